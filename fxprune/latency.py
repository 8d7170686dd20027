"""Measured latency: benchmark a compile result, and compile to a latency budget.

Two entry points, both on ONNX Runtime through :mod:`fxprune.bench` (warm-up, interleaved A/B
rounds, recorded conditions):

* :func:`benchmark_result` (``CompileResult.benchmark()``): export the original and the pruned
  model to ONNX in memory, time them interleaved, record the numbers in ``result.report.latency``
  and warn when latency did not follow MACs, with the likely reasons (kept channel counts off the
  CPU's NCHWc block, depthwise convs with such counts, a busy machine);
* :func:`compile_to_latency` (``fxprune.compile(..., latency_budget="20ms", target=...)``): by
  default (``allocation="latency"``) channels are allocated by the per-layer latency model measured
  on the target (:mod:`fxprune.latency_alloc`, :mod:`fxprune.cost_models.latency_table`), on ONNX
  Runtime or PyTorch (:mod:`fxprune.runtimes`). With ``allocation="macs"`` the MAC allocation is
  kept and its MAC budget is searched instead: calibrate the latency(MACs) curve
  (:mod:`fxprune.cost_models.latency`: the pipeline's own plans at a few MAC budgets, timed
  interleaved with the original, cached on disk), pick the MAC budget the curve predicts for the
  latency budget, then tighten (bisection on the MAC budget). Either way the result is **verified
  by measurement**: the returned model is one that was measured at or under the budget.

Budgets: ``"20ms"``, ``"500us"``, ``12.5`` (milliseconds) or ``"60%"`` of the original's median
measured *in the same interleaved run* as the candidate (so a machine that slows down slows both).

``report.latency`` schema ``fxprune.latency/1`` (times in milliseconds)::

    {"schema": "fxprune.latency/1",
     "provider": str, "threads": int, "opt_level": str, "batch": int,
     "original_median_ms": float, "original_p90_ms": float,
     "pruned_median_ms": float, "pruned_p90_ms": float,
     "speedup": float,                      # original median / pruned median
     "mac_reduction": float,                # base_macs / macs
     "speedup_per_mac_reduction": float,    # speedup / mac_reduction (1.0: latency follows MACs)
     "macs": int, "base_macs": int,
     "loadavg_before": [float, float, float] | null, "loadavg_after": [...] | null,
     "onnxruntime_version": str | null, "cpu_model": str | null, "nchwc_block": int | null,
     "bench_warnings": [str],               # from the benchmark (busy machine, unstable rounds)
     "warnings": [str],                     # latency did not follow MACs, and why
     "budget": {                            # only after compile(..., latency_budget=...)
        "spec": str, "budget_ms": float, "met": bool, "relative": float | null,
        "cache": "hit" | "miss", "cache_file": str | null, "measurements": int,
        "mac_budget": int, "smallest_measured_ms": float}}
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from fxprune import progress
from fxprune.bench import BenchConfig, Comparison, benchmark, compare
from fxprune.budget import format_macs, parse_latency_budget
from fxprune.cost_models.latency import (
    Candidate,
    LatencyCache,
    LatencyCostModel,
    Timer,
    Timing,
    graph_fingerprint,
)
from fxprune.errors import BandUnreachableError, BenchmarkError, BudgetUnreachableError, InvalidBudgetError

__all__ = [
    "LATENCY_SCHEMA",
    "FOLLOW_THRESHOLD",
    "LatencyOptions",
    "LatencySearch",
    "OrtTimer",
    "benchmark_result",
    "compile_to_latency",
    "search_latency",
    "latency_record",
    "latency_warnings",
    "misaligned_groups",
    "misaligned_depthwise",
    "nchwc_block",
]

logger = logging.getLogger(__name__)

LATENCY_SCHEMA = "fxprune.latency/1"
#: Warn when speed-up / MAC reduction falls below this (or the pruned model is slower).
FOLLOW_THRESHOLD = 0.6


# --------------------------------------------------------------------------------------------
# Hardware: the NCHWc block of ONNX Runtime's CPU kernels
# --------------------------------------------------------------------------------------------


def nchwc_block(cpuinfo: str | None = None) -> int | None:
    """The NCHWc channel block of ONNX Runtime's CPU kernels (MLAS) on this machine.

    16 with AVX-512F, 8 with AVX2, ``None`` when unknown (no ``/proc/cpuinfo``, another
    architecture). Channel counts that are multiples of the block keep convs and pools on the
    blocked fast path; others are reordered around or left on the plain NCHW path.

    Args:
        cpuinfo: the text of ``/proc/cpuinfo`` (read from the system when ``None``).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo = handle.read()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if "avx512f" in flags:
        return 16
    if "avx2" in flags:
        return 8
    return None


def misaligned_groups(groups: Sequence[Any], block: int) -> list[str]:
    """``"name keep/size"`` for every pruned channel group whose kept channels are not a block multiple.

    ``groups`` are ``GroupDecision``-like (``name``, ``kind``, ``size``, ``keep``, ``unit``);
    attention-head groups are skipped (NCHWc concerns convs and pools).
    """
    out = []
    for g in groups:
        if g.kind == "heads" or g.keep >= g.size:
            continue
        channels = g.keep * max(int(g.unit), 1)
        if channels % block:
            out.append(f"{g.name} {channels}/{g.size * max(int(g.unit), 1)}")
    return out


