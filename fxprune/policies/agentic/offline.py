"""The offline analyst: a deterministic, sensitivity-guided local search with the LLM's interface.

``propose(profile, history) -> Proposal``, like :class:`~fxprune.policies.agentic.llm.ClaudeAnalyst`,
so the Master loop does not care which analyst runs. Strategy:

1. **Allocation from sensitivity** (first call): starting from "keep everything", repeatedly lower
   the keep ratio of the bucket whose measured sensitivity curve loses the least quality per MAC
   saved, until the plan fits the budget.
2. **Local search** (later calls): around the best attempt so far, move keep ratio between a pair
   of buckets in a MAC-neutral way (one up by ``step``, the other down by the MAC-equivalent
   amount), cycling through pairs ordered by sensitivity; the step halves after a full cycle
   without improvement. Once, it also tries the best allocation with another importance
   criterion.
Every proposal it returns is new (it never repeats an earlier one).
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from fxprune.policies.agentic.prompts import Proposal
from fxprune.policies.base import PruningProblem

__all__ = ["OfflineAnalyst"]


def _curve(bucket: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((float(r), float(q)) for r, q in bucket.get("sensitivity") or [])
    if not pts:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    r = np.array([p[0] for p in pts] + [1.0])
    q = np.array([p[1] for p in pts] + [max(1.0, max(p[1] for p in pts))])
    return r, q


class OfflineAnalyst:
    """Deterministic analyst; needs the problem and the profile's buckets (it runs locally)."""

    name = "offline"

    def __init__(self, problem: PruningProblem, buckets: Sequence[Any], *, alt_criteria: Sequence[str] = ("l2", "taylor"),
                 step: float = 0.15, min_step: float = 0.02):
        self.problem = problem
        self.buckets = list(buckets)
        self.alt_criteria = list(alt_criteria)
        self.step = step
        self.min_step = min_step
        self.stats: dict[str, Any] = {"calls": 0}
        self._tried: set[tuple] = set()
        self._pairs: list[tuple[int, int]] = []
        self._cursor = 0
        self._base_criterion = "l1"
        self._criteria_tried: set[str] = set()

    # ------------------------------------------------------------------ helpers
    def _macs(self, ratios: dict[str, float]) -> int:
        target = self.problem.sizes.astype(np.float64).copy()
        for b in self.buckets:
            for g in b.groups:
                target[g] = self.problem.groups[g].size * ratios[b.id]
        return int(self.problem.cost(target[None, :])[0])

    def _key(self, ratios: dict[str, float], criterion: str) -> tuple:
        return (criterion,) + tuple(round(ratios[b.id], 3) for b in self.buckets)

    def _proposal(self, ratios, criterion, why) -> Proposal:
        self._tried.add(self._key(ratios, criterion))
        return Proposal({k: round(float(v), 4) for k, v in ratios.items()}, criterion, why)

    # ------------------------------------------------------------------ strategy
    def _initial(self, profile: dict[str, Any]) -> dict[str, float]:
        """Greedy: lower the bucket with the least quality lost per MAC saved, step 0.05."""
        by_id = {b["id"]: b for b in profile["buckets"]}
        ratios = {b.id: 1.0 for b in self.buckets}
        mins = {b.id: b.min_keep_ratio for b in self.buckets}
        curves = {b.id: _curve(by_id.get(b.id, {})) for b in self.buckets}
        macs = self._macs(ratios)
        while macs > self.problem.budget:
            best, best_score = None, np.inf
            for b in self.buckets:
                r0 = ratios[b.id]
                r1 = round(max(mins[b.id], r0 - 0.05), 4)
                if r1 >= r0:
                    continue
                trial = dict(ratios)
                trial[b.id] = r1
                saved = macs - self._macs(trial)
                rr, qq = curves[b.id]
                lost = float(np.interp(r0, rr, qq) - np.interp(r1, rr, qq))
                score = max(lost, 1e-6) / max(saved, 1)
                if score < best_score:
                    best, best_score = (b.id, r1), score
            if best is None:
                break
            ratios[best[0]] = best[1]
            macs = self._macs(ratios)
        return ratios

    def _best(self, history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        scored = [h for h in history if h.get("quality") is not None and h.get("in_band", True)]
        return max(scored, key=lambda h: h["quality"]) if scored else None

    def _order_pairs(self, profile: dict[str, Any]) -> list[tuple[int, int]]:
        """Pairs (up, down), most promising first: give keep to the bucket that loses the most
        quality per MAC when pruned, take it from the one that loses the least."""
        by_id = {b["id"]: b for b in profile["buckets"]}
        cost = []
        for b in self.buckets:
            rr, qq = _curve(by_id.get(b.id, {}))
            slope = float(np.interp(1.0, rr, qq) - np.interp(0.5, rr, qq)) / 0.5
            cost.append(slope / max(b.mac_share, 1e-6))
        pairs = list(itertools.permutations(range(len(self.buckets)), 2))
        pairs.sort(key=lambda p: -(cost[p[0]] - cost[p[1]]))
        return pairs

    def _neighbours(self, ratios: dict[str, float], profile: dict[str, Any]):
        ids = [b.id for b in self.buckets]
        share = {b.id: max(b.mac_share, 1e-6) for b in self.buckets}
        mins = {b.id: b.min_keep_ratio for b in self.buckets}
        if not self._pairs:
            self._pairs = self._order_pairs(profile)
        n = len(self._pairs)
        for _ in range(n):
            i, j = self._pairs[self._cursor % n]
            self._cursor += 1
            up, down = ids[i], ids[j]
            r = dict(ratios)
            r[up] = min(1.0, r[up] + self.step)
            gained = r[up] - ratios[up]
            if gained <= 0:
                continue
            r[down] = max(mins[down], r[down] - gained * share[up] / share[down])
            if r[down] >= ratios[down]:
                continue
            yield r, f"move {gained:.3f} keep ratio from {down} to {up}"

    def propose(self, profile: dict[str, Any], history: Sequence[dict[str, Any]]) -> Proposal:
        self.stats["calls"] += 1
        criteria = profile.get("criteria") or ["l1"]
        own = [h for h in history if str(h.get("analyst", "")).startswith("offline")]
        best = self._best(history)
        if not own:
            ratios = self._initial(profile)
            crit = (best or {}).get("proposal", {}).get("criterion") or criteria[0]
            self._base_criterion = crit
            if self._key(ratios, crit) not in self._tried:
                return self._proposal(ratios, crit, "allocation from the per-bucket sensitivity curves")
        base = dict((best or {}).get("proposal", {}).get("ratios") or self._initial(profile))
        base = {b.id: float(base.get(b.id, 1.0)) for b in self.buckets}
        crit = (best or {}).get("proposal", {}).get("criterion") or self._base_criterion
        self._criteria_tried.add(crit)
        # once: the best allocation with another criterion
        for alt in self.alt_criteria:
            if alt in criteria and alt not in self._criteria_tried and len(own) >= 2:
                self._criteria_tried.add(alt)
                if self._key(base, alt) not in self._tried:
                    return self._proposal(base, alt, f"best allocation so far, importance {alt}")
        while self.step >= self.min_step:
            for ratios, why in self._neighbours(base, profile):
                if self._key(ratios, crit) not in self._tried:
                    return self._proposal(ratios, crit, f"local search around the best attempt: {why}")
            self.step /= 2  # a full cycle without a new neighbour: refine
            self._cursor = 0
        # search space exhausted at the finest step: return the best again (the Master stops on repeats)
        return Proposal(base, crit, "no new neighbour left")
