"""Tests of fxprune.export: ONNX export with a dynamic batch, onnx.checker and ONNX Runtime parity."""

from __future__ import annotations

import copy
import errno
import os
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx
import torchvision.models as tvm
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer

import fxprune.export as export_mod
from fxprune.capture import capture
from fxprune.errors import ExportError
from fxprune.export import ParityResult, assert_onnx_parity, export_onnx, onnx_parity
from fxprune.serialization import load, save

MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet18": (lambda: tvm.resnet18(num_classes=10), (1, 3, 32, 32)),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(num_classes=10), (1, 3, 32, 32)),
    "shufflenet_v2_x0_5": (lambda: tvm.shufflenet_v2_x0_5(num_classes=10), (1, 3, 32, 32)),
    "convnext_like": (
        lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], stochastic_depth_prob=0.3,
                         num_classes=10),
        (1, 3, 32, 32)),
    "vit_tiny": (
        lambda: tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                      mlp_dim=64, dropout=0.1, num_classes=10),
        (1, 3, 32, 32)),
    "swin_tiny": (
        lambda: SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4],
                                window_size=[4, 4], num_classes=10),
        (1, 3, 64, 64)),
}


def calibrated_capture(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """Capture ``model`` with O(1) outputs (constant-initialised parameters perturbed, BatchNorm
    statistics from one random batch), so that parity compares meaningful numbers."""
    torch.manual_seed(seed)
    x = torch.randn(*shape)
    gm = capture(model, x).gm
    with torch.no_grad():
        for p in gm.parameters():
            if bool((p == p.flatten()[0]).all()):
                p.add_(0.1 * torch.randn_like(p))
        bns = [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        gm.train()
        gm(torch.randn(8, *shape[1:]))
        for m in bns:
            m.momentum = 0.1
    gm.eval()
    return gm, x


@pytest.fixture(scope="module")
def captured() -> Callable[[str], tuple[torch.fx.GraphModule, torch.Tensor]]:
    cache: dict[str, tuple[torch.fx.GraphModule, torch.Tensor]] = {}

    def get(name: str) -> tuple[torch.fx.GraphModule, torch.Tensor]:
        if name not in cache:
            builder, shape = MODELS[name]
            torch.manual_seed(0)  # the same weights whatever ran before on this worker
            cache[name] = calibrated_capture(builder(), shape)
        return cache[name]

    return get


def dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


# ------------------------------------------------------------------------ captured models

@pytest.mark.parametrize("name", list(MODELS))
def test_export_checker_and_parity_at_two_batch_sizes(name, captured, tmp_path):
    gm, x = captured(name)
    gm.train()
    try:
        proto = export_onnx(gm, x, tmp_path / f"{name}.onnx")
    finally:
        was_training = gm.training
        gm.eval()
    assert was_training, "export must not leave the caller's model in eval mode"
    assert (tmp_path / f"{name}.onnx").is_file()
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["x"]
    assert [o.name for o in proto.graph.output] == ["output"]
    assert dims(proto.graph.input[0])[0] == "batch" and dims(proto.graph.output[0])[0] == "batch"
    result = assert_onnx_parity(gm, x, tmp_path / f"{name}.onnx", batch_sizes=(1, 3))
    assert result.ok and result.batch_sizes == (1, 3)
    assert [(c.name, c.batch_size, c.shape) for c in result.checks] == [("output", 1, (1, 10)), ("output", 3, (3, 10))]
    with torch.no_grad():
        scale = max(1.0, float(gm(x).abs().max()))
    assert result.max_abs_err["output"] < 1e-4 * scale  # float32 rounding, relative to the output's size


def test_export_restores_each_modules_own_mode(captured):
    gm, x = captured("resnet18")
    gm.train()
    gm.layer1.eval()
    flags = [m.training for m in gm.modules()]
    try:
        export_onnx(gm, x, check=False)
        assert [m.training for m in gm.modules()] == flags
    finally:
        gm.eval()


def test_loaded_fxp_model_exports(captured, tmp_path):
    gm, x = captured("vit_tiny")
    save(gm, tmp_path / "vit.fxp")
    loaded = load(tmp_path / "vit.fxp")
    proto = export_onnx(loaded, x)
    assert onnx_parity(gm, x, proto, batch_sizes=(2,)).ok


# ------------------------------------------------------------------------ axes and names

class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.proj(self.embed(input_ids)) * attention_mask.unsqueeze(-1)
        return {"hidden": h, "pooled": h.sum(dim=1) / attention_mask.sum(dim=1, keepdim=True)}


def test_extra_dynamic_axes_and_keyword_inputs(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.int64)
    gm = capture(TokenModel(), {"input_ids": ids, "attention_mask": mask}).gm
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {1: "sequence"}, "hidden": {1: "sequence"}}
    proto = export_onnx(gm, {"input_ids": ids, "attention_mask": mask}, tmp_path / "tok.onnx", dynamic_axes=axes)
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in proto.graph.output] == ["hidden", "pooled"]
    assert dims(proto.graph.input[0]) == ["batch", "sequence"]
    assert dims(proto.graph.input[1]) == ["batch", "sequence"]
    assert dims(proto.graph.output[0]) == ["batch", "sequence", 16]
    session = ort.InferenceSession(str(tmp_path / "tok.onnx"), providers=["CPUExecutionProvider"])
    for batch, seq in [(1, 5), (3, 11)]:
        ids_b = torch.randint(0, 50, (batch, seq))
        mask_b = torch.ones(batch, seq, dtype=torch.int64)
        got = session.run(None, {"input_ids": ids_b.numpy(), "attention_mask": mask_b.numpy()})
        with torch.no_grad():
            want = gm(ids_b, mask_b)
        np.testing.assert_allclose(got[0], want["hidden"].numpy(), atol=1e-5)
        np.testing.assert_allclose(got[1], want["pooled"].numpy(), atol=1e-5)
    result = onnx_parity(gm, {"input_ids": ids, "attention_mask": mask}, proto, batch_sizes=(1, 4))
    assert result.ok and set(result.max_abs_err) == {"hidden", "pooled"}


