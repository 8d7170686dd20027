"""Deterministic policies: ``uniform``, ``global`` and ``isomorphic``.

``uniform``     every group keeps the same fraction of its units.
``global``      greedy across groups: repeatedly remove the step (``channel_multiple`` units of one
                group) with the least *relative* importance lost per MAC saved: the importance
                the step removes over the importance the group keeps after it. Summed over steps
                that is log(total / kept) per group, a barrier that makes each further cut of a
                thinning group dearer, so no group is drained just because its channels are
                expensive (the stem of a ResNet, the heads of a BERT layer), while unimportant
                units inside a group still go first. ``mac_weight`` (default 1) is the exponent of
                the MACs saved in the ratio; ``relative=False`` restores the plain removed-importance
                loss. Problems with at most 50,000 combinations of allowed keep counts (a small
                CNN, an LLM whose roles are tied across layers) are solved exactly: the in-band
                plan of least total loss. Near the budget the greedy also weighs *finishing jumps*
                (one group cut in one go to land in the band), so coarse steps (measured latency
                plateaus) end in a plan chosen by the same loss rather than by the band filling.
``isomorphic``  like ``global``, but importance is normalised within isomorphic buckets (groups
                with the same structure, widths and resolution) and the barrier is over the
                bucket's kept importance, so structurally identical blocks compete on raw
                importance (Isomorphic Pruning).

All three end with the budget solver, so every plan is in the band.
"""

from __future__ import annotations

import math

import numpy as np

from fxprune.errors import BandUnreachableError
from fxprune.policies.base import PruningPlan, PruningProblem, SearchContext
from fxprune.policies.solver import project, snap

__all__ = ["UniformPolicy", "GlobalPolicy", "IsomorphicPolicy", "greedy_keep"]


class UniformPolicy:
    """The same keep ratio for every group (the solver fills the band)."""

    name = "uniform"

    def select(self, problem: PruningProblem, ctx: SearchContext) -> PruningPlan:
        sizes = problem.sizes.astype(np.float64)
        allowed = [np.asarray(g.allowed) for g in problem.groups]

        def keep_at(r):
            return np.array([snap(a, n * r, "down") for a, n in zip(allowed, sizes)], dtype=np.int64)

        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if problem.cost(keep_at(mid)[None, :])[0] <= problem.budget:
                lo = mid
            else:
                hi = mid
        proj = project(problem, sizes * lo)
        return PruningPlan({g.id: int(k) for g, k in zip(problem.groups, proj.keep)}, self.name,
                           f"uniform keep ratio {lo:.3f}")


def _importance(problem: PruningProblem, by_bucket: bool) -> list[np.ndarray]:
    """Per group, unit importances sorted ascending (the order the greedy removes them)."""
    raw = []
    for g in problem.groups:
        imp = np.asarray(g.importance if g.importance is not None else np.ones(g.size), dtype=np.float64)
        raw.append(imp * (g.importance_scale if by_bucket else 1.0))
    if by_bucket:
        for ids in problem.buckets().values():
            mean = np.mean(np.concatenate([raw[i] for i in ids]))
            for i in ids:
                raw[i] = raw[i] / mean if mean > 0 else raw[i]
    return [np.sort(r) for r in raw]


