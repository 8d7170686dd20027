"""FuseProjectionsPass: the q/k/v projections capture split are packed back after the rewrite."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
from fxprune._compile import open_session
from fxprune.capture import capture
from fxprune.export import assert_onnx_parity, export_onnx
from fxprune.passes.fuse_projections import FuseProjectionsPass
from fxprune.passes.shape_prop import ShapePropPass
from fxprune.testing.equivalence import prune_with_units

HIDDEN, HEADS, LAYERS = 32, 4, 2


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=LAYERS, num_heads=HEADS,
                                                 hidden_dim=HIDDEN, mlp_dim=64, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision starts the head at zero
    return model, torch.randn(2, 3, 32, 32)


def _split_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.split]


def test_unpruned_capture_is_packed_and_equal_to_the_original(vit):
    model, x = vit
    session = open_session(model, (x,))
    assert "q_proj" in dict(session.gm.named_modules())["encoder.layers.encoder_layer_0.self_attention"]._modules
    deployed = session.deployed_original()
    for i in range(LAYERS):
        attn = deployed.get_submodule(f"encoder.layers.encoder_layer_{i}.self_attention")
        assert isinstance(attn.in_proj, nn.Linear) and attn.in_proj.out_features == 3 * HIDDEN
        assert not hasattr(attn, "q_proj") and not hasattr(attn, "k_proj") and not hasattr(attn, "v_proj")
        mha = model.encoder.layers[i].self_attention
        torch.testing.assert_close(attn.in_proj.weight, mha.in_proj_weight)
        torch.testing.assert_close(attn.in_proj.bias, mha.in_proj_bias)
    assert len(_split_nodes(deployed)) == LAYERS
    assert not [n for n in deployed.graph.nodes if n.op == "call_module" and str(n.target).endswith("q_proj")]
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), atol=1e-5, rtol=1e-5)
    # a MAC budget at or above the original returns the packed model too
    res = fxprune.compile(model, (x,), mac_budget=1.0)
    assert len(_split_nodes(res.model)) == LAYERS and res.macs == res.base_macs


def test_pruned_model_is_packed_counts_right_and_matches_the_unpacked_rewrite(vit, tmp_path):
    model, x = vit
    res = fxprune.compile(model, (x,), mac_budget="50%")
    session = open_session(model, (x,))
    keep = [res.keep.get(g.id, g.n) for g in session.graph.groups]
    unpacked = prune_with_units(session.gm, session.graph, session.units(keep), session.captured.inputs)
    assert "q_proj" in dict(unpacked.named_modules())["encoder.layers.encoder_layer_0.self_attention"]._modules
    for i in range(LAYERS):
        path = f"encoder.layers.encoder_layer_{i}.self_attention"
        attn, ref = res.model.get_submodule(path), unpacked.get_submodule(path)
        sizes = [ref.q_proj.out_features, ref.k_proj.out_features, ref.v_proj.out_features]
        assert attn.in_proj.out_features == sum(sizes) and attn.in_proj.in_features == ref.q_proj.in_features
        torch.testing.assert_close(attn.in_proj.weight, torch.cat([ref.q_proj.weight, ref.k_proj.weight,
                                                                   ref.v_proj.weight]))
    assert len(_split_nodes(res.model)) == LAYERS
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), unpacked(x), atol=1e-5, rtol=1e-5)
    assert fxprune.count_macs(res.model, x) == res.macs == fxprune.count_macs(unpacked, x)
    # saves, loads and exports to ONNX like any pruned model
    path = tmp_path / "vit.fxp"
    fxprune.save(res.model, path)
    loaded = fxprune.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), res.model(x))
    assert_onnx_parity(res.model, (x,), export_onnx(res.model, (x,)), batch_sizes=(1, 3))
    # fine-tuning still works: gradients reach the packed projection
    res.model.train()
    res.model(x).sum().backward()
    attn = res.model.get_submodule("encoder.layers.encoder_layer_0.self_attention")
    assert attn.in_proj.weight.grad is not None and attn.in_proj.weight.grad.abs().sum() > 0


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, q, kv):
        return self.attn(q, kv, kv, need_weights=False)[0]


def test_cross_attention_and_disabled_pass_are_left_alone():
    torch.manual_seed(0)
    model = CrossAttention().eval()
    q, kv = torch.randn(1, 5, 16), torch.randn(1, 7, 16)
    cap = capture(model, (q, kv))
    ShapePropPass(cap.inputs)(cap.gm)
    gm = copy.deepcopy(cap.gm)
    assert FuseProjectionsPass()(gm).info["fused"] == 0  # q reads another tensor than k and v
    assert hasattr(gm.attn, "q_proj")
    vit_model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                                     hidden_dim=16, mlp_dim=32).eval()
    cap = capture(vit_model, (torch.randn(1, 3, 32, 32),))
    assert FuseProjectionsPass(enabled=False)(cap.gm).info["fused"] == 0
    assert not _split_nodes(cap.gm)


def test_projections_that_came_separate_keep_their_names():
    """Hugging Face attention has its own query/key/value layers: never renamed (HF-native results
    are rebuilt from the pruned graph's state dict)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    bert = transformers.BertModel(cfg).eval()
    ids = torch.randint(1, 50, (1, 8))
    res = fxprune.compile(bert, {"input_ids": ids, "attention_mask": torch.ones(1, 8, dtype=torch.long)},
                          mac_budget="60%")
    names = set(res.model.state_dict())
    assert {n for n in names if n.endswith("self.query.weight")} and not _split_nodes(res.model)
    assert not [n for n in names if "in_proj" in n]
