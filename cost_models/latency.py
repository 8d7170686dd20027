"""The measured-latency cost model: latency as a monotone function of MACs, calibrated on this machine.

MACs are exact but latency is what a user pays for, and the two do not move together: channel
counts off the CPU's NCHWc block, depthwise convs, memory-bound ops and per-op overhead all bend
the curve (``research/other_anchors.md`` §8). This model does not guess the bend; it measures it.

**What is measured.** A family of candidate models, all built by the same pipeline (same policy,
channel multiple, importance) at different MAC budgets, is timed on ONNX Runtime *interleaved with
the original model* (``fxprune.bench``). Each candidate contributes a :class:`LatencyPoint`: its MACs
and its latency **ratio** to the original measured in the same run. Storing ratios rather than
milliseconds cancels most of the drift of a shared machine (if everything runs 20% slower this
minute, the ratio does not move).

**The fit.** ``ratio(macs)`` is the isotonic (non-decreasing) least-squares fit of the points
(pool-adjacent-violators, duplicates weighted by their count), interpolated linearly between
points. Monotone is the right prior for one pipeline's own plans (more MACs, more work); where the
measurements disagree (noise, a misaligned width) the fit pools them instead of promising a
speed-up that is not there. The inverse,
:meth:`LatencyCostModel.macs_for`, gives the largest MAC count whose predicted ratio is at most a
target, or ``None`` when the target is below every point measured.

**The cache.** A calibration costs a few model builds, exports and a benchmark, so it is stored
as JSON under ``$FXPRUNE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fxprune/latency`` or
``~/.cache/fxprune/latency``), one file per key. The key covers everything the curve depends on:
the graph's fingerprint (code, parameter shapes, input shapes; not the weight values), the
ONNX Runtime version, provider, intra-op threads, graph optimisation level, CPU model, batch size
and the plan settings (policy, channel multiple, minimum keep ratio, importance criterion,
ignored modules). Change any of them and the model is calibrated afresh.

Timing itself is a seam: anything with ``settings()`` and ``measure(candidates)`` (see
:class:`Timer`) can calibrate the model, so tests inject a deterministic fake clock and
``fxprune.latency.OrtTimer`` times real models on ONNX Runtime.

JSON schema ``fxprune.latency-model/1``::

    {"schema": "fxprune.latency-model/1", "key": {str: any}, "key_hash": str,
     "base_macs": int, "base_median_ms": float,
     "points": [{"macs": int, "ratio": float, "median_ms": float, "p90_ms": float,
                 "base_median_ms": float, "source": "original" | "calibration" | "verify"}]}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

__all__ = [
    "SCHEMA",
    "Candidate",
    "Timing",
    "Timer",
    "LatencyPoint",
    "LatencyCostModel",
    "LatencyCache",
    "calibrate",
    "cache_key",
    "default_cache_dir",
    "graph_fingerprint",
    "isotonic_fit",
]

logger = logging.getLogger(__name__)

SCHEMA = "fxprune.latency-model/1"


# --------------------------------------------------------------------------------------------
# The timing seam
# --------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One model whose latency is measured: the original or a pruned candidate.

    Attributes:
        label: name in benchmark tables (``"original"``, ``"macs=1.234G"``).
        macs: exact MACs of the model.
        model: the model itself (an ``nn.Module``; a fake timer may ignore it).
        payload: anything a timer wants to keep with the candidate (e.g. its exported ONNX).
    """

    label: str
    macs: int
    model: Any = None
    payload: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class Timing:
    """A candidate's latency in one interleaved measurement, in milliseconds."""

    median_ms: float
    p90_ms: float


