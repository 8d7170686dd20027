"""Scale (issue 15): shapes without arithmetic, one copy of the weights, weightless planning, dtype.

* Shape propagation runs on fake tensors and records exactly what a real run records; code fake
  tensors cannot run falls back to a real run, with a note.
* The compiled model owns every tensor (nothing shared with the user's model); the user's model is
  untouched; candidates built by a search are freed as soon as they are scored.
* A model on the meta device is counted and planned from shapes alone: the same MACs, keep counts
  and parameter counts as the real model with the same (structure-only) criterion.
* A pruned Hugging Face LLaMA (captured with torch.export) follows ``.to(dtype)``: bf16 and fp16
  give the fp32 outputs within their precision, fp64 within fp32's.
"""

from __future__ import annotations

import copy
import gc
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune import progress
from fxprune.capture import capture
from fxprune.errors import ConfigError
from fxprune.ir import META_SHAPE, META_VALUE
from fxprune.passes.shape_prop import ShapePropPass
from fxprune.policies.base import PruningPlan

tvm = pytest.importorskip("torchvision.models")


def _storages(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())
            if not t.is_meta and t.numel()}


def _meta_facts(gm: torch.fx.GraphModule) -> dict:
    return {n.name: (n.meta.get(META_SHAPE), n.meta.get(META_VALUE)) for n in gm.graph.nodes}


def _small_vit() -> nn.Module:
    return tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                 mlp_dim=128, num_classes=10)


def _small_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10)


CNN_CASES = {
    "resnet18": (lambda: tvm.resnet18(num_classes=10), 64),
    "vit": (_small_vit, 32),
    "swin": (_small_swin, 64),
    "shufflenet": (lambda: tvm.shufflenet_v2_x0_5(num_classes=10), 64),
}


# ------------------------------------------------------------------------- shape propagation

@pytest.mark.parametrize("name", sorted(CNN_CASES))
def test_fake_shape_prop_records_what_a_real_run_records(name):
    build, size = CNN_CASES[name]
    torch.manual_seed(0)
    cap = capture(build().eval(), torch.randn(2, 3, size, size))
    fake = ShapePropPass(cap.inputs)(cap.gm)
    assert fake.info["mode"] == "fake"
    facts = _meta_facts(cap.gm)
    real = ShapePropPass(cap.inputs, fake=False)(cap.gm)
    assert real.info["mode"] == "real"
    assert facts == _meta_facts(cap.gm)
    if name != "resnet18":  # the others read sizes off tensors: fxprune.value is covered too
        assert any(v is not None for _, v in facts.values())


class _DataDependent(nn.Module):
    """A leaf whose Python branches on a tensor value: fake tensors cannot run it."""

    def forward(self, x):
        return x * 2 if float(x.abs().sum()) > 0 else x


class _WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.gate = _DataDependent()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.gate(F.relu(self.conv(x)))
        return self.head(F.relu(self.conv2(x)).mean((2, 3)))


def test_data_dependent_code_falls_back_to_a_real_run_with_a_note():
    torch.manual_seed(0)
    model, x = _WithLeaf().eval(), torch.randn(1, 3, 16, 16)
    cap = capture(model, x, leaf_modules=[_DataDependent])
    res = ShapePropPass(cap.inputs)(cap.gm)
    assert res.info["mode"] == "real"
    assert "gate" in res.info["note"]
    out = fxprune.compile(model, x, mac_budget="60%", leaf_modules=[_DataDependent], channel_multiple=1,
                          tolerance=0.05)
    assert out.report.lower_macs <= out.macs <= out.report.budget_macs
    assert any("shape propagation ran the model on real tensors" in n for n in out.report.notes)


def test_bad_example_inputs_still_fail_clearly():
    cap = capture(tvm.resnet18(num_classes=10).eval(), torch.randn(1, 3, 32, 32))
    with pytest.raises(fxprune.PassError, match="example_inputs"):
        ShapePropPass((torch.randn(1, 5, 32, 32),))(cap.gm)


# ---------------------------------------------------------------------- one copy of the weights