def misaligned_depthwise(pruned: nn.Module, original: nn.Module | None, block: int) -> list[str]:
    """``"name (C channels)"`` for depthwise convs whose channel count pruning changed to a non-multiple of ``block``."""
    before = dict(original.named_modules()) if original is not None else {}
    out = []
    for name, module in pruned.named_modules():
        if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        if module.groups <= 1 or module.groups != module.in_channels:
            continue
        old = before.get(name)
        if old is not None and getattr(old, "out_channels", None) == module.out_channels:
            continue
        if module.out_channels % block:
            parity = "odd, " if module.out_channels % 2 else ""
            out.append(f"{name} ({module.out_channels} channels, {parity}not a multiple of {block})")
    return out


# --------------------------------------------------------------------------------------------
# The record in report.latency and its warnings
# --------------------------------------------------------------------------------------------


def latency_record(original: Timing, pruned: Timing, *, macs: int, base_macs: int,
                   settings: Mapping[str, Any], environment: Mapping[str, Any] | None = None,
                   bench_warnings: Sequence[str] = ()) -> dict[str, Any]:
    """The ``fxprune.latency/1`` record of one original-vs-pruned measurement (see module doc)."""
    env = dict(environment or {})
    speedup = original.median_ms / pruned.median_ms if pruned.median_ms > 0 else math.inf
    reduction = base_macs / macs if macs > 0 else math.inf
    return {
        "schema": LATENCY_SCHEMA,
        "provider": settings.get("provider"),
        "threads": settings.get("threads"),
        "opt_level": settings.get("opt_level"),
        "batch": settings.get("batch"),
        "original_median_ms": original.median_ms,
        "original_p90_ms": original.p90_ms,
        "pruned_median_ms": pruned.median_ms,
        "pruned_p90_ms": pruned.p90_ms,
        "speedup": speedup,
        "mac_reduction": reduction,
        "speedup_per_mac_reduction": speedup / reduction if reduction else math.nan,
        "macs": int(macs),
        "base_macs": int(base_macs),
        "loadavg_before": env.get("loadavg_before"),
        "loadavg_after": env.get("loadavg_after"),
        "onnxruntime_version": settings.get("onnxruntime_version", env.get("onnxruntime_version")),
        "cpu_model": settings.get("cpu_model", env.get("cpu_model")),
        "nchwc_block": settings.get("nchwc_block"),
        "bench_warnings": list(bench_warnings),
        "warnings": [],
    }


def latency_warnings(record: Mapping[str, Any], *, misaligned: Sequence[str] = (),
                     depthwise: Sequence[str] = (), threshold: float = FOLLOW_THRESHOLD) -> list[str]:
    """Warnings when latency did not follow MACs, each with the likely reasons.

    Fires when the pruned model is not faster than the original, or when
    ``speedup / mac_reduction < threshold``. The reasons listed: kept channel counts off the NCHWc
    block (``misaligned``), depthwise convs with such counts (``depthwise``), a busy or unstable
    machine (``record["bench_warnings"]``); if none applies, what else usually explains it.
    """
    speedup = record["speedup"]
    reduction = record["mac_reduction"]
    ratio = record["speedup_per_mac_reduction"]
    if reduction <= 1.0 + 1e-9 and speedup >= 1.0:
        return []
    slower = speedup < 1.0
    if not slower and not ratio < threshold:
        return []
    block = record.get("nchwc_block") or 8
    head = (f"the pruned model is slower than the original ({record['pruned_median_ms']:.3f} ms vs "
            f"{record['original_median_ms']:.3f} ms median) although it has {reduction:.2f}x fewer MACs"
            if slower else
            f"latency did not follow MACs: {speedup:.2f}x faster for {reduction:.2f}x fewer MACs "
            f"(speed-up / MAC reduction = {ratio:.2f} < {threshold:.2f})")
    reasons = []
    if misaligned:
        reasons.append(f"{len(misaligned)} group(s) keep a channel count that is not a multiple of {block} "
                       f"(the NCHWc block of this CPU): {_few(misaligned)}; compile with channel_multiple={block}")
    if depthwise:
        reasons.append(f"depthwise conv(s) with channel counts off the block: {_few(depthwise)}")
    busy = [w for w in record.get("bench_warnings", ()) if "busy" in w or "unstable" in w or "oversubscribed" in w]
    if busy:
        reasons.append("the measurement itself is suspect: " + "; ".join(busy))
    if not reasons:
        reasons.append("no misaligned channel counts found; the time likely goes to work MACs do not count "
                       "(memory-bound elementwise ops, pooling, layout reorders) or to fixed per-op overhead, "
                       "which pruning does not shrink; larger batches or fewer, wider layers help")
    return [head + ". Likely reason(s): " + " | ".join(reasons)]


