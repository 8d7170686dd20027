"""``compile(..., latency_budget=..., target=...)``: allocate channels by measured latency.

The pipeline (``fxprune.latency.compile_to_latency`` with ``allocation="latency"``, the default):

1. **tables** (:func:`fxprune.cost_models.latency_table.build_tables`): every layer of the
   captured graph timed standalone on the target at its candidate widths (cached on disk, keyed
   by the runtime's settings); the allowed keep counts per group are the right ends of the
   measured latency plateaus;
2. **calibration**: the original and two uniformly pruned models timed whole, interleaved; the
   model's fixed part and scale are fitted to them (cached per graph and runtime);
3. **allocation**: the policy (``global`` by default: importance lost per unit of cost saved)
   and the budget solver run on a :class:`~fxprune.policies.base.PruningProblem` whose cost is
   the predicted latency in nanoseconds (with ``mac_budget`` too, both as constraints through
   :class:`~fxprune.policies.base.CombinedCost`), over the measured widths;
4. **verification**: the candidate is timed whole, interleaved with the original; a candidate
   that misses the budget tightens the predicted-latency target (regula falsi on the measured
   ratio), one far under it loosens it, until a verified candidate is within ``slack`` under the
   budget. The returned model is one that was **measured** at or under the budget.

Every measurement is recorded: ``report.latency["model"]`` has the tables' summary (units, layers
timed, fixed part, scale, whole-model points with predicted vs measured latency, the median
absolute prediction error on the plans not used in the fit), ``report.attempts`` one record per
verified candidate.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from fxprune.budget import format_macs, parse_latency_budget, parse_mac_budget
from fxprune.cost_models.latency import Candidate, Timing, graph_fingerprint
from fxprune.cost_models.latency_table import (
    CalibrationCache,
    LatencyTableModel,
    UnitTimingCache,
    build_tables,
    fit_calibration_kinds,
)
from fxprune.errors import BandUnreachableError, BudgetUnreachableError, InvalidBudgetError
from fxprune.policies.base import CombinedCost, Constraint, PruningProblem
from fxprune.policies.solver import snap

__all__ = ["LatencyPlanner", "calibration_key", "compile_latency_driven", "search_by_prediction"]

logger = logging.getLogger(__name__)


@dataclass
class LatencyPlanner:
    """Plans and pruned models for predicted-latency (and MAC) budgets on one session and runtime.

    Attributes:
        model: the user's model (never modified).
        session: the compile session (capture, groups, importance, MAC cost).
        runtime: where latency is measured (``fxprune.runtimes``).
        tables: the measured per-group model.
        settings: ``compile_at_budget`` keyword arguments (policy, tolerance, importance, ...).
        mac_budget: an absolute MAC constraint, or ``None``.
    """

    model: nn.Module
    session: Any
    runtime: Any
    tables: LatencyTableModel
    settings: dict[str, Any]
    start: float
    mac_budget: int | None = None
    results: dict[bytes, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, model: nn.Module, session: Any, runtime: Any, settings: dict[str, Any], *, start: float,
               mac_budget: int | None = None, max_points: int = 12, cache_dir: str | None = None,
               use_cache: bool = True, plateau_tol: float = 0.002) -> "LatencyPlanner":
        cache = UnitTimingCache(cache_dir) if use_cache else None
        tables = build_tables(session.gm, session.graph.groups, session.graph.forms(), session.captured.inputs,
                              runtime, min_keep_ratio=settings["min_keep_ratio"], max_points=max_points, cache=cache,
                              plateau_tol=plateau_tol)
        return cls(model, session, runtime, tables, settings, start, mac_budget)

    # ------------------------------------------------------------------ plans
    @property
    def full(self) -> np.ndarray:
        return np.array([g.n for g in self.session.graph.groups], dtype=np.int64)

    def min_keep(self) -> np.ndarray:
        return np.array([self.tables.allowed[g.id][0] for g in self.session.graph.groups], dtype=np.int64)

    def predict_ms(self, keep: np.ndarray) -> float:
        return float(self.tables.cost.predict_ms(np.asarray(keep)[None, :])[0])

    def uniform_keep(self, fraction: float) -> np.ndarray:
        return np.array([snap(np.asarray(self.tables.allowed[g.id]), g.n * fraction, "down")
                         for g in self.session.graph.groups], dtype=np.int64)

    def problem(self, latency_ns: int, *, band: bool = True) -> PruningProblem:
        """The pruning problem at a predicted-latency budget (ns), with the MAC constraint if any."""
        from fxprune._compile import build_problem

        s = self.settings
        base = build_problem(self.session, self.session.base_macs, s["tolerance"], s["channel_multiple"],
                             s["min_keep_ratio"], tie=False)
        groups = tuple(dataclasses.replace(g, allowed=tuple(int(k) for k in self.tables.allowed[g.id]))
                       for g in base.groups)
        lat = self.tables.cost
        full = self.full[None, :]
        constraints = [Constraint("latency", lat, float(latency_ns), "ns", float(lat(full)[0]))]
        if self.mac_budget is not None:
            constraints.append(Constraint("macs", self.session.cost, float(self.mac_budget), "MACs",
                                          float(self.session.base_macs)))
        cost = CombinedCost(constraints) if len(constraints) > 1 else lat
        tol = max(float(s["tolerance"]), 0.02)
        lower = int(math.ceil(latency_ns * (1.0 - tol))) if band else 0
        problem = PruningProblem(groups, int(cost(full)[0]), int(latency_ns), lower,
                                 int(cost(self.min_keep()[None, :])[0]), int(round(lat.fixed_ms * 1e6)), cost,
                                 base.frozen, unit="ns",
                                 constraints=tuple(constraints) if len(constraints) > 1 else ())
        layout = self.session.layout
        if layout is not None:  # the same per-layer ties as the MAC problem (fxprune.tying)
            from fxprune.tying import apply_layout

            problem = apply_layout(problem, layout.ties, layout.fixed, layout.allowed)
        return problem

    def _compile(self, latency_ns: int, plan_only: bool) -> Any:
        from fxprune._compile import compile_at_budget

        s = self.settings
        kwargs = dict(tolerance=s["tolerance"], policy=s["policy"], channel_multiple=s["channel_multiple"],
                      min_keep_ratio=s["min_keep_ratio"], importance=s["importance"], evaluate=s["evaluate"],
                      calibration_data=s["calibration_data"], seed=s["seed"], verify=s["verify"],
                      policy_options=s["policy_options"], plan_only=plan_only)
        budget_macs = self.mac_budget if self.mac_budget is not None else self.session.base_macs
        try:
            return compile_at_budget(self.model, self.session, budget_macs, self.start,
                                     problem=self.problem(int(latency_ns)), **kwargs)
        except BandUnreachableError:  # coarse widths: the closest plan under the budget will do
            return compile_at_budget(self.model, self.session, budget_macs, self.start,
                                     problem=self.problem(int(latency_ns), band=False), **kwargs)

    def plan(self, latency_ns: int) -> tuple[np.ndarray, int]:
        """The keep counts and exact MACs of the plan at a predicted-latency budget (no model built)."""
        result = self._compile(latency_ns, plan_only=True)
        return self.keep_of(result), int(result.macs)

    def build(self, latency_ns: int) -> Any:
        """The ``CompileResult`` at a predicted-latency budget (memoized by plan)."""
        result = self._compile(latency_ns, plan_only=False)
        keep = np.array([result.keep.get(g.id, g.n) for g in self.session.graph.groups], dtype=np.int64)
        key = keep.tobytes()
        if key not in self.results:
            result.report.lower_macs = 0 if self.mac_budget is not None else int(result.macs)
            result.report.budget_macs = int(self.mac_budget) if self.mac_budget is not None else int(result.macs)
            self.results[key] = result
        return self.results[key]

    def keep_of(self, result: Any) -> np.ndarray:
        return np.array([result.keep.get(g.id, g.n) for g in self.session.graph.groups], dtype=np.int64)

    # ------------------------------------------------------------------ calibration
    def calibrate(self, original: Candidate, fractions: tuple[float, ...], cache: CalibrationCache | None,
                  key: Mapping[str, Any]) -> Timing | None:
        """Fit the fixed part and scale to whole-model timings (cached); returns the original's
        timing when it was measured now."""
        cost = self.tables.cost
        cached = cache.load(key) if cache is not None else None
        if cached is not None:
            cost.fixed_ms = float(cached["fixed_ms"])
            cost.scales = {k: float(cached["scales"].get(k, cached["scale"])) for k in cost.KINDS} \
                if isinstance(cached.get("scales"), dict) else {k: float(cached["scale"]) for k in cost.KINDS}
            self.tables.checks.extend(dict(p, use="fit", cached=True) for p in cached.get("points", []))
            return None
        plans = [("original", self.full)]
        for f in fractions:
            keep = self.uniform_keep(f)
            if not any(np.array_equal(keep, p) for _, p in plans):
                plans.append((f"uniform {f:.0%}", keep))
        cands = [original]
        for label, keep in plans[1:]:
            gm, macs = self.session.materialize(keep)
            cands.append(Candidate(label, int(macs), gm))
        timings = self.runtime.measure(cands)
        by_kind = [{k: float(v[0]) for k, v in cost.units_by_kind(keep[None, :]).items()} for _, keep in plans]
        robust = list(getattr(self.runtime, "round_min", []) or [])
        measured = robust if len(robust) == len(timings) else [t.median_ms for t in timings]
        cost.fixed_ms, cost.scales = fit_calibration_kinds(by_kind, measured)
        points = [{"label": label, "macs": int(c.macs), "units_ms": sum(u.values()), "measured_ms": m,
                   "predicted_ms": self.predict_ms(keep)}
                  for (label, keep), c, u, m in zip(plans, cands, by_kind, measured)]
        self.tables.checks.extend(dict(p, use="fit") for p in points)
        if cache is not None:
            path = cache.save(key, {"fixed_ms": cost.fixed_ms, "scale": cost.scale, "scales": dict(cost.scales),
                                    "points": points})
            self.tables.calibration_file = str(path) if path else None
        return timings[0]

    def check(self, label: str, keep: np.ndarray, measured_ms: float, macs: int) -> dict[str, Any]:
        point = {"label": label, "macs": int(macs), "predicted_ms": self.predict_ms(keep), "measured_ms": measured_ms,
                 "use": "check"}
        self.tables.checks.append(point)
        return point


# --------------------------------------------------------------------------------------------
# The search: predicted-latency target -> plan -> measured
# --------------------------------------------------------------------------------------------


@dataclass
class _Measured:
    result: Any
    keep: np.ndarray
    predicted_ms: float
    original: Timing
    timing: Timing
    limit_ms: float

    @property
    def units(self) -> float:  # measured latency in units of the budget (<= 1 meets it)
        return self.timing.median_ms / self.limit_ms


def search_by_prediction(planner: LatencyPlanner, original: Candidate, budget: Any, *, base_ms: float,
                         max_verify: int = 6, margin: float = 0.03, slack: float = 0.08,
                         log: Callable[[dict[str, Any]], None] = lambda r: None) -> tuple[_Measured | None, list[_Measured]]:
    """Find the plan with the largest predicted latency whose measured median meets ``budget``.

    ``base_ms`` is the original's latency (measured or predicted) used for the first guess.
    Returns ``(best passing measurement or None, every measurement)``.
    """
    from fxprune.latency import relative_budget

    relative = relative_budget(budget)
    absolute = None if relative is not None else parse_latency_budget(budget)

    def limit(orig_ms: float) -> float:
        return relative * orig_ms if relative is not None else absolute

    full_pred = planner.predict_ms(planner.full)
    cost = planner.tables.cost
    lo_ns, hi_ns = int(cost(planner.min_keep()[None, :])[0]), int(cost(planner.full[None, :])[0])
    target = 1.0 - margin
    x = full_pred * (limit(base_ms) / base_ms) * target
    done: dict[bytes, _Measured] = {}
    history: list[_Measured] = []
    best: _Measured | None = None
    fail: _Measured | None = None
    for attempt in range(max_verify):
        x_ns = int(min(max(x * 1e6, lo_ns), hi_ns))
        result = planner.build(x_ns)
        keep = planner.keep_of(result)
        key = keep.tobytes()
        if key in done:
            m = done[key]
        else:
            cand = Candidate(f"pred={planner.predict_ms(keep):.4g}ms", int(result.macs), result.model)
            orig_t, cand_t = planner.runtime.measure([original, cand])
            m = _Measured(result, keep, planner.predict_ms(keep), orig_t, cand_t, limit(orig_t.median_ms))
            done[key] = m
            history.append(m)
            planner.check(cand.label, keep, cand_t.median_ms, int(result.macs))
            log({"kind": "latency", "stage": "verify", "macs": int(result.macs),
                 "mac_fraction": result.macs / max(result.base_macs, 1), "predicted_ms": m.predicted_ms,
                 "median_ms": cand_t.median_ms, "p90_ms": cand_t.p90_ms, "original_median_ms": orig_t.median_ms,
                 "ratio": cand_t.median_ms / orig_t.median_ms, "budget_ms": m.limit_ms, "passed": m.units <= 1.0,
                 "target_ms": x_ns / 1e6})
        if m.units <= 1.0:
            if best is None or m.predicted_ms > best.predicted_ms:
                best = m
            if m.units >= 1.0 - slack:
                break
        else:
            if fail is None or m.predicted_ms < fail.predicted_ms:
                fail = m
            if np.array_equal(keep, planner.min_keep()) or x_ns <= lo_ns:
                break
        # next target: interpolate between the verified bounds (in predicted ms vs measured units)
        if best is not None and fail is not None:
            (p0, u0), (p1, u1) = (best.predicted_ms, best.units), (fail.predicted_ms, fail.units)
            nxt = p0 + (target - u0) / (u1 - u0) * (p1 - p0) if u1 > u0 else 0.5 * (p0 + p1)
            nxt = min(max(nxt, p0 + 0.05 * (p1 - p0)), p1 - 0.05 * (p1 - p0))
        else:
            nxt = m.predicted_ms * target / m.units
        if abs(nxt - x) < 1e-9 * max(x, 1e-9) or int(nxt * 1e6) == x_ns:
            nxt = x * (0.97 if best is None else 1.02)
        x = nxt
    return best, history


# --------------------------------------------------------------------------------------------
# compile
# --------------------------------------------------------------------------------------------


def calibration_key(session: Any, runtime: Any, *, max_points: int, min_keep_ratio: float,
                    fractions: Sequence[float], ignore: Any, plateau_tol: float, grouped_convs: str) -> dict[str, Any]:
    """What a cached whole-model calibration depends on (``CalibrationCache``). How grouped convs are
    pruned is absent for ``"within"``, the structure every calibration cached before the option
    existed was made with."""
    key = {"schema": 1, "graph": graph_fingerprint(session.gm, session.captured.inputs),
           "runtime": runtime.settings(), "max_points": max_points, "min_keep_ratio": min_keep_ratio,
           "fractions": list(fractions), "ignore": repr(ignore) if not callable(ignore) else "callable",
           "plateau_tol": plateau_tol}
    if grouped_convs != "within":
        key["grouped_convs"] = grouped_convs
    return key


def compile_latency_driven(model: nn.Module, example_inputs: Any, *, latency_budget: Any, mac_budget: Any = None,
                           target: str | None = None, dtype: Any = None, batch_size: int | None = None,
                           options: Any, settings: dict[str, Any], ignore: Any = None, capture: str = "auto",
                           leaf_modules: Any = (), calibration_data: Any = None, loss_fn: Any = None) -> Any:
    """The latency-driven compile (see the module docstring); returns a ``CompileResult``."""
    from fxprune._compile import _new_report, _result, open_session
    from fxprune.latency import _diagnose, relative_budget
    from fxprune.runtimes import make_runtime

    parse_latency_budget(latency_budget, base_ms=1.0)
    opts = options
    seed = settings["seed"]
    grouped_convs = settings["grouped_convs"]
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        session = open_session(model, example_inputs, ignore=ignore, importance=settings["importance"],
                               calibration_data=calibration_data, loss_fn=loss_fn, capture_method=capture,
                               leaf_modules=leaf_modules, seed=seed, grouped_convs=grouped_convs)
        mac_abs = parse_mac_budget(mac_budget, session.base_macs) if mac_budget is not None else None
        if not session.graph.groups:
            raise BudgetUnreachableError(
                f"latency budget {latency_budget!r}: nothing in this model can be pruned, so no model faster than "
                "the original can be built", min_macs=session.base_macs, budget=math.nan)
        batch = int(batch_size or opts.batch)
        runtime = opts.runtime
        if runtime is None:
            runtime = make_runtime(target or "ort-cpu", dtype=dtype or "fp32", batch=batch,
                                   example_inputs=session.captured.inputs, threads=opts.threads,
                                   opt_level=opts.opt_level, cuda_graphs=opts.cuda_graphs,
                                   channels_last=opts.channels_last, warmup=opts.warmup, rounds=opts.rounds,
                                   runs_per_round=opts.runs_per_round, dims=dict(opts.dims))
        planner = LatencyPlanner.create(model, session, runtime, settings, start=start, mac_budget=mac_abs,
                                        max_points=opts.max_points, cache_dir=opts.cache_dir, use_cache=opts.cache,
                                        plateau_tol=opts.plateau_tol)
        original = Candidate("original", session.base_macs, session.deployed_original())
        key = calibration_key(session, runtime, max_points=opts.max_points, min_keep_ratio=settings["min_keep_ratio"],
                              fractions=opts.fit_fractions, ignore=ignore, plateau_tol=opts.plateau_tol,
                              grouped_convs=grouped_convs)
        cal_cache = CalibrationCache(opts.cache_dir) if opts.cache else None
        orig_t = planner.calibrate(original, tuple(opts.fit_fractions), cal_cache, key)
        base_ms = orig_t.median_ms if orig_t is not None else planner.predict_ms(planner.full)

        attempts: list[dict[str, Any]] = []
        relative = relative_budget(latency_budget)
        limit_est = relative * base_ms if relative is not None else parse_latency_budget(latency_budget)
        if limit_est >= base_ms and mac_abs is None:
            if orig_t is None:
                orig_t, _ = runtime.measure([original, original])
            limit = relative * orig_t.median_ms if relative is not None else limit_est
            if orig_t.median_ms <= limit:
                report = _new_report(model, session, settings["policy"], settings["importance"], latency_budget,
                                     session.base_macs, settings["tolerance"], settings["channel_multiple"], seed)
                report.notes.append("latency budget at or above the original's measured latency: model returned unchanged")
                result = _result(session, session.owned_original(), session.base_macs, report, {}, start)
                _finish(result, runtime, latency_budget, orig_t, orig_t, limit, planner, [], relative, mac_abs)
                return result
        best, history = search_by_prediction(planner, original, latency_budget, base_ms=base_ms,
                                             max_verify=opts.max_verify, margin=opts.margin, slack=opts.slack,
                                             log=attempts.append)
        if best is None:
            fastest = min(history, key=lambda m: m.timing.median_ms) if history else None
            spec = f"{relative:.0%} of the original" if relative is not None else f"{limit_est:.4g} ms"
            smallest = (f"the smallest latency measured is {fastest.timing.median_ms:.4g} ms median "
                        f"({fastest.timing.median_ms / fastest.original.median_ms:.0%} of the original's "
                        f"{fastest.original.median_ms:.4g} ms in the same run, {format_macs(int(fastest.result.macs))} MACs)"
                        if fastest else "nothing could be measured")
            err = BudgetUnreachableError(
                f"latency budget {latency_budget!r} ({spec}) on {runtime.target}: no pruned model measured at or under "
                f"it; {smallest}. Raise the budget, lower min_keep_ratio, or measure at a larger batch "
                "(batch_size=...), where latency follows the width more closely.",
                min_macs=int(min((m.result.macs for m in history), default=session.base_macs)),
                budget=limit_est)
            err.min_latency_ms = float(fastest.timing.median_ms) if fastest else math.nan
            raise err
        result = best.result
        result.report.timings["total"] = time.perf_counter() - start
        result.report.attempts.extend(attempts)
        _finish(result, runtime, latency_budget, best.original, best.timing, best.limit_ms, planner, history,
                relative, mac_abs)
        _diagnose(result, result.report.latency)
        return result


def _finish(result: Any, runtime: Any, budget: Any, orig_t: Timing, chosen_t: Timing, limit: float,
            planner: LatencyPlanner, history: list, relative: float | None, mac_abs: int | None) -> None:
    from fxprune.latency import latency_record

    report = result.report
    report.budget_spec = f"latency {budget}" + (f" and {format_macs(mac_abs)} MACs" if mac_abs is not None else "")
    record = latency_record(orig_t, chosen_t, macs=result.macs, base_macs=result.base_macs,
                            settings=runtime.settings(), environment=getattr(runtime, "environment", {}),
                            bench_warnings=getattr(runtime, "warnings", []))
    record.update({"target": runtime.target, "dtype": runtime.dtype, "batch": runtime.batch, "allocation": "latency"})
    summary = planner.tables.summary()
    record["model"] = summary
    record["budget"] = {
        "spec": str(budget), "budget_ms": limit, "met": chosen_t.median_ms <= limit, "relative": relative,
        "mac_budget": mac_abs, "measurements": len(history),
        "predicted_ms": planner.predict_ms(planner.keep_of(result)) if result.keep else planner.predict_ms(planner.full),
        "smallest_measured_ms": min((m.timing.median_ms for m in history), default=chosen_t.median_ms),
        "cache": "hit" if planner.tables.measured == 0 else "miss",
        "cache_file": planner.tables.cache_file,
    }
    report.latency = record
    err = summary.get("median_abs_error")
    report.notes.append(
        f"latency budget {budget} on {runtime.target} ({runtime.dtype}, batch {runtime.batch}): "
        f"{chosen_t.median_ms:.4g} ms measured (budget {limit:.4g} ms, original {orig_t.median_ms:.4g} ms, "
        f"{format_macs(result.macs)} MACs); per-group model: {planner.tables.units} units, {planner.tables.specs} "
        f"layers timed ({planner.tables.measured} now, {planner.tables.seconds:.1f}s)"
        + (f", median prediction error {err:.1%}" if err is not None else ""))


_ = (InvalidBudgetError, Mapping)
