"""Rules the Hugging Face sweep asked for, each on the smallest model that shows it.

* in-place elementwise ATen ops (``hidden_state += residual`` is ``aten.add_``) tie the residual
  stream instead of freezing it;
* a relative-position table gathered by a tensor index keeps its heads column with the heads;
* attention written with matmuls (heads folded into the batch, DeBERTa) is pruned by whole heads;
* layers written as matmuls on their weight (``x @ W.t()``) produce channels;
* a frozen projection viewed as heads keeps its heads frozen;
* a constant-size factory tensor that follows the heads (Bloom's ALiBi slopes) is sliced with them;
* image/audio sizes stay symbolic where the model allows it, and fixed (with a note) where not.

Every pruning check runs the equivalence oracle: the pruned model equals the original with the
pruned channels zeroed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune._export import META_DYNAMIC_DIMS
from fxprune.capture import capture
from fxprune.dynamic_sizes import META_SIZE_PROBE
from fxprune.passes.dependency_groups import DependencyGroupsAnalysis
from fxprune.passes.shape_prop import ShapePropPass
from fxprune.testing.equivalence import check_equivalence, prune_with_units, random_plan
from fxprune.testing.timm_cases import randomize_constant_tensors


def _analyse(model, inputs, method="export"):
    cap = capture(model, inputs, method=method)
    ShapePropPass(cap.inputs)(cap.gm)
    return cap, DependencyGroupsAnalysis().run(cap.gm)


def _oracle(cap, graph, plans=3, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(plans):
        check_equivalence(cap.gm, graph, random_plan(graph, rng), cap.inputs, atol=1e-4)


def _half(graph, group):
    return {group.id: np.arange(0, group.n, 2)}


# ------------------------------------------------------------------------------ in-place ops

class InplaceResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        h = self.c2(F.relu(self.c1(x)))
        h += x  # aten.add_: the residual stream
        h = F.relu_(h)  # aten.relu_
        if h.shape[-1] > 1:  # a shape branch: torch.fx cannot trace this, torch.export can
            h = h.mean((2, 3))
        return self.head(h)


def test_inplace_add_ties_the_residual_stream():
    torch.manual_seed(0)
    cap, graph = _analyse(InplaceResidual().eval(), torch.randn(2, 3, 8, 8))
    targets = {str(n.target) for n in cap.gm.graph.nodes}
    assert "aten.add_.Tensor" in targets and "aten.relu_.default" in targets
    members = {frozenset(g.members) for g in graph.groups}
    assert frozenset({"stem", "c2", "c1", "head"}) in members  # stem and c2 write one stream
    assert frozenset({"c1", "c2"}) in members
    assert [f.reasons for f in graph.frozen] == [("model output",)]
    _oracle(cap, graph)


def test_hf_resnet_residual_channels_are_prunable():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    model = randomize_constant_tensors(transformers.ResNetModel(cfg).eval())
    cap, graph = _analyse(model, torch.randn(2, 3, 32, 32))
    assert not any("add_" in r for f in graph.frozen for r in f.reasons), graph.frozen
    residual = [g for g in graph.groups if any("shortcut" in m for m in g.members)]
    assert residual, [g.members for g in graph.groups]
    _oracle(cap, graph)


# ------------------------------------------------------------- gathered relative-position tables

class RelPosAttention(nn.Module):
    """Swin-style attention: a per-head bias gathered from a table by a constant index."""

    def __init__(self, dim=32, heads=4, window=3):
        super().__init__()
        self.heads, self.hd, n = heads, dim // heads, window * window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        self.register_buffer("index", torch.randint(0, (2 * window - 1) ** 2, (n, n)))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        attn = (q @ k.transpose(-2, -1)) * self.hd ** -0.5 + bias.unsqueeze(0)
        out = attn.softmax(-1) @ v
        if n > 1:
            out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


def test_relative_position_table_follows_the_heads():
    torch.manual_seed(0)
    model = RelPosAttention().eval()
    cap, graph = _analyse(model, torch.randn(2, 9, 32))
    heads = [g for g in graph.groups if g.kind == "heads"]
    assert len(heads) == 1 and heads[0].n == 4 and heads[0].unit == 3 * 8  # fused q, k, v rows
    assert "table" in heads[0].members
    _oracle(cap, graph)
    pruned = prune_with_units(cap.gm, graph, {heads[0].id: np.array([1, 3])}, cap.inputs)
    assert tuple(pruned.table.shape) == (25, 2)  # each kept head gathers its own column
    assert pruned.qkv.out_features == 3 * 2 * 8


def test_hf_swin_heads_are_pruned_with_their_bias_table():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(image_size=16, patch_size=4, embed_dim=16, depths=[2], num_heads=[2],
                                  window_size=2)
    model = randomize_constant_tensors(transformers.SwinModel(cfg).eval())
    cap, graph = _analyse(model, torch.randn(2, 3, 16, 16))
    heads = [g for g in graph.groups if g.kind == "heads"]
    assert len(heads) == 2, [(g.name, g.kind) for g in graph.groups]
    for g in heads:
        assert any("relative_position" in m for m in g.members), g.members
    assert not any("gathered" in r for f in graph.frozen for r in f.reasons)
    _oracle(cap, graph)


# --------------------------------------------------------------------- whole heads with matmuls

class FoldedHeads(nn.Module):
    """DeBERTa-style attention: heads folded into the batch (``[B*H, L, D]``) for ``bmm``; the
    head count is a literal and the head dim is the ``-1`` of the split."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def split(self, x):
        b, n, _ = x.shape
        x = x.view(b, n, self.heads, -1).permute(0, 2, 1, 3).contiguous()
        return x.view(-1, n, x.size(-1))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = torch.bmm(q, k.transpose(-1, -2) / math.sqrt(q.size(-1)))
        probs = scores.view(-1, self.heads, n, n).softmax(-1).view(-1, n, n)
        ctx = torch.bmm(probs, v).view(-1, self.heads, n, v.size(-1)).permute(0, 2, 1, 3).contiguous()
        if n > 1:
            ctx = ctx.view(b, n, -1)
        return self.out(ctx)