def _few(items: Sequence[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _diagnose(result: Any, record: dict[str, Any]) -> list[str]:
    """Fill ``record["warnings"]`` for a compile result and log them; returns them."""
    block = record.get("nchwc_block") or 8
    warnings = latency_warnings(
        record,
        misaligned=misaligned_groups(result.report.groups, block),
        depthwise=misaligned_depthwise(result.model, result.original, block),
    )
    record["warnings"] = warnings
    for message in warnings:
        logger.warning(message)
        if message not in result.report.warnings:
            result.report.warnings.append(message)
    return warnings


# --------------------------------------------------------------------------------------------
# Options and the ONNX Runtime timer
# --------------------------------------------------------------------------------------------


@dataclass
class LatencyOptions:
    """``compile(..., latency_options={...})`` and ``result.benchmark(**...)`` settings.

    Benchmark settings (as :class:`fxprune.bench.BenchConfig`): ``provider`` ("cpu"), ``threads``
    (None: physical cores), ``opt_level`` ("all"), ``batch`` (1), ``warmup``, ``rounds``,
    ``runs_per_round``, ``dims``.

    Allocation (``allocation``): ``"latency"`` (default) allocates channels by the per-group
    latency model measured on the target (``fxprune.latency_alloc``): ``max_points`` candidate
    widths per group, ``plateau_tol`` (a width is dropped when a larger one is at most this
    fraction of the model slower), ``fit_fractions`` (uniform plans timed whole to fit the model's
    fixed part and scale), ``cuda_graphs`` / ``channels_last`` (PyTorch targets), ``runtime`` (a
    ``fxprune.runtimes.Runtime`` replacing the target's, e.g. ``FakeRuntime`` in tests).
    ``"macs"`` keeps the MAC allocation and bisects the MAC budget on a measured latency(MACs)
    curve (the baseline the latency allocation is compared with).

    Search settings:
        calibration: (``allocation="macs"``) MAC fractions of the original timed to calibrate the
            curve (the original and the smallest reachable model are always timed too).
        max_verify: most verification measurements after the calibration.
        margin: aim this fraction under the budget (room for measurement noise).
        slack: stop once a verified model is within this fraction under the budget.
        cache / cache_dir: use the on-disk calibration cache, and where (default
            ``fxprune.cost_models.latency.default_cache_dir()``).
        timer: a :class:`fxprune.cost_models.latency.Timer` replacing ONNX Runtime (tests).
    """

    provider: str = "cpu"
    threads: int | None = None
    opt_level: str = "all"
    batch: int = 1
    warmup: int = 10
    rounds: int = 5
    runs_per_round: int = 20
    dims: Mapping[str, int] = field(default_factory=dict)
    calibration: tuple[float, ...] = (0.8, 0.65, 0.5, 0.35, 0.2)
    max_verify: int = 6
    margin: float = 0.03
    slack: float = 0.08
    cache: bool = True
    cache_dir: str | None = None
    timer: Any = None
    allocation: str = "latency"
    max_points: int = 12
    plateau_tol: float = 0.002
    fit_fractions: tuple[float, ...] = (0.75, 0.5, 0.3)
    cuda_graphs: bool = True
    channels_last: bool | None = None
    runtime: Any = None

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> "LatencyOptions":
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise BenchmarkError(f"unknown latency option(s) {unknown}; known: {sorted(known)}")
        opts = cls(**options)
        opts.calibration = tuple(float(f) for f in opts.calibration)
        if any(not 0 < f < 1 for f in opts.calibration):
            raise BenchmarkError(f"latency option calibration must list MAC fractions in (0, 1), got {opts.calibration}")
        if not isinstance(opts.max_verify, int) or opts.max_verify < 1:
            raise BenchmarkError(f"latency option max_verify must be a positive int, got {opts.max_verify!r}")
        if not (0 <= opts.margin < 0.5 and 0 < opts.slack < 1):
            raise BenchmarkError(f"latency options need 0 <= margin < 0.5 and 0 < slack < 1, got "
                                 f"margin={opts.margin!r}, slack={opts.slack!r}")
        if opts.allocation not in ("latency", "macs"):
            raise BenchmarkError(f"latency option allocation must be 'latency' or 'macs', got {opts.allocation!r}")
        if opts.allocation == "latency" and opts.timer is not None and not hasattr(opts.timer, "time_units"):
            raise BenchmarkError("latency option timer= is the whole-model timer of allocation='macs'; the default "
                                 "allocation='latency' also times layers: pass runtime=fxprune.runtimes.Runtime "
                                 "(e.g. FakeRuntime) instead, or allocation='macs'")
        if opts.allocation == "latency" and opts.timer is not None and opts.runtime is None:
            opts.runtime = opts.timer
        if not isinstance(opts.max_points, int) or opts.max_points < 2:
            raise BenchmarkError(f"latency option max_points must be an int >= 2, got {opts.max_points!r}")
        opts.fit_fractions = tuple(float(f) for f in opts.fit_fractions)
        if any(not 0 < f < 1 for f in opts.fit_fractions):
            raise BenchmarkError(f"latency option fit_fractions must be fractions in (0, 1), got {opts.fit_fractions}")
        opts.bench_config()  # validates the benchmark settings now, not after minutes of work
        return opts

    def bench_config(self) -> BenchConfig:
        return BenchConfig(provider=self.provider, threads=self.threads, opt_level=self.opt_level,
                           batch_sizes=(self.batch,), warmup=self.warmup, rounds=self.rounds,
                           runs_per_round=self.runs_per_round, dims=dict(self.dims))


def _settings(config: BenchConfig) -> dict[str, Any]:
    """What a latency depends on besides the model: provider, threads, opt level, batch, runtime, CPU."""
    import onnxruntime

    from fxprune.bench import _cpu_model

    return {
        "provider": config.provider,
        "threads": config.resolved_threads(),
        "opt_level": config.opt_level,
        "batch": config.batch_sizes[0],
        "onnxruntime_version": onnxruntime.__version__,
        "cpu_model": _cpu_model(),
        "nchwc_block": nchwc_block() if config.provider == "cpu" else None,
    }


class OrtTimer:
    """Times candidates on ONNX Runtime with :func:`fxprune.bench.benchmark`, interleaved.

    Each candidate is exported to ONNX once (kept in ``candidate.payload``); the original's export
    is therefore reused by every measurement.
    """

    def __init__(self, example_inputs: Any, config: BenchConfig):
        self.example_inputs = example_inputs
        self.config = config
        self.warnings: list[str] = []
        self.environment: dict[str, Any] = {}
        self.round_min: list[float] = []
        self.exports = 0

    def settings(self) -> dict[str, Any]:
        return _settings(self.config)

    def onnx(self, candidate: Candidate) -> Any:
        if candidate.payload is None:
            from fxprune.export import export_onnx

            proto = export_onnx(candidate.model, self.example_inputs)
            self._example_dims(proto)
            candidate.payload = proto.SerializeToString()
            self.exports += 1
        return candidate.payload

    def _example_dims(self, proto: Any) -> None:
        """Sizes of symbolic non-batch input dims (a dynamic sequence axis) taken from the example
        inputs, unless the configuration gives them: the model is timed at the shape it was compiled at."""
        import torch

        tensors = [x for x in self.example_inputs if isinstance(x, torch.Tensor)]
        dims = dict(self.config.dims)
        for value, example in zip(proto.graph.input, tensors):
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                if axis and dim.dim_param and dim.dim_param not in dims and axis < example.dim():
                    dims[dim.dim_param] = int(example.shape[axis])
        if dims != dict(self.config.dims):
            self.config = dataclasses.replace(self.config, dims=dims)

    def measure(self, candidates: Sequence[Candidate]) -> list[Timing]:
        labels = [c.label if i == 0 else f"{i}:{c.label}" for i, c in enumerate(candidates)]
        report = benchmark([self.onnx(c) for c in candidates], self.config, labels=labels)
        self.warnings = list(report.warnings)
        self.environment = dict(report.environment)
        # the fastest round's median per candidate: what a passing burst of load on a shared machine
        # does not inflate (the latency model's calibration fits these; budgets use the medians)
        self.round_min = [min(report.result(label).round_medians_ms) for label in labels]
        return [Timing(report.result(label).median_ms, report.result(label).p90_ms) for label in labels]


# --------------------------------------------------------------------------------------------
# result.benchmark()
# --------------------------------------------------------------------------------------------


def benchmark_result(result: Any, config: BenchConfig | None = None, **options: Any) -> Comparison:
    """Measure the original and the pruned model of a compile result on ONNX Runtime.

    Both are exported to ONNX in memory (dynamic batch) and timed interleaved with
    :func:`fxprune.bench.compare`. The numbers go to ``result.report.latency`` (schema in the
    module docstring); a warning goes to ``result.report.warnings`` and the log when latency did not
    follow MACs (see :func:`latency_warnings`).

    Args:
        result: a ``CompileResult``.
        config: benchmark settings; default ``BenchConfig()`` (ONNX Runtime CPU, batch 1, physical cores).
        **options: ``BenchConfig`` fields overriding ``config`` (``threads=1``, ``opt_level=...``,
            ``batch_sizes=(1, 8)``, ``rounds=...``; ``runtime="torch-cuda"``, ``dtype="fp16"``,
            ``cuda_graphs=True``, ``channels_last=True`` to time the GraphModules with PyTorch).
            ``report.latency["rows"]`` has every batch size with its throughput (items/s).

    Returns:
        The :class:`fxprune.bench.Comparison` (first batch size in the scalar properties).

    Raises:
        BenchmarkError: a bad option, or ONNX Runtime cannot run a model.
        ExportError: a model cannot be exported.
    """
    from fxprune.export import export_onnx

    if result.original is None:
        raise BenchmarkError("this compile result has no original model to compare with")
    config = config if config is not None else BenchConfig()
    if options:
        known = {f.name for f in dataclasses.fields(BenchConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise BenchmarkError(f"unknown benchmark option(s) {unknown}; known: {sorted(known)}")
        config = dataclasses.replace(config, **options)
    if config.runtime == "torch":  # PyTorch times the GraphModules themselves: no export
        comparison = compare(result.original, result.model, config, labels=("original", "pruned"),
                             inputs=result.example_inputs)
        env = comparison.report.environment
        settings = {"provider": config.target, "threads": env.get("threads"), "opt_level": None,
                    "batch": config.batch_sizes[0], "dtype": config.dtype,
                    "cuda_graphs": env.get("cuda_graphs_used"), "channels_last": config.channels_last,
                    "device": env.get("device"), "torch_version": env.get("torch_version"),
                    "cpu_model": env.get("cpu_model")}
    else:
        with progress.stage("ONNX export (original and pruned)"):
            original = export_onnx(result.original, result.example_inputs)
            pruned = export_onnx(result.model, result.example_inputs)
        comparison = compare(original, pruned, config, labels=("original", "pruned"))
        settings = _settings(comparison.report.config)
    row = comparison.rows[0]
    record = latency_record(
        Timing(row.median_a_ms, row.p90_a_ms), Timing(row.median_b_ms, row.p90_b_ms),
        macs=result.macs, base_macs=result.base_macs, settings=settings,
        environment=comparison.report.environment, bench_warnings=comparison.report.warnings,
    )
    record["target"] = config.target
    record["dtype"] = config.dtype
    record["rows"] = [dict(dataclasses.asdict(r), original_items_per_s=r.batch * 1000.0 / r.median_a_ms,
                           pruned_items_per_s=r.batch * 1000.0 / r.median_b_ms) for r in comparison.rows]
    _diagnose(result, record)
    result.report.latency = {**(result.report.latency or {}), **record}
    return comparison


# --------------------------------------------------------------------------------------------
# The latency-budget search
# --------------------------------------------------------------------------------------------


@dataclass
class LatencySearch:
    """Outcome of :func:`search_latency`.

    Attributes:
        chosen: the candidate returned (``None``: the original already meets the budget).
        original_timing / chosen_timing: the interleaved measurement that verified it.
        budget_ms: the budget in milliseconds in that measurement.
        model: the latency cost model with every measurement.
        attempts: one record per measured candidate (calibration and verification).
        calibrated: False when the calibration came from the cache.
        environment / bench_warnings: conditions of the verifying measurement.
    """

    chosen: Candidate | None
    original_timing: Timing
    chosen_timing: Timing
    budget_ms: float
    model: LatencyCostModel
    attempts: list[dict[str, Any]]
    calibrated: bool
    environment: dict[str, Any] = field(default_factory=dict)
    bench_warnings: list[str] = field(default_factory=list)


def relative_budget(budget: Any) -> float | None:
    """The fraction of the original's latency for ``"60%"``-style budgets, else ``None``."""
    if isinstance(budget, str) and budget.strip().endswith("%"):
        return parse_latency_budget(budget, base_ms=1.0)
    return None


def search_latency(
    budget: Any,
    original: Candidate,
    build: Callable[[int], Candidate],
    timer: Timer,
    *,
    min_macs: int,
    model: LatencyCostModel | None = None,
    key: Mapping[str, Any] | None = None,
    calibration: Sequence[float] = LatencyOptions.calibration,
    max_verify: int = LatencyOptions.max_verify,
    margin: float = LatencyOptions.margin,
    slack: float = LatencyOptions.slack,
    on_measure: Callable[[LatencyCostModel], None] | None = None,
) -> LatencySearch:
    """Find the candidate with the most MACs whose measured median meets ``budget``.

    1. calibrate (unless ``model`` is given, e.g. from the cache): time the original, the
       candidates at ``calibration`` fractions of its MACs and the smallest one, interleaved;
    2. verify, at most ``max_verify`` times: build the candidate at a MAC budget, time it
       interleaved with the original and add the measurement to the model. A candidate that misses
       the budget becomes the upper bound, one that meets it the lower bound. The first MAC budget
       is the model's answer for ``budget * (1 - margin)``; later ones interpolate the verified
       bounds (regula falsi, in units of the budget, so drift since the calibration drops out),
       kept at least 5% of the interval away from either bound. Stop once a verified candidate is
       within ``slack`` under the budget, the smallest model misses it, or the bounds meet.

    Args:
        budget: ``"20ms"``, ``"500us"``, milliseconds, or ``"60%"`` of the original (measured in the
            same run as each candidate).
        original: the unpruned model as a candidate.
        build: ``build(mac_budget) -> Candidate``: the pipeline's plan at that MAC budget
            (``mac_budget >= min_macs``; the candidate's MACs may be slightly lower).
        timer: measures candidates interleaved (``candidates[0]`` the original).
        min_macs: MACs of the smallest buildable model.
        model: a calibrated model to start from (skips step 1).
        key: cache-key fields stored in a new model.
        on_measure: called with the model after every measurement (the caller saves the cache).

    Raises:
        BudgetUnreachableError: even the fastest model measured misses the budget; the message
            gives the smallest latency measured.
    """
    relative = relative_budget(budget)
    absolute = None if relative is not None else parse_latency_budget(budget)
    base_macs = int(original.macs)
    attempts: list[dict[str, Any]] = []
    conditions: dict[str, Any] = {}  # environment and warnings of the latest measurement

    def budget_ms(base_ms: float) -> float:
        return relative * base_ms if relative is not None else absolute

    def record(stage: str, cand: Candidate, timing: Timing, base: Timing, **extra: Any) -> None:
        attempts.append({
            "kind": "latency", "stage": stage, "macs": int(cand.macs), "mac_fraction": cand.macs / base_macs,
            "median_ms": timing.median_ms, "p90_ms": timing.p90_ms, "original_median_ms": base.median_ms,
            "ratio": timing.median_ms / base.median_ms, **extra,
        })

    def measure(cands: list[Candidate], stage: str) -> list[Timing]:
        timings = timer.measure([original, *cands])
        model.add(timings, [original, *cands], stage)
        conditions["environment"] = dict(getattr(timer, "environment", {}) or {})
        conditions["warnings"] = list(getattr(timer, "warnings", []) or [])
        if on_measure is not None:
            on_measure(model)
        return timings

    def verified(macs: int) -> bool:
        return any(a["stage"] == "verify" and a["macs"] == int(macs) for a in attempts)

    calibrated = model is None
    smallest = build(min_macs)
    if model is None:
        model = LatencyCostModel(base_macs, [], dict(key or {}))
        cands: dict[int, Candidate] = {}
        for fraction in sorted(set(calibration), reverse=True):
            if fraction * base_macs > min_macs:
                cand = build(int(fraction * base_macs))
                cands.setdefault(int(cand.macs), cand)
        cands.setdefault(int(smallest.macs), smallest)
        cands.pop(base_macs, None)
        timings = measure(list(cands.values()), "calibration")
        for cand, timing in zip(cands.values(), timings[1:]):
            record("calibration", cand, timing, timings[0])
        base = timings[0]
    else:  # cached calibration: the original is timed again before any decision that needs it
        for p in model.points:
            if p.source != "original":
                attempts.append({"kind": "latency", "stage": "cached", "macs": p.macs, "mac_fraction": p.macs / base_macs,
                                 "median_ms": p.median_ms, "p90_ms": p.p90_ms, "original_median_ms": p.base_median_ms,
                                 "ratio": p.ratio})
        base = Timing(model.base_median_ms, math.nan)

    def outcome(chosen: Candidate | None, base_t: Timing, chosen_t: Timing, snapshot: dict[str, Any]) -> LatencySearch:
        return LatencySearch(chosen, base_t, chosen_t, budget_ms(base_t.median_ms), model, attempts, calibrated,
                             snapshot.get("environment", {}), snapshot.get("warnings", []))

    # The original may already meet the budget.
    if budget_ms(base.median_ms) >= base.median_ms:
        if not calibrated:
            (base,) = measure([], "verify")
        if base.median_ms <= budget_ms(base.median_ms):
            return outcome(None, base, base, dict(conditions))

    # Verified bounds in budget units (median / budget; <= 1 meets it): ``hi`` misses, ``lo`` meets.
    # Before any candidate meets the budget, ``lo`` is the smallest model as the model predicts it.
    passed: tuple[Candidate, Timing, Timing, dict[str, Any]] | None = None
    hi = (base_macs, base.median_ms / budget_ms(base.median_ms))
    lo = (int(smallest.macs), model.ratio(smallest.macs) * base.median_ms / budget_ms(base.median_ms))
    target = 1.0 - margin
    for attempt in range(max_verify):
        if attempt == 0:  # the calibrated curve's answer
            m = model.macs_for(target * budget_ms(base.median_ms) / base.median_ms)
            m = min_macs if m is None else m
        else:  # regula falsi on the verified bounds: drift since the calibration no longer matters
            m = _secant(lo, hi, target)
        span = hi[0] - lo[0]
        floor = lo[0] + 0.05 * span if passed else min_macs
        m = int(min(max(m, floor), hi[0] - 0.05 * span))
        cand = build(m)
        if verified(cand.macs):  # the plans repeat: nothing new to learn here
            if passed is not None or verified(smallest.macs):
                break
            cand = smallest
        base, timing = measure([cand], "verify")
        limit = budget_ms(base.median_ms)
        ok = timing.median_ms <= limit
        record("verify", cand, timing, base, budget_ms=limit, passed=ok, mac_budget=int(m))
        point = (int(cand.macs), timing.median_ms / limit)
        if ok:
            if passed is None or cand.macs > passed[0].macs:
                passed = (cand, base, timing, dict(conditions))
                lo = point
            if timing.median_ms >= limit * (1.0 - slack):
                break
        else:
            if point[0] < hi[0]:
                hi = point
            if point[0] <= int(smallest.macs):
                break
        if hi[0] - (lo[0] if passed else min_macs) <= max(1, int(0.005 * base_macs)):
            break

    if passed is None and not verified(smallest.macs):
        base, timing = measure([smallest], "verify")
        ok = timing.median_ms <= budget_ms(base.median_ms)
        record("verify", smallest, timing, base, budget_ms=budget_ms(base.median_ms), passed=ok,
               mac_budget=int(min_macs))
        if ok:
            passed = (smallest, base, timing, dict(conditions))
    if passed is None:
        fastest = min((a for a in attempts), key=lambda a: a["median_ms"])
        spec = f"{relative:.0%} of the original" if relative is not None else f"{absolute:.4g} ms"
        err = BudgetUnreachableError(
            f"latency budget {budget!r} ({spec}) is below what any pruned model reaches here: the smallest "
            f"latency measured is {fastest['median_ms']:.4g} ms median ({format_macs(fastest['macs'])} MACs, "
            f"{fastest['ratio']:.0%} of the original's {fastest['original_median_ms']:.4g} ms in the same run). "
            "Raise the budget, lower min_keep_ratio, use more threads or a larger batch per call.",
            min_macs=int(smallest.macs), budget=budget_ms(base.median_ms),
        )
        err.min_latency_ms = float(fastest["median_ms"])
        raise err
    return outcome(*passed)


def _secant(lo: tuple[int, float], hi: tuple[int, float], target: float) -> float:
    """MACs where the line through ``lo`` and ``hi`` (MACs, budget units) reaches ``target``."""
    (m0, u0), (m1, u1) = lo, hi
    if u1 <= u0:  # noise inverted the bounds: bisect
        return 0.5 * (m0 + m1)
    return m0 + (target - u0) / (u1 - u0) * (m1 - m0)


# --------------------------------------------------------------------------------------------
# compile(..., latency_budget=...)
# --------------------------------------------------------------------------------------------


def compile_to_latency(
    model: nn.Module,
    example_inputs: Any,
    *,
    latency_budget: Any,
    tolerance: float = 0.01,
    policy: Any = "global",
    channel_multiple: int = 8,
    min_keep_ratio: float = 0.1,
    ignore: Any = None,
    importance: str = "l1",
    calibration_data: Any = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    loss_fn: Any = None,
    seed: int = 0,
    verify: bool = True,
    policy_options: dict[str, Any] | None = None,
    capture: str = "auto",
    leaf_modules: Sequence[type] = (),
    options: Mapping[str, Any] | None = None,
    mac_budget: Any = None,
    target: str | None = None,
    dtype: Any = None,
    batch_size: int | None = None,
    grouped_convs: str | None = None,
):
    """``fxprune.compile`` to a measured-latency budget; returns a ``CompileResult``.

    The arguments are ``compile``'s; ``options`` are :class:`LatencyOptions` fields. The returned
    model's median latency was measured at or under the budget, interleaved with the original; the
    measurement is in ``result.report.latency`` and every measured candidate in
    ``result.report.attempts`` (records with ``"kind": "latency"``).

    Raises:
        InvalidBudgetError: the budget is not understood.
        BudgetUnreachableError: no model built here meets it (message: the smallest latency measured).
        BenchmarkError: bad latency options or ONNX Runtime failures.
    """
    from fxprune._compile import _new_report, _result, open_session

    parse_latency_budget(latency_budget, base_ms=1.0)  # reject a malformed budget before any work
    opts = LatencyOptions.from_mapping(options)
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidBudgetError(f"batch_size must be a positive int, got {batch_size!r}")
        opts.batch = batch_size
    if target is not None or dtype is not None:
        from fxprune.runtimes import parse_dtype, parse_target

        runtime_kind, _ = parse_target(target or "ort-cpu")
        if runtime_kind == "ort" and dtype is not None and parse_dtype(dtype) != "fp32":
            raise InvalidBudgetError(f"target {target or 'ort-cpu'} times fp32 ONNX models; dtype={dtype!r} is for "
                                     "target='torch-cuda' or 'torch-cpu'")
    if opts.allocation == "latency":
        from fxprune.latency_alloc import compile_latency_driven

        settings = dict(policy=policy, tolerance=tolerance, channel_multiple=channel_multiple,
                        min_keep_ratio=min_keep_ratio, importance=importance, evaluate=evaluate,
                        calibration_data=calibration_data, seed=seed, verify=verify, policy_options=policy_options,
                        grouped_convs=grouped_convs or "whole")
        return compile_latency_driven(model, example_inputs, latency_budget=latency_budget, mac_budget=mac_budget,
                                      target=target, dtype=dtype, batch_size=opts.batch, options=opts,
                                      settings=settings, ignore=ignore, capture=capture, leaf_modules=leaf_modules,
                                      calibration_data=calibration_data, loss_fn=loss_fn)
    if mac_budget is not None:
        raise InvalidBudgetError("allocation='macs' searches the MAC budget that meets the latency budget; it "
                                 "cannot take mac_budget as well (use the default allocation='latency')")
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        session = open_session(model, example_inputs, ignore=ignore, importance=importance,
                               calibration_data=calibration_data, loss_fn=loss_fn, capture_method=capture,
                               leaf_modules=leaf_modules, seed=seed, grouped_convs=grouped_convs or "within")
        settings = dict(policy=policy, tolerance=tolerance, channel_multiple=channel_multiple,
                        min_keep_ratio=min_keep_ratio, importance=importance, evaluate=evaluate,
                        calibration_data=calibration_data, seed=seed, verify=verify,
                        policy_options=policy_options)
        if not session.graph.groups:
            raise BudgetUnreachableError(
                f"latency budget {latency_budget!r}: nothing in this model can be pruned, so no model faster than "
                "the original can be built", min_macs=session.base_macs, budget=math.nan)
        builder = _Builder(model, session, start, settings)
        if opts.timer is not None:
            timer = opts.timer
        elif opts.runtime is not None:
            timer = opts.runtime
        elif target is not None and target != "ort-cpu":
            from fxprune.runtimes import make_runtime

            timer = make_runtime(target, dtype=dtype or "fp32", batch=opts.batch, example_inputs=session.captured.inputs,
                                 threads=opts.threads, opt_level=opts.opt_level, cuda_graphs=opts.cuda_graphs,
                                 channels_last=opts.channels_last, warmup=opts.warmup, rounds=opts.rounds,
                                 runs_per_round=opts.runs_per_round, dims=dict(opts.dims))
        else:
            timer = OrtTimer(session.captured.inputs, opts.bench_config())
        original = Candidate("original", session.base_macs, session.deployed_original())
        key = {
            "schema": 1,
            "graph": graph_fingerprint(session.gm, session.captured.inputs),
            "timer": timer.settings(),
            "policy": policy if isinstance(policy, str) else type(policy).__name__,
            "channel_multiple": channel_multiple,
            "min_keep_ratio": min_keep_ratio,
            "importance": importance,
            "ignore": repr(ignore) if not callable(ignore) else getattr(ignore, "__qualname__", "callable"),
        }
        cache = LatencyCache(opts.cache_dir) if opts.cache else None
        cached = cache.load(key) if cache is not None else None
        cache_file = [None]

        def save(latency_model: LatencyCostModel) -> None:
            if cache is not None:
                cache_file[0] = cache.save(latency_model)

        found = search_latency(
            latency_budget, original, builder, timer, min_macs=builder.min_macs, model=cached, key=key,
            calibration=opts.calibration, max_verify=opts.max_verify, margin=opts.margin, slack=opts.slack,
            on_measure=save,
        )
        if found.chosen is None:
            report = _new_report(model, session, policy, importance, latency_budget, session.base_macs,
                                 tolerance, channel_multiple, seed)
            report.notes.append("latency budget at or above the original's measured latency: model returned unchanged")
            result = _result(session, session.owned_original(), session.base_macs, report, {}, start)
        else:
            result = builder.results[int(found.chosen.macs)]
            result.report.timings["total"] = time.perf_counter() - start
        report = result.report
        report.budget_spec = f"latency {latency_budget}"
        report.attempts.extend(found.attempts)
        record = latency_record(found.original_timing, found.chosen_timing, macs=result.macs,
                                base_macs=result.base_macs, settings=timer.settings(),
                                environment=found.environment, bench_warnings=found.bench_warnings)
        record["budget"] = {
            "spec": str(latency_budget),
            "budget_ms": found.budget_ms,
            "met": found.chosen_timing.median_ms <= found.budget_ms,
            "relative": relative_budget(latency_budget),
            "cache": "miss" if found.calibrated else "hit",
            "cache_file": str(cache_file[0]) if cache_file[0] else None,
            "measurements": sum(1 for a in found.attempts if a["stage"] == "verify"),
            "mac_budget": int(report.budget_macs),
            "smallest_measured_ms": min(a["median_ms"] for a in found.attempts) if found.attempts else None,
        }
        if found.chosen is not None:
            _diagnose(result, record)
        report.latency = record
        report.notes.append(
            f"latency budget {latency_budget}: {found.chosen_timing.median_ms:.4g} ms measured "
            f"(budget {found.budget_ms:.4g} ms, original {found.original_timing.median_ms:.4g} ms, "
            f"{format_macs(result.macs)} MACs; calibration {'cached' if not found.calibrated else 'measured'})")
        return result


class _Builder:
    """``build(mac_budget) -> Candidate``: the compile pipeline's result at a MAC budget, memoized."""

    def __init__(self, model: nn.Module, session: Any, start: float, settings: dict[str, Any]):
        from fxprune._compile import build_problem

        self.model = model
        self.session = session
        self.start = start
        self.settings = settings
        self.results: dict[int, Any] = {}  # achieved MACs -> CompileResult
        self._by_budget: dict[int, Candidate] = {}
        probe = build_problem(session, session.base_macs, settings["tolerance"], settings["channel_multiple"],
                              settings["min_keep_ratio"])
        self.min_macs = int(probe.min_macs)

    def __call__(self, mac_budget: int) -> Candidate:
        from fxprune._compile import compile_at_budget

        mac_budget = max(int(mac_budget), self.min_macs)
        if mac_budget in self._by_budget:
            return self._by_budget[mac_budget]
        s = self.settings
        try:
            result = compile_at_budget(self.model, self.session, mac_budget, self.start, **s)
        except BandUnreachableError as err:  # coarse keep counts: take the closest plan under the budget
            result = compile_at_budget(self.model, self.session, err.best_macs, self.start, **s)
        macs = int(result.macs)
        self.results.setdefault(macs, result)
        cand = Candidate(f"macs={format_macs(macs).replace(' ', '')}", macs, self.results[macs].model)
        for existing in self._by_budget.values():  # same plan, same candidate (keeps its ONNX export)
            if existing.macs == macs:
                cand = existing
                break
        self._by_budget[mac_budget] = cand
        return cand
