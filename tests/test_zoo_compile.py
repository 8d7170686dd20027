"""The whole pipeline on a torchvision subset that covers every construct compile() must handle.

What ``tools/sweep_torchvision.py`` checks on all 80 models at their default resolution, here on a
representative subset at small resolutions (or small configurations of the same classes where the
architecture fixes its input size): compile at 50% of MACs -> the band holds -> MACs recounted on
the pruned model equal the reported ones -> the pruned model runs at a batch size different from
the example's -> ONNX export with a dynamic batch matches PyTorch through onnxruntime.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import PostconditionError
from fxprune.export import onnx_parity

tvm = pytest.importorskip("torchvision.models")


def _vit() -> nn.Module:
    return tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                 mlp_dim=128, num_classes=10)


def _swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10)


def _maxvit() -> nn.Module:
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(64, 64), stem_channels=16, partition_size=4, block_channels=[32, 64],
                  block_layers=[1, 1], head_dim=16, stochastic_depth_prob=0.0, num_classes=10)


def _tv(name: str) -> Callable[[], nn.Module]:
    return lambda: tvm.get_model(name, weights=None, num_classes=10)


# name -> (builder, input size, the constructs it covers)
SUBSET: dict[str, tuple[Callable[[], nn.Module], int, str]] = {
    "resnet18": (_tv("resnet18"), 64, "residual add"),
    "densenet121": (_tv("densenet121"), 64, "concat"),
    "googlenet": (lambda: tvm.googlenet(weights=None, num_classes=10, aux_logits=False, init_weights=True), 64,
                  "concat of branches"),
    "shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), 64, "split/chunk, channel shuffle"),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), 64, "depthwise, squeeze-excite"),
    "regnet_y_400mf": (_tv("regnet_y_400mf"), 64, "grouped conv, squeeze-excite"),
    "mnasnet0_5": (_tv("mnasnet0_5"), 64, "depthwise"),
    "alexnet": (_tv("alexnet"), 64, "flatten -> linear"),
    "convnext_tiny": (_tv("convnext_tiny"), 64, "permute + LayerNorm, layer scale"),
    "vit": (_vit, 32, "attention heads (nn.MultiheadAttention), MLP, class token"),
    "swin": (_swin, 64, "window attention, relative position bias, patch merging"),
    "maxvit": (_maxvit, 64, "MBConv + window/grid attention reshaped to the block input's shape"),
}


@pytest.mark.parametrize("name", list(SUBSET))
def test_compile_at_half_the_macs(name, tmp_path):
    builder, size, _ = SUBSET[name]
    torch.manual_seed(0)
    model = builder().eval()
    x = torch.randn(1, 3, size, size)
    res = fxprune.compile(model, (x,), mac_budget="50%")
    budget = res.report.budget_macs
    assert budget * 0.99 <= res.macs <= budget, (res.macs, budget)
    assert res.macs == fxprune.count_macs(res.model, (x,))
    assert res.macs < res.base_macs and res.params < res.base_params
    res.model.eval()
    with torch.no_grad():
        y = res.model(torch.randn(3, 3, size, size))
    assert tuple(y.shape) == (3, 10)
    proto = res.export_onnx(str(tmp_path / f"{name}.onnx"))
    par = onnx_parity(res.model, (x,), proto, batch_sizes=(1, 2))
    assert par.ok, par


def test_an_inconsistent_rewrite_is_a_postcondition_error_naming_the_node(monkeypatch):
    """Without tracking sizes read off other tensors, MaxViT's rewrite goes stale: building that
    candidate must blame the rewrite at the failing node, not the user's example inputs (compile
    heals it: see tests/test_heal.py)."""
    import numpy as np

    import fxprune.opset._base as base
    from fxprune._compile import open_session

    monkeypatch.setattr(base, "shape_source", lambda s: None)
    torch.manual_seed(0)
    session = open_session(_maxvit().eval(), (torch.randn(1, 3, 64, 64),))
    # the blocks' residual channels pruned: the attention's reshape back to the block input's
    # x.shape[-1] (read off another tensor) goes stale
    keep = np.array([g.n // 2 if g.name.endswith("MBconv.proj.1") else g.n for g in session.graph.groups])
    with pytest.raises(PostconditionError, match=r"no longer runs, at node 'reshape_\d+'") as info:
        session.materialize(keep)
    assert "example_inputs" not in str(info.value) and "ignore=" in str(info.value)
