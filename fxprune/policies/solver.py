"""The budget solver: project any proposal onto the band ``[lower, budget]`` of the problem's cost.

The cost is the exact MAC count by default; with a latency budget it is the predicted latency of
the measured per-group model, or several constraints combined (``PruningProblem.constraints``);
the algorithm below only needs a cost that does not decrease when a group keeps more.

Policies shape the allocation; the solver makes the budget a guarantee. Given per-group keep
*targets* (any real numbers; a policy's wish), it

1. **scales** the pruning the proposal asks for by a factor ``alpha`` (bisection; MACs are
   monotone in every keep count) until the plan fits under the budget, blending towards uniform
   pruning if the proposal alone cannot get there;
2. **fills** the band from below: it adds back one allowed step at a time, preferring the groups
   the scaling cut furthest below their target (and, among those, the most important units per
   MAC), while the plan stays under the budget;
3. **swaps** when filling is stuck below the band: remove one step somewhere, add steps elsewhere;
4. as a last resort, lets the fill use single-unit steps (ignoring ``channel_multiple``) and says
   so in the returned notes.

Every keep count the solver returns is one of the group's allowed counts (multiples of the
channel multiple and of the conv-group count, at least the minimum keep), and the exact MACs are
re-evaluated for every candidate, so ``macs <= budget`` holds by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

import itertools

from fxprune.errors import BandUnreachableError, BudgetUnreachableError
from fxprune.policies.base import PruningProblem

__all__ = ["Projection", "project", "allowed_keeps", "snap"]


def allowed_keeps(n: int, *, blocks: int = 1, multiple: int = 8, unit: int = 1, heads: bool = False,
                  min_keep_ratio: float = 0.1, max_keep: int | None = None) -> tuple[int, ...]:
    """The keep counts a group may take.

    ``multiple`` applies to channels in the producing layer (``keep * unit``); heads are whole
    units already, so only the conv-group constraint applies to them. Groups smaller than twice the
    multiple use the largest divisor of it that still leaves room to prune.
    """
    m = 1 if heads else max(1, int(multiple))
    m = m // math.gcd(m, max(unit, 1))
    while m > 1 and n < 2 * m * blocks:
        m //= 2
    step = blocks * m // math.gcd(blocks, m)
    lo = max(step, int(math.ceil(min_keep_ratio * n / step)) * step)
    vals = list(range(lo, n, step))
    hi = n if max_keep is None else max_keep
    vals = [v for v in vals if v <= hi]
    if not vals or vals[-1] != n:
        vals.append(n)
    return tuple(vals)


def snap(allowed: np.ndarray, value: float, mode: str = "down") -> int:
    if mode == "down":
        i = int(np.searchsorted(allowed, value + 1e-9, side="right")) - 1
        return int(allowed[max(i, 0)])
    i = int(np.searchsorted(allowed, value - 1e-9, side="left"))
    return int(allowed[min(i, len(allowed) - 1)])


@dataclass
class Projection:
    keep: np.ndarray
    macs: int
    in_band: bool
    notes: list[str] = field(default_factory=list)
    alpha: float = 0.0
    evaluations: int = 0


class _Eval:
    def __init__(self, problem: PruningProblem):
        self.problem = problem
        self.n = 0

    def __call__(self, k: np.ndarray) -> np.ndarray:
        k = np.atleast_2d(k)
        self.n += k.shape[0]
        return self.problem.cost(k)


def _keep_at(allowed, sizes, prune, alpha):
    out = np.empty(len(sizes), dtype=np.int64)
    for g, (a, n, p) in enumerate(zip(allowed, sizes, prune)):
        out[g] = snap(a, n * (1.0 - min(1.0, alpha * p)), "down")
    return out


def _bisect(fn_keep, cost, budget, lo, hi, iters=40):
    """Smallest parameter in [lo, hi] whose plan fits under the budget (plan is monotone)."""
    k_hi = fn_keep(hi)
    if cost(k_hi)[0] > budget:
        return None, k_hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        k = fn_keep(mid)
        if cost(k)[0] <= budget:
            hi, k_hi = mid, k
        else:
            lo = mid
        if hi - lo < 1e-6:
            break
    return hi, k_hi


def project(problem: PruningProblem, target: np.ndarray, *, priority: np.ndarray | None = None,
            allow_fine_fill: bool = True) -> Projection:
    """Project per-group keep ``target`` (units, may be fractional) onto the MAC band.

    Args:
        problem: the pruning problem (groups, allowed keeps, cost, band).
        target: [G] desired keep counts.
        priority: optional [G] scores, or a callable ``keep -> [G]``: a higher score means the group
            gets its next step back first during the fill (default: the relative shortfall vs
            the target).
        allow_fine_fill: permit single-unit steps when multiples cannot reach the band.

    Raises:
        BudgetUnreachableError: the budget is below the smallest reachable model.
    """
    ev = _Eval(problem)
    sizes = problem.sizes.astype(np.float64)
    allowed = [np.asarray(g.allowed, dtype=np.int64) for g in problem.groups]
    target = np.clip(np.asarray(target, dtype=np.float64), 0, sizes)
    notes: list[str] = []
    min_keep = np.array([a[0] for a in allowed], dtype=np.int64)
    if ev(min_keep)[0] > problem.budget:
        fmt = problem.fmt
        raise BudgetUnreachableError(
            f"a budget of {fmt(problem.budget)} is below the smallest model fxprune can build here "
            f"({fmt(problem.min_macs)}: every prunable group at its minimum keep; {fmt(problem.fixed_macs)} "
            "cannot be pruned at all"
            + (f", most of it in {', '.join(problem.fixed_where)}: their channels are frozen (report.frozen "
               "says why)" if problem.fixed_where and problem.unit == "MACs" else "")
            + "). Raise the budget, lower min_keep_ratio, or un-ignore modules.",
            min_macs=problem.min_macs, budget=problem.budget,
        )
    prune = 1.0 - target / np.maximum(sizes, 1)
    # 1. scale the proposal's pruning until it fits
    alpha = 1.0
    keep = _keep_at(allowed, sizes, prune, 1.0)
    if ev(keep)[0] > problem.budget:
        hi = 1.0 / max(prune[prune > 0].min(), 1e-6) if (prune > 0).any() else 1.0
        a, k = _bisect(lambda x: _keep_at(allowed, sizes, prune, x), ev, problem.budget, 1.0, max(hi, 1.0))
        if a is None:
            # the proposal's groups alone cannot reach the budget: blend in uniform pruning
            b, k = _bisect(lambda beta: _keep_at(allowed, sizes, np.maximum(prune, beta), 1.0),
                           ev, problem.budget, 0.0, 1.0)
            notes.append(f"proposal could not reach the budget alone; added uniform pruning of {b:.3f}")
            alpha = float("nan")
        else:
            alpha = a
            if a > 1.0 + 1e-6:
                notes.append(f"scaled the proposed pruning by {a:.3f} to fit the budget")
        keep = k
    elif ev(keep)[0] < problem.lower:
        # the proposal prunes too much: shrink it (alpha < 1) and let the fill finish
        a, k = _bisect(lambda x: _keep_at(allowed, sizes, prune, x), ev, problem.budget, 0.0, 1.0)
        if a is not None:
            keep, alpha = k, a
            if a < 1.0 - 1e-6:
                notes.append(f"scaled the proposed pruning by {a:.3f} (it pruned more than needed)")
    keep = np.asarray(keep, dtype=np.int64)
    macs = int(ev(keep)[0])
    # 2-4. fill the band
    keep, macs, fill_notes = _fill(problem, ev, allowed, keep, macs, target, priority, fine=False)
    notes += fill_notes
    if macs < problem.lower:
        keep, macs, swap_notes = _swap(problem, ev, allowed, keep, macs, target, priority)
        notes += swap_notes
    if macs < problem.lower:  # small problems: every combination that honours the multiples
        keep, macs, searched = _exhaustive(problem, ev, allowed, target, keep, macs)
        if searched and macs >= problem.lower:
            notes.append("searched every combination of keep counts to land in the band")
    # latency problems keep to the measured widths: single-unit steps would leave the tables' grid
    if macs < problem.lower and allow_fine_fill and problem.unit == "MACs":
        fine = [np.arange(max(1, a[0] // 2), int(s) + 1, dtype=np.int64) if len(a) > 1 else a
                for a, s in zip(allowed, sizes)]
        fine = [f[(f % g.quantum == 0) | (f == g.size)] for f, g in zip(fine, problem.groups)]
        keep2, macs2, _ = _fill(problem, ev, fine, keep, macs, target, priority, fine=True)
        if macs2 < problem.lower:
            keep2, macs2, _ = _swap(problem, ev, fine, keep2, macs2, target, priority)
        if macs2 < problem.lower:
            keep2, macs2, _ = _exhaustive(problem, ev, fine, target, keep2, macs2)
        if macs2 >= problem.lower:
            changed = [g.name for g, k in zip(problem.groups, keep2) if int(k) not in g.allowed]
            notes.append("used single-unit steps to reach the band (channel_multiple not honoured for: "
                         + ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else "") + ")")
        if macs2 > macs:
            keep, macs = keep2, macs2
    if macs < problem.lower:
        fmt = problem.fmt
        raise BandUnreachableError(
            f"no plan lands in the band [{fmt(problem.lower)}, {fmt(problem.budget)}]: the closest at or below the "
            f"budget is {fmt(macs)} ({1 - macs / problem.budget:.2%} below it). The keep counts are too coarse for this "
            f"tolerance ({1 - problem.lower / problem.budget:.2%}); raise tolerance to at least "
            f"{1 - macs / problem.budget:.2%} or lower channel_multiple.",
            best_macs=macs, budget=problem.budget, lower=problem.lower)
    assert problem.lower <= macs <= problem.budget
    return Projection(keep, macs, True, notes, alpha, ev.n)


def _exhaustive(problem, ev, allowed, target, keep, macs, limit=200_000, chunk=20_000):
    """Try every combination when there are few; returns (keep, macs, searched)."""
    total = 1
    for a in allowed:
        total *= len(a)
        if total > limit:
            return keep, macs, False
    best_keep, best_macs = keep, macs
    best_dist = np.inf
    sizes = np.maximum(problem.sizes, 1)
    combos = itertools.product(*[a.tolist() for a in allowed])
    while True:
        block = list(itertools.islice(combos, chunk))
        if not block:
            break
        K = np.asarray(block, dtype=np.int64)
        c = ev(K)
        ok = c <= problem.budget
        lands = ok & (c >= problem.lower)
        if lands.any():
            idx = np.flatnonzero(lands)
            dist = (np.abs(K[idx] - target) / sizes).sum(axis=1)
            j = idx[np.argmin(dist)]
            if dist.min() < best_dist:
                best_keep, best_macs, best_dist = K[j], int(c[j]), dist.min()
        elif best_dist == np.inf and ok.any():
            j = np.flatnonzero(ok)[np.argmax(c[ok])]
            if c[j] > best_macs:
                best_keep, best_macs = K[j], int(c[j])
    return best_keep, best_macs, True


def _fill(problem, ev, allowed, keep, macs, target, priority, fine):
    """Add back allowed steps while under the budget, until the band is reached."""
    notes = []
    keep = keep.copy()
    G = len(keep)
    for _ in range(100000):
        if macs >= problem.lower:
            break
        cand_keep, cand_g = [], []
        for g in range(G):
            a = allowed[g]
            i = int(np.searchsorted(a, keep[g], side="right"))
            if i < len(a):
                k = keep.copy()
                k[g] = a[i]
                cand_keep.append(k)
                cand_g.append(g)
        if not cand_keep:
            break
        K = np.stack(cand_keep)
        costs = ev(K)
        fits = costs <= problem.budget
        if not fits.any():
            break
        cg = np.asarray(cand_g)
        shortfall = (target[cg] - keep[cg]) / np.maximum(problem.sizes[cg], 1)
        if priority is not None:
            pr = priority(keep) if callable(priority) else priority
            score = np.asarray(pr)[cg] + 1e-3 * shortfall
        else:
            score = shortfall
        # prefer candidates that land in the band outright, then the best-scored one
        lands = fits & (costs >= problem.lower)
        pool = np.flatnonzero(lands) if lands.any() else np.flatnonzero(fits)
        best = pool[np.lexsort((costs[pool], -score[pool]))[0]]
        keep = K[best]
        macs = int(costs[best])
    return keep, macs, notes


def _swap(problem, ev, allowed, keep, macs, target, priority, rounds=8, max_up=24):
    """Move one group up a step and another down as far as needed, when plain filling is stuck.

    MACs are linear in any single group's keep count (with the others fixed), so for each pair
    (j up one step, i down) the i value that lands mid-band is interpolated from two evaluations
    and then checked exactly.
    """
    notes = []
    G = len(keep)
    aim = 0.5 * (problem.lower + problem.budget)
    for _ in range(rounds):
        if macs >= problem.lower:
            break
        ups = []
        for j in range(G):
            a = allowed[j]
            t = int(np.searchsorted(a, keep[j], side="right"))
            if t < len(a):
                k = keep.copy()
                k[j] = a[t]
                ups.append(k)
        if not ups:
            break
        U = np.stack(ups)
        cu = ev(U)
        if len(ups) > max_up:  # the cheapest up-steps are the most likely to be repairable
            sel = np.argsort(cu)[:max_up]
            U, cu = U[sel], cu[sel]
        rows, meta = [], []
        for r, (k_up, c) in enumerate(zip(U, cu)):
            j = int(np.flatnonzero(k_up != keep)[0])
            for i in range(G):
                if i != j and keep[i] > allowed[i][0]:
                    k = k_up.copy()
                    k[i] = allowed[i][0]
                    rows.append(k)
                    meta.append((r, i))
        if not rows:
            break
        cmin = ev(np.stack(rows))
        cands = []
        for (r, i), c_lo in zip(meta, cmin):
            c_hi = cu[r]
            span = keep[i] - allowed[i][0]
            if c_lo > problem.budget or c_hi <= c_lo or span <= 0:
                continue
            v = keep[i] - (c_hi - aim) / ((c_hi - c_lo) / span)
            for mode in ("down", "up"):
                k = U[r].copy()
                k[i] = snap(allowed[i], min(max(v, allowed[i][0]), keep[i]), mode)
                cands.append(k)
        if not cands:
            break
        K = np.stack(cands)
        costs = ev(K)
        ok = (costs <= problem.budget) & (costs > macs)
        if not ok.any():
            break
        pool = np.flatnonzero(ok)
        lands = pool[costs[pool] >= problem.lower]
        best = lands[np.argmax(costs[lands])] if len(lands) else pool[np.argmax(costs[pool])]
        keep, macs = K[best], int(costs[best])
        keep, macs, _ = _fill(problem, ev, allowed, keep, macs, target, priority, fine=False)
        notes.append("moved steps between groups to land in the band")
    return keep, macs, notes
