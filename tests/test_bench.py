"""Tests of the ONNX Runtime latency benchmark (``fxprune.bench``) and ``fxprune bench``.

Models are built directly with ``onnx.helper`` (fast, no torch import) except one test that goes
through ``torch.onnx.export``. No test asserts a wall-clock threshold: timings are only checked
for structure (counts, order, min <= median <= p90 <= max).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from fxprune import bench
from fxprune.bench import (
    SCHEMA,
    BenchConfig,
    BenchReport,
    LatencyStats,
    benchmark,
    compare,
    median,
    percentile,
    run_interleaved,
    summarize,
)
from fxprune.cli import main
from fxprune.errors import BenchmarkError, FxpruneError

# Small but complete: every test benchmark runs 1 warm-up + 2 rounds x 3 runs per model.
FAST = dict(threads=1, warmup=1, rounds=2, runs_per_round=3)


# --------------------------------------------------------------------------------------------
# Model builders
# --------------------------------------------------------------------------------------------


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def conv_model(channels: int, batch: int | str = "batch", size: int = 8) -> onnx.ModelProto:
    """x[batch, 3, size, size] -> 3x3 conv with ``channels`` outputs -> relu."""
    rng = np.random.default_rng(channels)
    weight = numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        f"conv{channels}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, channels, size, size])],
        [weight],
    )
    return _finish(graph)


def token_model(vocab: int = 10, width: int = 4) -> onnx.ModelProto:
    """BERT-like inputs: ids through a ``vocab``-row embedding, token types, a mask; symbolic sequence."""
    rng = np.random.default_rng(0)
    word = numpy_helper.from_array(rng.standard_normal((vocab, width)).astype(np.float32), "word")
    types = numpy_helper.from_array(rng.standard_normal((2, width)).astype(np.float32), "types")
    axes = numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Gather", ["word", "input_ids"], ["e"]),
        helper.make_node("Gather", ["types", "token_type_ids"], ["t"]),
        helper.make_node("Add", ["e", "t"], ["s"]),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "axes"], ["mu"]),
        helper.make_node("Mul", ["s", "mu"], ["y"]),
    ]
    seq = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes,
        "tokens",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, seq),
            helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, seq),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, seq),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*seq, width])],
        [word, types, axes],
    )
    return _finish(graph)


@pytest.fixture()
def conv_files(tmp_path):
    paths = []
    for channels in (8, 16):
        path = tmp_path / f"conv{channels}.onnx"
        onnx.save(conv_model(channels), str(path))
        paths.append(str(path))
    return paths


@pytest.fixture()
def garbage_file(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(bytes(range(256)) * 4)
    return str(path)


@pytest.fixture()
def no_cuda(monkeypatch):
    """Pretend this onnxruntime has no CUDA provider (true here; forced for GPU machines)."""
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def test_percentile_and_median_by_hand():
    values = [10, 1, 9, 2, 8, 3, 7, 4, 6, 5]  # 1..10, shuffled
    assert median(values) == 5.5
    assert percentile(values, 90) == pytest.approx(9.1)  # position 0.9 * 9 = 8.1 -> 9 + 0.1
    assert percentile(values, 0) == 1
    assert percentile(values, 100) == 10
    assert median([3, 1, 2]) == 2
    assert percentile([4.0], 90) == 4.0
    assert percentile(values, 37) == pytest.approx(float(np.percentile(values, 37)))


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1, 2], 101)


def test_summarize_by_hand():
    stats = summarize([4.0, 1.0, 3.0, 2.0])
    assert stats == LatencyStats(
        median_ms=2.5, p90_ms=pytest.approx(3.7), mean_ms=2.5, stdev_ms=pytest.approx(math.sqrt(5 / 3)),
        min_ms=1.0, max_ms=4.0, n=4,
    )
    single = summarize([7.0])
    assert (single.median_ms, single.p90_ms, single.stdev_ms, single.n) == (7.0, 7.0, 0.0, 1)
    with pytest.raises(ValueError):
        summarize([])


# --------------------------------------------------------------------------------------------
# Interleaving (fake runners and a fake clock)
# --------------------------------------------------------------------------------------------


def test_run_interleaved_rotates_model_order_every_round():
    log: list[int] = []
    now = [0]

    def make_run(index):
        def run():
            log.append(index)
            now[0] += 1000 * (index + 1)  # model i "takes" (i + 1) microseconds

        return run

    times = run_interleaved(
        [make_run(i) for i in range(3)], warmup=1, rounds=4, runs_per_round=2, clock=lambda: now[0]
    )
    warmup, timed = log[:3], log[3:]
    assert warmup == [0, 1, 2]
    blocks = [timed[i : i + 2] for i in range(0, len(timed), 2)]
    assert all(block[0] == block[1] for block in blocks)  # each model runs back to back within a round
    orders = [[block[0] for block in blocks[r * 3 : r * 3 + 3]] for r in range(4)]
    assert orders == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
    assert times == [[[1000 * (i + 1)] * 2 for _ in range(4)] for i in range(3)]


def test_run_interleaved_single_model_and_no_warmup():
    calls = []
    times = run_interleaved([lambda: calls.append(1)], warmup=0, rounds=2, runs_per_round=3)
    assert len(calls) == 6
    assert [len(r) for r in times[0]] == [3, 3]
    assert all(isinstance(t, int) and t >= 0 for r in times[0] for t in r)


def test_benchmark_times_all_models_through_the_interleaved_loop(conv_files, monkeypatch):
    seen = {}
    real = bench.run_interleaved

    def spy(runs, **kwargs):
        seen["n_runs"] = len(runs)
        seen["kwargs"] = kwargs
        return real(runs, **kwargs)

    monkeypatch.setattr(bench, "run_interleaved", spy)
    benchmark(conv_files, BenchConfig(**FAST))
    assert seen == {"n_runs": 2, "kwargs": {"warmup": 1, "rounds": 2, "runs_per_round": 3}}


# --------------------------------------------------------------------------------------------
# End to end on real ONNX Runtime sessions
# --------------------------------------------------------------------------------------------


def test_benchmark_files_batch_sizes_and_statistics(conv_files):
    report = benchmark(conv_files, BenchConfig(batch_sizes=(1, 3), **FAST))
    assert isinstance(report, BenchReport)
    assert [(r.label, r.batch) for r in report.results] == [
        ("conv8.onnx", 1), ("conv16.onnx", 1), ("conv8.onnx", 3), ("conv16.onnx", 3),
    ]
    for result in report.results:
        channels = 8 if result.label == "conv8.onnx" else 16
        assert result.inputs == {"x": {"shape": [result.batch, 3, 8, 8], "dtype": "float32"}}
        assert result.outputs == {"y": {"shape": [result.batch, channels, 8, 8]}}
        stats = result.stats
        assert stats.n == 6 == len(result.samples_ms)
        assert len(result.round_medians_ms) == 2
        assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms <= stats.max_ms
        assert result.source is not None and result.source.endswith(result.label)
    assert report.speedup("conv8.onnx", "conv8.onnx", 3) == 1.0
    expected = report.result("conv8.onnx", 1).median_ms / report.result("conv16.onnx", 1).median_ms
    assert report.speedup("conv8.onnx", "conv16.onnx") == pytest.approx(expected)
    with pytest.raises(KeyError, match="conv8.onnx"):
        report.speedup("conv8.onnx", "nope", 1)


def test_environment_is_recorded(conv_files):
    env = benchmark(conv_files[:1], BenchConfig(**FAST)).environment
    assert env["onnxruntime_version"] == onnxruntime.__version__
    assert env["provider_used"] == "CPUExecutionProvider"
    assert env["threads"] == 1 and env["inter_op_threads"] == 1
    assert env["opt_level"] == "all" and env["execution_mode"] == "sequential"
    assert env["physical_cores"] >= 1 and env["logical_cpus"] >= 1
    assert isinstance(env["cpu_model"], str) and env["cpu_model"]
    if hasattr(os, "getloadavg"):
        assert len(env["loadavg_before"]) == 3 and len(env["loadavg_after"]) == 3


def test_default_threads_are_physical_cores():
    assert BenchConfig().resolved_threads() == bench.physical_cores() >= 1


def test_busy_machine_warning(conv_files, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (1000.0, 1000.0, 1000.0))
    report = benchmark(conv_files[:1], BenchConfig(**FAST))
    assert any(w.startswith("machine busy: timings may be inflated") for w in report.warnings)
    assert "machine busy" in report.format_table()


def test_json_schema(conv_files):
    report = benchmark(conv_files, BenchConfig(batch_sizes=(1, 2), **FAST))
    data = json.loads(report.to_json())
    assert data["schema"] == SCHEMA == "fxprune.bench/1"
    assert set(data) == {"schema", "config", "environment", "warnings", "results"}
    assert data["config"] == {
        "runtime": "ort", "dtype": "fp32", "cuda_graphs": False, "channels_last": False,
        "provider": "cpu", "threads": 1, "opt_level": "all", "batch_sizes": [1, 2], "warmup": 1,
        "rounds": 2, "runs_per_round": 3, "dims": {}, "seed": 0,
    }
    assert isinstance(data["warnings"], list)
    for key in ("onnxruntime_version", "provider_used", "cpu_model", "started_at"):
        assert isinstance(data["environment"][key], str)
    assert len(data["results"]) == 4
    float_keys = ("median_ms", "p90_ms", "mean_ms", "stdev_ms", "min_ms", "max_ms", "speedup_vs_first", "items_per_s")
    for result in data["results"]:
        assert set(result) == {
            "label", "source", "batch", "n", "round_medians_ms", "inputs", "outputs", *float_keys,
        }
        assert all(isinstance(result[k], float) for k in float_keys)
        assert isinstance(result["n"], int) and isinstance(result["batch"], int)
        assert result["inputs"]["x"]["shape"][0] == result["batch"]
    assert [r["speedup_vs_first"] for r in data["results"]][::2] == [1.0, 1.0]
    with_samples = json.loads(report.to_json(include_samples=True))
    assert all(len(r["samples_ms"]) == r["n"] for r in with_samples["results"])


def test_format_table(conv_files):
    table = benchmark(conv_files, BenchConfig(**FAST)).format_table()
    lines = table.splitlines()
    for column in ("model", "batch", "median ms", "p90 ms", "min ms", "max ms", "n", "speed-up"):
        assert column in lines[0]
    assert lines[2].startswith("conv8.onnx ") and lines[2].endswith("1.00x")
    assert lines[3].startswith("conv16.onnx")
    assert len({len(line) for line in lines[:4]}) == 1  # fixed width
    assert "onnxruntime" in table and "1 intra-op thread" in table


def test_in_memory_models_labels_and_compare():
    small, large = conv_model(8), conv_model(16)
    report = benchmark([large, small.SerializeToString()], BenchConfig(**FAST))
    assert report.labels == ["model0", "model1"]
    assert all(r.source is None for r in report.results)
    named = benchmark([large, small], BenchConfig(**FAST), labels=["big", "small"])
    assert named.labels == ["big", "small"]

    cmp = compare(large, small, BenchConfig(batch_sizes=(1, 2), **FAST))
    assert (cmp.label_a, cmp.label_b) == ("original", "pruned")
    assert [row.batch for row in cmp.rows] == [1, 2]
    a, b = cmp.report.result("original", 1), cmp.report.result("pruned", 1)
    assert (cmp.median_a_ms, cmp.median_b_ms, cmp.p90_a_ms, cmp.p90_b_ms) == (
        a.median_ms, b.median_ms, a.p90_ms, b.p90_ms,
    )
    assert cmp.speedup == pytest.approx(a.median_ms / b.median_ms)
    assert cmp.row(2).speedup == pytest.approx(cmp.report.speedup("original", "pruned", 2))
    assert compare(large, small, BenchConfig(**FAST), labels=["A", "B"]).label_b == "B"


def test_duplicate_file_names_get_unique_labels(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        onnx.save(conv_model(8), str(tmp_path / sub / "model.onnx"))
    paths = [str(tmp_path / "a" / "model.onnx"), tmp_path / "b" / "model.onnx"]  # str and Path
    report = benchmark(paths, BenchConfig(**FAST))
    assert report.labels == ["model.onnx", "model.onnx#2"]


def test_symbolic_dim_without_size_names_the_dim():
    with pytest.raises(BenchmarkError, match=r"'sequence'.*--dim sequence=VALUE"):
        benchmark([token_model()], BenchConfig(**FAST))


def test_token_inputs_with_dim(caplog):
    # vocab 10 < the default id range: ids must follow the embedding size or Gather fails.
    report = benchmark([token_model(vocab=10)], BenchConfig(batch_sizes=(2,), dims={"sequence": 7}, **FAST))
    result = report.results[0]
    assert result.outputs == {"y": {"shape": [2, 7, 4]}}
    assert {spec["dtype"] for spec in result.inputs.values()} == {"int64"}
    assert all(spec["shape"] == [2, 7] for spec in result.inputs.values())


def test_generated_token_inputs():
    model = bench._load_models([token_model(vocab=10)], None)[0]
    config = BenchConfig(dims={"sequence": 5})
    feeds = bench._generate_inputs(model, 3, config)
    assert feeds["input_ids"].shape == (3, 5) and feeds["input_ids"].dtype == np.int64
    assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 10
    assert (feeds["attention_mask"] == 1).all() and (feeds["token_type_ids"] == 0).all()
    again = bench._generate_inputs(bench._load_models([token_model(vocab=10)], None)[0], 3, config)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)  # same spec -> same data


def test_unused_dim_is_a_warning(conv_files):
    report = benchmark(conv_files[:1], BenchConfig(dims={"sequence": 4}, **FAST))
    assert any("--dim sequence" in w for w in report.warnings)


def test_fixed_batch_model_at_other_batch_size():
    with pytest.raises(BenchmarkError, match="fixed first dimension 1.*--batch-sizes 1"):
        benchmark([conv_model(8, batch=1)], BenchConfig(batch_sizes=(2,), **FAST))
    assert benchmark([conv_model(8, batch=1)], BenchConfig(**FAST)).results[0].batch == 1


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(BenchmarkError, match="no such file"):
        benchmark([str(tmp_path / "absent.onnx")], BenchConfig(**FAST))


def test_garbage_file(garbage_file):
    with pytest.raises(BenchmarkError, match="garbage.onnx"):
        benchmark([garbage_file], BenchConfig(**FAST))


def test_text_file_and_bad_bytes(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(BenchmarkError):
        benchmark([str(text)], BenchConfig(**FAST))
    with pytest.raises(BenchmarkError, match="model0"):
        benchmark([b"\x00\xff garbage"], BenchConfig(**FAST))
    with pytest.raises(BenchmarkError, match="cannot benchmark a int"):
        benchmark([42], BenchConfig(**FAST))


def test_checker_failure():
    model = conv_model(8)
    model.graph.node[1].op_type = "NoSuchOp"
    with pytest.raises(BenchmarkError, match="invalid ONNX model"):
        benchmark([model], BenchConfig(**FAST))


def test_input_without_shape():
    model = conv_model(8)
    model.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(BenchmarkError, match="shape"):
        benchmark([model], BenchConfig(**FAST))


def test_cuda_unavailable(no_cuda):
    message = "CUDAExecutionProvider is not available.*onnxruntime-gpu.*--provider cpu"
    with pytest.raises(BenchmarkError, match=message):
        benchmark([conv_model(8)], BenchConfig(provider="cuda", **FAST))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"provider": "tpu"}, "unknown provider 'tpu'"),
        ({"opt_level": "max"}, "unknown optimisation level 'max'"),
        ({"rounds": 0}, "rounds must be a positive integer"),
        ({"batch_sizes": ()}, "no batch sizes"),
        ({"batch_sizes": (1, -2)}, "batch size must be a positive integer"),
        ({"threads": 0}, "threads must be a positive integer"),
        ({"warmup": -1}, "warmup must be zero or a positive integer"),
        ({"dims": {"sequence": "long"}}, "dimension 'sequence' must be an integer"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(BenchmarkError, match=match):
        BenchConfig(**kwargs)


def test_bad_model_lists():
    with pytest.raises(BenchmarkError, match="no models"):
        benchmark([], BenchConfig(**FAST))
    with pytest.raises(BenchmarkError, match="1 labels for 2 models"):
        benchmark([conv_model(8), conv_model(16)], BenchConfig(**FAST), labels=["a"])
    with pytest.raises(BenchmarkError, match="unique"):
        benchmark([conv_model(8), conv_model(16)], BenchConfig(**FAST), labels=["a", "a"])


def test_benchmark_error_is_an_fxprune_error():
    assert issubclass(BenchmarkError, FxpruneError)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

CLI_FAST = ["--threads", "1", "--warmup", "1", "--rounds", "2", "--runs", "3"]


def test_cli_table(conv_files, capsys):
    assert main(["bench", *conv_files, "--batch-sizes", "1,2", *CLI_FAST]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["model", "batch", "median"]
    rows = [line.split() for line in out.splitlines()[2:6]]
    assert [(row[0], row[1]) for row in rows] == [
        ("conv8.onnx", "1"), ("conv16.onnx", "1"), ("conv8.onnx", "2"), ("conv16.onnx", "2"),
    ]


def test_cli_json_to_stdout(conv_files, capsys):
    assert main(["bench", *conv_files, "--opt-level", "extended", *CLI_FAST, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == SCHEMA
    assert data["config"]["opt_level"] == "extended" and data["config"]["runs_per_round"] == 3
    assert [r["label"] for r in data["results"]] == ["conv8.onnx", "conv16.onnx"]


def test_cli_json_to_file(conv_files, tmp_path, capsys):
    target = tmp_path / "out.json"
    assert main(["bench", conv_files[0], *CLI_FAST, "--json", str(target)]) == 0
    assert "median ms" in capsys.readouterr().out
    assert json.loads(target.read_text())["results"][0]["label"] == "conv8.onnx"


def test_cli_dim(tmp_path, capsys):
    path = tmp_path / "tokens.onnx"
    onnx.save(token_model(), str(path))
    assert main(["bench", str(path), "--dim", "sequence=6", *CLI_FAST, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["outputs"]["y"]["shape"] == [1, 6, 4]
    assert main(["bench", str(path), *CLI_FAST]) == 2
    assert "--dim sequence=VALUE" in capsys.readouterr().err


def test_cli_errors_exit_2_with_message(tmp_path, garbage_file, no_cuda, capsys):
    cases = [
        ([str(tmp_path / "absent.onnx")], "no such file"),
        ([garbage_file], "garbage.onnx"),
        ([garbage_file, "--provider", "cuda"], "CUDAExecutionProvider is not available"),
    ]
    for args, message in cases:
        assert main(["bench", *args, *CLI_FAST]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("fxprune bench: error:") and message in captured.err
        assert "Traceback" not in captured.err and captured.out == ""


def test_cli_unwritable_json_path(conv_files, tmp_path, capsys):
    assert main(["bench", conv_files[0], *CLI_FAST, "--json", str(tmp_path / "no" / "dir.json")]) == 2
    assert "cannot write the JSON report" in capsys.readouterr().err


def test_cli_json_path_that_is_a_model_is_refused(conv_files, capsys):
    before = open(conv_files[0], "rb").read()
    assert main(["bench", "--json", *conv_files, *CLI_FAST]) == 2
    assert "would be overwritten" in capsys.readouterr().err
    assert open(conv_files[0], "rb").read() == before


@pytest.mark.parametrize(
    "args",
    [
        ["--batch-sizes", "0"],
        ["--batch-sizes", "1,x"],
        ["--dim", "sequence"],
        ["--dim", "sequence=-1"],
        ["--provider", "tpu"],
        ["--opt-level", "max"],
        ["--runs", "0"],
    ],
)
def test_cli_argument_errors(conv_files, args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", conv_files[0], *args])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# A model from torch.onnx.export (what `compile` produces)
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torch_exported_model(tmp_path):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    module.eval()
    path = tmp_path / "exported.onnx"
    try:
        torch.onnx.export(
            module, (torch.zeros(1, 3, 6, 6),), str(path), dynamo=False,
            input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    except TypeError:  # pragma: no cover - legacy exporter gone in a later torch
        pytest.skip("torch.onnx.export(dynamo=False) is not available")
    report = benchmark([str(path)], BenchConfig(batch_sizes=(1, 5), **FAST))
    assert [r.outputs["y"]["shape"] for r in report.results] == [[1, 2], [5, 2]]