def greedy_keep(problem: PruningProblem, sorted_imp: list[np.ndarray], mac_weight: float = 1.0,
                relative: bool = True, pools: list[int] | None = None,
                block_overshoot: bool | None = None) -> np.ndarray:
    """Remove, one step at a time, the step with the least importance lost per MAC saved.

    ``relative``: the loss of a step is the importance it removes divided by the importance its
    pool keeps after it (summed over steps: log(total / kept), a barrier that grows as the pool
    thins out, so no group is drained because its channels are expensive). ``pools`` gives each
    group's pool (default: every group its own pool; ``isomorphic`` pools each bucket).
    Otherwise the loss is the removed importance itself.

    Near the budget, every iteration also looks at the *finishing jumps*: each group cut in one go
    to its largest keep count that meets the budget. A jump that lands in the band is a complete
    plan; the plan returned is the one of least total loss among those and the greedy's own end
    (when it is in the band). With coarse steps (measured latency plateaus) the greedy's last step
    often overshoots the band, and the band filling that follows does not weigh importance per
    cost; the jumps give the greedy in-band plans chosen by its own objective.

    ``block_overshoot`` (default: on for cost models other than MACs, whose measured steps are
    coarse): a best step near the budget that would land *below the band* is not taken, and the
    greedy goes on with the other groups, whose smaller steps can land in the band. (A residual
    stream measured in sixths of its width spans every layer: its last step can take a sixth of the
    model's time, far past a 2% band, and the solver may find nothing to give back into it.) The
    step's plan is not forgotten: with the solver's give-back into the band it is the alternative,
    and of the two in-band plans the one of lower loss is returned.
    """
    G = len(problem.groups)
    allowed = [np.asarray(g.allowed) for g in problem.groups]
    cum = [np.concatenate([[0.0], np.cumsum(s)]) for s in sorted_imp]
    sizes = problem.sizes
    keep = sizes.copy()
    cost = int(problem.cost(keep[None, :])[0])
    unit_cost = max(problem.base_macs / max(int(sizes.sum()), 1), 1.0)
    pool = np.arange(G) if pools is None else np.asarray(pools)
    n_pools = int(pool.max()) + 1 if G else 0
    pool_total = np.bincount(pool, weights=[c[-1] for c in cum], minlength=n_pools) if G else np.zeros(0)

    onehot = np.zeros((G, n_pools))
    onehot[np.arange(G), pool] = 1.0

    def objectives(K: np.ndarray) -> np.ndarray:  # [n, G] plans -> the total loss the greedy's steps add up to
        removed = np.stack([cum[g][sizes[g] - K[:, g]] for g in range(G)], axis=1)
        if not relative:
            return removed.sum(axis=1)
        kept = pool_total[None, :] - removed @ onehot
        return np.log(np.maximum(pool_total, 1e-300)[None, :] / np.maximum(kept, 1e-300)).sum(axis=1)

    def objective(k: np.ndarray) -> float:
        return float(objectives(np.asarray(k)[None, :])[0])

    if cost > problem.budget:
        exact = _best_of_all_plans(problem, allowed, objectives)
        if exact is not None:
            return exact
    finished = None  # (loss, plan): the best in-band plan seen (finishing jumps)
    if block_overshoot is None:
        block_overshoot = problem.unit != "MACs"
    blocked: set[int] = set()  # groups whose next step would overshoot the band
    overshoot = None  # the plan of the first blocked step: the greedy's own end had it not been blocked
    while cost > problem.budget:
        gs, ks = [], []
        for g in range(G):
            i = int(np.searchsorted(allowed[g], keep[g], side="left"))
            if i > 0 and g not in blocked:
                gs.append(g)
                ks.append(allowed[g][i - 1])
        if not gs:
            break
        K = np.repeat(keep[None, :], len(gs), axis=0)
        K[np.arange(len(gs)), gs] = ks
        costs = problem.cost(K)
        saved = np.maximum(cost - costs, 1)
        lost = np.array([cum[g][sizes[g] - k] - cum[g][sizes[g] - keep[g]] for g, k in zip(gs, ks)])
        if relative:
            kept = np.array([cum[g][-1] - cum[g][sizes[g] - keep[g]] for g in range(G)])
            pool_kept = np.bincount(pool, weights=kept, minlength=int(pool.max()) + 1)
            left = pool_kept[pool[gs]] - lost
            lost = lost / np.maximum(left, 1e-12 * np.maximum(lost, 1e-300))
        score = lost / (saved / unit_cost) ** mac_weight
        best = int(np.argmin(score))
        excess = cost - problem.budget
        if excess <= 20 * saved[best]:  # near the budget: exactly one step, the best
            for jump in _finishing_jumps(problem, keep, allowed, gs):
                loss = objective(jump)
                if finished is None or loss < finished[0]:
                    finished = (loss, jump)
            if block_overshoot and problem.lower > 0 and costs[best] < problem.lower:
                blocked.add(gs[best])
                if overshoot is None:
                    overshoot = keep.copy()
                    overshoot[gs[best]] = ks[best]
                continue
            keep[gs[best]] = ks[best]
        else:  # far above it: many steps in one round, ranked as the one-step greedy would
            keep = _round_of_steps(keep, gs, saved, excess / 4, allowed, cum, sizes, unit_cost, mac_weight,
                                   pool_kept[pool] if relative else None)
        cost = int(problem.cost(keep[None, :])[0])
    if overshoot is not None:
        # the blocked step, then the solver giving back other steps into the band: the plan the
        # greedy made before blocking existed; of it and the blocked path's end, the lower loss wins
        try:
            filled = project(problem, overshoot.astype(np.float64),
                             priority=give_back_priority(sorted_imp, sizes)).keep.astype(np.int64)
        except BandUnreachableError:
            filled = None
        if cost > problem.budget or (filled is not None and objective(filled) < objective(keep)):
            keep = overshoot if filled is None else filled
            cost = int(problem.cost(keep[None, :])[0])
    if finished is not None and not (problem.lower <= cost <= problem.budget and objective(keep) <= finished[0]):
        return finished[1]
    return keep