def test_unknown_dynamic_axes_name_is_an_export_error():
    gm = torch.fx.symbolic_trace(Mlp())
    with pytest.raises(ExportError, match="'tokens'.*Inputs: \\['x'\\]; outputs: \\['output'\\]"):
        export_onnx(gm, torch.randn(2, 8), dynamic_axes={"tokens": {1: "seq"}})


def test_static_batch_is_caught_by_parity():
    gm = torch.fx.symbolic_trace(Mlp())
    x = torch.randn(1, 8)
    proto = export_onnx(gm, x, dynamic_batch=False)
    assert dims(proto.graph.input[0]) == [1, 8]
    assert onnx_parity(gm, x, proto, batch_sizes=(1,)).ok
    with pytest.raises(ExportError, match="batch size 3.*dynamic_batch=True"):
        onnx_parity(gm, x, proto, batch_sizes=(1, 3))


# ------------------------------------------------------------------------ failures

class Eigvals(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvals(x).real


def test_unsupported_operator_is_an_export_error():
    gm = torch.fx.symbolic_trace(Eigvals())
    with pytest.raises(ExportError) as info:
        export_onnx(gm, torch.randn(1, 4, 4), exporter="torchscript")
    message = str(info.value)
    assert "torchscript export" in message and "linalg_eigvals" in message
    assert info.value.__cause__ is not None


def test_falls_back_to_the_dynamo_exporter(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated TorchScript exporter failure")

    monkeypatch.setitem(export_mod._EXPORT_FUNCS, "torchscript", broken)
    gm = torch.fx.symbolic_trace(Mlp())
    x = torch.randn(1, 8)
    proto = export_onnx(gm, x, tmp_path / "mlp.onnx")
    assert dims(proto.graph.input[0])[0] == "batch"  # a batch of 1 was not specialised
    assert assert_onnx_parity(gm, x, tmp_path / "mlp.onnx", batch_sizes=(1, 5)).ok
    with pytest.raises(ExportError, match="simulated TorchScript exporter failure"):
        export_onnx(gm, x, exporter="torchscript")


def test_a_full_disk_is_reported_as_such_and_other_exporters_are_not_tried(monkeypatch, tmp_path):
    calls = []

    def disk_full(model, spec, file, opset):
        calls.append("torchscript")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        except OSError as err:  # exporters wrap the write error in their own
            raise RuntimeError("serialization failed") from err

    def dynamo(*args, **kwargs):
        calls.append("dynamo")

    monkeypatch.setitem(export_mod._EXPORT_FUNCS, "torchscript", disk_full)
    monkeypatch.setitem(export_mod._EXPORT_FUNCS, "dynamo", dynamo)
    target = tmp_path / "mlp.onnx"
    target.write_bytes(b"previous")
    gm = torch.fx.symbolic_trace(Mlp())
    with pytest.raises(ExportError) as info:
        export_onnx(gm, torch.randn(1, 8), target)
    message = str(info.value)
    assert "No space left on device" in message and str(tmp_path) in message, message
    assert "operator is unsupported" not in message
    assert calls == ["torchscript"]  # the next exporter would hit the same disk
    assert isinstance(info.value.__cause__, OSError)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["mlp.onnx"]  # no private directory left behind


def test_checker_failure_names_the_step(monkeypatch):
    def reject(*args, **kwargs):
        raise onnx.checker.ValidationError("simulated checker failure")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    gm = torch.fx.symbolic_trace(Mlp())
    with pytest.raises(ExportError, match="onnx.checker: ValidationError: simulated checker failure"):
        export_onnx(gm, torch.randn(1, 8), exporter="torchscript")
    export_onnx(gm, torch.randn(1, 8), exporter="torchscript", check=False)


def test_model_failing_on_its_inputs_and_bad_arguments():
    gm = torch.fx.symbolic_trace(Mlp())
    with pytest.raises(ExportError, match="fails on its example inputs"):
        export_onnx(gm, torch.randn(1, 7))
    with pytest.raises(ExportError, match="unknown exporter"):
        export_onnx(gm, torch.randn(1, 8), exporter="tvm")
    with pytest.raises(ExportError, match="not inputs of the model"):
        export_onnx(gm, {"y": torch.randn(1, 8)})


def test_parity_mismatch_reports_the_numbers():
    gm = torch.fx.symbolic_trace(Mlp())
    x = torch.randn(1, 8)
    proto = export_onnx(gm, x)
    other = copy.deepcopy(gm)
    with torch.no_grad():
        other.fc.bias.add_(0.5)
    result = onnx_parity(other, x, proto)
    assert isinstance(result, ParityResult) and not result.ok
    assert result.max_abs_err["output"] > 0.1 and result.max_rel_err["output"] > 0.1
    with pytest.raises(ExportError, match=r"differ from PyTorch[\s\S]*max abs err"):
        assert_onnx_parity(other, x, proto)


def test_parity_tolerance_follows_the_output_scale():
    """Float32 error grows with the output's magnitude: near-zero elements of a large output pass,
    a shift that is large for the output's scale still fails."""
    from fxprune.export import _compare

    want = np.array([1000.0, -800.0, 0.01], dtype=np.float32)
    rounding = want + np.array([6e-4, -5e-4, 5e-4], dtype=np.float32)  # ~1 ulp of 1000 on every element
    assert _compare("y", 1, rounding, want, 1e-4, 1e-3).ok
    assert not _compare("y", 1, want + np.float32(0.5), want, 1e-4, 1e-3).ok
    small = np.array([1.0, -0.8, 0.01], dtype=np.float32)
    assert not _compare("y", 1, small + np.float32(5e-4), small, 1e-4, 1e-3).ok  # scale 1: atol as given


class _AntialiasedPosEmbed(nn.Module):
    """A parameter resized to the input's height and width with antialiasing (timm's Hiera
    position embeddings): ``aten::_upsample_{bicubic,bilinear}2d_aa`` in the trace."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.pos = nn.Parameter(torch.randn(1, 4, 14, 14))
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        pos = nn.functional.interpolate(self.pos, size=(x.shape[2], x.shape[3]), mode=self.mode, antialias=True)
        return self.conv(x) + pos


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_antialiased_resize_exports_as_onnx_resize_and_matches_at_other_sizes(mode, tmp_path):
    torch.manual_seed(0)
    model = _AntialiasedPosEmbed(mode).eval()
    x = torch.randn(1, 3, 20, 24)
    axes = {"x": {0: "batch", 2: "height", 3: "width"}}
    proto = export_onnx(model, (x,), tmp_path / "aa.onnx", dynamic_axes=axes, exporter="torchscript")
    resize = [n for n in proto.graph.node if n.op_type == "Resize"]
    assert resize and all({a.name: a.i for a in r.attribute}.get("antialias") == 1 for r in resize)
    session = ort.InferenceSession(str(tmp_path / "aa.onnx"), providers=["CPUExecutionProvider"])
    name = proto.graph.input[0].name
    for shape in [(1, 3, 20, 24), (2, 3, 9, 30), (1, 3, 14, 14), (2, 3, 40, 8)]:  # down- and upsampling
        xb = torch.randn(*shape)
        with torch.no_grad():
            want = model(xb).numpy()
        np.testing.assert_allclose(session.run(None, {name: xb.numpy()})[0], want, atol=1e-4)