def test_folded_heads_are_pruned_whole():
    torch.manual_seed(0)
    cap, graph = _analyse(FoldedHeads().eval(), torch.randn(2, 6, 32))
    heads = [g for g in graph.groups if g.kind == "heads"]
    assert len(heads) == 1
    h = heads[0]
    assert h.n == 4 and h.unit == 8 and set(h.members) == {"q", "k", "v", "out"}
    _oracle(cap, graph)
    pruned = prune_with_units(cap.gm, graph, {h.id: np.array([0, 2, 3])}, cap.inputs)
    with torch.no_grad():  # the folded [B*H] follows any batch size
        for batch in (1, 3):
            assert pruned(torch.randn(batch, 5, 32)).shape == (batch, 5, 32)


@pytest.mark.parametrize("relative", [False, True])
def test_deberta_v2_heads_are_pruned_whole(relative):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    extra = dict(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8) if relative else {}
    cfg = transformers.DebertaV2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=48, max_position_embeddings=32, **extra)
    model = randomize_constant_tensors(transformers.DebertaV2Model(cfg).eval())
    ids = torch.randint(3, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, -2:] = 0
    cap, graph = _analyse(model, {"input_ids": ids, "attention_mask": mask}, method="auto")
    heads = [g for g in graph.groups if g.kind == "heads"]
    assert len(heads) == 1, [(g.name, g.kind, g.n, g.unit) for g in graph.groups]
    p = "encoder.layer.0.attention"
    assert heads[0].n == 4 and heads[0].unit == 8
    assert {f"{p}.self.query_proj", f"{p}.self.key_proj", f"{p}.self.value_proj", f"{p}.output.dense"} <= \
        set(heads[0].members)
    _oracle(cap, graph, plans=2)
    pruned = prune_with_units(cap.gm, graph, {heads[0].id: np.array([1, 2])}, cap.inputs)
    with torch.no_grad():
        for batch, seq in ((1, 10), (3, 7)):
            out = pruned(input_ids=torch.randint(3, 64, (batch, seq)),
                         attention_mask=torch.ones(batch, seq, dtype=torch.long))
            assert out.last_hidden_state.shape == (batch, seq, 32)


# ------------------------------------------------------------- layers written as matmuls, others

