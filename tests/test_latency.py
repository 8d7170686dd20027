"""Measured latency: ``result.benchmark()``, the latency cost model and its cache, latency budgets.

Timings on a shared machine are noise, so no test asserts a wall-clock threshold. The search and
the cost model are tested with a deterministic fake timer (latency a known function of MACs); the
real ONNX Runtime path runs once on a tiny model and is checked for structure only.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune import latency as lat
from fxprune.bench import BenchConfig, BenchReport, Comparison, ComparisonRow
from fxprune.cli import main
from fxprune.cost_models.latency import (
    Candidate,
    LatencyCache,
    LatencyCostModel,
    Timing,
    cache_key,
    graph_fingerprint,
    isotonic_fit,
)
from fxprune.errors import BenchmarkError, BudgetUnreachableError, InvalidBudgetError
from fxprune.report import GroupDecision

FAST = dict(threads=1, warmup=1, rounds=2, runs_per_round=3)


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny CNN and a fake timer
# --------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.b1 = nn.BatchNorm2d(32)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.b2 = nn.BatchNorm2d(64)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.c3 = nn.Conv2d(64, 64, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.c3(self.dw(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, x = TinyNet().eval(), torch.randn(1, 3, 16, 16)
    return model, x, fxprune.count_macs(model, x)


class FakeTimer:
    """Latency = ``fn(macs)`` milliseconds, p90 5% above; records every call."""

    def __init__(self, fn, **settings):
        self.fn = fn
        self.calls: list[list[int]] = []
        self.warnings: list[str] = []
        self.environment = {"loadavg_before": [0.1, 0.1, 0.1], "loadavg_after": [0.2, 0.2, 0.2]}
        self._settings = {"provider": "fake", "threads": 1, "opt_level": "all", "batch": 1, **settings}

    def settings(self):
        return dict(self._settings)

    def measure(self, candidates):
        self.calls.append([int(c.macs) for c in candidates])
        return [Timing(self.fn(c.macs), 1.05 * self.fn(c.macs)) for c in candidates]


def linear(base, fixed=1.0, span=9.0):
    return lambda macs: fixed + span * macs / base


# --------------------------------------------------------------------------------------------
# NCHWc block and the warning logic
# --------------------------------------------------------------------------------------------


def test_nchwc_block_from_cpuinfo_flags():
    assert lat.nchwc_block("processor : 0\nflags\t\t: fpu sse avx avx2 avx512f avx512bw\n") == 16
    assert lat.nchwc_block("flags : fpu sse avx avx2 fma\n") == 8
    assert lat.nchwc_block("flags : fpu sse sse2\n") is None
    assert lat.nchwc_block("Features : fp asimd evtstrm\n") is None
    assert lat.nchwc_block() in (None, 8, 16)  # this machine


def _record(speedup, reduction, warnings=(), block=8):
    orig = Timing(10.0, 11.0)
    pruned = Timing(10.0 / speedup, 11.0 / speedup)
    rec = lat.latency_record(orig, pruned, macs=int(1000 / reduction), base_macs=1000,
                             settings={"provider": "cpu", "threads": 2, "opt_level": "all", "batch": 1,
                                       "nchwc_block": block},
                             environment={"loadavg_before": [0.5, 0.4, 0.3]}, bench_warnings=warnings)
    return rec


def test_record_schema():
    rec = _record(1.8, 2.0)
    assert rec["schema"] == lat.LATENCY_SCHEMA
    assert rec["speedup"] == pytest.approx(1.8)
    assert rec["mac_reduction"] == pytest.approx(2.0)
    assert rec["speedup_per_mac_reduction"] == pytest.approx(0.9)
    assert rec["original_median_ms"] == 10.0 and rec["pruned_p90_ms"] == pytest.approx(11.0 / 1.8)
    assert rec["loadavg_before"] == [0.5, 0.4, 0.3] and rec["threads"] == 2 and rec["opt_level"] == "all"
    json.dumps(rec)


def test_no_warning_when_latency_follows_macs():
    assert lat.latency_warnings(_record(1.8, 2.0)) == []
    assert lat.latency_warnings(_record(1.25, 2.0)) == []  # 0.625 >= 0.6
    assert lat.latency_warnings(_record(1.0, 1.0)) == []  # nothing pruned


def test_warning_names_misaligned_groups_and_depthwise():
    (msg,) = lat.latency_warnings(_record(1.1, 2.0), misaligned=["layer1.0.conv1 36/64"],
                                  depthwise=["features.3.conv.1.0 (37 channels, odd, not a multiple of 8)"])
    assert "did not follow MACs" in msg and "0.55" in msg
    assert "layer1.0.conv1 36/64" in msg and "channel_multiple=8" in msg and "37 channels" in msg


def test_warning_when_pruned_model_is_slower():
    (msg,) = lat.latency_warnings(_record(0.9, 2.0, block=16), misaligned=["a 20/32"])
    assert "slower than the original" in msg and "multiple of 16" in msg


def test_warning_reports_a_busy_machine_and_falls_back_to_generic_reasons():
    (busy,) = lat.latency_warnings(_record(1.0, 2.0, warnings=["machine busy: timings may be inflated"]))
    assert "machine busy" in busy
    (generic,) = lat.latency_warnings(_record(1.0, 2.0))
    assert "no misaligned channel counts" in generic


def test_misaligned_groups_and_depthwise():
    groups = [
        GroupDecision(0, "a", "channels", "b0", 64, 36, 1, 0.1, True),
        GroupDecision(1, "b", "channels", "b0", 64, 32, 1, 0.1, True),
        GroupDecision(2, "c", "channels", "b0", 60, 60, 1, 0.1, True),  # unpruned: not reported
        GroupDecision(3, "attn", "heads", "b1", 12, 5, 64, 0.1, True),
    ]
    assert lat.misaligned_groups(groups, 8) == ["a 36/64"]
    assert lat.misaligned_groups(groups, 16) == ["a 36/64"]
    original = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(24, 24, 3, groups=24))
    pruned = nn.Sequential(nn.Conv2d(3, 13, 1), nn.Conv2d(13, 13, 3, groups=13), nn.Conv2d(24, 24, 3, groups=24))
    (dw,) = lat.misaligned_depthwise(pruned, original, 8)
    assert dw.startswith("1 (13 channels, odd")


# --------------------------------------------------------------------------------------------
# result.benchmark()
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(tiny):
    model, x, _ = tiny
    return fxprune.compile(model, (x,), mac_budget="50%")


def test_benchmark_result_fills_report_latency(compiled):
    cmp = compiled.benchmark(**FAST)
    assert isinstance(cmp, Comparison) and cmp.speedup > 0
    rec = compiled.report.latency
    assert rec["schema"] == lat.LATENCY_SCHEMA
    assert rec["original_median_ms"] == pytest.approx(cmp.median_a_ms)
    assert rec["pruned_median_ms"] == pytest.approx(cmp.median_b_ms)
    assert rec["original_p90_ms"] >= rec["original_median_ms"] > 0
    assert rec["speedup"] == pytest.approx(cmp.speedup)
    assert rec["mac_reduction"] == pytest.approx(compiled.base_macs / compiled.macs)
    assert rec["speedup_per_mac_reduction"] == pytest.approx(rec["speedup"] / rec["mac_reduction"])
    assert rec["threads"] == 1 and rec["opt_level"] == "all" and rec["batch"] == 1 and rec["provider"] == "cpu"
    assert "loadavg_before" in rec and isinstance(rec["warnings"], list)
    json.dumps(compiled.report.to_json(), default=str)
    assert "latency (ONNX Runtime cpu" in str(compiled.report)


def test_benchmark_result_options(compiled):
    with pytest.raises(BenchmarkError, match="unknown benchmark option"):
        compiled.benchmark(thread=1)
    cmp = compiled.benchmark(BenchConfig(opt_level="extended", **FAST), batch_sizes=(1, 2))
    assert [r.batch for r in cmp.rows] == [1, 2]
    assert compiled.report.latency["opt_level"] == "extended" and len(compiled.report.latency["rows"]) == 2


def _fake_comparison(median_a, median_b, warnings=()):
    config = BenchConfig(threads=2)
    report = BenchReport(results=[], environment={"loadavg_before": [3.0, 2.0, 1.0], "loadavg_after": None},
                         warnings=list(warnings), config=config)
    row = ComparisonRow(1, median_a, median_b, median_a * 1.1, median_b * 1.1, median_a / median_b)
    return Comparison("original", "pruned", (row,), report)


def test_benchmark_result_warns_when_latency_does_not_follow(compiled, monkeypatch, caplog):
    monkeypatch.setattr(lat, "compare", lambda *a, **k: _fake_comparison(10.0, 12.0, ["machine busy: x"]))
    compiled.report.warnings.clear()
    with caplog.at_level("WARNING", logger="fxprune.latency"):
        compiled.benchmark()
    (msg,) = compiled.report.latency["warnings"]
    assert "slower than the original" in msg and "machine busy" in msg
    assert msg in compiled.report.warnings and msg in caplog.text
    assert compiled.report.latency["loadavg_before"] == [3.0, 2.0, 1.0]
    # latency that follows MACs: no warning
    red = compiled.base_macs / compiled.macs
    monkeypatch.setattr(lat, "compare", lambda *a, **k: _fake_comparison(10.0, 10.0 / red))
    compiled.benchmark()
    assert compiled.report.latency["warnings"] == []


# --------------------------------------------------------------------------------------------
# The cost model
# --------------------------------------------------------------------------------------------


def test_isotonic_fit_pools_violators():
    xs, ys = isotonic_fit([1, 2, 3], [1.0, 3.0, 2.0])
    assert xs.tolist() == [1, 2, 3] and ys.tolist() == [1.0, 2.5, 2.5]
    xs, ys = isotonic_fit([3, 1, 1, 2], [5.0, 1.0, 3.0, 4.0])  # duplicates averaged, weighted
    assert xs.tolist() == [1, 2, 3] and ys.tolist() == [2.0, 4.0, 5.0]
    rng = np.random.default_rng(0)
    _, ys = isotonic_fit(rng.uniform(size=50), rng.uniform(size=50))
    assert np.all(np.diff(ys) >= -1e-12)


def _model_from(points, base=1000):
    model = LatencyCostModel(base, [])
    cands = [Candidate("original", base)] + [Candidate(str(m), m) for m, _ in points]
    model.add([Timing(10.0, 11.0)] + [Timing(10.0 * r, 11.0 * r) for _, r in points], cands, "calibration")
    return model


def test_cost_model_predicts_and_inverts():
    model = _model_from([(200, 0.3), (500, 0.6), (800, 0.85)])
    assert model.ratio(500) == pytest.approx(0.6)
    assert model.ratio(650) == pytest.approx(0.725)
    assert model.predict_ms(650) == pytest.approx(7.25)
    assert model.macs_for(0.725) == 650
    assert model.macs_for(0.6) == 500
    assert model.macs_for(1.5) == 1000
    assert model.macs_for(0.2) is None  # below the fastest model measured
    assert model.min_point.macs == 200
    # a non-monotone measurement is pooled, never promised
    bumpy = _model_from([(200, 0.3), (500, 0.7), (600, 0.5), (800, 0.85)])
    assert bumpy.ratio(500) == pytest.approx(0.6) and bumpy.ratio(600) == pytest.approx(0.6)
    assert bumpy.macs_for(0.6) == 600


def test_cost_model_json_round_trip():
    model = _model_from([(200, 0.3), (700, 0.8)])
    model.key = {"graph": "abc", "timer": {"threads": 1}}
    again = LatencyCostModel.from_json(json.loads(json.dumps(model.to_json())))
    assert again.points == model.points and again.key == model.key and again.base_macs == 1000
    with pytest.raises(ValueError):
        LatencyCostModel.from_json({"schema": "other"})


def test_cache_round_trip_and_key(tmp_path):
    cache = LatencyCache(tmp_path)
    key = {"graph": "g", "timer": {"threads": 1, "opt_level": "all"}}
    assert cache.load(key) is None
    model = _model_from([(300, 0.4)])
    model.key = key
    path = cache.save(model)
    assert path.exists() and path.parent == tmp_path
    assert cache.load(key).points == model.points
    assert cache.load({**key, "timer": {"threads": 2, "opt_level": "all"}}) is None
    assert cache_key(key) != cache_key({**key, "timer": {"threads": 1, "opt_level": "extended"}})
    path.write_text("{not json")
    assert cache.load(key) is None  # a corrupt file is ignored, not fatal


def test_ort_timer_settings_feed_the_key(tiny):
    model, x, _ = tiny
    s1 = lat.OrtTimer((x,), BenchConfig(threads=1)).settings()
    s2 = lat.OrtTimer((x,), BenchConfig(threads=2)).settings()
    s3 = lat.OrtTimer((x,), BenchConfig(threads=1, opt_level="extended")).settings()
    assert s1["threads"] == 1 and s2["threads"] == 2 and s3["opt_level"] == "extended"
    assert {"onnxruntime_version", "cpu_model", "batch", "provider"} <= set(s1)
    assert len({cache_key(s) for s in (s1, s2, s3)}) == 3
    gm = fxprune.capture(model, (x,)).gm
    assert graph_fingerprint(gm, (x,)) == graph_fingerprint(gm, (x,))
    assert graph_fingerprint(gm, (x,)) != graph_fingerprint(gm, (torch.randn(1, 3, 8, 8),))


# --------------------------------------------------------------------------------------------
# The search, with a fake timer
# --------------------------------------------------------------------------------------------


BASE, MIN = 1_000_000, 60_000


def _search(budget, fn, **kw):
    timer = FakeTimer(fn)
    built: list[int] = []

    def build(m):
        built.append(m)
        return Candidate(f"m{m}", max(MIN, m - m % 997))  # plans land a little under the MAC budget

    found = lat.search_latency(budget, Candidate("original", BASE), build, timer, min_macs=MIN, **kw)
    return found, timer


@pytest.mark.parametrize("shape", ["linear", "convex", "steps"])
@pytest.mark.parametrize("budget", ["2.5ms", 4.0, "7ms", "9900us", "35%", "80%"])
def test_search_lands_at_or_under_budget(shape, budget):
    fns = {
        "linear": lambda m: 1.0 + 9.0 * m / BASE,
        "convex": lambda m: 1.0 + 9.0 * (m / BASE) ** 1.7,
        # latency jumps by 0.8 ms on every other 10% of MACs: monotone only on average
        "steps": lambda m: 1.0 + 8.0 * m / BASE + (0.8 if int(10 * m / BASE) % 2 else 0.0),
    }
    fn = fns[shape]
    found, timer = _search(budget, fn)
    limit = lat.parse_latency_budget(budget, base_ms=fn(BASE))
    if limit >= fn(BASE):  # the original already meets it
        assert found.chosen is None and found.chosen_timing.median_ms == fn(BASE)
        return
    assert found.chosen_timing.median_ms == pytest.approx(fn(found.chosen.macs))
    assert fn(found.chosen.macs) <= limit + 1e-12
    assert found.budget_ms == pytest.approx(limit)
    assert len(timer.calls) <= 1 + 6 + 1  # calibration, verifications, last resort
    assert all(calls[0] == BASE for calls in timer.calls)  # every measurement includes the original
    verified = [a for a in found.attempts if a["stage"] == "verify"]
    assert verified and any(a["passed"] and a["macs"] == found.chosen.macs for a in verified)
    if shape == "linear":  # a model that fits the truth lands close under the budget at the first try
        assert len(verified) == 1 and fn(found.chosen.macs) >= 0.9 * limit


def test_search_tightens_when_prediction_is_optimistic():
    # calibration sees a faster machine than verification (drift): the first try misses
    state = {"n": 0}
    timer = FakeTimer(lambda m: 1.0 + 9.0 * m / BASE)
    real_measure = timer.measure

    def drifting(cands):
        state["n"] += 1
        out = real_measure(cands)
        if state["n"] == 1:
            return out
        # after calibration the pruned candidates get 20% slower, the original does not
        return [out[0]] + [Timing(t.median_ms * 1.2, t.p90_ms * 1.2) for t in out[1:]]

    timer.measure = drifting
    found = lat.search_latency("6ms", Candidate("original", BASE), lambda m: Candidate(str(m), m), timer,
                               min_macs=MIN)
    verified = [a for a in found.attempts if a["stage"] == "verify"]
    assert not verified[0]["passed"] and verified[-1]["passed"]
    assert found.chosen_timing.median_ms <= 6.0
    assert found.chosen.macs < verified[0]["macs"]


@pytest.mark.parametrize("budget", ["60%", "40%"])
def test_search_recovers_from_a_calibration_that_was_too_optimistic(budget):
    """Seen on a busy machine: calibration said 50% MACs -> 0.49x, verification measured 0.66x."""
    runs = {"n": 0}

    def optimistic(m):
        return 10.0 * (0.02 + 0.98 * m / BASE)

    def truth(m):
        return 10.0 if m >= BASE else 10.0 * (0.05 + 0.95 * (m / BASE) ** 0.6)

    timer = FakeTimer(None)
    real_measure = timer.measure

    def measure(cands):
        runs["n"] += 1
        timer.fn = optimistic if runs["n"] == 1 else truth
        return real_measure(cands)

    timer.measure = measure
    found = lat.search_latency(budget, Candidate("original", BASE), lambda m: Candidate(str(m), m), timer,
                               min_macs=MIN)
    fraction = lat.relative_budget(budget)
    assert truth(found.chosen.macs) <= fraction * 10.0
    assert truth(found.chosen.macs) >= 0.9 * fraction * 10.0  # close under, not far under
    assert len(timer.calls) <= 1 + 6


def test_search_unreachable_budget_reports_smallest_latency():
    with pytest.raises(BudgetUnreachableError, match=r"smallest latency measured is 1\.54") as info:
        _search("1.2ms", lambda m: 1.0 + 9.0 * m / BASE)
    assert info.value.min_latency_ms == pytest.approx(1.0 + 9.0 * MIN / BASE)
    with pytest.raises(BudgetUnreachableError):
        _search("5%", lambda m: 1.0 + 9.0 * m / BASE)


def test_search_returns_original_when_it_meets_the_budget():
    found, timer = _search("50ms", lambda m: 1.0 + 9.0 * m / BASE)
    assert found.chosen is None and found.chosen_timing.median_ms == 10.0
    found, _ = _search("100%", lambda m: 1.0 + 9.0 * m / BASE)
    assert found.chosen is None


def test_search_with_cached_model_skips_calibration():
    fn = linear(BASE)
    found, _ = _search("5ms", fn)
    found2, timer2 = _search("5ms", fn, model=found.model)
    assert not found2.calibrated and len(timer2.calls[0]) == 2  # straight to verification
    assert any(a["stage"] == "cached" for a in found2.attempts)
    assert fn(found2.chosen.macs) <= 5.0


# --------------------------------------------------------------------------------------------
# compile(..., latency_budget=...)
# --------------------------------------------------------------------------------------------


def test_compile_to_latency_with_fake_timer_and_cache(tiny, tmp_path):
    model, x, base = tiny
    fn = linear(base)
    timer = FakeTimer(fn)
    opts = {"timer": timer, "cache_dir": str(tmp_path), "allocation": "macs"}
    res = fxprune.compile(model, (x,), latency_budget="6ms", latency_options=opts)
    assert res.macs < base and fn(res.macs) <= 6.0
    rec = res.report.latency
    assert rec["schema"] == lat.LATENCY_SCHEMA and rec["budget"]["met"] and rec["budget"]["cache"] == "miss"
    assert rec["pruned_median_ms"] == pytest.approx(fn(res.macs)) and rec["budget"]["budget_ms"] == 6.0
    assert rec["mac_reduction"] == pytest.approx(base / res.macs)
    assert [a for a in res.report.attempts if a.get("kind") == "latency" and a["stage"] == "calibration"]
    assert fxprune.count_macs(res.model, x) == res.macs
    assert "budget 6ms" in str(res.report)
    calibration_calls = len(timer.calls)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["schema"] == "fxprune.latency-model/1"

    # second call: cache hit, no calibration run (only verifications with two models each)
    timer2 = FakeTimer(fn)
    res2 = fxprune.compile(model, (x,), latency_budget="60%", latency_options={**opts, "timer": timer2})
    assert res2.report.latency["budget"]["cache"] == "hit"
    assert all(len(c) <= 2 for c in timer2.calls) and len(timer2.calls) < calibration_calls + 2
    assert fn(res2.macs) <= 0.6 * fn(base)

    # other threads or optimisation level: another key, another calibration
    timer3 = FakeTimer(fn, threads=2)
    res3 = fxprune.compile(model, (x,), latency_budget="6ms", latency_options={**opts, "timer": timer3})
    assert res3.report.latency["budget"]["cache"] == "miss" and len(timer3.calls[0]) > 2
    timer4 = FakeTimer(fn, opt_level="extended")
    fxprune.compile(model, (x,), latency_budget="6ms", latency_options={**opts, "timer": timer4})
    assert len(list(tmp_path.glob("*.json"))) == 3


def test_compile_to_latency_unreachable_and_unchanged(tiny, tmp_path):
    model, x, base = tiny
    fn = linear(base, fixed=2.0, span=8.0)
    opts = {"timer": FakeTimer(fn), "cache": False, "allocation": "macs"}
    with pytest.raises(BudgetUnreachableError, match="smallest latency measured") as info:
        fxprune.compile(model, (x,), latency_budget="1.5ms", latency_options=opts)
    assert info.value.min_latency_ms > 1.5
    res = fxprune.compile(model, (x,), latency_budget=25.0, latency_options=opts)
    assert res.macs == base and "unchanged" in " ".join(res.report.notes)
    assert res.report.latency["budget"]["met"]


def test_compile_to_latency_rejects_bad_budget_and_options(tiny):
    model, x, _ = tiny
    with pytest.raises(InvalidBudgetError):
        fxprune.compile(model, (x,), latency_budget="fast")
    with pytest.raises(BenchmarkError, match="unknown latency option"):
        fxprune.compile(model, (x,), latency_budget="1ms", latency_options={"thread": 1})
    with pytest.raises(BenchmarkError):
        fxprune.compile(model, (x,), latency_budget="1ms", latency_options={"opt_level": "max"})


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

MODEL_FILE = '''
import torch
import torch.nn as nn

def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return model, (torch.randn(1, 3, 16, 16),)
'''


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    path = tmp_path / "tiny_model.py"
    path.write_text(MODEL_FILE)
    monkeypatch.setenv("FXPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    return f"{path}:build"


def test_cli_latency_budget_success_path(model_file, monkeypatch, capsys):
    class Relative(FakeTimer):  # latency relative to the original, which is always measured first
        def measure(self, candidates):
            self.fn = linear(candidates[0].macs)
            return super().measure(candidates)

    monkeypatch.setattr(lat, "OrtTimer", lambda inputs, config: Relative(None))
    assert main(["compile", model_file, "--latency-budget", "60%", "--threads", "1", "--allocation", "macs"]) == 0
    out = capsys.readouterr().out
    assert "latency (ONNX Runtime fake" in out and "budget 60%" in out and "met" in out


def test_cli_latency_budget_real_onnxruntime(model_file, capsys):
    """The real path on ONNX Runtime: a budget no model reaches gives a clear error (exit 2)."""
    code = main(["compile", model_file, "--latency-budget", "0.1us", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "fxprune compile: error: latency budget '0.1us'" in err and "smallest latency measured" in err


# --------------------------------------------------------------------------------------------
# The measurement tools stay runnable (structure only, one tiny configuration)
# --------------------------------------------------------------------------------------------


def _tool(name):
    import importlib.util
    import os
    import sys

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_fxprune_tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _tool_args(**kw):
    import argparse

    base = dict(budget="50%", policy="global", tolerance=0.01, threads=1, opt_level="all", warmup=0, rounds=1,
                runs=1)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_channel_multiple_sweep_tool_runs(capsys):
    pytest.importorskip("torchvision")
    rows = _tool("sweep_channel_multiple").sweep("mobilenet_v3_small", [1, 8], _tool_args())
    assert [r["multiple"] for r in rows] == [1, 8] and all(r["macs"] <= 0.5 * r["base_macs"] for r in rows)
    assert rows[1]["off_multiple"] == 0
    assert rows[0]["speedup_per_mac_reduction"] == pytest.approx(
        rows[0]["speedup"] * rows[0]["macs"] / rows[0]["base_macs"])
    out = capsys.readouterr().out
    assert "| channel_multiple |" in out and "speed-up / MAC red." in out
    assert callable(_tool("bench_latency").follow_rows)  # the other tool at least imports
