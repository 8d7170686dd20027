"""The per-group latency model: unit extraction, layer builders, tables, cache, solver and compile.

Timing is a seam: every test here but the small real ONNX Runtime case uses ``FakeRuntime``, whose
clock is computed from a layer's work with channel counts rounded up to a step, so results are
exact and deterministic. No test asserts wall-clock time.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune._compile import open_session
from fxprune.cost_models.latency import Candidate
from fxprune.cost_models.latency_table import (
    UnitTimingCache,
    build_tables,
    candidate_keeps,
    fit_calibration,
    plateau_ends,
)
from fxprune.cost_models.latency_units import OpSpec, UnitSpec, build_onnx, build_torch, extract_units
from fxprune.errors import BenchmarkError, InvalidBudgetError
from fxprune.latency_alloc import LatencyPlanner
from fxprune.policies.base import CombinedCost, Constraint, SearchContext
from fxprune.policies.solver import project
from fxprune.runtimes import FakeRuntime, OrtRuntime


class MiniNet(nn.Module):
    """Conv stem, an inverted-residual block (expand, depthwise, SE, project, add), a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(32)
        self.expand = nn.Conv2d(32, 96, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(96)
        self.dw = nn.Conv2d(96, 96, 3, padding=1, groups=96, bias=False)
        self.bn2 = nn.BatchNorm2d(96)
        self.se1 = nn.Conv2d(96, 24, 1)
        self.se2 = nn.Conv2d(24, 96, 1)
        self.project = nn.Conv2d(96, 32, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        s = torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(y, 1)))))
        y = y * s
        y = self.bn3(self.project(y))
        x = x + self.drop(y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    model = MiniNet().eval()
    x = torch.randn(1, 3, 16, 16)
    session = open_session(model, (x,))
    return model, x, session


def fake(**kw):
    kw.setdefault("step", 16)
    kw.setdefault("grid", 8)
    return FakeRuntime(**kw)


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------


def test_units_fuse_followers_and_link_groups(mini):
    model, x, session = mini
    ex = extract_units(session.gm, session.graph.forms())
    labels = [u.label for u in ex.units]
    kinds = {lab.split(" [")[0]: lab.split("[")[1].rstrip("]") for lab in labels}
    assert kinds["stem"] == "conv+bn+relu" and kinds["expand"] == "conv+bn+relu6"
    assert kinds["dw"] == "conv+bn+relu6" and kinds["se1"] == "conv+relu" and kinds["se2"] == "conv+sigmoid"
    assert kinds["project"] == "conv+bn" and kinds["fc"] == "linear"
    assert any(k == "add" for k in kinds.values()) and any(k == "mul" for k in kinds.values())
    assert not ex.unmodelled
    by = {u.label.split(" [")[0]: u for u in ex.units}
    # expand couples the residual group (input) with the expanded group (output); the depthwise conv
    # keeps in and out in one group
    assert len(by["expand"].groups) == 2 and len(by["dw"].groups) == 1
    assert by["dw"].groups[0] in by["expand"].groups
    full = {g.id: g.n for g in session.graph.groups}
    spec = by["dw"].concrete({**full, by["dw"].groups[0]: 48})
    assert spec.inputs[0][1] == 48 and spec.ops[0].out[1] == 48 and spec.ops[0].get("depthwise")


def test_built_layers_match_their_specs_on_torch_and_onnxruntime(mini):
    import onnxruntime as ort

    _, _, session = mini
    full = {g.id: g.n for g in session.graph.groups}
    seen = set()
    for u in extract_units(session.gm, session.graph.forms()).units:
        spec = u.concrete(full)
        if spec.key() in seen:
            continue
        seen.add(spec.key())
        module, inputs = build_torch(spec)
        with torch.no_grad():
            assert tuple(module(*inputs).shape) == spec.ops[-1].out
        sess = ort.InferenceSession(build_onnx(spec).SerializeToString(), providers=["CPUExecutionProvider"])
        out = sess.run(None, {f"x{i}": t.numpy() for i, t in enumerate(inputs)})[0]
        assert out.shape == spec.ops[-1].out
    assert len(seen) >= 8


def test_whole_group_convs_are_timed_at_the_group_count_the_pruned_model_has():
    """A conv pruned by whole groups keeps its channels per group: the layer timed for a plan is the
    layer the pruned model runs (same group count), on torch and ONNX Runtime."""
    import onnxruntime as ort

    from fxprune.testing.zoo import tiny_model

    model, inputs = tiny_model("grouped_whole")
    session = open_session(model, inputs, grouped_convs="whole")
    names = {g.name: g.id for g in session.graph.groups}
    keep = np.array([g.n for g in session.graph.groups], dtype=np.int64)
    keep[names["a"]], keep[names["stem"]] = 3, 10
    planned = sorted(u.concrete({g.id: int(k) for g, k in zip(session.graph.groups, keep)}).key()
                     for u in extract_units(session.gm, session.graph.forms()).units)
    gm, _ = session.materialize(keep)
    assert (gm.get_submodule("b").groups, gm.get_submodule("e").groups) == (3, 10)
    assert planned == sorted(u.concrete({}).key() for u in extract_units(gm).units)
    for u in extract_units(session.gm, session.graph.forms()).units:
        if "[conv" in u.label and u.label.split(" [")[0] in ("b", "e"):
            spec = u.concrete({g.id: int(k) for g, k in zip(session.graph.groups, keep)})
            module, xs = build_torch(spec)
            with torch.no_grad():
                assert tuple(module(*xs).shape) == spec.ops[-1].out
            sess = ort.InferenceSession(build_onnx(spec).SerializeToString(), providers=["CPUExecutionProvider"])
            assert sess.run(None, {f"x{i}": t.numpy() for i, t in enumerate(xs)})[0].shape == spec.ops[-1].out


def test_onnx_layer_computes_what_the_torch_layer_computes():
    """Same weights are not shared, so compare ops without weights: add+relu, gelu, softmax, sdpa."""
    import onnxruntime as ort

    specs = [
        UnitSpec((OpSpec("add", (), (2, 8, 4, 4)), OpSpec("act", (("fn", "relu"),), (2, 8, 4, 4))),
                 ((2, 8, 4, 4), (2, 8, 4, 4))),
        UnitSpec((OpSpec("act", (("fn", "gelu"),), (2, 5, 16)),), ((2, 5, 16),)),
        UnitSpec((OpSpec("act", (("fn", "silu"),), (2, 5, 16)),), ((2, 5, 16),)),
        UnitSpec((OpSpec("softmax", (("dim", 2),), (2, 5, 16)),), ((2, 5, 16),)),
        UnitSpec((OpSpec("sdpa", (("causal", False), ("mask", False), ("scale", None)), (1, 2, 6, 8)),),
                 ((1, 2, 6, 8), (1, 2, 6, 8), (1, 2, 6, 8))),
    ]
    for spec in specs:
        module, inputs = build_torch(spec)
        with torch.no_grad():
            want = module(*inputs).numpy()
        sess = ort.InferenceSession(build_onnx(spec).SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run(None, {f"x{i}": t.numpy() for i, t in enumerate(inputs)})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Candidate widths and plateaus
# --------------------------------------------------------------------------------------------


def test_candidate_keeps_thin_to_aligned_steps():
    assert candidate_keeps(64, quantum=8, max_points=12) == (8, 16, 24, 32, 40, 48, 56, 64)
    big = candidate_keeps(2048, quantum=8, max_points=12)
    assert big[-1] == 2048 and len(big) <= 12 and all(k % 256 == 0 for k in big)
    heads = candidate_keeps(12, quantum=8, heads=True, unit=64, max_points=12)
    assert heads == tuple(range(2, 13))  # whole heads, at least 10% kept
    assert candidate_keeps(30, quantum=8, max_points=12)[-1] == 30


def test_plateau_ends_keep_only_widths_a_larger_one_does_not_match():
    keeps = [8, 16, 24, 32, 40, 48]
    ms = [1.0, 1.0, 2.0, 2.0, 2.0, 3.0]  # steps every 16 channels
    assert plateau_ends(keeps, ms, tol=0.01) == (16, 40, 48)
    assert plateau_ends(keeps, [1, 2, 3, 4, 5, 6], tol=0.01) == tuple(keeps)
    # a wider layer that is faster (an aligned width) dominates the narrower ones before it
    assert plateau_ends([8, 16, 24], [1.2, 1.0, 2.0], tol=0.01) == (16, 24)
    # a gentle slope (each step under the tolerance) keeps a width every `tol` ms, not none
    assert plateau_ends(keeps, [1.0, 1.1, 1.2, 1.3, 1.4, 1.5], tol=0.25) == (24, 48)


def test_fit_calibration_recovers_fixed_and_scale():
    units = [10.0, 6.0, 3.0]
    fixed, scale = fit_calibration(units, [0.5 + 1.2 * u for u in units])
    assert fixed == pytest.approx(0.5) and scale == pytest.approx(1.2)
    assert fit_calibration([4.0], [5.0]) == (pytest.approx(1.0), 1.0)


# --------------------------------------------------------------------------------------------
# Tables on the fake runtime, and the cache
# --------------------------------------------------------------------------------------------


def test_tables_find_the_steps_and_predict_the_fake_clock(mini, tmp_path):
    _, x, session = mini
    rt = fake(example_inputs=(x,))
    cache = UnitTimingCache(tmp_path)
    model = build_tables(session.gm, session.graph.groups, session.graph.forms(), (x,), rt, cache=cache)
    for g in session.graph.groups:
        assert set(model.allowed[g.id]) <= set(model.candidates[g.id])
        if g.n % 16 == 0 and g.n >= 32:  # the fake kernels step every 16 channels: 8, 24, ... are dominated
            assert all(k % 16 == 0 for k in model.allowed[g.id]), (g.name, model.allowed[g.id])
    full = np.array([g.n for g in session.graph.groups])
    whole = rt.model_ms(session.gm)  # fixed_ms + the sum of every unit of the real graph
    fixed_units = [u for u in extract_units(session.gm).units]
    assert model.cost.predict_ms(full[None, :])[0] == pytest.approx(whole - rt.fixed_ms, rel=0.05)
    assert len(fixed_units) >= model.units
    # the vectorised interface: [n, G] -> int64 [n], monotone along a group's allowed widths
    g = next(g for g in session.graph.groups if len(model.allowed[g.id]) > 2)
    K = np.repeat(full[None, :], len(model.allowed[g.id]), axis=0)
    K[:, g.id] = model.allowed[g.id]
    cost = model.cost(K)
    assert cost.dtype == np.int64 and cost.shape == (len(K),) and np.all(np.diff(cost) > 0)
    np.testing.assert_array_equal(cost, np.rint(model.cost.predict_ms(K) * 1e6).astype(np.int64))
    # a plan with a narrowed group costs what the fake clock says for that pruned graph
    keep = full.copy()
    keep[g.id] = model.allowed[g.id][1]
    gm, _ = session.materialize(keep)
    assert model.cost.predict_ms(keep[None, :])[0] == pytest.approx(rt.model_ms(gm) - rt.fixed_ms, rel=0.05)


def test_identical_layers_are_timed_once_and_the_cache_is_reused(mini, tmp_path):
    _, x, session = mini
    cache = UnitTimingCache(tmp_path)
    rt = fake(example_inputs=(x,))
    first = build_tables(session.gm, session.graph.groups, session.graph.forms(), (x,), rt, cache=cache)
    assert first.measured == first.specs == rt.unit_timings > 0
    files = list((tmp_path / "units").glob("*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["schema"] == "fxprune.latency-units/1" and len(doc["entries"]) == first.specs
    assert doc["settings"]["runtime"] == "fake" and doc["settings"]["batch"] == 1
    again = fake(example_inputs=(x,))
    second = build_tables(session.gm, session.graph.groups, session.graph.forms(), (x,), again, cache=cache)
    assert second.measured == 0 and again.unit_timings == 0
    assert second.allowed == first.allowed
    # another batch is another key: timed afresh, in another file
    other = fake(example_inputs=(x,), batch=4)
    third = build_tables(session.gm, session.graph.groups, session.graph.forms(), (x,), other, cache=cache)
    assert third.measured == third.specs and len(list((tmp_path / "units").glob("*.json"))) == 2
    assert third.cost.predict_ms(np.array([[g.n for g in session.graph.groups]]))[0] > \
        first.cost.predict_ms(np.array([[g.n for g in session.graph.groups]]))[0]
    # a corrupt cache file is ignored (and rewritten), never fatal
    files[0].write_text("{not json")
    rt4 = fake(example_inputs=(x,))
    build_tables(session.gm, session.graph.groups, session.graph.forms(), (x,), rt4, cache=cache)
    assert rt4.unit_timings == first.specs


def test_resnet_stage_layers_are_deduplicated():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    session = open_session(model, (x,))
    rt = fake(example_inputs=(x,))
    tables = build_tables(session.gm, session.graph.groups, session.graph.forms(), (x,), rt, cache=None)
    naive = 0
    for u in extract_units(session.gm, session.graph.forms()).units:
        if u.groups:
            naive += 1 + sum(len(tables.candidates[g]) for g in u.groups) + (len(u.groups) > 1)
    assert tables.specs < 0.8 * naive


# --------------------------------------------------------------------------------------------
# Constraints, solver and policies on the latency cost
# --------------------------------------------------------------------------------------------


def test_combined_cost_holds_exactly_when_every_constraint_holds():
    a = Constraint("latency", lambda K: K[:, 0] * 10, 100.0, "ns", 200.0)
    b = Constraint("macs", lambda K: K[:, 1] * 3, 30.0, "MACs", 60.0)
    cost = CombinedCost([a, b])
    K = np.array([[10, 10], [10, 11], [11, 10], [5, 10], [10, 5], [5, 5], [20, 20]])
    c = cost(K)
    assert list(c <= 100) == [True, False, False, True, True, True, False]
    assert c[3] == 100 and c[4] == 100 and c[5] == 50  # the binding constraint sets the cost
    grid = np.array([[i, j] for i in range(0, 21) for j in range(0, 21)])
    vals = cost(grid).reshape(21, 21)
    assert np.all(np.diff(vals, axis=0) >= 0) and np.all(np.diff(vals, axis=1) >= 0)
    assert CombinedCost([a])(K).tolist() == (K[:, 0] * 10).tolist()


def _planner(mini, mac_budget=None, **kw):
    model, x, session = mini
    settings = dict(policy="global", tolerance=0.01, channel_multiple=8, min_keep_ratio=0.1, importance="l1",
                    evaluate=None, calibration_data=None, seed=0, verify=True, policy_options=None, **kw)
    rt = fake(example_inputs=(x,), context=0.9, fixed_ms=0.2)
    return LatencyPlanner.create(model, session, rt, settings, start=0.0, mac_budget=mac_budget, use_cache=False)


@pytest.mark.parametrize("policy", ["global", "isomorphic", "uniform", "agentic", "rl"])
def test_every_policy_runs_on_the_latency_cost(mini, policy):
    options = {"agentic": {"max_attempts": 3}, "rl": {"max_evaluations": 4, "proxy_episodes": 8, "episodes": 4}}
    planner = _planner(mini)
    planner.settings.update(policy=policy, policy_options=options.get(policy))
    full_ns = int(planner.tables.cost(planner.full[None, :])[0])
    budget = int(0.6 * full_ns)
    res = planner.build(budget)
    keep = planner.keep_of(res)
    assert planner.tables.cost(keep[None, :])[0] <= budget
    for g in planner.session.graph.groups:
        assert keep[g.id] in planner.tables.allowed[g.id]
    assert fxprune.count_macs(res.model, mini[1]) == res.macs


def test_a_plan_is_the_keep_counts_and_macs_its_built_model_has(mini):
    planner = _planner(mini)
    full_ns = int(planner.tables.cost(planner.full[None, :])[0])
    for frac in (0.8, 0.5):
        keep, macs = planner.plan(int(frac * full_ns))
        built = planner.build(int(frac * full_ns))
        assert np.array_equal(keep, planner.keep_of(built)) and macs == built.macs
        assert planner.tables.cost(keep[None, :])[0] <= int(frac * full_ns)


def test_solver_on_the_fake_latency_model_is_deterministic_and_in_band(mini):
    planner = _planner(mini)
    full_ns = int(planner.tables.cost(planner.full[None, :])[0])
    for frac in (0.8, 0.6, 0.45):
        problem = planner.problem(int(frac * full_ns), band=False)
        assert problem.unit == "ns" and not problem.constraints
        a = project(problem, problem.sizes * frac)
        b = project(problem, problem.sizes * frac)
        assert np.array_equal(a.keep, b.keep) and a.macs == b.macs <= problem.budget


def test_mac_and_latency_budgets_are_two_constraints(mini):
    _, x, session = mini
    mac_budget = int(0.5 * session.base_macs)
    planner = _planner(mini, mac_budget=mac_budget)
    full_ns = int(planner.tables.cost(planner.full[None, :])[0])
    for frac in (0.9, 0.4):  # loose latency (MACs bind), tight latency (latency binds)
        res = planner.build(int(frac * full_ns))
        keep = planner.keep_of(res)
        assert res.macs <= mac_budget and fxprune.count_macs(res.model, x) == res.macs
        assert planner.tables.cost(keep[None, :])[0] <= int(frac * full_ns)
    problem = planner.problem(int(0.9 * full_ns))
    assert [c.name for c in problem.constraints] == ["latency", "macs"]


# --------------------------------------------------------------------------------------------
# compile(..., latency_budget=...)
# --------------------------------------------------------------------------------------------


def test_compile_to_a_latency_budget_on_the_fake_runtime(mini, tmp_path):
    model, x, session = mini
    rt = fake(example_inputs=(x,), context=0.9, fixed_ms=0.05)
    res = fxprune.compile(model, (x,), latency_budget="60%", latency_options={"runtime": rt, "cache_dir": str(tmp_path)})
    lat = res.report.latency
    assert lat["budget"]["met"] and lat["pruned_median_ms"] <= 0.6 * lat["original_median_ms"] + 1e-9
    assert lat["allocation"] == "latency" and lat["target"] == "fake"
    assert lat["pruned_median_ms"] == pytest.approx(rt.model_ms(res.model))
    model_summary = lat["model"]
    assert model_summary["scale"] == pytest.approx(0.9, rel=0.02) and model_summary["fixed_ms"] == pytest.approx(0.05, abs=0.01)
    assert model_summary["median_abs_error"] < 0.02
    assert [c["use"] for c in model_summary["checks"]].count("fit") >= 2
    assert fxprune.count_macs(res.model, x) == res.macs < session.base_macs
    assert any(a.get("stage") == "verify" for a in res.report.attempts)
    # at the same MACs, the MAC-driven plan is not faster on this runtime
    mac = fxprune.compile(model, (x,), mac_budget=res.macs, tolerance=0.05)
    assert rt.model_ms(res.model) <= rt.model_ms(mac.model) * 1.001
    # the calibration and the tables are cached: a second compile times no layer and no calibration set
    rt2 = fake(example_inputs=(x,), context=0.9, fixed_ms=0.05)
    res2 = fxprune.compile(model, (x,), latency_budget="60%", latency_options={"runtime": rt2, "cache_dir": str(tmp_path)})
    assert rt2.unit_timings == 0 and res2.report.latency["budget"]["cache"] == "hit"
    assert all(len(m) == 2 for m in rt2.measurements)


def test_compile_with_both_budgets_and_bad_arguments(mini):
    model, x, session = mini
    rt = fake(example_inputs=(x,))
    res = fxprune.compile(model, (x,), latency_budget="80%", mac_budget="40%",
                          latency_options={"runtime": rt, "cache": False})
    assert res.macs <= 0.4 * session.base_macs and res.report.latency["budget"]["met"]
    assert "40%" not in res.report.budget_spec or "MACs" in res.report.budget_spec
    with pytest.raises(InvalidBudgetError, match="latency_budget"):
        fxprune.compile(model, (x,), mac_budget="50%", target="torch-cuda")
    with pytest.raises(BenchmarkError, match="unknown target"):
        fxprune.compile(model, (x,), latency_budget="50%", target="tpu")
    with pytest.raises(InvalidBudgetError, match="fp32"):
        fxprune.compile(model, (x,), latency_budget="50%", target="ort-cpu", dtype="fp16")
    with pytest.raises(BenchmarkError, match="timer="):
        fxprune.compile(model, (x,), latency_budget="50%", latency_options={"timer": object()})
    if not torch.cuda.is_available():
        with pytest.raises(BenchmarkError, match="CUDA"):
            fxprune.compile(model, (x,), latency_budget="50%", target="torch-cuda", dtype="fp16")


def test_fake_runtime_measures_whole_models_from_their_graph(mini):
    _, x, session = mini
    rt = fake(example_inputs=(x,), fixed_ms=1.0, context=2.0)
    (t,) = rt.measure([Candidate("original", session.base_macs, session.gm)])
    units = [u.concrete({}) for u in extract_units(session.gm).units]
    assert t.median_ms == pytest.approx(1.0 + 2.0 * sum(rt.unit_ms(s) for s in units))


# --------------------------------------------------------------------------------------------
# A small real case on ONNX Runtime (structure only: no timing is asserted)
# --------------------------------------------------------------------------------------------


def test_real_onnxruntime_tables_for_a_small_model(mini, tmp_path):
    _, x, session = mini
    rt = OrtRuntime("cpu", threads=1, example_inputs=(x,), unit_ms=1.0)
    assert rt.settings()["runtime"] == "onnxruntime" and rt.quantum() in (8, 16)
    tables = build_tables(session.gm, session.graph.groups, session.graph.forms(), (x,), rt, max_points=4,
                          cache=UnitTimingCache(tmp_path))
    assert tables.measured == tables.specs == rt.unit_timings
    for table in tables.cost.tables:
        assert table.full_ms > 0 and all(np.all(np.isfinite(v)) and np.all(v > 0) for v in table.values.values())
    doc = json.loads(next((tmp_path / "units").glob("*.json")).read_text())
    assert doc["settings"]["threads"] == 1 and doc["settings"]["opt_level"] == "all"
    assert len(doc["entries"]) == tables.specs


def test_cli_target_options_need_a_latency_budget(capsys):
    from fxprune.cli import main

    assert main(["compile", "torchvision:resnet18", "--mac-budget", "50%", "--target", "torch-cuda"]) == 2
    assert "--latency-budget" in capsys.readouterr().err
    assert main(["compile", "torchvision:resnet18"]) == 2
    assert "--mac-budget" in capsys.readouterr().err


def test_fit_calibration_scales_compute_and_memory_units_apart():
    from fxprune.cost_models.latency_table import fit_calibration_kinds

    pts = [{"compute": c, "memory": m} for c, m in [(10.0, 2.0), (6.0, 1.5), (3.0, 1.0), (1.5, 0.6)]]
    y = [0.3 + 1.1 * p["compute"] + 0.5 * p["memory"] for p in pts]
    fixed, scales = fit_calibration_kinds(pts, y)
    assert fixed == pytest.approx(0.3) and scales == {"compute": pytest.approx(1.1), "memory": pytest.approx(0.5)}
    # proportional sums (or too few points): one common scale
    fixed, scales = fit_calibration_kinds(pts[:3], y[:3])
    assert scales["compute"] == scales["memory"]


def test_a_layer_the_runtime_cannot_run_is_left_to_the_fixed_part(mini):
    _, x, session = mini

    class Picky(FakeRuntime):
        def time_units(self, specs, progress=None):
            from fxprune.runtimes import _time_in_chunks

            def make(spec):
                if spec.ops[0].kind == "mul":
                    raise RuntimeError("no kernel for mul here")
                return lambda: None

            return _time_in_chunks(specs, make, 0.0, 0.01, progress, self)

    rt = Picky(step=16, grid=8, example_inputs=(x,))
    tables = build_tables(session.gm, session.graph.groups, session.graph.forms(), (x,), rt, cache=None)
    assert any("could not be timed" in u and "mul" in u for u in tables.unmodelled)
    assert any("no kernel for mul" in w for w in rt.warnings)
    assert all("[mul]" not in t.label for t in tables.cost.tables) and tables.cost.tables