def give_back_priority(sorted_imp: list[np.ndarray], sizes: np.ndarray):
    """The solver's order for giving steps back into the band: the group whose most important
    removed unit is the most important first."""
    def priority(k):
        out = np.zeros(len(k))
        for g, s in enumerate(sorted_imp):
            removed = sizes[g] - k[g]
            out[g] = s[removed - 1] if removed > 0 else -np.inf
        return out

    return priority


def _best_of_all_plans(problem: PruningProblem, allowed: list[np.ndarray], objectives,
                       limit: int = 50_000, chunk: int = 4096) -> np.ndarray | None:
    """Small problems: the in-band plan of least loss among every combination of allowed keep
    counts (``None`` when there are more than ``limit`` combinations or none lands in the band).
    Only the groups with a choice are enumerated, ``chunk`` plans at a time."""
    free = [g for g, a in enumerate(allowed) if len(a) > 1]
    if not free or math.prod(len(allowed[g]) for g in free) > limit:
        return None
    base = np.array([a[-1] for a in allowed], dtype=np.int64)
    grids = np.meshgrid(*[allowed[g] for g in free], indexing="ij")
    choices = np.stack([x.ravel() for x in grids], axis=1).astype(np.int64)
    best = None
    for start in range(0, len(choices), chunk):
        K = np.repeat(base[None, :], min(chunk, len(choices) - start), axis=0)
        K[:, free] = choices[start:start + chunk]
        costs = problem.cost(K)
        inside = (costs >= problem.lower) & (costs <= problem.budget)
        if inside.any():
            losses = objectives(K[inside])
            i = int(np.argmin(losses))
            if best is None or losses[i] < best[0]:
                best = (float(losses[i]), K[inside][i].copy())
    return None if best is None else best[1]


