"""Honest ONNX Runtime latency benchmarks: warm-up, interleaved A/B rounds, recorded conditions.

Pruning is done to make a model faster, so the numbers that prove it must be fair. This module
times one or more ONNX models on ONNX Runtime under identical conditions:

* one session per (model, batch size), all with the same :class:`BenchConfig` (intra-op threads,
  one inter-op thread, sequential execution, graph optimisation level, execution provider);
* inputs generated once per (model, batch) from the model's input specs (the same input name,
  shape and type gets the same values in every model, so A and B see identical data);
* a warm-up, then ``rounds`` **interleaved** rounds: each round runs every model
  ``runs_per_round`` times, and the model order rotates every round (A B C, B C A, C A B, ...) so
  that thermal or load drift hits every model equally;
* every run timed with :func:`time.perf_counter_ns`; median, p90, mean, stdev, min and max per
  (model, batch); the environment (ONNX Runtime version, provider actually used, threads,
  optimisation level, CPU, load average before and after) recorded beside the numbers.

On CUDA the inputs are copied to the device once and inputs and outputs are bound there with
IOBinding, so host-device copies are not part of the timing.

Typical use::

    from fxprune.bench import BenchConfig, benchmark, compare

    report = benchmark(["resnet50.onnx", "resnet50_pruned.onnx"], BenchConfig(batch_sizes=(1, 8)))
    print(report.format_table())
    report.speedup("resnet50.onnx", "resnet50_pruned.onnx", batch=1)   # median_a / median_b

    cmp = compare(original_proto, pruned_proto)        # labels default to "original"/"pruned"
    cmp.speedup, cmp.median_a_ms, cmp.p90_b_ms

JSON schema ``fxprune.bench/1`` (:meth:`BenchReport.to_json`); times are milliseconds::

    {
      "schema": "fxprune.bench/1",
      "config": {"runtime": "ort" | "torch", "dtype": "fp32" | "fp16" | "bf16", "cuda_graphs": bool,
                 "channels_last": bool, "provider": str, "threads": int, "opt_level": str,
                 "batch_sizes": [int], "warmup": int, "rounds": int, "runs_per_round": int,
                 "dims": {str: int}, "seed": int},
      "environment": {"fxprune_version": str, "onnxruntime_version": str, "onnx_version": str,
                      "python_version": str, "platform": str, "provider_requested": str,
                      "provider_used": str, "session_providers": [str], "threads": int,
                      "inter_op_threads": 1, "execution_mode": "sequential", "opt_level": str,
                      "cpu_model": str, "physical_cores": int, "logical_cpus": int,
                      "loadavg_before": [float, float, float] | null,
                      "loadavg_after": [float, float, float] | null, "started_at": str (UTC ISO)},
      "warnings": [str],
      "results": [{"label": str, "source": str | null, "batch": int,
                   "median_ms": float, "p90_ms": float, "mean_ms": float, "stdev_ms": float,
                   "min_ms": float, "max_ms": float, "n": int,
                   "round_medians_ms": [float], "items_per_s": float, "speedup_vs_first": float,
                   "inputs": {name: {"shape": [int], "dtype": str}},
                   "outputs": {name: {"shape": [int]}},
                   "samples_ms": [float]   # only with to_json(include_samples=True)
                  }]
    }

``results`` is ordered by batch size, then by model in the order given. ``speedup_vs_first`` is
``median(first model) / median(this model)`` at the same batch size (> 1: this model is faster).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import statistics
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx

from fxprune import progress
from fxprune.errors import BenchmarkError

__all__ = [
    "SCHEMA",
    "BenchConfig",
    "LatencyStats",
    "BenchResult",
    "BenchReport",
    "Comparison",
    "ComparisonRow",
    "benchmark",
    "compare",
    "run_interleaved",
    "rotation",
    "summarize",
    "percentile",
    "median",
    "physical_cores",
]

logger = logging.getLogger(__name__)

SCHEMA = "fxprune.bench/1"

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
RUNTIMES = ("ort", "torch")
OPT_LEVELS = ("all", "extended", "basic", "disable")
_OPT_LEVEL_ENUM = {
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "disable": "ORT_DISABLE_ALL",
}
_BUSY_LOAD_FRACTION = 0.5  # warn when the 1-min loadavg exceeds this fraction of the logical CPUs
_UNSTABLE_ROUND_SPREAD = 0.20  # warn when round medians spread by more than this fraction
_DEFAULT_ID_RANGE = 100  # integer ids are drawn from [0, 100) unless an embedding is smaller


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """How to benchmark: provider, threads, optimisation level, batch sizes and repetitions.

    Attributes:
        provider: ``"cpu"``, ``"cuda"`` or ``"tensorrt"`` (ONNX Runtime; ``cpu``/``cuda`` for PyTorch).
        threads: intra-op threads; ``None`` means the number of physical cores (the value used
            is recorded in the report environment).
        opt_level: ONNX Runtime graph optimisation level: ``"all"``, ``"extended"``, ``"basic"``
            or ``"disable"``.
        batch_sizes: batch sizes to time; the first dimension of every input is the batch.
        warmup: untimed runs per model before the timed rounds.
        rounds: interleaved rounds; the model order rotates every round.
        runs_per_round: timed runs of each model per round.
        dims: sizes of symbolic input dimensions other than the batch, e.g. ``{"sequence": 128}``.
        seed: seed of the generated inputs.

    Raises:
        BenchmarkError: on construction, when a value is out of range or unknown.
    """

    provider: str = "cpu"
    threads: int | None = None
    opt_level: str = "all"
    batch_sizes: Sequence[int] = (1,)
    warmup: int = 10
    rounds: int = 5
    runs_per_round: int = 20
    dims: Mapping[str, int] = field(default_factory=dict)
    seed: int = 0
    runtime: str = "ort"
    dtype: str = "fp32"
    cuda_graphs: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        self.runtime = str(self.runtime).lower()
        if self.runtime in ("ort-cpu", "ort-cuda", "ort-trt", "torch-cpu", "torch-cuda"):  # a target name
            self.runtime, _, device = self.runtime.partition("-")
            self.provider = "tensorrt" if device == "trt" else device
        if self.runtime == "torch" and str(self.provider).lower() not in ("cpu", "cuda"):
            raise BenchmarkError(f"PyTorch runs on cpu or cuda, not {self.provider!r}")
        if self.runtime not in RUNTIMES:
            raise BenchmarkError(
                f"unknown runtime {self.runtime!r}; choose one of ort-cpu, ort-cuda, torch-cpu, torch-cuda")
        from fxprune.runtimes import parse_dtype

        self.dtype = parse_dtype(self.dtype)
        if self.runtime == "ort" and self.dtype != "fp32":
            raise BenchmarkError(f"ONNX Runtime times the fp32 ONNX models fxprune exports; dtype {self.dtype} is "
                                 "for --runtime torch-cuda / torch-cpu")
        if self.cuda_graphs and not (self.runtime == "torch" and str(self.provider).lower() == "cuda"):
            raise BenchmarkError("CUDA graphs (--cuda-graphs) need --runtime torch-cuda")
        self.provider = str(self.provider).lower()
        self.opt_level = str(self.opt_level).lower()
        if self.provider not in PROVIDERS:
            raise BenchmarkError(
                f"unknown provider {self.provider!r}; choose one of {', '.join(PROVIDERS)}"
            )
        if self.opt_level not in OPT_LEVELS:
            raise BenchmarkError(
                f"unknown optimisation level {self.opt_level!r}; choose one of {', '.join(OPT_LEVELS)}"
            )
        self.batch_sizes = tuple(_positive_int(b, "batch size") for b in self.batch_sizes)
        if not self.batch_sizes:
            raise BenchmarkError("no batch sizes given; pass at least one, e.g. batch_sizes=(1,)")
        if self.threads is not None:
            self.threads = _positive_int(self.threads, "threads")
        self.warmup = _non_negative_int(self.warmup, "warmup")
        self.rounds = _positive_int(self.rounds, "rounds")
        self.runs_per_round = _positive_int(self.runs_per_round, "runs_per_round")
        self.dims = {str(k): _positive_int(v, f"dimension {k!r}") for k, v in dict(self.dims).items()}
        self.seed = int(self.seed)

    def resolved_threads(self) -> int:
        """The intra-op thread count to use: ``threads`` or the number of physical cores."""
        return self.threads if self.threads is not None else physical_cores()

    @property
    def target(self) -> str:
        """``ort-cpu``, ``ort-cuda``, ``torch-cpu`` or ``torch-cuda``."""
        return f"{self.runtime}-{'trt' if self.provider == 'tensorrt' else self.provider}"

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-ready data, with ``threads`` resolved."""
        return {
            "runtime": self.runtime,
            "dtype": self.dtype,
            "cuda_graphs": self.cuda_graphs,
            "channels_last": self.channels_last,
            "provider": self.provider,
            "threads": self.resolved_threads(),
            "opt_level": self.opt_level,
            "batch_sizes": list(self.batch_sizes),
            "warmup": self.warmup,
            "rounds": self.rounds,
            "runs_per_round": self.runs_per_round,
            "dims": dict(self.dims),
            "seed": self.seed,
        }