class MatmulLayers(nn.Module):
    """Falcon-style ``x @ W.T + b`` layers and GPT-2-style ``addmm(b, x, W)`` (weight ``[in, out]``)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(24, 8) * 0.3)
        self.b1 = nn.Parameter(torch.randn(24) * 0.1)
        self.w2 = nn.Parameter(torch.randn(24, 16) * 0.3)
        self.b2 = nn.Parameter(torch.randn(16) * 0.1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h = F.gelu(x @ self.w1.t() + self.b1)
        h = torch.addmm(self.b2, h.view(-1, 24), self.w2)
        if h.shape[0] > 1:
            h = torch.tanh(h)
        return self.fc(h)


def test_layers_written_as_matmuls_produce_channels():
    torch.manual_seed(0)
    cap, graph = _analyse(MatmulLayers().eval(), torch.randn(3, 8))
    sizes = sorted(g.n for g in graph.groups)
    assert sizes == [16, 24], [(g.name, g.n, g.members) for g in graph.groups]
    _oracle(cap, graph)


class FrozenProjectionHeads(nn.Module):
    """ConvBERT-like: the query also feeds an op without a rule (frozen), the key does not; heads
    tied through ``q @ k^T`` must then stay whole on both sides."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, c = x.shape
        q = self.q(x)
        side = torch.special.i0(q).sum()  # no rule for i0: q's channels are frozen
        q, k, v = (t.view(b, n, -1, c // self.heads).transpose(1, 2) for t in (q, self.k(x), self.v(x)))
        a = (q @ k.transpose(-1, -2)).softmax(-1) @ v
        if n > 1:
            a = a.transpose(1, 2).reshape(b, n, c)
        return self.o(a) + side


def test_heads_of_a_frozen_projection_stay_frozen():
    torch.manual_seed(0)
    cap, graph = _analyse(FrozenProjectionHeads().eval(), torch.randn(2, 5, 16))
    assert not [g for g in graph.groups if g.kind == "heads"]
    _oracle(cap, graph)


class AlibiLike(nn.Module):
    """Per-head slopes built from ``arange(1, heads + 1)`` bias the scores (Bloom's ALiBi)."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        slopes = 2.0 ** (-torch.arange(1, self.heads + 1, dtype=torch.float32))
        pos = torch.arange(n, dtype=torch.float32)
        bias = slopes[:, None, None] * (pos[None, None, :] - pos[None, :, None])
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        a = ((q @ k.transpose(-1, -2)) + bias).softmax(-1) @ v
        if n > 1:
            a = a.transpose(1, 2).reshape(b, n, c)
        return self.o(a)


def test_constant_size_factory_follows_the_heads():
    torch.manual_seed(0)
    cap, graph = _analyse(AlibiLike().eval(), torch.randn(2, 6, 16))
    heads = [g for g in graph.groups if g.kind == "heads"]
    assert len(heads) == 1 and heads[0].n == 4
    _oracle(cap, graph)
    pruned = prune_with_units(cap.gm, graph, {heads[0].id: np.array([0, 3])}, cap.inputs)
    with torch.no_grad():
        assert pruned(torch.randn(3, 7, 16)).shape == (3, 7, 16)


# ------------------------------------------------------------------------------ symbolic sizes

class PadToWindows(nn.Module):
    """A Swin-like size branch: pad to whole windows only when needed, crop back afterwards."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 4, stride=4)
        self.up = nn.ConvTranspose2d(8, 8, 4, stride=4)

    def forward(self, x):
        h, w = x.shape[-2:]
        y = F.relu(self.conv(x))
        ph, pw = (4 - h % 4) % 4, (4 - w % 4) % 4
        if ph or pw:
            y = F.pad(y, (0, pw, 0, ph))
        y = self.up(F.relu(self.mix(y)))
        if ph or pw:
            y = y[:, :, :h, :w]
        return y


def test_size_branch_is_recaptured_at_an_irregular_size_and_stays_dynamic(tmp_path):
    torch.manual_seed(0)
    model = PadToWindows().eval()
    x = torch.randn(2, 3, 16, 16)  # 16 needs no padding: the example's branch has no pad and no crop
    cap = capture(model, x)
    assert cap.method == "export"
    assert cap.gm.meta[META_DYNAMIC_DIMS] == {"x": [0, 2, 3]}
    assert any("size-dependent branch" in n and "captured again" in n for n in cap.notes), cap.notes
    with torch.no_grad():
        for size in ((13, 13), (16, 20), (9, 14)):  # sizes that need padding, and non-square ones
            z = torch.randn(1, 3, *size)
            torch.testing.assert_close(cap.gm(z), model(z))
    res = fxprune.compile(model, x, mac_budget="60%", tolerance=0.3)
    proto = res.export_onnx(str(tmp_path / "m.onnx"))
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    from fxprune.export import onnx_parity

    parity = onnx_parity(res.model, torch.randn(1, 3, 13, 18), tmp_path / "m.onnx", batch_sizes=(2,))
    assert parity.ok, parity.summary()


def test_a_recapture_that_pads_where_the_model_does_not_is_refused():
    """HF FocalNet pads to a multiple of the patch (``if w % 4: pad(4 - w % 4)``, per stage). At
    64 px no stage pads, the 64 px graph fails at 48 px (a stage pads there), and the graph captured
    at 81 px pads ``4 - w % 4`` unconditionally: right outputs at 64 px (later strides drop the
    padding) but 24% more MACs, which made the budget one of a model the user does not have."""
    transformers = pytest.importorskip("transformers")
    from fxprune.testing.hf_cases import independent_macs

    cfg = transformers.FocalNetConfig(image_size=64, embed_dim=16, depths=[1, 1, 1, 1], focal_levels=[2] * 4,
                                      focal_windows=[3] * 4)
    torch.manual_seed(0)
    model = transformers.FocalNetModel(cfg).eval()
    x = {"pixel_values": torch.randn(2, 3, 64, 64)}
    cap = capture(model, x)
    assert fxprune.count_macs(cap.gm, x) == independent_macs(model, x) == 8_039_424
    note = next(n for n in cap.notes if "specialised to 64x64" in n)
    assert "more work than the model at 64x64" in note, note
    with torch.no_grad():
        torch.testing.assert_close(cap.gm(**x).last_hidden_state, model(**x).last_hidden_state)


class FixedGrid(nn.Module):
    """A ViT-like model: a position table for one grid, so one image size only (checked, like
    transformers' ViT does)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(1, 16, 8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        if x.shape[-2:] != (16, 16):
            raise ValueError(f"Input image size ({x.shape[-2]}*{x.shape[-1]}) doesn't match model (16*16).")
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.fc(t.mean(1))


def test_a_model_with_one_image_size_keeps_it_with_a_note(tmp_path):
    torch.manual_seed(0)
    cap = capture(FixedGrid().eval(), torch.randn(2, 3, 16, 16))
    assert cap.gm.meta[META_DYNAMIC_DIMS] == {"x": [0]}
    assert any(n.startswith("height/width fixed at 16x16") for n in cap.notes), cap.notes
    res = fxprune.compile(FixedGrid().eval(), torch.randn(2, 3, 16, 16), mac_budget="70%", tolerance=0.3)
    proto = res.export_onnx(str(tmp_path / "f.onnx"))
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 16, 16]


class AudioConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(1, 8, 5, stride=2)
        self.c2 = nn.Conv1d(8, 8, 3, stride=2)

    def forward(self, wav):
        if wav.dim() == 2:  # not traceable by torch.fx
            wav = wav[:, None]
        return self.c2(F.gelu(self.c1(wav))).transpose(1, 2)


def test_audio_length_is_dynamic():
    torch.manual_seed(0)
    model = AudioConv().eval()
    cap = capture(model, torch.randn(2, 100))
    assert cap.gm.meta[META_DYNAMIC_DIMS] == {"wav": [0, 1]}
    assert cap.gm.meta[META_SIZE_PROBE] == {"wav": {1: 99}}
    z = torch.randn(3, 157)
    with torch.no_grad():
        torch.testing.assert_close(cap.gm(z), model(z))


def test_fx_models_export_dynamic_height_and_width(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    res = fxprune.compile(torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32), mac_budget="50%")
    assert res.original is not None
    proto = res.export_onnx(str(tmp_path / "r.onnx"))
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["fxprune.example_sizes"] == '{"height": 32, "width": 32}'  # what fxprune bench feeds
    from fxprune.export import onnx_parity

    parity = onnx_parity(res.model, torch.randn(1, 3, 48, 40), tmp_path / "r.onnx", batch_sizes=(2,))
    assert parity.ok, parity.summary()
