"""PyTorch runtimes in ``fxprune bench`` and ``result.benchmark()``: batch sweep, throughput.

Runs on the CPU (``torch-cpu``); the CUDA paths share the code and are exercised by
``tools/gpu_check.py`` on a GPU. No test asserts a timing.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.bench import BenchConfig, benchmark
from fxprune.cli import main
from fxprune.cost_models.latency_units import OpSpec, UnitSpec
from fxprune.errors import BenchmarkError
from fxprune.runtimes import TorchRuntime, TorchTimer, make_runtime

FAST = dict(warmup=1, rounds=2, runs_per_round=2)


def net(width=16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4)).eval()


def test_torch_cpu_benchmark_batch_sweep_and_throughput():
    x = torch.randn(1, 3, 8, 8)
    report = benchmark([net(16), net(8)], BenchConfig(runtime="torch-cpu", batch_sizes=(1, 4), threads=1, **FAST),
                       labels=["a", "b"], inputs=(x,))
    assert [(r.label, r.batch) for r in report.results] == [("a", 1), ("b", 1), ("a", 4), ("b", 4)]
    for r in report.results:
        assert r.stats.n == 4 and r.items_per_s == pytest.approx(r.batch * 1000.0 / r.median_ms)
        assert r.inputs["input_0"]["shape"] == [r.batch, 3, 8, 8]
    data = json.loads(report.to_json())
    assert data["config"]["runtime"] == "torch" and data["environment"]["runtime"] == "torch"
    assert "items_per_s" in data["results"][0]
    table = report.format_table()
    assert "items/s" in table and "PyTorch" in table and "eager" in table


def test_bench_config_rejects_what_a_runtime_cannot_do():
    with pytest.raises(BenchmarkError, match="fp32"):
        BenchConfig(runtime="ort-cpu", dtype="fp16")
    with pytest.raises(BenchmarkError, match="torch-cuda"):
        BenchConfig(runtime="torch-cpu", cuda_graphs=True)
    with pytest.raises(BenchmarkError, match="unknown runtime"):
        BenchConfig(runtime="tvm")
    with pytest.raises(BenchmarkError, match="dtype"):
        BenchConfig(runtime="torch-cpu", dtype="int4")
    with pytest.raises(BenchmarkError, match="example inputs"):
        benchmark([net()], BenchConfig(runtime="torch-cpu"))
    with pytest.raises(BenchmarkError, match="nn.Module"):
        benchmark(["a.onnx"], BenchConfig(runtime="torch-cpu"), inputs=(torch.randn(1, 3, 8, 8),))
    if not torch.cuda.is_available():
        with pytest.raises(BenchmarkError, match="CUDA"):
            benchmark([net()], BenchConfig(runtime="torch-cuda"), inputs=(torch.randn(1, 3, 8, 8),))
        with pytest.raises(BenchmarkError, match="CUDA"):
            make_runtime("torch-cuda", dtype="fp16")


def test_result_benchmark_on_torch_cpu():
    x = torch.randn(1, 3, 8, 8)
    res = fxprune.compile(net(32), (x,), mac_budget="50%")
    cmp = res.benchmark(runtime="torch-cpu", batch_sizes=(1, 3), threads=1, **FAST)
    assert [r.batch for r in cmp.rows] == [1, 3]
    lat = res.report.latency
    assert lat["target"] == "torch-cpu" and lat["provider"] == "torch-cpu" and lat["dtype"] == "fp32"
    rows = lat["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["pruned_items_per_s"] == pytest.approx(r["batch"] * 1000.0 / r["median_b_ms"])


def test_cli_bench_torch_runtime(tmp_path, capsys):
    path = tmp_path / "m.py"
    path.write_text("import torch, torch.nn as nn\n"
                    "def build():\n"
                    "    torch.manual_seed(0)\n"
                    "    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.Flatten())\n"
                    "    return m, (torch.randn(1, 3, 8, 8),)\n")
    saved = tmp_path / "m.fxp"
    res = fxprune.compile(*_load(path), mac_budget="60%", tolerance=0.2)
    fxprune.save(res.model, saved)
    code = main(["bench", f"{path}:build", str(saved), "--runtime", "torch-cpu", "--batch-sizes", "1,2",
                 "--threads", "1", "--rounds", "1", "--runs", "2", "--warmup", "0", "--input-shape", "1,3,8,8"])
    out = capsys.readouterr().out
    assert code == 0 and "items/s" in out and "m.fxp" in out
    assert main(["bench", str(saved), "--runtime", "torch-cpu"]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["bench", "x.onnx", "--runtime", "torch-cpu"]) == 2
    assert "ONNX Runtime" in capsys.readouterr().err
    assert main(["bench", f"{path}:build", "--runtime", "torch-cpu", "--dtype", "fp16", "--cuda-graphs"]) == 2


def _load(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("m", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, inputs = mod.build()
    return model.eval(), inputs


def test_torch_runtime_times_layers_and_whole_models_on_cpu():
    rt = TorchRuntime("cpu", dtype="fp32", batch=2, example_inputs=(torch.randn(1, 3, 8, 8),), threads=1,
                      **FAST, unit_ms=0.5)
    specs = [UnitSpec((OpSpec("conv", (("bias", True), ("depthwise", False), ("dilation", (1, 1)), ("groups", 1),
                                       ("kernel", (3, 3)), ("pads", (1, 1, 1, 1)), ("stride", (1, 1))), (2, 8, 8, 8)),
                       OpSpec("act", (("fn", "relu"),), (2, 8, 8, 8))), ((2, 3, 8, 8),)),
             UnitSpec((OpSpec("add", (), (2, 8, 4)),), ((2, 8, 4), (2, 8, 4)))]
    times = rt.time_units(specs)
    assert len(times) == 2 and all(t > 0 for t in times) and rt.unit_timings == 2
    settings = rt.settings()
    assert settings["runtime"] == "torch" and settings["threads"] == 1 and settings["batch"] == 2
    times = rt.time_models([net(8), net(16)])
    assert len(times) == 2 and all(len(r) == 2 for r in times[0])


def test_torch_timer_runs_eagerly_without_a_gpu():
    timer = TorchTimer("cpu", cuda_graphs=True)
    assert not timer.cuda_graphs  # graphs are a CUDA feature
    calls = []
    run = timer.prepare(lambda: calls.append(1), warmup=2)
    assert len(calls) == 2 and len(timer.time(run, 3)) == 3 and len(calls) == 5
