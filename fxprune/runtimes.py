"""Runtimes: where latency is measured (ONNX Runtime CPU/CUDA/TensorRT, PyTorch CUDA/CPU, a fake).

A runtime times two things under fixed, recorded settings:

* **units** (:meth:`Runtime.time_units`): standalone layers described by a
  :class:`~fxprune.cost_models.latency_units.UnitSpec`, built for the runtime (an ONNX model for
  ONNX Runtime, an ``nn.Module`` for PyTorch) and timed one after another in small chunks, every
  chunk twice with the minimum of the two medians kept (a passing burst of load on a shared
  machine hits one pass, rarely both). The runtime's per-call overhead (timed on an empty layer)
  is subtracted: inside a whole model that overhead is paid once, not once per layer;
* **whole models** (:meth:`Runtime.measure`): the original and candidates timed interleaved
  (:class:`fxprune.cost_models.latency.Timer` protocol), the ground truth every latency budget is
  verified against.

``settings()`` lists everything a timing depends on (runtime and version, device, dtype, batch,
threads, optimisation level, CUDA graphs, channels_last); it is part of every cache key.
``quantum()`` is the hardware's channel step (the NCHWc block of ONNX Runtime's CPU kernels, 8
for fp16/bf16 tensor cores, 4 for fp32 on a GPU): candidate keep counts are multiples of it, and
the measured tables decide which of them are worth keeping.

:class:`FakeRuntime` is the seam for tests: a deterministic clock computed from a unit's work
(MACs and bytes with channel counts rounded up to a step, plus a per-op cost), so the table
builder, the cache and the solver can be tested exactly.

Targets (``compile(..., target=...)``, ``fxprune bench --runtime``): ``ort-cpu``, ``ort-cuda``,
``ort-trt`` (ONNX Runtime execution providers, when installed), ``torch-cuda`` (eager or CUDA graphs;
fp32/fp16/bf16; channels_last) and ``torch-cpu``.
"""

from __future__ import annotations

import copy
import logging
import math
import platform
import statistics
import time
import warnings as _warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from fxprune.cost_models.latency import Candidate, Timing
from fxprune.cost_models.latency_units import UnitSpec, build_onnx, build_torch, extract_units, shapes_at_batch, spec_bytes, spec_macs
from fxprune.errors import BenchmarkError

__all__ = [
    "TARGETS",
    "DTYPES",
    "Runtime",
    "OrtRuntime",
    "TorchRuntime",
    "FakeRuntime",
    "make_runtime",
    "parse_target",
    "parse_dtype",
    "batch_inputs",
    "TorchTimer",
]

logger = logging.getLogger(__name__)

#: target name -> (runtime, device)
TARGETS = {
    "ort-cpu": ("ort", "cpu"),
    "ort-cuda": ("ort", "cuda"),
    "ort-trt": ("ort", "tensorrt"),
    "torch-cuda": ("torch", "cuda"),
    "torch-cpu": ("torch", "cpu"),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}

_CHUNK = 24  # units built and timed together (then released: sessions hold weights)


def parse_target(target: str) -> tuple[str, str]:
    """``(runtime, device)`` of a target name; raises ``BenchmarkError`` for an unknown one."""
    key = str(target).strip().lower()
    if key not in TARGETS:
        raise BenchmarkError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[key]