class Timer(Protocol):
    """Measures candidates' latencies, interleaved, under fixed settings.

    ``settings()`` returns the conditions the timings depend on (provider, threads, optimisation
    level, batch, runtime version, CPU); they become part of the cache key. ``measure`` times the
    candidates in one interleaved run and returns one :class:`Timing` per candidate, in order;
    ``candidates[0]`` is always the original model. ``warnings`` holds what the last measurement
    found suspicious (busy machine, unstable rounds).
    """

    warnings: list[str]

    def settings(self) -> dict[str, Any]:
        ...

    def measure(self, candidates: Sequence[Candidate]) -> list[Timing]:
        ...


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyPoint:
    """One measured candidate.

    Attributes:
        macs: the candidate's MACs.
        ratio: candidate median / original median, both from the same interleaved run.
        median_ms / p90_ms: the candidate's latency in that run.
        base_median_ms: the original's median in that run.
        source: "original", "calibration" or "verify".
    """

    macs: int
    ratio: float
    median_ms: float
    p90_ms: float
    base_median_ms: float
    source: str = "calibration"


def isotonic_fit(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing least-squares fit of ``y`` over ``x`` (pool adjacent violators).

    Points with equal ``x`` are averaged first and weighted by their count.

    Returns:
        ``(xs, fitted)``: the distinct ``x`` ascending and the fitted, non-decreasing values.

    Example:
        ``isotonic_fit([1, 2, 3], [1.0, 3.0, 2.0])`` -> ``([1, 2, 3], [1.0, 2.5, 2.5])``.
    """
    if len(x) != len(y) or not len(x):
        raise ValueError("isotonic_fit needs equally long, non-empty x and y")
    xs, inverse = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True)
    weights = np.bincount(inverse).astype(np.float64)
    means = np.bincount(inverse, weights=np.asarray(y, dtype=np.float64)) / weights
    # blocks of pooled points: value, weight, number of distinct x in the block
    values: list[float] = []
    block_w: list[float] = []
    counts: list[int] = []
    for value, weight in zip(means, weights):
        values.append(float(value))
        block_w.append(float(weight))
        counts.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            w = block_w[-2] + block_w[-1]
            v = (values[-2] * block_w[-2] + values[-1] * block_w[-1]) / w
            c = counts[-2] + counts[-1]
            del values[-1], block_w[-1], counts[-1]
            values[-1], block_w[-1], counts[-1] = v, w, c
    fitted = np.repeat(np.asarray(values), counts)
    return xs, fitted


@dataclass
class LatencyCostModel:
    """Latency ratio to the original as a monotone, piecewise-linear function of MACs.

    Attributes:
        base_macs: MACs of the original model.
        points: every measurement, the original's own point (ratio 1) included.
        key: the cache-key fields (what the calibration depends on).
    """

    base_macs: int
    points: list[LatencyPoint] = field(default_factory=list)
    key: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ fitting and prediction
    def fit(self) -> tuple[np.ndarray, np.ndarray]:
        """``(macs, ratio)`` knots of the fitted curve, MACs ascending."""
        if not self.points:
            raise ValueError("the latency model has no measurements yet")
        return isotonic_fit([p.macs for p in self.points], [p.ratio for p in self.points])

    def ratio(self, macs: float) -> float:
        """Predicted latency ratio to the original at ``macs`` (clamped to the measured range)."""
        xs, ys = self.fit()
        return float(np.interp(float(macs), xs, ys))

    def predict_ms(self, macs: float, base_median_ms: float | None = None) -> float:
        """Predicted median latency at ``macs``, relative to ``base_median_ms`` (default: the
        original's median in the most recent measurement)."""
        base = self.base_median_ms if base_median_ms is None else base_median_ms
        return self.ratio(macs) * base

    def macs_for(self, ratio: float) -> int | None:
        """The largest MACs whose predicted ratio is at most ``ratio``; ``None`` if below the curve.

        Between knots the curve is linear, so the answer is interpolated; on a flat stretch it is
        the stretch's right end. At or above the largest knot's ratio it is the largest knot.
        """
        xs, ys = self.fit()
        if ratio < ys[0]:
            return None
        if ratio >= ys[-1]:
            return int(xs[-1])
        i = int(np.searchsorted(ys, ratio, side="right")) - 1  # last knot with ys[i] <= ratio
        x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
        if y1 <= y0:
            return int(x1)
        return int(np.floor(x0 + (ratio - y0) / (y1 - y0) * (x1 - x0)))

    @property
    def base_median_ms(self) -> float:
        """The original's median latency in the most recent measurement."""
        if not self.points:
            raise ValueError("the latency model has no measurements yet")
        return self.points[-1].base_median_ms

    @property
    def min_point(self) -> LatencyPoint:
        """The fastest candidate measured (smallest median relative to its run's original)."""
        return min(self.points, key=lambda p: (p.ratio, p.macs))

    def add(self, timings: Sequence[Timing], candidates: Sequence[Candidate], source: str) -> list[LatencyPoint]:
        """Record one interleaved measurement; ``candidates[0]`` must be the original.

        Returns the new points (the original's own point is added too, ratio 1).
        """
        if len(timings) != len(candidates) or not candidates:
            raise ValueError("one timing per candidate, the original first")
        base = timings[0].median_ms
        new = [LatencyPoint(int(c.macs), t.median_ms / base, t.median_ms, t.p90_ms, base,
                            "original" if i == 0 else source)
               for i, (c, t) in enumerate(zip(candidates, timings))]
        self.points.extend(new)
        return new

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "key": dict(self.key),
            "key_hash": cache_key(self.key),
            "base_macs": int(self.base_macs),
            "base_median_ms": self.base_median_ms if self.points else None,
            "points": [asdict(p) for p in self.points],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LatencyCostModel":
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} document (schema {data.get('schema')!r})")
        points = [LatencyPoint(int(p["macs"]), float(p["ratio"]), float(p["median_ms"]), float(p["p90_ms"]),
                               float(p["base_median_ms"]), str(p.get("source", "calibration")))
                  for p in data["points"]]
        return cls(int(data["base_macs"]), points, dict(data.get("key", {})))


def calibrate(candidates: Sequence[Candidate], timer: Timer, *, key: Mapping[str, Any] | None = None) -> LatencyCostModel:
    """Time ``candidates`` (the original first) in one interleaved run and fit a model to them."""
    if not candidates:
        raise ValueError("calibrate needs at least the original model")
    model = LatencyCostModel(int(candidates[0].macs), [], dict(key or {}))
    model.add(timer.measure(candidates), candidates, "calibration")
    return model


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$FXPRUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxprune/latency``, else ``~/.cache/fxprune/latency``."""
    explicit = os.environ.get("FXPRUNE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fxprune" / "latency"


def cache_key(fields: Mapping[str, Any]) -> str:
    """A short, stable hash of the key fields (JSON with sorted keys)."""
    text = json.dumps(dict(fields), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def graph_fingerprint(gm: Any, example_inputs: Any = None) -> str:
    """Hash of a GraphModule's structure: generated code, parameter/buffer shapes, input shapes.

    Weight values are deliberately left out: pretrained and random weights of one architecture
    share a latency curve (and a cache entry).
    """
    import torch
    from torch.utils._pytree import tree_leaves

    h = hashlib.sha256()
    h.update(str(getattr(gm, "code", type(gm).__name__)).encode())
    for name, tensor in list(gm.named_parameters()) + list(gm.named_buffers()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    for leaf in tree_leaves(example_inputs):
        if isinstance(leaf, torch.Tensor):
            h.update(f"in:{tuple(leaf.shape)}:{leaf.dtype};".encode())
    return h.hexdigest()[:24]


class LatencyCache:
    """Latency models on disk, one JSON file per key (``<key hash>.json``)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, key: Mapping[str, Any]) -> Path:
        return self.directory / f"{cache_key(key)}.json"

    def load(self, key: Mapping[str, Any]) -> LatencyCostModel | None:
        """The cached model for ``key``, or ``None`` (missing, unreadable or for another key)."""
        path = self.path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            model = LatencyCostModel.from_json(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("ignoring unreadable latency cache %s (%s); it will be rewritten", path, err)
            return None
        if cache_key(model.key) != cache_key(key) or not model.points:
            return None
        return model

    def save(self, model: LatencyCostModel) -> Path | None:
        """Write ``model`` atomically; returns the file, or ``None`` if the directory is not writable."""
        from fxprune._io import atomic_write

        path = self.path(model.key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(model.to_json(), indent=1))
        except OSError as err:
            logger.warning("could not write the latency cache %s: %s", path, err)
            return None
        return path
