"""The per-group latency cost model: lookup tables measured on the target (HALP / NetAdapt style).

**What is measured.** Every latency unit of the graph (:mod:`fxprune.cost_models.latency_units`:
a conv/linear/attention with its fused BatchNorm and activation, or a memory-bound op such as a
residual add, SE scale, pooling or LayerNorm) depends on the keep counts of at most a few
dependency groups (a conv: its input group and its output group). For each unit and each group
``g`` it touches, the unit is built standalone at every *candidate* keep count of ``g`` (the
other groups at full width) and timed on the target runtime; one more point with all its groups
at their smallest candidate fixes the interaction. Identical layers are measured once (the spec
key is the concrete op list and shapes), and every timing is cached on disk per runtime settings,
so a second model sharing layers (ResNet-101 after ResNet-50) reuses them.

**Candidate keep counts** are multiples of the runtime's channel step (``Runtime.quantum()``: the
NCHWc block on CPU, 8 for fp16 tensor cores), thinned by doubling the step until at most
``max_points`` remain (so large groups keep tile-aligned widths: multiples of 64 or 128). Then the
**measured steps decide**: a group's latency curve (the sum of its units' tables) is read, and a
width is allowed only at the right end of a plateau, i.e. when every larger candidate is
measurably slower (a 60-channel layer that costs what 64 channels cost is not worth keeping).

**The model** of one unit ``u`` with groups ``G_u`` and full-width time ``F``::

    T_u(keep) = o + (F - o) * prod_g (T_ug(keep_g) - o) / (F - o)

the measured one-group tables ``T_ug`` combined multiplicatively around an intercept ``o``
(fitted so the all-minimum point is reproduced exactly; for a conv whose time is
``o + c * cin * cout`` this is exact). The whole model is::

    latency(keep) = fixed + scale_compute * sum_{compute u} T_u(keep) + scale_memory * sum_{memory u} T_u(keep)

``fixed`` and the scales come from whole-model measurements of the original and a few uniform
plans (:func:`fit_calibration_kinds`): ``fixed`` holds what no table sees (ops whose width never
changes, unmodelled ops, the runtime's per-call cost), the scales what standalone timing misses
inside a whole model (cache reuse, layout reorders at a lone layer's boundaries, fusions across
units), separately for compute units and memory-bound units when the points allow it. The prediction error is then checked on plans
that were not used in the fit.

:class:`LatencyPlanCost` evaluates it for a keep matrix ``[n, G]`` and returns int64 nanoseconds:
the same vectorised interface as the MAC ``PlanCost``, so the solver and every policy run on it.

Cache files (JSON, written atomically), under ``default_cache_dir()``::

    units/<settings hash>.json   {"schema": "fxprune.latency-units/1", "settings": {...},
                                  "entries": {spec key: milliseconds}}
    calibration/<hash>.json      {"schema": "fxprune.latency-calibration/1", "key": {...},
                                  "fixed_ms": float, "scale": float, "points": [...]}
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fxprune.cost_models.latency import cache_key, default_cache_dir
from fxprune.cost_models.latency_units import UnitSpec, UnitTemplate, extract_units, shapes_at_batch

__all__ = [
    "fit_calibration_kinds",
    "UNITS_SCHEMA",
    "CALIBRATION_SCHEMA",
    "UnitTimingCache",
    "CalibrationCache",
    "UnitTable",
    "LatencyPlanCost",
    "LatencyTableModel",
    "candidate_keeps",
    "plateau_ends",
    "build_tables",
    "fit_calibration",
]

logger = logging.getLogger(__name__)

UNITS_SCHEMA = "fxprune.latency-units/1"
CALIBRATION_SCHEMA = "fxprune.latency-calibration/1"


# --------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------


class UnitTimingCache:
    """Measured unit latencies, one JSON file per runtime settings (``units/<hash>.json``)."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, settings: Mapping[str, Any]) -> Path:
        return self.directory / "units" / f"{cache_key(settings)}.json"

    def load(self, settings: Mapping[str, Any]) -> dict[str, float]:
        path = self.path(settings)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            logger.warning("ignoring unreadable latency table cache %s (%s)", path, err)
            return {}
        if data.get("schema") != UNITS_SCHEMA or cache_key(data.get("settings", {})) != cache_key(settings):
            return {}
        entries = data.get("entries", {})
        return {str(k): float(v) for k, v in entries.items() if isinstance(v, (int, float)) and math.isfinite(v)}

    def save(self, settings: Mapping[str, Any], entries: Mapping[str, float]) -> Path | None:
        """Merge ``entries`` into the file (what another process wrote meanwhile is kept)."""
        from fxprune._io import atomic_write

        path = self.path(settings)
        merged = self.load(settings)
        merged.update({k: float(v) for k, v in entries.items()})
        doc = {"schema": UNITS_SCHEMA, "settings": json.loads(json.dumps(dict(settings), default=str)),
               "entries": merged}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(doc, separators=(",", ":")))
        except OSError as err:
            logger.warning("could not write the latency table cache %s: %s", path, err)
            return None
        return path


