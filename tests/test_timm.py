"""timm models end to end: capture, MAC count vs an independent counter, dependency groups (heads
pruned whole), the equivalence oracle, compile to a budget, ONNX parity, and DeiT-Tiny at 0.62 GMACs.

Random weights only; small inputs where the model allows (CNNs at 96 px, ViT/DeiT at 64 px, Swin-T
at 64 px with 2x2 windows, LeViT at 128 px; see ``fxprune.testing.timm_cases``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

import fxprune  # noqa: E402
from fxprune.capture import capture  # noqa: E402
from fxprune.passes.dependency_groups import DependencyGroupsAnalysis  # noqa: E402
from fxprune.passes.shape_prop import ShapePropPass  # noqa: E402
from fxprune.testing.equivalence import check_equivalence, random_plan  # noqa: E402
from fxprune.testing.timm_cases import MODELS, ORACLE_INPUTS, oracle_model, reference_macs  # noqa: E402


def small(name):
    kwargs, size = ORACLE_INPUTS.get(name, ({}, 96))
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval(), torch.randn(1, 3, size, size), kwargs


@pytest.mark.parametrize("name", MODELS)
def test_count_macs_equals_flop_counter(name):
    """fxprune's analytical count == FlopCounterMode (autograd on, halved, non-fused attention)."""
    model, x, kwargs = small(name)
    assert fxprune.count_macs(model, x) == reference_macs(name, x, **kwargs)


# expected attention-head groups (heads pruned whole): ViT/DeiT 12 blocks; Swin-T 2+2+6+2 blocks;
# LeViT-128S 2+3+4 attention blocks and 2 attention downsamples
HEAD_GROUPS = {"deit_tiny_patch16_224": 12, "swin_tiny_patch4_window7_224": 12, "levit_128s": 11}
ORACLE_MODELS = ["resnet50d", "efficientnet_b0", "mobilenetv3_large_100", "convnext_nano", "regnetx_016",
                 "rexnet_100", "ghostnet_100", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
                 "levit_128s"]


@pytest.mark.parametrize("name", ORACLE_MODELS)
def test_groups_and_equivalence_oracle(name):
    """Only the classifier is frozen; random plans over the exact groups: pruned == masked original."""
    model, inputs = oracle_model(name)
    cap = capture(model, inputs)
    ShapePropPass(cap.inputs)(cap.gm)
    dg = DependencyGroupsAnalysis().run(cap.gm)
    assert len(dg.frozen) == 1 and dg.frozen[0].reasons == ("model output",), [
        (f.name, f.reasons) for f in dg.frozen]
    heads = [g for g in dg.groups if g.kind == "heads"]
    assert len(heads) == HEAD_GROUPS.get(name, 0)
    rng = np.random.default_rng(0)
    plan = random_plan(dg, rng)
    assert plan
    check_equivalence(cap.gm, dg, plan, cap.inputs, atol=1e-3)
    if heads:  # every attention layer loses at least one head at once
        plan = {g.id: np.sort(rng.choice(g.n, size=g.n - 1, replace=False)) for g in heads}
        check_equivalence(cap.gm, dg, plan, cap.inputs, atol=1e-3)


def test_capture_substitutes_on_a_copy_only():
    swin, x, _ = small("swin_tiny_patch4_window7_224")
    levit, y, _ = small("levit_128s")
    fused_before = [m.fused_attn for m in swin.modules() if hasattr(m, "fused_attn")]
    classes_before = [type(m) for m in levit.modules()]
    notes = capture(swin, x).notes + capture(levit, y).notes
    assert any("fused_attn switched on in 12" in n for n in notes)
    assert any("9 LeViT Attention modules" in n for n in notes)
    assert any("2 LeViT AttentionDownsample modules" in n for n in notes)
    assert [m.fused_attn for m in swin.modules() if hasattr(m, "fused_attn")] == fused_before
    assert [type(m) for m in levit.modules()] == classes_before


COMPILE_MODELS = ["regnetx_016", "ghostnet_100", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
                  "levit_128s", "convnextv2_atto"]