def parse_dtype(dtype: Any) -> str:
    """Canonical dtype name (``fp32``, ``fp16``, ``bf16``) of a name or ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
    key = str(dtype).strip().lower().replace("torch.", "")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise BenchmarkError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return key


def batch_inputs(example_inputs: Sequence[Any], batch: int) -> tuple[Any, ...]:
    """Example inputs repeated along dim 0 to ``batch`` rows (the first row of each is used)."""
    out = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            out.append(x[:1].repeat(batch, *([1] * (x.dim() - 1))))
        else:
            out.append(x)
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Protocol
# --------------------------------------------------------------------------------------------


class Runtime:
    """Base class of the runtimes; see the module docstring."""

    target: str = ""
    batch: int = 1
    dtype: str = "fp32"

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.environment: dict[str, Any] = {}
        self.unit_timings = 0  # units timed (not served from a cache)
        self.round_min: list[float] = []  # after measure(): per candidate, the fastest round's median

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def quantum(self) -> int:
        return 8

    def time_units(self, specs: Sequence[UnitSpec], progress: Callable[[int], None] | None = None) -> list[float]:
        raise NotImplementedError

    def measure(self, candidates: Sequence[Candidate]) -> list[Timing]:
        raise NotImplementedError


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def _p90(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), 90)) if values else math.nan


def _runs_for(estimate_ms: float, target_ms: float, lo: int, hi: int) -> int:
    if not estimate_ms > 0:
        return hi
    return int(min(hi, max(lo, math.ceil(target_ms / estimate_ms))))


# --------------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------------


class OrtRuntime(Runtime):
    """ONNX Runtime with one execution provider (``cpu``, ``cuda`` or ``tensorrt``), fp32.

    Units are built as ONNX models directly (:func:`build_onnx`), whole models are exported by
    fxprune's exporter and timed by :mod:`fxprune.bench` (interleaved rounds, IOBinding on a GPU).
    With ``tensorrt`` every layer builds its own TensorRT engine (seconds each): expect a table
    build in tens of minutes for a ResNet-50 (cached afterwards).
    """

    def __init__(self, provider: str = "cpu", *, threads: int | None = None, opt_level: str = "all",
                 batch: int = 1, example_inputs: Sequence[Any] = (), warmup: int = 10, rounds: int = 5,
                 runs_per_round: int = 20, dims: dict[str, int] | None = None, unit_ms: float = 15.0):
        super().__init__()
        from fxprune.bench import BenchConfig

        self.provider = provider
        self.target = {"cpu": "ort-cpu", "cuda": "ort-cuda", "tensorrt": "ort-trt"}[provider]
        self.batch = int(batch)
        self.dtype = "fp32"
        self.example_inputs = tuple(example_inputs)
        self.unit_ms = unit_ms
        self.config = BenchConfig(provider=provider, threads=threads, opt_level=opt_level,
                                  batch_sizes=(self.batch,), warmup=warmup, rounds=rounds,
                                  runs_per_round=runs_per_round, dims=dict(dims or {}))
        self._overhead: float | None = None
        self._timer = None
        self._check_provider()

    def _ep(self) -> list[Any]:
        if self.provider == "cpu":
            return ["CPUExecutionProvider"]
        if self.provider == "cuda":
            return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        return [("TensorrtExecutionProvider", {"device_id": 0}), ("CUDAExecutionProvider", {"device_id": 0}),
                "CPUExecutionProvider"]

    def _check_provider(self) -> None:
        import onnxruntime

        wanted = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                  "tensorrt": "TensorrtExecutionProvider"}[self.provider]
        if wanted not in onnxruntime.get_available_providers():
            raise BenchmarkError(
                f"target {self.target}: {wanted} is not available in this onnxruntime {onnxruntime.__version__} "
                f"(available: {', '.join(onnxruntime.get_available_providers())}); install onnxruntime-gpu "
                "(with TensorRT for ort-trt), or use target='torch-cuda' / 'ort-cpu'")

    def settings(self) -> dict[str, Any]:
        from fxprune.latency import _settings

        out = _settings(self.config)
        out.update({"runtime": "onnxruntime", "target": self.target, "dtype": "fp32"})
        return out

    def quantum(self) -> int:
        # 8: the NCHWc block of AVX2, and half the AVX-512 block. Candidates are measured at multiples
        # of 8 on every x86 CPU; where the block is 16 the tables show it and the plateau filter drops
        # the widths that are not worth their time.
        return 8

    def _session(self, payload: bytes) -> Any:
        import onnxruntime

        from fxprune.bench import _session_options

        return onnxruntime.InferenceSession(payload, sess_options=_session_options(self.config,
                                            self.config.resolved_threads()), providers=self._ep())

    def _runner(self, spec: UnitSpec) -> Callable[[], Any]:
        session = self._session(build_onnx(spec).SerializeToString())
        rng = np.random.default_rng(0)
        feeds = {f"x{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(spec.inputs)}
        if len(spec.inputs) > 3 and spec.ops[0].kind == "sdpa":
            feeds["x3"] = np.zeros(spec.inputs[3], dtype=np.float32)
        names = [o.name for o in session.get_outputs()]
        return lambda: session.run(names, feeds)

    def overhead_ms(self) -> float:
        """Median time of one call of an empty layer (session.run overhead)."""
        if self._overhead is None:
            from fxprune.cost_models.latency_units import OpSpec

            spec = UnitSpec((OpSpec("act", (("fn", "relu"),), (1, 1)),), ((1, 1),))
            run = self._runner(spec)
            for _ in range(20):
                run()
            self._overhead = _median(_time_calls(run, 200))
        return self._overhead

    def time_units(self, specs: Sequence[UnitSpec], progress: Callable[[int], None] | None = None) -> list[float]:
        return _time_in_chunks(specs, self._runner, self.overhead_ms(), self.unit_ms, progress, self)

    def measure(self, candidates: Sequence[Candidate]) -> list[Timing]:
        from fxprune.latency import OrtTimer

        if self._timer is None:
            self._timer = OrtTimer(self.example_inputs, self.config)
        out = self._timer.measure(candidates)
        self.warnings = list(self._timer.warnings)
        self.environment = dict(self._timer.environment)
        self.round_min = list(self._timer.round_min)
        return out


def _time_calls(run: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        run()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def _time_in_chunks(specs: Sequence[UnitSpec], make: Callable[[UnitSpec], Callable[[], Any]], overhead: float,
                    target_ms: float, progress: Callable[[int], None] | None, runtime: Runtime,
                    timer: Callable[[Callable[[], Any], int], list[float]] = _time_calls) -> list[float]:
    """Build and time specs in chunks: each chunk twice, the minimum of the two medians kept.

    A layer the runtime cannot build or run (an op it lacks, out of memory) gets ``nan`` and a
    warning in ``runtime.warnings``; its time then stays in the model's fixed part.
    """
    out: list[float] = []
    for start in range(0, len(specs), _CHUNK):
        chunk = specs[start:start + _CHUNK]
        runs: list[Callable[[], Any] | None] = []
        for spec in chunk:
            try:
                run = make(spec)
                run()
                run()
            except Exception as err:  # report, never crash the compile
                runtime.warnings.append(f"{runtime.target}: cannot time the layer {spec.label}: {type(err).__name__}: "
                                        f"{str(err).splitlines()[0][:160] if str(err) else ''}")
                logger.warning(runtime.warnings[-1])
                run = None
            runs.append(run)
        best = [math.inf] * len(chunk)
        counts = [_runs_for(_median(timer(run, 2)), target_ms, 3, 60) if run is not None else 0 for run in runs]
        for _ in range(2):
            for i, run in enumerate(runs):
                if run is not None:
                    best[i] = min(best[i], _median(timer(run, counts[i])))
        for value, run in zip(best, runs):
            out.append(max(value - overhead, 0.05 * value) if run is not None else math.nan)
        runtime.unit_timings += len(chunk)
        del runs
        if progress is not None:
            progress(len(chunk))
    return out


# --------------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------------


class TorchTimer:
    """Times zero-argument callables on a device: CUDA events on a GPU, ``perf_counter`` on the CPU.

    With ``cuda_graphs`` each callable is captured once in a ``torch.cuda.CUDAGraph`` (after
    warm-up calls on a side stream) and replayed; a callable that cannot be captured (CPU work in
    the forward) runs eagerly and a warning says so.
    """

    def __init__(self, device: str = "cpu", cuda_graphs: bool = False):
        self.device = device
        self.cuda_graphs = bool(cuda_graphs and device == "cuda")
        self.warnings: list[str] = []

    def prepare(self, fn: Callable[[], Any], label: str = "", warmup: int = 3) -> Callable[[], Any]:
        """The callable to time (a graph replay with CUDA graphs); runs the warm-up."""
        if self.device != "cuda":
            for _ in range(warmup):
                fn()
            return fn
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(max(warmup, 2)):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        if not self.cuda_graphs:
            return fn
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            torch.cuda.synchronize()
            graph.replay()
            torch.cuda.synchronize()
        except Exception as err:  # CPU work inside the forward: eager instead
            torch.cuda.synchronize()
            self.warnings.append(f"{label or 'model'}: CUDA graph capture failed ({type(err).__name__}); timed eagerly")
            return fn
        return graph.replay

    def time(self, run: Callable[[], Any], n: int) -> list[float]:
        """Per-call milliseconds of ``n`` back-to-back calls."""
        if self.device != "cuda":
            return _time_calls(run, n)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]


class TorchRuntime(Runtime):
    """PyTorch on ``cuda`` or ``cpu``: eager or CUDA graphs, fp32/fp16/bf16, optional channels_last."""

    def __init__(self, device: str = "cuda", *, dtype: str = "fp32", batch: int = 1, example_inputs: Sequence[Any] = (),
                 cuda_graphs: bool = True, channels_last: bool = True, threads: int | None = None,
                 warmup: int = 5, rounds: int = 5, runs_per_round: int = 20, unit_ms: float = 10.0):
        super().__init__()
        self.device = device
        self.target = f"torch-{device}"
        self.dtype = parse_dtype(dtype)
        self.batch = int(batch)
        self.example_inputs = tuple(example_inputs)
        self.cuda_graphs = bool(cuda_graphs and device == "cuda")
        self.channels_last = bool(channels_last)
        self.threads = threads
        self.warmup, self.rounds, self.runs_per_round = int(warmup), int(rounds), int(runs_per_round)
        self.unit_ms = unit_ms
        self._overhead: float | None = None
        if device == "cuda" and not torch.cuda.is_available():
            raise BenchmarkError("target torch-cuda needs a CUDA GPU, and torch.cuda.is_available() is False here; "
                                 "use target='torch-cpu' or 'ort-cpu'")
        if device == "cpu" and self.dtype != "fp32":
            logger.warning("torch-cpu with %s: CPU kernels for half precision are slow on most machines", self.dtype)
        if device == "cuda":
            torch.backends.cudnn.benchmark = True
        self.clock = TorchTimer(device, self.cuda_graphs)

    def settings(self) -> dict[str, Any]:
        from fxprune.bench import _cpu_model

        out = {"runtime": "torch", "target": self.target, "torch_version": torch.__version__, "dtype": self.dtype,
               "batch": self.batch, "cuda_graphs": self.cuda_graphs, "channels_last": self.channels_last,
               "cpu_model": _cpu_model()}
        if self.device == "cuda":
            out.update({"device": torch.cuda.get_device_name(0), "cuda_version": torch.version.cuda,
                        "cudnn_version": torch.backends.cudnn.version()})
        else:
            out.update({"device": "cpu", "threads": self.threads or torch.get_num_threads()})
        return out

    def quantum(self) -> int:
        if self.device == "cuda":
            return 4 if self.dtype == "fp32" else 8
        return 8

    def _threads(self):
        if self.device == "cpu" and self.threads:
            before = torch.get_num_threads()
            torch.set_num_threads(int(self.threads))
            return before
        return None

    def _runner(self, spec: UnitSpec) -> Callable[[], Any]:
        module, inputs = build_torch(spec, device=self.device, dtype=DTYPES[self.dtype],
                                     channels_last=self.channels_last)

        def fn():
            with torch.inference_mode():
                return module(*inputs)

        return self.clock.prepare(fn, spec.label, warmup=2)

    def overhead_ms(self) -> float:
        if self._overhead is None:
            from fxprune.cost_models.latency_units import OpSpec

            if self.device == "cuda" and self.cuda_graphs:
                self._overhead = 0.0  # a replayed graph has no per-call Python overhead worth removing
            else:
                spec = UnitSpec((OpSpec("act", (("fn", "relu"),), (1, 1)),), ((1, 1),))
                run = self._runner(spec)
                self._overhead = _median(self.clock.time(run, 100))
        return self._overhead

    def time_units(self, specs: Sequence[UnitSpec], progress: Callable[[int], None] | None = None) -> list[float]:
        before = self._threads()
        try:
            return _time_in_chunks(specs, self._runner, self.overhead_ms(), self.unit_ms, progress, self,
                                   timer=self.clock.time)
        finally:
            if before is not None:
                torch.set_num_threads(before)

    def prepare_model(self, model: nn.Module, label: str = "") -> Callable[[], Any]:
        """A callable running a private copy of ``model`` on this runtime's device, dtype and batch."""
        dev_model = copy.deepcopy(model).eval().to(self.device)
        dev_model = dev_model.to(DTYPES[self.dtype])
        if self.channels_last:
            dev_model = dev_model.to(memory_format=torch.channels_last)
        inputs = []
        for x in batch_inputs(self.example_inputs, self.batch):
            if isinstance(x, torch.Tensor):
                x = x.to(self.device)
                if x.is_floating_point():
                    x = x.to(DTYPES[self.dtype])
                if self.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
            inputs.append(x)

        def fn():
            with torch.inference_mode():
                return dev_model(*inputs)

        return self.clock.prepare(fn, label, warmup=self.warmup)

    def time_models(self, models: Sequence[nn.Module], labels: Sequence[str] | None = None) -> list[list[list[float]]]:
        """``times[model][round]``: per-call ms, models interleaved with the order rotated each round."""
        from fxprune.bench import rotation

        before = self._threads()
        try:
            runs = [self.prepare_model(m, (labels or [""] * len(models))[i]) for i, m in enumerate(models)]
            times: list[list[list[float]]] = [[[] for _ in range(self.rounds)] for _ in runs]
            for r in range(self.rounds):
                for i in rotation(len(runs), r):
                    times[i][r] = self.clock.time(runs[i], self.runs_per_round)
            del runs
            if self.device == "cuda":
                torch.cuda.empty_cache()
            return times
        finally:
            if before is not None:
                torch.set_num_threads(before)

    def measure(self, candidates: Sequence[Candidate]) -> list[Timing]:
        times = self.time_models([c.model for c in candidates], [c.label for c in candidates])
        self.warnings = list(self.clock.warnings)
        self.environment = {"loadavg": _loadavg()}
        self.round_min = [min(_median(r) for r in per_round) for per_round in times]
        out = []
        for per_round in times:
            samples = [v for r in per_round for v in r]
            out.append(Timing(_median(samples), _p90(samples)))
        return out