def _finishing_jumps(problem: PruningProblem, keep: np.ndarray, allowed: list[np.ndarray], gs: list[int]):
    """Plans that cut one group of ``keep`` in one go to its largest allowed count meeting the budget
    and land in the band (a binary search per group, all groups evaluated together; only the groups
    whose smallest count meets the budget are searched)."""
    gs = np.asarray(gs)

    def plans(groups, idx):
        K = np.repeat(keep[None, :], len(groups), axis=0)
        K[np.arange(len(groups)), groups] = [allowed[g][i] for g, i in zip(groups, idx)]
        return K

    lo = np.zeros(len(gs), dtype=np.int64)
    cost_lo = problem.cost(plans(gs, lo))
    ok = cost_lo <= problem.budget
    gs, lo, cost_lo = gs[ok], lo[ok], cost_lo[ok]
    hi = np.array([int(np.searchsorted(allowed[g], keep[g], side="left")) - 1 for g in gs], dtype=np.int64)
    while np.any(lo < hi):
        mid = (lo + hi + 1) // 2
        cost_mid = problem.cost(plans(gs, mid))
        fits = cost_mid <= problem.budget  # a finished search has mid == lo, which fits
        hi = np.where(fits, hi, mid - 1)
        lo, cost_lo = np.where(fits, mid, lo), np.where(fits, cost_mid, cost_lo)
    K = plans(gs, lo)
    return [K[j] for j in range(len(gs)) if cost_lo[j] >= problem.lower]


def _round_of_steps(keep, gs, saved, limit, allowed, cum, sizes, unit_cost, mac_weight, pool_kept):
    """Several greedy steps at once, in the order the one-step greedy would take them.

    Each candidate group's further steps are scored with the cost it saves per unit now (from this
    round's one-step evaluation) and the exact importance each step removes (with the relative
    barrier, over what its pool keeps after it); scores are made non-decreasing along each group so
    its steps are taken in order. Steps are taken best first while the savings stay under
    ``limit``; the first step is always taken. Returns the new keep vector.
    """
    entries = []  # (score, group, keep after the step, saved)
    for j, g in enumerate(gs):
        n, k0 = int(sizes[g]), int(keep[g])
        below = allowed[g][allowed[g] < k0][::-1]
        per_unit = float(saved[j]) / max(k0 - int(below[0]), 1)
        prev, spent, worst = k0, 0.0, 0.0
        for a in below:
            a = int(a)
            step_saved = per_unit * (prev - a)
            removed = cum[g][n - a] - cum[g][n - prev]
            if pool_kept is not None:
                left = pool_kept[g] - (cum[g][n - a] - cum[g][n - k0])
                removed = removed / max(left, 1e-12 * max(removed, 1e-300))
            worst = max(worst, removed / (step_saved / unit_cost) ** mac_weight)
            entries.append((worst, g, a, step_saved))
            spent += step_saved
            prev = a
            if spent > limit:
                break
    entries.sort(key=lambda e: (e[0], e[1], -e[2]))
    out = keep.copy()
    budget_left = limit
    for i, (_, g, a, step_saved) in enumerate(entries):
        if i and step_saved > budget_left:
            break
        out[g] = min(out[g], a)
        budget_left -= step_saved
    return out


class GlobalPolicy:
    """Importance-per-MAC greedy across groups (importance normalised within each group)."""

    name = "global"
    by_bucket = False

    def __init__(self, mac_weight: float = 1.0):
        self.mac_weight = mac_weight

    def select(self, problem: PruningProblem, ctx: SearchContext) -> PruningPlan:
        imp = _importance(problem, self.by_bucket)
        pools = None
        if self.by_bucket:
            pools = [0] * len(problem.groups)
            for b, ids in enumerate(problem.buckets().values()):
                for i in ids:
                    pools[i] = b
        keep = greedy_keep(problem, imp, float(ctx.options.get("mac_weight", self.mac_weight)),
                           relative=bool(ctx.options.get("relative", True)), pools=pools)
        proj = project(problem, keep.astype(np.float64), priority=give_back_priority(imp, problem.sizes))
        return PruningPlan({g.id: int(k) for g, k in zip(problem.groups, proj.keep)}, self.name,
                           "greedy: least importance lost per MAC saved")


class IsomorphicPolicy(GlobalPolicy):
    """Global greedy with importance normalised within isomorphic buckets."""

    name = "isomorphic"
    by_bucket = True