def test_convnext_v2_global_response_norm_leaves_the_mlp_widths_prunable():
    """GRN takes each channel's spatial L2 norm (``x.norm(p=2, dim=(1, 2))``): with no rule for it the
    MLP width of every block was frozen (12 groups), which left convnextv2_atto's latency floor at 51%
    of the original. Every group here is inexact (LayerNorm, GRN's channel mean), so no oracle."""
    model, inputs = oracle_model("convnextv2_atto")
    cap = capture(model, inputs)
    ShapePropPass(cap.inputs)(cap.gm)
    dg = DependencyGroupsAnalysis().run(cap.gm)
    assert len(dg.frozen) == 1 and dg.frozen[0].reasons == ("model output",), [
        (f.name, f.reasons) for f in dg.frozen]
    mlp = [g for g in dg.groups if any(m.endswith("mlp.grn") for m in g.members)]
    assert len(mlp) == 12 and all(not g.exact for g in mlp)  # depths 2, 2, 6, 2


@pytest.mark.parametrize("name", COMPILE_MODELS)
def test_compile_half_budget(name):
    """50%: in the band, recount == result, runs at batch 2; ONNX parity for the attention models."""
    model, x = oracle_model(name)
    # uniform on the attention models so that heads are certainly cut (global may keep 3 of 3 heads)
    res = fxprune.compile(model, x, mac_budget="50%", policy="uniform" if name in HEAD_GROUPS else "global")
    r = res.report
    assert r.lower_macs <= res.macs <= r.budget_macs
    assert fxprune.count_macs(res.model, x) == res.macs
    x2 = torch.randn(2, *x[0].shape[1:])
    with torch.no_grad():
        y = res.model(x2)
    assert y.shape[0] == 2 and torch.isfinite(y).all()
    if name in HEAD_GROUPS:
        assert any(g.kind == "heads" and g.keep < g.size for g in r.groups)
        from fxprune.export import onnx_parity

        par = onnx_parity(res.model, x, res.export_onnx(), batch_sizes=(1, 2))
        assert par.ok, par.summary()


def test_deit_tiny_at_agenticpruner_target():
    """DeiT-Tiny at AgenticPruner's 0.62 GMACs target lands in [0.6138e9, 0.62e9] (tolerance 1%)."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    res = fxprune.compile(model, x, mac_budget=0.62e9, tolerance=0.01)
    assert 0.6138e9 <= res.macs <= 0.62e9
    assert res.base_macs == 1_253_683_200
    assert fxprune.count_macs(res.model, x) == res.macs
    with torch.no_grad():
        assert res.model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)


def test_condconv_experts_are_pruned_with_the_batch_folded_into_the_groups():
    """timm's CondConv mixes expert weights per sample (``[B, out*in*k*k]`` viewed as
    ``[B*out, in, k, k]``) and folds the batch into the conv groups (``groups = C * B``). Output
    channels are pruned through the flattened expert dim, the in-dim of the split stays positional,
    and a computed group count keeps its batch factor: the pruned model runs at any batch size,
    without the self-healing compile having to freeze anything."""
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_cc_b0_4e", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    res = fxprune.compile(model, (x,), mac_budget="50%")
    r = res.report
    assert not r.healed
    assert r.lower_macs <= res.macs <= r.budget_macs
    assert fxprune.count_macs(res.model, x) == res.macs
    before = {n: p.shape for n, p in model.named_parameters() if p.dim() == 2 and n.endswith("conv_pw.weight")}
    after = dict(res.model.named_parameters())
    assert before and any(after[n].shape[1] < s[1] for n, s in before.items())  # expert weights [E, out*in]
    with torch.no_grad():
        xb = torch.randn(3, 3, 64, 64)
        assert res.model(xb).shape == (3, 1000)


@pytest.mark.parametrize("name,whole", [("regnetz_005", True), ("regnetz_b16_evos", False)])
def test_whole_conv_groups_on_timm_regnets(name, whole):
    """``grouped_convs="whole"`` (the latency default): RegNetZ's grouped convs lose whole groups; the
    EvoNorm variant's norms reshape by a constant group count, so its convs fall back to pruning within
    their groups. Both compile without the self-healing net, with exact MACs and ONNX parity."""
    from fxprune.export import onnx_parity

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, 96, 96)
    res = fxprune.compile(model, x, mac_budget="50%", policy="uniform", grouped_convs="whole")
    assert not res.report.healed and fxprune.count_macs(res.model, x) == res.macs
    before = {n: m.groups for n, m in model.named_modules()
              if isinstance(m, torch.nn.Conv2d) and 1 < m.groups < m.in_channels}
    after = {n: res.model.get_submodule(n).groups for n in before}
    assert before and (any(after[n] < g for n, g in before.items()) if whole else after == before)
    par = onnx_parity(res.model, x, res.export_onnx(), batch_sizes=(1, 2))
    assert par.ok, par.summary()
