"""Smoke tests of tools/bench_accuracy.py and tools/bench_speed.py on a tiny configuration.

They keep the benchmark scripts from rotting: every core function runs end to end (one budget,
one epoch, a narrow CNN). No wall-clock limits and no accuracy thresholds are asserted, only
structure and the invariants that hold by construction (MACs at most the budget / target).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("torch_pruning")

import fxprune  # noqa: E402

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")

pytestmark = pytest.mark.filterwarnings("ignore")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_fxprune_tools_{name}", os.path.join(TOOLS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core box OpenMP spin-waiting makes tiny ops many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def acc():
    return _load("bench_accuracy")


@pytest.fixture(scope="module")
def speed():
    return _load("bench_speed")


@pytest.fixture(scope="module")
def splits(acc):
    return acc.make_splits(0)


def test_splits_partition_digits_and_are_fixed(acc, splits):
    sizes = (len(splits.x_train), len(splits.x_val), len(splits.x_test))
    assert sum(sizes) == 1797 and sizes == (899, 359, 539)
    again = acc.make_splits(0)
    assert torch.equal(again.x_val, splits.x_val) and torch.equal(again.y_test, splits.y_test)


def test_accuracy_benchmark_one_budget(acc, splits):
    cfg = acc.Config(budgets=("50%",),
                     variants=("fxprune uniform (l1)", "fxprune global (taylor/val)",
                               "fxprune agentic (offline, eval=val acc)"),
                     tp_variants=("TP global magnitude", "TP local (uniform) magnitude"),
                     train_epochs=1, width=8, ft_epochs=1, tp_steps=50,
                     agentic_options={"max_attempts": 2, "sensitivity": (0.5,)})
    out = acc.run_seed(0, cfg, splits, log=lambda *_: None)
    rows = out["rows"]
    assert [r.label for r in rows] == ["original (unpruned)", *cfg.variants, *cfg.tp_variants]
    base = rows[0].macs
    fx_rows = [r for r in rows[1:] if r.label.startswith("fxprune")]
    tp_rows = [r for r in rows if r.label.startswith("TP")]
    for r in fx_rows:
        assert r.macs <= r.target_macs <= 0.5 * base + 1
        assert r.extra["in_band"]
    target = min(r.macs for r in fx_rows)
    for r in tp_rows:
        assert r.target_macs == target and r.macs <= target
        assert r.extra["steps"] >= 1 and r.extra["tp_ops"] > 0
    for r in rows:
        assert 0.0 <= r.acc_before <= 1.0 and 0.0 <= r.acc_after <= 1.0
        assert r.widths["fc2"] == 10
    agentic = next(r for r in rows if "agentic" in r.label)
    assert agentic.extra["attempts"] >= 1
    table = acc.format_seed_table(rows)
    assert table.count("\n") == len(rows) + 1
    assert "TP global magnitude" in acc.format_mean_table(rows + rows)


def test_accuracy_tp_progressive_respects_target(acc, splits):
    from fxprune.testing.digits import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN(8).eval()
    x = splits.x_train[:1]
    base = fxprune.count_macs(model, x)
    res = acc.prune_tp_progressive(model, x, int(0.6 * base), iterative_steps=40)
    assert res.macs <= 0.6 * base
    assert res.macs == fxprune.count_macs(res.model, x)
    assert acc.widths(model)["conv1"] == 8  # the original is untouched


def test_accuracy_diagnosis_format(acc):
    recs = [{"seed": s, "budget": "50%", "allocation": "uniform", "criterion": "l1", "keep": "8/8",
             "fraction": 0.49, "before": 0.5, "after": 0.9} for s in (0, 1)]
    text = acc.format_diagnosis(recs)
    assert "| 50% | uniform | 8/8 | 0.4900 | l1 |" in text


def test_speed_benchmark_core_functions(speed, splits):
    from fxprune.testing.digits import DigitsCNN

    torch.manual_seed(0)
    model = DigitsCNN(8).eval()
    x = splits.x_train[:1]
    cm = speed.time_count_macs(model, x, repeats=1)
    assert cm["macs"] == fxprune.count_macs(model, x)
    assert set(cm) >= {"capture_seconds", "shape_prop_seconds", "count_seconds", "seconds"}
    c = speed.time_compile(model, x, "50%")
    assert c["macs"] <= c["target_macs"] and c["in_band"] and "total" in c["timings"]
    for counter in ("tp", "fxprune"):
        r = speed.tp_progressive(model, x, 0.5, iterative_steps=40, counter=counter)
        assert r["reached"] and r["steps"] >= 1
        if counter == "fxprune":
            assert r["macs"] <= r["target_macs"]
        assert r["tp_ops"] <= r["tp_base_ops"]
    assert speed.parse_fraction("50%") == 0.5