class CalibrationCache:
    """Whole-model calibrations (``fixed``, ``scale`` and the measured points) per graph and runtime."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, key: Mapping[str, Any]) -> Path:
        return self.directory / "calibration" / f"{cache_key(key)}.json"

    def load(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        path = self.path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            logger.warning("ignoring unreadable latency calibration %s (%s)", path, err)
            return None
        if data.get("schema") != CALIBRATION_SCHEMA or cache_key(data.get("key", {})) != cache_key(key):
            return None
        return data

    def save(self, key: Mapping[str, Any], data: Mapping[str, Any]) -> Path | None:
        from fxprune._io import atomic_write

        path = self.path(key)
        doc = {"schema": CALIBRATION_SCHEMA, "key": json.loads(json.dumps(dict(key), default=str)), **data}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(doc, indent=1, default=float))
        except OSError as err:
            logger.warning("could not write the latency calibration %s: %s", path, err)
            return None
        return path


# --------------------------------------------------------------------------------------------
# Candidate keep counts and plateaus
# --------------------------------------------------------------------------------------------


def candidate_keeps(n: int, *, quantum: int, blocks: int = 1, unit: int = 1, heads: bool = False,
                    min_keep_ratio: float = 0.1, max_points: int = 12) -> tuple[int, ...]:
    """Keep counts worth measuring for a group of ``n`` units (ascending, ending with ``n``).

    Multiples of the hardware ``quantum`` (channels in the producing layer; heads are whole), of the
    conv-group count and at least ``min_keep_ratio * n``; when more than ``max_points`` remain the
    step is doubled until they fit, so thinned grids stay aligned to larger tiles.
    """
    from fxprune.policies.solver import allowed_keeps

    base = allowed_keeps(n, blocks=blocks, multiple=quantum, unit=unit, heads=heads, min_keep_ratio=min_keep_ratio)
    if len(base) <= max_points:
        return tuple(base)
    step = base[1] - base[0] if len(base) > 1 else 1
    factor = 2
    while True:
        sub = [k for k in base if k % (step * factor) == 0 and k < n]
        if len(sub) + 1 <= max_points or len(sub) <= 1:
            break
        factor *= 2
    if not sub:
        sub = [base[0]]
    return tuple(sorted(set(sub) | {n}))


def plateau_ends(keeps: Sequence[int], ms: Sequence[float], tol: float) -> tuple[int, ...]:
    """The keep counts at the right end of a latency plateau.

    Walking down from the full width, ``keeps[i]`` stays when it is faster by more than ``tol`` (ms)
    than the last width kept and not slower than any larger candidate (a larger width that costs no
    more dominates it). A step function keeps the right end of each step; a gentle slope keeps a
    width every ``tol`` ms. The largest keep always stays.
    """
    keeps = list(keeps)
    ms = list(ms)
    out = []
    best_above = math.inf
    last_kept = math.inf
    for k, t in zip(reversed(keeps), reversed(ms)):
        if k == keeps[-1] or (t < last_kept - tol and t <= best_above):
            out.append(int(k))
            last_kept = t
        best_above = min(best_above, t)
    return tuple(sorted(out))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


COMPUTE_KINDS = frozenset({"conv", "linear", "matmul", "sdpa"})


@dataclass
class UnitTable:
    """The measured tables of one unit: per group, latency at each allowed keep (others full).

    ``kind`` is ``"compute"`` (a conv, linear, matmul or attention unit) or ``"memory"`` (an
    elementwise, pooling or normalisation unit); the calibration may scale the two differently.
    """

    label: str
    groups: tuple[int, ...]
    grid: dict[int, np.ndarray]
    values: dict[int, np.ndarray]
    full_ms: float
    intercept_ms: float = 0.0
    kind: str = "compute"

    def predict(self, keep: np.ndarray) -> np.ndarray:
        """Milliseconds for a keep matrix ``[n, G]``."""
        n = keep.shape[0]
        if not self.groups:
            return np.full(n, self.full_ms)
        o = self.intercept_ms
        span = self.full_ms - o
        if len(self.groups) == 1:
            g = self.groups[0]
            return np.interp(keep[:, g], self.grid[g], self.values[g])
        if span <= 1e-12:
            return np.full(n, self.full_ms)
        prod = np.ones(n)
        for g in self.groups:
            t = np.interp(keep[:, g], self.grid[g], self.values[g])
            prod *= np.clip((t - o) / span, 0.0, None)
        return o + span * prod


class LatencyPlanCost:
    """Predicted latency of candidate plans: ``cost(K)`` for ``K`` of shape ``[n, G]`` -> int64 ns.

    ``fixed_ms + sum_kind scales[kind] * sum(unit tables of that kind)``; :meth:`predict_ms` gives
    milliseconds as floats.
    """

    KINDS = ("compute", "memory")

    def __init__(self, tables: Sequence[UnitTable], n_groups: int, fixed_ms: float = 0.0, scale: float = 1.0):
        self.tables = list(tables)
        self.n_groups = int(n_groups)
        self.fixed_ms = float(fixed_ms)
        self.scales = {k: float(scale) for k in self.KINDS}

    @property
    def scale(self) -> float:
        """The compute units' scale (the memory units' may differ; see ``scales``)."""
        return self.scales["compute"]

    @scale.setter
    def scale(self, value: float) -> None:
        self.scales = {k: float(value) for k in self.KINDS}

    def units_by_kind(self, keep: np.ndarray) -> dict[str, np.ndarray]:
        """Sums of the unit tables per kind (no calibration), ``[n]`` milliseconds each."""
        k = np.atleast_2d(np.asarray(keep, dtype=np.float64))
        out = {kind: np.zeros(k.shape[0]) for kind in self.KINDS}
        for t in self.tables:
            out[t.kind] += t.predict(k)
        return out

    def units_ms(self, keep: np.ndarray) -> np.ndarray:
        """Sum of the unit tables (no calibration), ``[n]`` milliseconds."""
        return sum(self.units_by_kind(keep).values())

    def predict_ms(self, keep: np.ndarray) -> np.ndarray:
        by = self.units_by_kind(keep)
        return self.fixed_ms + sum(self.scales[k] * v for k, v in by.items())

    def __call__(self, keep: np.ndarray) -> np.ndarray:
        return np.rint(self.predict_ms(keep) * 1e6).astype(np.int64)

    def breakdown(self, keep: np.ndarray) -> list[tuple[str, float]]:
        """Per unit ``(label, ms)`` of one plan, largest first (before calibration)."""
        k = np.atleast_2d(np.asarray(keep, dtype=np.float64))
        rows = [(t.label, float(t.predict(k)[0])) for t in self.tables]
        return sorted(rows, key=lambda r: -r[1])


@dataclass
class LatencyTableModel:
    """The measured per-group model of one graph on one runtime.

    Attributes:
        cost: the vectorised plan cost (int64 ns).
        allowed: per group id, the keep counts at the right end of a measured plateau.
        candidates: per group id, the keep counts measured.
        settings: the runtime settings (cache key).
        units: number of units with a width that pruning changes; ``specs``: distinct layers timed
            or read from the cache; ``measured``: layers timed now; ``seconds``: table build time.
        unmodelled: ops whose width changes but that no table covers (their time is in ``fixed``).
        checks: whole-model measurements: ``{"label", "predicted_ms", "measured_ms", "use": "fit" | "check"}``.
    """

    cost: LatencyPlanCost
    allowed: dict[int, tuple[int, ...]]
    candidates: dict[int, tuple[int, ...]]
    settings: dict[str, Any]
    units: int = 0
    specs: int = 0
    measured: int = 0
    seconds: float = 0.0
    unmodelled: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    cache_file: str | None = None
    calibration_file: str | None = None
    fixed_units: int = 0

    def group_curve(self, g: int, full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(keeps, ms)``: predicted model latency with group ``g`` at each allowed keep, others at ``full``."""
        keeps = np.asarray(self.allowed[g], dtype=np.int64)
        K = np.repeat(np.asarray(full, dtype=np.int64)[None, :], len(keeps), axis=0)
        K[:, g] = keeps
        return keeps, self.cost.predict_ms(K)

    def errors(self, use: str = "check") -> list[float]:
        """Relative errors ``|predicted - measured| / measured`` of the whole-model points of one use."""
        return [abs(c["predicted_ms"] - c["measured_ms"]) / c["measured_ms"] for c in self.checks
                if c.get("use") == use and c["measured_ms"] > 0]

    def summary(self) -> dict[str, Any]:
        errs = self.errors("check")
        return {
            "target": self.settings.get("target"),
            "units": self.units,
            "layers_timed": self.specs,
            "layers_measured_now": self.measured,
            "table_seconds": round(self.seconds, 2),
            "fixed_ms": self.cost.fixed_ms,
            "scale": self.cost.scale,
            "scales": dict(self.cost.scales),
            "unmodelled": list(self.unmodelled),
            "checks": list(self.checks),
            "median_abs_error": float(np.median(errs)) if errs else None,
            "allowed": {str(g): list(v) for g, v in self.allowed.items()},
            "cache_file": self.cache_file,
            "calibration_file": self.calibration_file,
        }