def test_pruned_model_owns_its_tensors_and_the_user_model_is_untouched():
    torch.manual_seed(0)
    model, x = tvm.resnet18(num_classes=10).eval(), torch.randn(1, 3, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs, ids = _storages(model), {id(p) for p in model.parameters()}
    res = fxprune.compile(model, x, mac_budget="50%")
    assert not (_storages(res.model) & ptrs)  # nothing shared: fine-tuning it cannot reach the user's model
    assert not ({id(p) for p in res.model.parameters()} & ids)
    # the capture's parameters are views of the user's weights, not a copy (buffers are copied: small)
    assert {p.untyped_storage().data_ptr() for p in res.original.parameters()} <= ptrs
    # casting or re-flagging the capture never reaches the user's tensors
    res.original.to(torch.float64)
    res.original.requires_grad_(False)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    opt = torch.optim.SGD(res.model.parameters(), lr=0.1)
    res.model.train()
    res.model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # a budget at or above the original returns a model that owns its tensors too
    same = fxprune.compile(model, x, mac_budget="100%")
    assert not (_storages(same.model) & ptrs)


def test_search_candidates_are_freed_as_soon_as_they_are_scored():
    torch.manual_seed(0)
    model, x = tvm.resnet18(num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    alive: list[weakref.ref] = []
    live_at_call: list[int] = []

    def evaluate(m: nn.Module) -> float:
        live_at_call.append(sum(r() is not None for r in alive))
        alive.append(weakref.ref(next(m.parameters())))
        return -float(sum(p.numel() for p in m.parameters()))

    class FourCandidates:  # a search policy: scores four plans, returns the best
        name = "four"

        def select(self, problem, ctx):
            plans = [PruningPlan({g.id: g.allowed[len(g.allowed) * k // 5] for g in problem.groups})
                     for k in (1, 2, 3, 4)]
            return max(plans, key=ctx.quality)

    gc.disable()  # only what compile() frees itself counts (a graph module is a reference cycle)
    try:
        fxprune.compile(model, x, mac_budget="50%", policy=FourCandidates(), evaluate=evaluate)
    finally:
        gc.enable()
    assert len(live_at_call) == 4
    assert max(live_at_call) == 0  # no earlier candidate is alive when the next one is scored


# ------------------------------------------------------------------------------ meta device

def _meta_twin(build) -> nn.Module:
    with torch.device("meta"):
        return build().eval()


@pytest.mark.parametrize("name", ["resnet18", "vit", "swin"])
def test_meta_model_is_counted_and_planned_like_the_real_one(name):
    build, size = CNN_CASES[name]
    torch.manual_seed(0)
    real, meta = build().eval(), _meta_twin(build)
    x = torch.randn(1, 3, size, size)
    assert fxprune.count_macs(meta, x) == fxprune.count_macs(real, x)
    plan = fxprune.compile(meta, x, mac_budget="50%", plan_only=True)
    assert plan.model is None and plan.plan_only
    assert plan.report.criterion == "uniform"
    assert any("meta device" in n for n in plan.report.notes)
    full = fxprune.compile(real, x, mac_budget="50%", importance="uniform")
    assert plan.keep == full.keep
    assert plan.macs == full.macs and plan.params == full.params
    assert all(p.is_meta for p in meta.parameters())  # nothing was materialised


def test_plan_only_on_real_weights_matches_the_compiled_model():
    torch.manual_seed(0)
    model, x = tvm.resnet18(num_classes=10).eval(), torch.randn(1, 3, 64, 64)
    plan = fxprune.compile(model, x, mac_budget="40%", plan_only=True)
    full = fxprune.compile(model, x, mac_budget="40%")
    assert plan.keep == full.keep and plan.macs == full.macs and plan.params == full.params
    assert plan.report.lower_macs <= plan.macs <= plan.report.budget_macs
    with pytest.raises(ConfigError, match="plan_only"):
        plan.export_onnx()


def test_meta_model_refuses_what_needs_weights():
    meta = _meta_twin(CNN_CASES["resnet18"][0])
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ConfigError, match="plan_only=True"):
        fxprune.compile(meta, x, mac_budget="50%")
    with pytest.raises(ConfigError, match="real weights"):
        fxprune.compile(meta, x, mac_budget="50%", plan_only=True, policy="agentic")
    with pytest.raises(ConfigError, match="latency budget"):
        fxprune.compile(meta, x, latency_budget="50%", plan_only=True)


# ----------------------------------------------------------------------------- HF LLaMA dtype

transformers = pytest.importorskip("transformers")


def _tiny_llama(device: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, use_cache=False)
    if device == "meta":
        with torch.device("meta"):
            return transformers.LlamaForCausalLM(cfg).eval()
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama_compiled():
    model = _tiny_llama()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    res = fxprune.compile(model, {"input_ids": ids}, mac_budget="50%")
    return model, ids, res


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.bfloat16, 4e-2), (torch.float16, 5e-3)])
def test_pruned_llama_follows_to_dtype(llama_compiled, dtype, tol):
    model, ids, res = llama_compiled
    assert res.report.lower_macs <= res.macs <= res.report.budget_macs
    ref = _logits(res.model, ids)
    cast = copy.deepcopy(res.model).to(dtype)
    out = _logits(cast, ids)
    assert model(input_ids=ids).logits.dtype == torch.float32  # the user's model was not cast
    scale = ref.abs().max()
    assert (out - ref).abs().max() <= tol * scale, (dtype, float((out - ref).abs().max() / scale))


def test_pruned_llama_half_and_bfloat16_methods(llama_compiled):
    _, ids, res = llama_compiled
    ref = _logits(res.model, ids)
    for method in ("bfloat16", "half"):
        m = getattr(copy.deepcopy(res.model), method)()
        out = m(input_ids=ids).logits
        assert out.dtype == (torch.bfloat16 if method == "bfloat16" else torch.float16)
        assert (out.double() - ref).abs().max() <= 4e-2 * ref.abs().max()


def test_llama_capture_keeps_fp32_upcasts_and_follows_derived_casts(llama_compiled):
    _, _, res = llama_compiled
    g = res.model.graph
    asserts = [n for n in g.nodes if "assert" in str(n.target)]
    assert not asserts
    derived = [n for n in g.nodes if n.op == "get_attr" and n.target == "fxprune_compute_dtype"]
    assert derived and derived[0].users  # casts that read x.dtype now read the weights' dtype
    literal = [n for n in g.nodes if n.op == "call_function" and torch.float32 in tuple(n.args) + tuple(n.kwargs.values())]
    assert literal  # RMSNorm's and the rotary embedding's explicit fp32 upcasts stay fp32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pruned_llama_moves_to_cuda_in_bfloat16(llama_compiled):
    _, ids, res = llama_compiled
    ref = _logits(res.model, ids)
    m = copy.deepcopy(res.model).to("cuda", torch.bfloat16)
    out = _logits(m, ids.to("cuda")).cpu()
    assert (out - ref).abs().max() <= 4e-2 * ref.abs().max()


def _params_on_meta(model: nn.Module) -> nn.Module:
    """What accelerate's ``init_empty_weights()`` builds: parameters on meta, buffers real."""
    model = copy.deepcopy(model)
    for mod in model.modules():
        for k, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[k] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
    return model


def test_meta_llama_is_planned_without_weights(llama_compiled):
    model, ids, _ = llama_compiled
    full = fxprune.compile(model, {"input_ids": ids}, mac_budget="50%", importance="uniform")
    for meta in (_tiny_llama("meta"), _params_on_meta(model)):
        assert fxprune.count_macs(meta, {"input_ids": ids}) == fxprune.count_macs(model, {"input_ids": ids})
        plan = fxprune.compile(meta, {"input_ids": ids}, mac_budget="50%", plan_only=True)
        assert plan.keep == full.keep and plan.macs == full.macs and plan.params == full.params


# ------------------------------------------------------------------------------ importance

@pytest.mark.parametrize("shape", [(7,), (33, 5), (64, 3, 3, 3), (5, 300, 2)])
@pytest.mark.parametrize("power", [0, 1, 2])
def test_index_sums_match_a_direct_float64_reduction(monkeypatch, shape, power):
    from fxprune import importance

    monkeypatch.setattr(importance, "_CHUNK", 97)  # many slabs, with a ragged last one
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    got = importance._index_sums(t, range(t.dim()), power)
    v = t.double()
    v = v if power == 0 else v.abs() ** power
    for d in range(t.dim()):
        want = v.movedim(d, 0).reshape(t.shape[d], -1).sum(1).numpy()
        np.testing.assert_allclose(got[d], want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ progress bars

def test_progress_off_writes_nothing(capsys):
    progress.set_enabled(False)
    try:
        fxprune.compile(tvm.resnet18(num_classes=10).eval(), torch.randn(1, 3, 32, 32), mac_budget="50%")
    finally:
        progress.set_enabled(None)
    assert capsys.readouterr().err == ""


def test_cli_quiet_before_or_after_the_subcommand():
    from fxprune.cli import build_parser

    p = build_parser()
    assert p.parse_args(["--quiet", "profile", "torchvision:resnet18"]).quiet
    assert p.parse_args(["compile", "torchvision:resnet18", "--mac-budget", "50%", "-q"]).quiet
    assert not p.parse_args(["profile", "torchvision:resnet18"]).quiet


def test_cli_plan_only(capsys, tmp_path):
    from fxprune.cli import main

    assert main(["-q", "compile", "torchvision:resnet18", "--mac-budget", "50%", "--plan-only",
                 "--input-shape", "1,3,64,64"]) == 0
    assert "IN BAND" in capsys.readouterr().out
    assert main(["compile", "torchvision:resnet18", "--mac-budget", "50%", "--plan-only",
                 "-o", str(tmp_path / "m.onnx")]) == 2
    assert "--plan-only builds no model" in capsys.readouterr().err


class _DtypeHeavy(nn.Module):
    """Derived dtypes in every form torch.export bakes: a factory with a symbolic size and
    ``dtype=x.dtype``, a ``finfo(x.dtype).min`` mask, literal fp32 upcasts (softmax, RMS norm)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        b, n = x.shape[0], x.shape[1]
        h = self.lin(x)
        h = h + h.new_zeros((b, n, 8), dtype=h.dtype)
        mask = torch.full((n, n), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device).triu(1)
        rms = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
        h = (h * torch.rsqrt(rms + 1e-6)).to(h.dtype)
        att = torch.softmax(h @ h.transpose(1, 2) + mask, -1, dtype=torch.float32).to(h.dtype)
        return self.out(att @ h)


def test_export_capture_follows_dtype_in_factories_masks_and_casts():
    torch.manual_seed(0)
    model, x = _DtypeHeavy().eval(), torch.randn(2, 6, 8)
    res = fxprune.compile(model, x, mac_budget="100%", capture="export")
    targets = {str(n.target) for n in res.model.graph.nodes}
    assert "fxprune.ops.finfo_value" in targets or any("finfo_value" in t for t in targets)
    ref = res.model(x).double()
    for dtype, tol in ((torch.float64, 1e-6), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)):
        out = copy.deepcopy(res.model).to(dtype)(x.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()  # fp16's own finfo.min: no -inf + inf
        assert (out.double() - ref).abs().max() <= tol * ref.abs().max(), dtype


def test_cli_quiet_holds_for_its_call_only(capsys):
    """``main([..., "--quiet"])`` run in-process (a notebook, a test) leaves progress output as it was."""
    from fxprune import progress
    from fxprune.cli import main

    progress.set_enabled(None)
    assert main(["--quiet", "profile", "torchvision:resnet18"]) == 0
    assert progress._enabled is None
    progress.set_enabled(True)
    assert main(["profile", "torchvision:resnet18", "-q"]) == 0
    assert progress._enabled is True
    progress.set_enabled(None)


class _NoGradMask(torch.nn.Module):
    """Masks built under ``torch.no_grad()`` with ``device=x.device`` (CPM-Ant): torch.export puts the
    block in a ``wrap_with_set_grad_enabled`` subgraph, where the weightless capture recorded the
    meta device."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        with torch.no_grad():
            keep = torch.arange(x.shape[1], device=x.device)[None, :, None] < torch.full((1, 1, 1), 4, device=x.device)
        return self.fc2(torch.relu(self.fc1(x))) * keep


def test_device_constants_inside_no_grad_blocks_follow_the_input():
    torch.manual_seed(0)
    model, x = _NoGradMask().eval(), torch.randn(2, 6, 8)
    res = fxprune.compile(model, x, mac_budget="50%", capture="export")
    assert res.report.lower_macs <= res.macs <= res.report.budget_macs
    with torch.no_grad():
        out = res.model(x)
    assert out.shape == (2, 6, 8) and (out[:, 4:] == 0).all() and (out[:, :4] != 0).any()