def _positive_int(value: Any, what: str) -> int:
    number = _as_int(value, what)
    if number < 1:
        raise BenchmarkError(f"{what} must be a positive integer, got {value!r}")
    return number


def _non_negative_int(value: Any, what: str) -> int:
    number = _as_int(value, what)
    if number < 0:
        raise BenchmarkError(f"{what} must be zero or a positive integer, got {value!r}")
    return number


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise BenchmarkError(f"{what} must be an integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------
# Statistics (pure functions)
# --------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` with linear interpolation (numpy's default method).

    Args:
        values: a non-empty sequence of numbers (any order).
        q: percentile in ``[0, 100]``.

    Returns:
        The interpolated percentile, e.g. ``percentile([1, 2, 3, 4], 50) == 2.5``.

    Raises:
        ValueError: when ``values`` is empty or ``q`` is outside ``[0, 100]``.
    """
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (the mean of the two middle values for an even count)."""
    return percentile(values, 50)


@dataclass(frozen=True)
class LatencyStats:
    """Summary of one model's timed runs, in milliseconds.

    ``stdev_ms`` is the sample standard deviation (0 for a single run).
    """

    median_ms: float
    p90_ms: float
    mean_ms: float
    stdev_ms: float
    min_ms: float
    max_ms: float
    n: int


def summarize(samples_ms: Sequence[float]) -> LatencyStats:
    """Median, p90, mean, sample stdev, min, max and count of latencies in milliseconds.

    Args:
        samples_ms: a non-empty sequence of per-run latencies in milliseconds.

    Returns:
        The :class:`LatencyStats` of the samples.

    Raises:
        ValueError: when ``samples_ms`` is empty.
    """
    if not samples_ms:
        raise ValueError("no samples to summarize")
    values = [float(v) for v in samples_ms]
    return LatencyStats(
        median_ms=median(values),
        p90_ms=percentile(values, 90),
        mean_ms=statistics.fmean(values),
        stdev_ms=statistics.stdev(values) if len(values) > 1 else 0.0,
        min_ms=min(values),
        max_ms=max(values),
        n=len(values),
    )


# --------------------------------------------------------------------------------------------
# The timing loop (the seam: any zero-argument callables and any nanosecond clock)
# --------------------------------------------------------------------------------------------


def rotation(n_models: int, round_index: int) -> list[int]:
    """Model order of one round: ``round_index`` rotations of ``0..n_models-1`` to the left."""
    return [(round_index + k) % n_models for k in range(n_models)]


def run_interleaved(
    runs: Sequence[Callable[[], object]],
    *,
    warmup: int,
    rounds: int,
    runs_per_round: int,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> list[list[list[int]]]:
    """Warm up, then time every callable in interleaved, rotated rounds.

    Each callable is first called ``warmup`` times (untimed, in the given order). Then, in round
    ``r``, the callables run in the order ``rotation(len(runs), r)`` and each runs
    ``runs_per_round`` times back to back, every call timed on its own with ``clock``.

    Args:
        runs: one zero-argument callable per model (one inference each).
        warmup: untimed calls per callable before the first round.
        rounds: number of rounds.
        runs_per_round: timed calls per callable and round.
        clock: a monotonic clock in nanoseconds.

    Returns:
        ``times[model][round]`` = the list of per-call durations in nanoseconds.
    """
    for run in runs:
        for _ in range(warmup):
            run()
    times: list[list[list[int]]] = [[[] for _ in range(rounds)] for _ in runs]
    # the bar is updated between rounds only, outside every timed call
    for round_index in progress.bar(range(rounds), desc="benchmark", unit="round"):
        for model_index in rotation(len(runs), round_index):
            run = runs[model_index]
            bucket = times[model_index][round_index]
            for _ in range(runs_per_round):
                start = clock()
                run()
                bucket.append(clock() - start)
    return times


# --------------------------------------------------------------------------------------------
# Results and report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchResult:
    """Latency of one model at one batch size.

    Attributes:
        label: the model's name in the report (file name or the label given).
        batch: the batch size.
        stats: summary statistics over all timed runs.
        round_medians_ms: the median of each round (their spread shows drift).
        samples_ms: every timed run in milliseconds, round by round.
        inputs: ``{name: {"shape": [...], "dtype": "float32"}}`` of the generated inputs.
        outputs: ``{name: {"shape": [...]}}`` observed on a probe run.
        source: the file path, or ``None`` for an in-memory model.
    """

    label: str
    batch: int
    stats: LatencyStats
    round_medians_ms: tuple[float, ...]
    samples_ms: tuple[float, ...]
    inputs: Mapping[str, Mapping[str, Any]]
    outputs: Mapping[str, Mapping[str, Any]]
    source: str | None = None

    @property
    def median_ms(self) -> float:
        """Median latency in milliseconds."""
        return self.stats.median_ms

    @property
    def p90_ms(self) -> float:
        """90th-percentile latency in milliseconds."""
        return self.stats.p90_ms

    @property
    def items_per_s(self) -> float:
        """Throughput at the median latency: batch items per second."""
        return self.batch * 1000.0 / self.stats.median_ms if self.stats.median_ms > 0 else math.inf


@dataclass
class BenchReport:
    """The outcome of :func:`benchmark`: results, environment and warnings.

    Attributes:
        results: one :class:`BenchResult` per (batch size, model), batch-major, models in order.
        environment: the recorded conditions (see the module docstring for the keys).
        warnings: conditions that make the numbers less trustworthy (busy machine, drift, ...).
        config: the configuration that produced the report.
    """

    results: list[BenchResult]
    environment: dict[str, Any]
    warnings: list[str]
    config: BenchConfig

    @property
    def labels(self) -> list[str]:
        """Model labels in the order given."""
        seen: dict[str, None] = {}
        for result in self.results:
            seen.setdefault(result.label, None)
        return list(seen)

    def result(self, label: str, batch: int | None = None) -> BenchResult:
        """The result of model ``label`` at ``batch`` (default: the first batch size).

        Raises:
            KeyError: when there is no such model or batch size.
        """
        batch = self.config.batch_sizes[0] if batch is None else batch
        for result in self.results:
            if result.label == label and result.batch == batch:
                return result
        raise KeyError(
            f"no result for model {label!r} at batch {batch}; models: {self.labels}, "
            f"batch sizes: {list(self.config.batch_sizes)}"
        )

    def speedup(self, a_label: str, b_label: str, batch: int | None = None) -> float:
        """``median(a) / median(b)`` at ``batch``: above 1 means ``b`` is faster than ``a``.

        Args:
            a_label: the reference model (e.g. the original).
            b_label: the model compared with it (e.g. the pruned one).
            batch: batch size; default the first configured one.

        Raises:
            KeyError: when a label or the batch size is unknown.
        """
        return self.result(a_label, batch).median_ms / self.result(b_label, batch).median_ms

    def _speedup_vs_first(self, result: BenchResult) -> float:
        first = next(r for r in self.results if r.batch == result.batch)
        return first.median_ms / result.median_ms

    def to_dict(self, include_samples: bool = False) -> dict[str, Any]:
        """The report as JSON-ready data following schema ``fxprune.bench/1``.

        Args:
            include_samples: also list every timed run (``samples_ms``) per result.
        """
        return {
            "schema": SCHEMA,
            "config": self.config.to_dict() | {"threads": self.environment.get("threads")},
            "environment": dict(self.environment),
            "warnings": list(self.warnings),
            "results": [self._result_dict(r, include_samples) for r in self.results],
        }

    def _result_dict(self, result: BenchResult, include_samples: bool) -> dict[str, Any]:
        data: dict[str, Any] = {"label": result.label, "source": result.source, "batch": result.batch}
        data.update(dataclasses.asdict(result.stats))
        data["round_medians_ms"] = list(result.round_medians_ms)
        data["items_per_s"] = result.items_per_s
        data["speedup_vs_first"] = self._speedup_vs_first(result)
        data["inputs"] = {name: dict(spec) for name, spec in result.inputs.items()}
        data["outputs"] = {name: dict(spec) for name, spec in result.outputs.items()}
        if include_samples:
            data["samples_ms"] = list(result.samples_ms)
        return data

    def to_json(self, indent: int | None = 2, include_samples: bool = False) -> str:
        """The report as a JSON string (schema ``fxprune.bench/1``, see the module docstring)."""
        return json.dumps(self.to_dict(include_samples), indent=indent)

    def format_table(self) -> str:
        """A fixed-width table (one row per model and batch) followed by the conditions.

        The speed-up column is ``median(first model) / median(this model)`` at the same batch.
        """
        header = ("model", "batch", "median ms", "p90 ms", "min ms", "max ms", "n", "items/s", "speed-up")
        rows = [
            (
                r.label,
                str(r.batch),
                f"{r.stats.median_ms:.3f}",
                f"{r.stats.p90_ms:.3f}",
                f"{r.stats.min_ms:.3f}",
                f"{r.stats.max_ms:.3f}",
                str(r.stats.n),
                f"{r.items_per_s:,.1f}",
                f"{self._speedup_vs_first(r):.2f}x",
            )
            for r in self.results
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(cells: Sequence[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
            return "  ".join([first, *rest])

        out = [line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]
        out.append("")
        out.append(self._conditions())
        out.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(out)

    def _conditions(self) -> str:
        env = self.environment
        load = _format_load(env.get("loadavg_before"), env.get("loadavg_after"))
        if env.get("runtime") == "torch":
            device = env.get("device") or "cpu"
            mode = "CUDA graphs" if env.get("cuda_graphs_used") else "eager"
            return (
                f"PyTorch {env.get('torch_version')} on {device} ({mode}, {env.get('dtype')}"
                f"{', channels_last' if env.get('channels_last') else ''}, {env.get('threads')} CPU thread(s)), "
                f"{self.config.rounds} interleaved rounds x {self.config.runs_per_round} runs "
                f"after {self.config.warmup} warm-up\n{env.get('cpu_model')} "
                f"({env.get('physical_cores')} physical cores); {load}"
            )
        return (
            f"onnxruntime {env.get('onnxruntime_version')} {env.get('provider_used')}, "
            f"{env.get('threads')} intra-op thread(s), opt level {env.get('opt_level')}, "
            f"{self.config.rounds} interleaved rounds x {self.config.runs_per_round} runs "
            f"after {self.config.warmup} warm-up\n{env.get('cpu_model')} "
            f"({env.get('physical_cores')} physical cores); {load}"
        )


def _format_load(before: Sequence[float] | None, after: Sequence[float] | None) -> str:
    if before is None or after is None:
        return "loadavg unavailable"
    return f"loadavg (1 min) {before[0]:.2f} before, {after[0]:.2f} after"


@dataclass(frozen=True)
class ComparisonRow:
    """Original (``a``) versus pruned (``b``) at one batch size; ``speedup = median_a / median_b``."""

    batch: int
    median_a_ms: float
    median_b_ms: float
    p90_a_ms: float
    p90_b_ms: float
    speedup: float


@dataclass(frozen=True)
class Comparison:
    """Result of :func:`compare`. Scalar properties refer to the first batch size.

    Attributes:
        label_a: label of the original model.
        label_b: label of the pruned model.
        rows: one :class:`ComparisonRow` per batch size, in the configured order.
        report: the full :class:`BenchReport` (environment, warnings, all statistics).
    """

    label_a: str
    label_b: str
    rows: tuple[ComparisonRow, ...]
    report: BenchReport

    def row(self, batch: int) -> ComparisonRow:
        """The comparison at ``batch``.

        Raises:
            KeyError: when that batch size was not measured.
        """
        for row in self.rows:
            if row.batch == batch:
                return row
        raise KeyError(f"batch {batch} was not measured; batch sizes: {[r.batch for r in self.rows]}")

    @property
    def speedup(self) -> float:
        """``median_a / median_b`` at the first batch size (above 1: the pruned model is faster)."""
        return self.rows[0].speedup

    @property
    def median_a_ms(self) -> float:
        """Median latency of the original at the first batch size."""
        return self.rows[0].median_a_ms

    @property
    def median_b_ms(self) -> float:
        """Median latency of the pruned model at the first batch size."""
        return self.rows[0].median_b_ms

    @property
    def p90_a_ms(self) -> float:
        """p90 latency of the original at the first batch size."""
        return self.rows[0].p90_a_ms

    @property
    def p90_b_ms(self) -> float:
        """p90 latency of the pruned model at the first batch size."""
        return self.rows[0].p90_b_ms


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def physical_cores() -> int:
    """Physical cores this process may run on (logical CPUs where the topology is unknown)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, len(cores))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 3) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _base_environment(config: BenchConfig, threads: int) -> dict[str, Any]:
    import onnxruntime

    from fxprune import __version__

    return {
        "fxprune_version": __version__,
        "onnxruntime_version": onnxruntime.__version__,
        "onnx_version": onnx.__version__,
        "provider_requested": PROVIDERS[config.provider],
        "provider_used": None,
        "session_providers": [],
        "inter_op_threads": 1,
        "execution_mode": "sequential",
        "opt_level": config.opt_level,
        **_host_environment(threads),
    }


def _host_environment(threads: int) -> dict[str, Any]:
    """What every benchmark records about the host, whatever the runtime."""
    return {
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "threads": threads,
        "cpu_model": _cpu_model(),
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count() or 1,
        "loadavg_before": None,
        "loadavg_after": None,
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _environment_warnings(env: dict[str, Any]) -> list[str]:
    warnings = []
    load = env["loadavg_before"]
    cpus = env["logical_cpus"]
    if load is not None and load[0] > _BUSY_LOAD_FRACTION * cpus:
        warnings.append(
            f"machine busy: timings may be inflated (1-min loadavg {load[0]:.2f} on {cpus} logical "
            f"CPUs before starting); stop other work or rerun later"
        )
    if env["threads"] > env["physical_cores"]:
        warnings.append(
            f"{env['threads']} intra-op threads on {env['physical_cores']} physical cores: "
            f"oversubscribed threads make timings noisy"
        )
    return warnings


def _drift_warnings(results: Sequence[BenchResult]) -> list[str]:
    """One warning naming every result whose round medians spread by more than the threshold."""
    unstable = []
    for result in results:
        rounds = result.round_medians_ms
        if len(rounds) < 2 or result.median_ms <= 0:
            continue
        spread = (max(rounds) - min(rounds)) / result.median_ms
        if spread > _UNSTABLE_ROUND_SPREAD:
            unstable.append(f"{result.label} at batch {result.batch} ({spread:.0%})")
    if not unstable:
        return []
    return [
        f"unstable timings: round medians differ by more than {_UNSTABLE_ROUND_SPREAD:.0%} of the median "
        f"for {', '.join(unstable)}; more --rounds/--runs, fewer --threads or a quieter machine may help"
    ]


# --------------------------------------------------------------------------------------------
# Loading models and generating inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _InputSpec:
    name: str
    dims: tuple[int | str | None, ...]  # int: fixed; str: symbolic; None: unknown
    dtype: np.dtype


@dataclass(frozen=True)
class _Model:
    label: str
    source: str | None  # file path, None for in-memory models
    payload: str | bytes  # what InferenceSession is created from
    inputs: tuple[_InputSpec, ...]
    id_bounds: Mapping[str, int]  # integer input -> exclusive upper bound for generated ids
    #: sizes of named dynamic dims recorded by ``fxprune.export_onnx`` (the example's sequence
    #: length, image height/width): used when ``config.dims`` does not give them
    default_dims: Mapping[str, int] = field(default_factory=dict)


def _load_models(models: Sequence[ModelSource], labels: Sequence[str] | None) -> list[_Model]:
    if not models:
        raise BenchmarkError("no models to benchmark; pass at least one ONNX file or model")
    if labels is not None and len(labels) != len(models):
        raise BenchmarkError(f"got {len(labels)} labels for {len(models)} models; give one per model")
    if labels is not None:
        names = list(labels)
    else:
        names = [_default_label(model, f"model{i}") for i, model in enumerate(models)]
    if labels is not None and len(set(names)) != len(names):
        raise BenchmarkError(f"labels must be unique, got {names}")
    names = _deduplicate(names)
    return [_load_model(model, name) for model, name in zip(models, names)]


def _default_label(model: ModelSource, fallback: str) -> str:
    if isinstance(model, (str, os.PathLike)):
        return Path(model).name
    return fallback


def _deduplicate(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return unique


def _load_model(model: ModelSource, label: str) -> _Model:
    if isinstance(model, (str, os.PathLike)):
        return _load_file(Path(model), label)
    if isinstance(model, (bytes, bytearray)):
        proto = _parse_bytes(bytes(model), label)
        return _from_proto(proto, label, source=None, payload=bytes(model))
    if isinstance(model, onnx.ModelProto):
        _check(model, label)
        try:
            payload = model.SerializeToString()
        except Exception as err:  # e.g. protobuf refuses models over 2 GiB
            raise BenchmarkError(
                f"{label}: cannot serialize the in-memory model ({err}); save it to a file instead"
            ) from err
        return _from_proto(model, label, source=None, payload=payload)
    raise BenchmarkError(
        f"{label}: cannot benchmark a {type(model).__name__}; pass a path, bytes or onnx.ModelProto"
    )


def _load_file(path: Path, label: str) -> _Model:
    if not path.exists():
        raise BenchmarkError(f"{path}: no such file")
    if not path.is_file():
        raise BenchmarkError(f"{path}: not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise BenchmarkError(f"{path}: not a readable ONNX model ({_first_line(err)})") from err
    _check(proto, label, path=str(path))
    return _from_proto(proto, label, source=str(path), payload=str(path))


def _parse_bytes(data: bytes, label: str) -> onnx.ModelProto:
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as err:
        raise BenchmarkError(f"{label}: bytes are not an ONNX model ({_first_line(err)})") from err
    _check(proto, label)
    return proto


def _check(proto: onnx.ModelProto, label: str, path: str | None = None) -> None:
    """``onnx.checker`` on the file (so external data resolves) or on the in-memory model."""
    if not proto.graph.node and not proto.graph.output:
        raise BenchmarkError(f"{label}: not an ONNX model (empty graph; is it the right file?)")
    try:
        onnx.checker.check_model(path if path is not None else proto)
    except Exception as err:
        raise BenchmarkError(f"{label}: invalid ONNX model: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _from_proto(proto: onnx.ModelProto, label: str, *, source: str | None, payload: str | bytes) -> _Model:
    initializers = {init.name for init in proto.graph.initializer}
    specs = tuple(
        _input_spec(value, label) for value in proto.graph.input if value.name not in initializers
    )
    bounds = {spec.name: _id_bound(proto.graph, spec.name) for spec in specs if spec.dtype.kind in "iu"}
    return _Model(label=label, source=source, payload=payload, inputs=specs, id_bounds=bounds,
                  default_dims=_recorded_dims(proto))


def _recorded_dims(proto: onnx.ModelProto) -> dict[str, int]:
    """The example sizes ``fxprune.export_onnx`` stored in the model's metadata (may be absent)."""
    for prop in proto.metadata_props:
        if prop.key == "fxprune.example_sizes":
            try:
                data = json.loads(prop.value)
            except ValueError:
                return {}
            if isinstance(data, dict):
                return {str(k): int(v) for k, v in data.items() if isinstance(v, int) and v > 0}
    return {}


def _input_spec(value: onnx.ValueInfoProto, label: str) -> _InputSpec:
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise BenchmarkError(
            f"{label}: input {value.name!r} is not a tensor; only tensor inputs are supported"
        )
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    except Exception as err:
        raise BenchmarkError(
            f"{label}: input {value.name!r} has an element type fxprune cannot generate "
            f"({onnx.TensorProto.DataType.Name(tensor.elem_type)})"
        ) from err
    if dtype.kind not in "fiub":
        raise BenchmarkError(f"{label}: input {value.name!r} has unsupported type {dtype}")
    if not tensor.HasField("shape"):
        raise BenchmarkError(
            f"{label}: input {value.name!r} has no shape (unknown rank); export the model with input shapes"
        )
    dims: list[int | str | None] = []
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param") and dim.dim_param:
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return _InputSpec(name=value.name, dims=tuple(dims), dtype=dtype)


def _id_bound(graph: onnx.GraphProto, name: str) -> int:
    """Upper bound for ids fed to ``name``: the smallest table a Gather indexes with it directly."""
    tables = {init.name: list(init.dims) for init in graph.initializer}
    bound = _DEFAULT_ID_RANGE
    for node in graph.node:
        indexes_table = len(node.input) > 1 and node.input[1] == name and node.input[0] in tables
        if node.op_type == "Gather" and indexes_table:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            shape = tables[node.input[0]]
            if shape and -len(shape) <= axis < len(shape):
                bound = min(bound, max(1, shape[axis]))
    return bound


def _check_dims(models: Sequence[_Model], config: BenchConfig) -> list[str]:
    """Fail early on sizes the user must give; return warnings about unused ``dims``."""
    used: set[str] = set()
    for model in models:
        batch_names = _batch_names(model)
        for spec in model.inputs:
            for axis, dim in enumerate(spec.dims[1:], start=1):
                if isinstance(dim, str) and dim not in batch_names:
                    if dim not in config.dims and dim in model.default_dims:
                        continue
                    if dim not in config.dims:
                        raise BenchmarkError(
                            f"{model.label}: input {spec.name!r} has symbolic dimension {dim!r} "
                            f"(axis {axis}); "
                            f"give its size with --dim {dim}=VALUE (dims={{{dim!r}: VALUE}} in the API)"
                        )
                    used.add(dim)
                elif dim is None:
                    raise BenchmarkError(
                        f"{model.label}: input {spec.name!r} has an unnamed dynamic dimension at axis "
                        f"{axis}; export the model with a named dynamic axis (then pass "
                        f"--dim NAME=VALUE) or a fixed size"
                    )
    return [
        f"--dim {name} was given but no model has a dimension named {name!r}"
        for name in sorted(set(config.dims) - used)
    ]


def _check_shapes(models: Sequence[_Model], config: BenchConfig) -> list[str]:
    """Fail before any timing when an input cannot be built at some batch size."""
    warnings = _check_dims(models, config)
    for batch in config.batch_sizes:
        for model in models:
            for spec in model.inputs:
                _input_shape(model, spec, batch, config.dims)
    return warnings


def _batch_names(model: _Model) -> set[str]:
    return {spec.dims[0] for spec in model.inputs if spec.dims and isinstance(spec.dims[0], str)}


def _input_shape(model: _Model, spec: _InputSpec, batch: int, dims: Mapping[str, int]) -> tuple[int, ...]:
    if not spec.dims:
        return ()
    first = spec.dims[0]
    if isinstance(first, int) and first != batch:
        raise BenchmarkError(
            f"{model.label}: input {spec.name!r} has a fixed first dimension {first}, so it cannot run "
            f"at batch {batch}; export it with a dynamic batch axis or use --batch-sizes {first}"
        )
    batch_names = _batch_names(model)
    shape = [batch]
    for dim in spec.dims[1:]:
        if isinstance(dim, int):
            shape.append(dim)
        elif dim in batch_names:
            shape.append(batch)
        else:
            shape.append(dims[dim] if dim in dims else model.default_dims[dim])  # checked by _check_dims
    return tuple(shape)


def _generate_inputs(model: _Model, batch: int, config: BenchConfig) -> dict[str, np.ndarray]:
    """Inputs for ``model`` at ``batch``; the same (name, shape, dtype) gives the same values."""
    feeds = {}
    for spec in model.inputs:
        shape = _input_shape(model, spec, batch, config.dims)
        rng = np.random.default_rng([config.seed, batch, zlib.crc32(spec.name.encode())])
        feeds[spec.name] = _random_tensor(spec, shape, rng, model.id_bounds.get(spec.name, _DEFAULT_ID_RANGE))
    return feeds


def _random_tensor(
    spec: _InputSpec, shape: tuple[int, ...], rng: np.random.Generator, id_bound: int
) -> np.ndarray:
    name = spec.name.lower()
    if spec.dtype.kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    if "mask" in name:
        return np.ones(shape, dtype=spec.dtype)
    if "token_type" in name:
        return np.zeros(shape, dtype=spec.dtype)
    if spec.dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    return rng.integers(0, id_bound, size=shape).astype(spec.dtype)


# --------------------------------------------------------------------------------------------
# Sessions and runners
# --------------------------------------------------------------------------------------------


def _check_provider(config: BenchConfig) -> None:
    import onnxruntime

    wanted = PROVIDERS[config.provider]
    available = onnxruntime.get_available_providers()
    if wanted not in available:
        hint = (
            "install the GPU build (pip uninstall onnxruntime && pip install onnxruntime-gpu) with a "
            "matching CUDA/cuDNN, or use --provider cpu"
            if config.provider in ("cuda", "tensorrt")
            else "reinstall onnxruntime"
        )
        raise BenchmarkError(
            f"{wanted} is not available in this onnxruntime {onnxruntime.__version__} "
            f"(available: {', '.join(available)}); {hint}"
        )


def _session_options(config: BenchConfig, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    level = _OPT_LEVEL_ENUM[config.opt_level]
    options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, level)
    options.log_severity_level = 3  # errors only; ORT's warnings would drown the table
    return options


def _create_session(model: _Model, config: BenchConfig, threads: int) -> Any:
    import onnxruntime

    providers: list[Any] = ["CPUExecutionProvider"]
    if config.provider == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    elif config.provider == "tensorrt":
        providers = [("TensorrtExecutionProvider", {"device_id": 0}), ("CUDAExecutionProvider", {"device_id": 0}),
                     "CPUExecutionProvider"]
    try:
        session = onnxruntime.InferenceSession(
            model.payload, sess_options=_session_options(config, threads), providers=providers
        )
    except Exception as err:
        raise BenchmarkError(f"{model.label}: onnxruntime cannot load the model: {_first_line(err)}") from err
    if PROVIDERS[config.provider] not in session.get_providers():
        raise BenchmarkError(
            f"{model.label}: onnxruntime fell back to {session.get_providers()} instead of "
            f"{PROVIDERS[config.provider]} (CUDA or cuDNN libraries missing or mismatched?); "
            f"fix the GPU setup or use --provider cpu"
        )
    return session


class _Runner:
    """One inference per call, inputs already in place; ``probe`` also returns the output shapes."""

    def __init__(self, session: Any):
        self.session = session
        self.output_names = [output.name for output in session.get_outputs()]

    def __call__(self) -> object:
        raise NotImplementedError

    def probe(self) -> list[list[int]]:
        raise NotImplementedError


class _CpuRunner(_Runner):
    """Plain ``session.run`` with numpy feeds (ORT wraps them without copying)."""

    def __init__(self, session: Any, feeds: Mapping[str, np.ndarray]):
        super().__init__(session)
        self.feeds = dict(feeds)

    def __call__(self) -> object:
        return self.session.run(self.output_names, self.feeds)

    def probe(self) -> list[list[int]]:
        return [list(np.shape(value)) for value in self()]


class _CudaRunner(_Runner):  # pragma: no cover - needs onnxruntime-gpu and a GPU
    """IOBinding: inputs copied to the GPU once, outputs left on the GPU, so no copy is timed."""

    def __init__(self, session: Any, feeds: Mapping[str, np.ndarray], device_id: int = 0):
        import onnxruntime

        super().__init__(session)
        self.binding = session.io_binding()
        # Kept as attributes: the device buffers must live as long as the binding.
        self.device_inputs = {
            name: onnxruntime.OrtValue.ortvalue_from_numpy(array, "cuda", device_id)
            for name, array in feeds.items()
        }
        for name, value in self.device_inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            self.binding.bind_output(name, "cuda", device_id)
        self.binding.synchronize_inputs()

    def __call__(self) -> object:
        # Run() synchronises the CUDA stream before returning, so the kernel time is included.
        return self.session.run_with_iobinding(self.binding)

    def probe(self) -> list[list[int]]:
        self()
        return [list(value.shape()) for value in self.binding.get_outputs()]


def _make_runner(session: Any, feeds: Mapping[str, np.ndarray], provider: str) -> _Runner:
    if provider in ("cuda", "tensorrt"):
        return _CudaRunner(session, feeds)
    return _CpuRunner(session, feeds)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def benchmark(
    models: Sequence[ModelSource],
    config: BenchConfig | None = None,
    *,
    labels: Sequence[str] | None = None,
    inputs: Sequence[Any] | None = None,
) -> BenchReport:
    """Time ONNX models on ONNX Runtime (or PyTorch models on PyTorch) under identical, recorded conditions.

    With ``config.runtime == "torch"`` the models are ``nn.Module`` s run by PyTorch on
    ``config.provider`` (``cuda`` or ``cpu``) in ``config.dtype``, eagerly or as CUDA graphs
    (``config.cuda_graphs``), on ``inputs`` (example inputs, batch dim 0, repeated to each batch
    size); everything else is as below.

    For each batch size: one session per model, inputs generated once per model, a warm-up, then
    ``config.rounds`` interleaved rounds with the model order rotated every round (see
    :func:`run_interleaved`).

    Args:
        models: ONNX models as file paths, serialized ``bytes`` or ``onnx.ModelProto``.
        config: benchmark settings; default :class:`BenchConfig()`.
        labels: names for the models in the report; default the file name for paths and
            ``model0``, ``model1``, ... for in-memory models.

    Returns:
        A :class:`BenchReport` with one result per (batch size, model).

    Raises:
        BenchmarkError: a missing or invalid model, an unavailable provider, a symbolic input
            dimension without a size in ``config.dims``, or a model that fails to run.
    """
    config = config if config is not None else BenchConfig()
    if config.runtime == "torch":
        return _benchmark_torch(models, config, labels, inputs)
    _check_provider(config)
    loaded = _load_models(models, labels)
    warnings = _check_shapes(loaded, config)
    threads = config.resolved_threads()
    env = _base_environment(config, threads)
    env["loadavg_before"] = _loadavg()
    warnings = _environment_warnings(env) + warnings
    for message in warnings:
        logger.warning(message)

    results: list[BenchResult] = []
    for batch in config.batch_sizes:
        results.extend(_benchmark_batch(loaded, batch, config, threads, env))
    env["loadavg_after"] = _loadavg()

    drift = _drift_warnings(results)
    for message in drift:
        logger.warning(message)
    return BenchReport(results=results, environment=env, warnings=warnings + drift, config=config)


def _benchmark_batch(
    models: Sequence[_Model], batch: int, config: BenchConfig, threads: int, env: dict[str, Any]
) -> list[BenchResult]:
    sessions, runners, inputs, outputs = [], [], [], []
    for model in models:
        feeds = _generate_inputs(model, batch, config)
        session = _create_session(model, config, threads)
        runner = _make_runner(session, feeds, config.provider)
        sessions.append(session)
        runners.append(runner)
        inputs.append({name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in feeds.items()})
        outputs.append(_probe(model, runner, batch))
    _record_providers(env, sessions)
    logger.info(
        "batch %d: timing %d model(s), %d rounds x %d runs",
        batch, len(models), config.rounds, config.runs_per_round,
    )
    times = run_interleaved(
        runners, warmup=config.warmup, rounds=config.rounds, runs_per_round=config.runs_per_round
    )
    return [
        _result(model, batch, per_round, model_inputs, model_outputs)
        for model, per_round, model_inputs, model_outputs in zip(models, times, inputs, outputs)
    ]


def _probe(model: _Model, runner: _Runner, batch: int) -> dict[str, dict[str, Any]]:
    """Run once untimed, turning a runtime failure into a clear error; return the output shapes."""
    try:
        shapes = runner.probe()
    except Exception as err:
        raise BenchmarkError(
            f"{model.label}: inference failed at batch {batch}: {_first_line(err)} (generated inputs: "
            f"floats ~ N(0,1), integer ids below {_DEFAULT_ID_RANGE} or the embedding size, "
            f"masks 1, token types 0)"
        ) from err
    return {name: {"shape": [int(d) for d in shape]} for name, shape in zip(runner.output_names, shapes)}


def _record_providers(env: dict[str, Any], sessions: Sequence[Any]) -> None:
    used = sessions[0].get_providers()
    env["session_providers"] = list(used)
    env["provider_used"] = used[0]


def _result(
    model: _Model,
    batch: int,
    per_round_ns: Sequence[Sequence[int]],
    inputs: Mapping[str, Mapping[str, Any]],
    outputs: Mapping[str, Mapping[str, Any]],
) -> BenchResult:
    rounds_ms = [[ns / 1e6 for ns in round_ns] for round_ns in per_round_ns]
    samples = [value for round_ms in rounds_ms for value in round_ms]
    return BenchResult(
        label=model.label,
        batch=batch,
        stats=summarize(samples),
        round_medians_ms=tuple(median(round_ms) for round_ms in rounds_ms),
        samples_ms=tuple(samples),
        inputs=inputs,
        outputs=outputs,
        source=model.source,
    )


def compare(
    original: ModelSource,
    pruned: ModelSource,
    config: BenchConfig | None = None,
    *,
    labels: Sequence[str] | None = None,
    inputs: Sequence[Any] | None = None,
) -> Comparison:
    """Benchmark an original and a pruned model interleaved and compare their latencies.

    Args:
        original: the reference model (path, bytes or ``onnx.ModelProto``).
        pruned: the model compared with it.
        config: benchmark settings; default :class:`BenchConfig()`.
        labels: two names; default the file names for paths, ``"original"`` and ``"pruned"`` for
            in-memory models.

    Returns:
        A :class:`Comparison`: per batch size the medians, p90s and ``speedup = median_a / median_b``
        (above 1: the pruned model is faster), plus the full report.

    Raises:
        BenchmarkError: as :func:`benchmark`.
    """
    if labels is None:
        labels = _deduplicate([_default_label(original, "original"), _default_label(pruned, "pruned")])
    if len(labels) != 2:
        raise BenchmarkError(f"compare needs two labels, got {list(labels)}")
    report = benchmark([original, pruned], config, labels=labels, inputs=inputs)
    label_a, label_b = report.labels
    rows = tuple(_comparison_row(report, label_a, label_b, batch) for batch in report.config.batch_sizes)
    return Comparison(label_a=label_a, label_b=label_b, rows=rows, report=report)


def _comparison_row(report: BenchReport, label_a: str, label_b: str, batch: int) -> ComparisonRow:
    a, b = report.result(label_a, batch), report.result(label_b, batch)
    return ComparisonRow(
        batch=batch,
        median_a_ms=a.median_ms,
        median_b_ms=b.median_ms,
        p90_a_ms=a.p90_ms,
        p90_b_ms=b.p90_ms,
        speedup=a.median_ms / b.median_ms,
    )



# --------------------------------------------------------------------------------------------
# PyTorch runtimes
# --------------------------------------------------------------------------------------------


def _benchmark_torch(models: Sequence[Any], config: BenchConfig, labels: Sequence[str] | None,
                     inputs: Sequence[Any] | None) -> BenchReport:
    """Time ``nn.Module`` s with PyTorch (``fxprune.runtimes.TorchRuntime``), interleaved per batch size."""
    import torch

    from fxprune.runtimes import TorchRuntime

    if not models:
        raise BenchmarkError("no models to benchmark; pass at least one model")
    for i, m in enumerate(models):
        if not isinstance(m, torch.nn.Module):
            raise BenchmarkError(
                f"model {i} is a {type(m).__name__}: the PyTorch runtimes time nn.Modules (ONNX files run on "
                "--runtime ort-cpu / ort-cuda)")
    if not inputs:
        raise BenchmarkError("the PyTorch runtimes need example inputs (inputs=...; batch dim first)")
    names = list(labels) if labels is not None else [f"model{i}" for i in range(len(models))]
    if len(names) != len(models) or len(set(names)) != len(names):
        raise BenchmarkError(f"give one unique label per model, got {names}")
    env = _torch_environment(config)
    env["loadavg_before"] = _loadavg()
    warnings = [w for w in _environment_warnings(env) if "intra-op" not in w]
    results: list[BenchResult] = []
    graphs_used = config.cuda_graphs
    for batch in config.batch_sizes:
        rt = TorchRuntime(config.provider, dtype=config.dtype, batch=batch, example_inputs=tuple(inputs),
                          cuda_graphs=config.cuda_graphs, channels_last=config.channels_last, threads=config.threads,
                          warmup=config.warmup, rounds=config.rounds, runs_per_round=config.runs_per_round)
        try:
            times = rt.time_models(models, names)
        except BenchmarkError:
            raise
        except Exception as err:  # out of memory, a model that fails at this batch
            raise BenchmarkError(f"PyTorch {config.target} at batch {batch}: {type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''}") from err
        if rt.clock.warnings:
            graphs_used = False
            warnings.extend(w for w in rt.clock.warnings if w not in warnings)
        shapes = {f"input_{i}": {"shape": [batch, *list(x.shape[1:])], "dtype": str(x.dtype).replace("torch.", "")}
                  for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)}
        for name, per_round in zip(names, times):
            samples = [v for r in per_round for v in r]
            results.append(BenchResult(label=name, batch=batch, stats=summarize(samples),
                                       round_medians_ms=tuple(median(r) for r in per_round),
                                       samples_ms=tuple(samples), inputs=shapes, outputs={}, source=None))
    env["loadavg_after"] = _loadavg()
    env["cuda_graphs_used"] = graphs_used
    drift = _drift_warnings(results)
    return BenchReport(results=results, environment=env, warnings=warnings + drift, config=config)


def _torch_environment(config: BenchConfig) -> dict[str, Any]:
    import torch

    from fxprune import __version__

    threads = config.threads or torch.get_num_threads()
    env: dict[str, Any] = {
        "runtime": "torch",
        "fxprune_version": __version__,
        "torch_version": torch.__version__,
        "provider_requested": f"torch-{config.provider}",
        "provider_used": f"torch-{config.provider}",
        "dtype": config.dtype,
        "cuda_graphs": config.cuda_graphs,
        "channels_last": config.channels_last,
        **_host_environment(threads),
        "device": "cpu",
    }
    if config.provider == "cuda":
        if not torch.cuda.is_available():
            raise BenchmarkError("--runtime torch-cuda needs a CUDA GPU; torch.cuda.is_available() is False here")
        env.update({"device": torch.cuda.get_device_name(0), "cuda_version": torch.version.cuda,
                    "cudnn_version": torch.backends.cudnn.version()})
    return env