# --------------------------------------------------------------------------------------------
# Building the tables
# --------------------------------------------------------------------------------------------


def _solve_intercept(full: float, singles: Sequence[float], cross: float) -> float:
    """``o`` with ``o + (F - o) * prod((a_g - o) / (F - o)) == cross`` (0 when none fits)."""
    upper = min(min(singles), cross, full)
    if upper <= 0 or full <= 0:
        return 0.0
    grid = np.linspace(0.0, upper * 0.999, 400)
    span = np.maximum(full - grid, 1e-12)
    pred = grid + span * np.prod([(a - grid) / span for a in singles], axis=0)
    i = int(np.argmin(np.abs(pred - cross)))
    return float(grid[i])


def build_tables(gm: Any, groups: Sequence[Any], forms: Mapping[tuple[str, int], Any], example_inputs: Sequence[Any],
                 runtime: Any, *, min_keep_ratio: float = 0.1, max_points: int = 12,
                 cache: UnitTimingCache | None = None, plateau_tol: float = 0.002, group_noise: float = 0.01,
                 progress: bool = True) -> LatencyTableModel:
    """Measure (or read from the cache) the tables of every unit of ``gm`` on ``runtime``.

    Args:
        gm: the captured, shape-annotated graph.
        groups: the dependency groups (``id``, ``n``, ``kind``, ``unit``, ``block_count``).
        forms: the dependency analysis' space forms (``DependencyGraph.forms()``).
        example_inputs: the inputs the graph was captured with (shapes are rescaled to the
            runtime's batch).
        runtime: a :class:`fxprune.runtimes.Runtime`.
        max_points: most candidate keep counts measured per group.
        cache: where unit timings are kept between runs (``None``: no cache).
        plateau_tol: a width is dominated when a larger candidate is at most this fraction of the
            full model's table sum slower ...
        group_noise: ... or at most this fraction of the group's own layers' time (timing noise).
    """
    from fxprune import progress as progress_bars

    t0 = time.perf_counter()
    shapes = shapes_at_batch(gm, example_inputs, int(runtime.batch))
    extraction = extract_units(gm, forms, shapes)
    varying = [u for u in extraction.units if u.groups]
    fixed_units = [u for u in extraction.units if not u.groups]
    G = len(groups)
    full = {int(g.id): int(g.n) for g in groups}
    quantum = int(runtime.quantum())
    cands = {int(g.id): candidate_keeps(int(g.n), quantum=quantum, blocks=int(g.block_count), unit=int(g.unit),
                                        heads=g.kind == "heads", min_keep_ratio=min_keep_ratio, max_points=max_points)
             for g in groups}

    # every spec to time: per unit, per group, per candidate (others full); plus the cross point
    wanted: dict[str, UnitSpec] = {}
    plan_points: list[tuple[UnitTemplate, dict[int, list[str]], str, str | None]] = []
    for u in varying:
        per_group: dict[int, list[str]] = {}
        for g in u.groups:
            keys = []
            for k in cands[g]:
                keep = dict(full)
                keep[g] = k
                spec = u.concrete(keep)
                key = spec.key()
                wanted.setdefault(key, spec)
                keys.append(key)
            per_group[g] = keys
        full_spec = u.concrete(full)
        wanted.setdefault(full_spec.key(), full_spec)
        cross_key = None
        if len(u.groups) > 1:
            keep = dict(full)
            for g in u.groups:
                keep[g] = cands[g][0]
            cross = u.concrete(keep)
            cross_key = cross.key()
            wanted.setdefault(cross_key, cross)
        plan_points.append((u, per_group, full_spec.key(), cross_key))

    settings = dict(runtime.settings())
    known = cache.load(settings) if cache is not None else {}
    missing = [k for k in wanted if k not in known]
    measured: dict[str, float] = {}
    if missing:
        specs = [wanted[k] for k in missing]
        # big layers first: a progress bar that slows down at the end is less surprising
        with progress_bars.bar(total=len(specs), desc=f"latency tables ({runtime.target})", unit="layer") as bar:
            times = runtime.time_units(specs, progress=bar.update if progress else None)
        measured = dict(zip(missing, times))
    table_ms = {**known, **measured}
    cache_file = None
    finite = {k: v for k, v in measured.items() if math.isfinite(v)}
    if cache is not None and finite:
        path = cache.save(settings, finite)
        cache_file = str(path) if path else None
    elif cache is not None:
        cache_file = str(cache.path(settings))

    # the raw tables, then the plateau filter on each group's summed curve
    untimed = []
    timed_points = []
    for point in plan_points:
        u, per_group, full_key, cross_key = point
        keys = [full_key, *(k for ks in per_group.values() for k in ks), *([cross_key] if cross_key else [])]
        if all(math.isfinite(table_ms[k]) for k in keys):
            timed_points.append(point)
        else:
            untimed.append(f"{u.label}: could not be timed on {runtime.target}")
    plan_points = timed_points
    raw: list[tuple[str, tuple[int, ...], dict[int, np.ndarray], float, float]] = []
    kinds = ["compute" if u.ops[0].kind in COMPUTE_KINDS else "memory" for u, _, _, _ in plan_points]
    for u, per_group, full_key, cross_key in plan_points:
        vals = {g: np.array([table_ms[k] for k in keys], dtype=np.float64) for g, keys in per_group.items()}
        f = float(table_ms[full_key])
        o = 0.0
        if cross_key is not None:
            singles = [float(vals[g][0]) for g in u.groups]
            o = _solve_intercept(f, singles, float(table_ms[cross_key]))
        raw.append((u.label, u.groups, vals, f, o))
    total_full = sum(r[3] for r in raw) or 1.0
    allowed: dict[int, tuple[int, ...]] = {}
    for g in groups:
        gid = int(g.id)
        curve = np.zeros(len(cands[gid]))
        for _, ugroups, vals, _, _ in raw:
            if gid in vals:
                curve += vals[gid]
        # a step must beat the timing noise of the group's own layers and be worth a solver step
        tol = max(plateau_tol * total_full, group_noise * float(curve[-1]))
        allowed[gid] = plateau_ends(cands[gid], curve, tol) if curve.any() else cands[gid]
    tables = []
    for (label, ugroups, vals, f, o), kind in zip(raw, kinds):
        grid, values = {}, {}
        for g in ugroups:
            idx = [cands[g].index(k) for k in allowed[g]]
            grid[g] = np.asarray(allowed[g], dtype=np.float64)
            values[g] = np.maximum.accumulate(vals[g][idx])  # monotone over the allowed widths
        tables.append(UnitTable(label, ugroups, grid, values, f, o, kind))
    cost = LatencyPlanCost(tables, G)
    return LatencyTableModel(cost, allowed, cands, settings, units=len(varying), specs=len(wanted),
                             measured=len(measured), seconds=time.perf_counter() - t0,
                             unmodelled=list(extraction.unmodelled) + untimed, cache_file=cache_file,
                             fixed_units=len(fixed_units))