def _loadavg() -> list[float] | None:
    try:
        import os

        return [round(v, 3) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# --------------------------------------------------------------------------------------------
# The fake runtime (tests)
# --------------------------------------------------------------------------------------------


@dataclass
class FakeRuntime(Runtime):
    """A deterministic runtime: a unit's time is computed from its work, never measured.

    ``ms = op_ms * ops + macs(step) / mac_rate + bytes(step) / byte_rate`` where channel counts are
    rounded up to multiples of ``step`` (so latency steps like a real kernel's blocks). A whole
    model costs ``fixed_ms + context * sum(units)`` plus ``extra_ms_per_unit`` for every unit, so
    a model fitted on units has a fixed part and a scale to learn. ``grid`` is the channel step the
    runtime reports (``quantum()``), finer than ``step`` to exercise the plateau filter.
    """

    step: int = 8
    grid: int | None = None
    mac_rate: float = 2.5e7
    byte_rate: float = 1e7
    op_ms: float = 0.002
    fixed_ms: float = 0.05
    context: float = 1.0
    batch: int = 1
    example_inputs: tuple = ()
    target: str = "fake"
    dtype: str = "fp32"
    measurements: list = field(default_factory=list)

    def __post_init__(self) -> None:
        Runtime.__init__(self)

    def settings(self) -> dict[str, Any]:
        return {"runtime": "fake", "target": self.target, "step": self.step, "grid": self.quantum(),
                "mac_rate": self.mac_rate, "byte_rate": self.byte_rate, "op_ms": self.op_ms, "batch": self.batch,
                "dtype": self.dtype}

    def quantum(self) -> int:
        return int(self.grid or self.step)

    def unit_ms(self, spec: UnitSpec) -> float:
        return (self.op_ms * len(spec.ops) + spec_macs(spec, self.step) / self.mac_rate
                + spec_bytes(spec, self.step) / self.byte_rate)

    def time_units(self, specs: Sequence[UnitSpec], progress: Callable[[int], None] | None = None) -> list[float]:
        self.unit_timings += len(specs)
        if progress is not None:
            progress(len(specs))
        return [self.unit_ms(s) for s in specs]

    def model_ms(self, model: nn.Module) -> float:
        if not isinstance(model, torch.fx.GraphModule):
            raise BenchmarkError("FakeRuntime times torch.fx GraphModules (captured or pruned models) only")
        shapes = shapes_at_batch(model, self.example_inputs, self.batch) if self.example_inputs else None
        units = extract_units(model, None, shapes).units
        specs = [u.concrete({}) for u in units]
        return self.fixed_ms + self.context * sum(self.unit_ms(s) for s in specs)

    def measure(self, candidates: Sequence[Candidate]) -> list[Timing]:
        self.measurements.append([c.label for c in candidates])
        self.round_min = []
        out = []
        for c in candidates:
            ms = self.model_ms(c.model)
            out.append(Timing(ms, ms))
        return out


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def make_runtime(target: str = "ort-cpu", *, dtype: Any = "fp32", batch: int = 1, example_inputs: Sequence[Any] = (),
                 threads: int | None = None, opt_level: str = "all", cuda_graphs: bool = True,
                 channels_last: bool | None = None, warmup: int = 10, rounds: int = 5, runs_per_round: int = 20,
                 dims: dict[str, int] | None = None) -> Runtime:
    """The runtime for a target name (see :data:`TARGETS`).

    Raises:
        BenchmarkError: unknown target or dtype, ONNX Runtime targets with a dtype other than fp32,
            a provider or GPU that is not available.
    """
    runtime, device = parse_target(target)
    dtype = parse_dtype(dtype)
    if runtime == "ort":
        if dtype != "fp32":
            raise BenchmarkError(f"target {target} times the fp32 ONNX models fxprune exports; dtype {dtype} is for "
                                 "the torch-cuda / torch-cpu targets")
        return OrtRuntime(device, threads=threads, opt_level=opt_level, batch=batch, example_inputs=example_inputs,
                          warmup=warmup, rounds=rounds, runs_per_round=runs_per_round, dims=dims)
    if channels_last is None:
        channels_last = device == "cuda"
    return TorchRuntime(device, dtype=dtype, batch=batch, example_inputs=example_inputs, cuda_graphs=cuda_graphs,
                        channels_last=channels_last, threads=threads, warmup=min(warmup, 5), rounds=rounds,
                        runs_per_round=runs_per_round)


_ = (platform, _warnings)