# --------------------------------------------------------------------------------------------
# Calibration against whole-model measurements
# --------------------------------------------------------------------------------------------


def fit_calibration(units_ms: Sequence[float], measured_ms: Sequence[float]) -> tuple[float, float]:
    """``(fixed_ms, scale)`` with ``measured ~ fixed + scale * units`` (least squares).

    One point (or points with equal table sums): ``scale = 1`` and ``fixed`` the mean difference.
    The scale is kept in [0.25, 4] (outside it the tables and the model disagree about what
    pruning saves, and the fixed part is refitted with the clamped scale).
    """
    x = np.asarray(units_ms, dtype=np.float64)
    y = np.asarray(measured_ms, dtype=np.float64)
    if len(x) == 0:
        return 0.0, 1.0
    if len(x) < 2 or np.ptp(x) <= 1e-9 * max(abs(x).max(), 1e-12):
        return float(np.mean(y - x)), 1.0
    A = np.stack([np.ones_like(x), x], axis=1)
    (fixed, scale), *_ = np.linalg.lstsq(A, y, rcond=None)
    scale = float(np.clip(scale, 0.25, 4.0))
    fixed = float(np.mean(y - scale * x))
    return fixed, scale


def fit_calibration_kinds(by_kind: Sequence[Mapping[str, float]], measured_ms: Sequence[float]
                          ) -> tuple[float, dict[str, float]]:
    """``(fixed_ms, {kind: scale})`` with ``measured ~ fixed + sum_kind scale_kind * units_kind``.

    Compute units (conv, linear, attention) and memory-bound units (adds, pooling, norms) can be
    off by different factors when timed standalone (layout reorders at a lone layer's boundaries,
    fusions across layers inside the model). With at least four points whose two sums are not
    proportional, both scales are fitted (each kept in [0.25, 4]); otherwise one common scale
    (:func:`fit_calibration`).
    """
    kinds = LatencyPlanCost.KINDS
    X = np.array([[float(p.get(k, 0.0)) for k in kinds] for p in by_kind], dtype=np.float64)
    y = np.asarray(measured_ms, dtype=np.float64)
    total = X.sum(axis=1)
    fixed, scale = fit_calibration(total, y)
    single = (fixed, {k: scale for k in kinds})
    if len(y) < 4 or np.linalg.matrix_rank(np.column_stack([np.ones(len(y)), X]), tol=1e-9 * max(X.max(), 1)) < 3:
        return single
    A = np.column_stack([np.ones(len(y)), X])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    if not np.all(np.isfinite(coef)) or np.any(coef[1:] < 0.25) or np.any(coef[1:] > 4.0):
        return single
    resid_two = float(np.abs(A @ coef - y).mean())
    resid_one = float(np.abs(fixed + scale * total - y).mean())
    if resid_two >= resid_one:
        return single
    return float(coef[0]), {k: float(c) for k, c in zip(kinds, coef[1:])}


_ = (Callable,)
