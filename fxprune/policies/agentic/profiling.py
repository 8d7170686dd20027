"""The Profiling agent: a compact, token-efficient profile of the pruning problem.

Deterministic code, no LLM. It turns a :class:`~fxprune.policies.base.PruningProblem` into
*agentic buckets* (isomorphic buckets; when a model has more than ``max_buckets`` of them, the
ones with the smallest MAC share are merged by stage), and measures a cheap per-bucket
**sensitivity curve**: the quality of the model when that bucket alone is pruned to a few keep
ratios (everything else intact). The profile is the dict the Analysis agent's prompt renders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from fxprune.budget import format_macs
from fxprune.policies.base import PruningPlan, PruningProblem
from fxprune.policies.solver import snap

__all__ = ["AgentBucket", "Profile", "build_profile", "CRITERIA"]

CRITERIA = ("l1", "l2", "bn_scale", "taylor", "snip", "grasp", "synflow")


@dataclass
class AgentBucket:
    id: str
    label: str
    groups: list[int]
    kind: str
    units: int
    min_keep_ratio: float
    mac_share: float
    importance: dict[str, float]
    sensitivity: list[tuple[float, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "groups": len(self.groups), "kind": self.kind,
                "units_per_group": self.units, "min_keep_ratio": round(self.min_keep_ratio, 4),
                "mac_share": round(self.mac_share, 4), "importance": self.importance,
                "sensitivity": [[round(r, 3), round(q, 4)] for r, q in self.sensitivity]}


@dataclass
class Profile:
    buckets: list[AgentBucket]
    data: dict[str, Any]
    evaluations: int = 0

    def bucket_targets(self, problem: PruningProblem, ratios: dict[str, float]) -> np.ndarray:
        """Per-group keep targets (units) for per-bucket keep ratios."""
        target = problem.sizes.astype(np.float64).copy()
        for b in self.buckets:
            r = float(ratios.get(b.id, 1.0))
            for g in b.groups:
                target[g] = problem.groups[g].size * r
        return target

    def bucket_ratios(self, problem: PruningProblem, keep: np.ndarray) -> dict[str, float]:
        """Per-bucket keep ratios of a per-group plan (unit-weighted)."""
        out = {}
        for b in self.buckets:
            kept = sum(int(keep[g]) for g in b.groups)
            total = sum(problem.groups[g].size for g in b.groups)
            out[b.id] = round(kept / max(total, 1), 4)
        return out


def _stage(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


def _imp_stats(problem: PruningProblem, groups: Sequence[int]) -> dict[str, float]:
    vals = [np.asarray(problem.groups[g].importance, dtype=np.float64) for g in groups
            if problem.groups[g].importance is not None]
    if not vals:
        return {"mean": 1.0, "cv": 0.0, "p10": 1.0, "p50": 1.0}
    v = np.concatenate(vals)
    mean = float(v.mean()) or 1.0
    v = v / mean
    return {"mean": 1.0, "cv": round(float(v.std()), 3), "p10": round(float(np.percentile(v, 10)), 3),
            "p50": round(float(np.percentile(v, 50)), 3)}


def _label(problem: PruningProblem, groups: Sequence[int]) -> str:
    names = [problem.groups[g].name for g in groups]
    if len(names) == 1:
        return names[0]
    prefix = names[0]
    for n in names[1:]:
        while prefix and not n.startswith(prefix):
            prefix = prefix[:-1]
    prefix = prefix.rstrip(".")
    return f"{prefix + '.*' if prefix else names[0] + ' ...'} ({len(names)} groups)"


def make_buckets(problem: PruningProblem, max_buckets: int = 16) -> list[AgentBucket]:
    """Isomorphic buckets, merged by stage (smallest MAC share first) down to ``max_buckets``."""
    raw: dict[str, list[int]] = {}
    for g in problem.groups:
        raw.setdefault(g.bucket, []).append(g.id)
    clusters = [list(v) for v in raw.values()]

    def share(c):
        return sum(problem.groups[g].mac_share for g in c)

    while len(clusters) > max_buckets:
        clusters.sort(key=share)
        small = clusters.pop(0)
        key = (_stage(problem.groups[small[0]].name), problem.groups[small[0]].kind)
        match = next((c for c in clusters if (_stage(problem.groups[c[0]].name), problem.groups[c[0]].kind) == key), None)
        if match is None:
            match = next((c for c in clusters if problem.groups[c[0]].kind == key[1]), clusters[0])
        match.extend(small)
    clusters.sort(key=lambda c: min(c))
    out = []
    for i, c in enumerate(clusters):
        c.sort()
        gs = [problem.groups[g] for g in c]
        units = int(round(np.mean([g.size for g in gs])))
        min_ratio = max(g.allowed[0] / g.size for g in gs)
        out.append(AgentBucket(f"b{i}", _label(problem, c), c, gs[0].kind, units, float(min_ratio),
                               float(share(c)), _imp_stats(problem, c)))
    return out


def build_profile(
    problem: PruningProblem,
    quality: Callable[[PruningPlan], float] | None,
    *,
    model_name: str = "model",
    quality_name: str = "",
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    max_buckets: int = 16,
    max_sensitivity_buckets: int = 12,
) -> Profile:
    """Buckets, importance statistics and sensitivity curves (``quality`` evaluations: one per
    bucket and ratio, for the ``max_sensitivity_buckets`` buckets with the largest MAC share)."""
    buckets = make_buckets(problem, max_buckets)
    evals = 0
    if quality is not None and ratios:
        order = sorted(buckets, key=lambda b: -b.mac_share)[:max_sensitivity_buckets]
        for b in order:
            for r in ratios:
                keep = {g: snap(np.asarray(problem.groups[g].allowed), problem.groups[g].size * r, "down")
                        for g in b.groups}
                actual = sum(keep.values()) / max(sum(problem.groups[g].size for g in b.groups), 1)
                q = float(quality(PruningPlan(keep, "profiling")))
                evals += 1
                b.sensitivity.append((actual, q))
    data = {
        "model": model_name,
        "base_macs": problem.base_macs,
        "budget_macs": problem.budget,
        "band": [problem.lower, problem.budget],
        "min_macs": problem.min_macs,
        "quality_metric": quality_name or "quality (higher is better)",
        "criteria": list(CRITERIA),
        "buckets": [b.to_json() for b in buckets],
        "frozen": list(problem.frozen[:8]),
        "summary": f"{len(problem.groups)} groups in {len(buckets)} buckets; budget "
                   + (format_macs(problem.budget) if problem.unit == "MACs" else problem.fmt(problem.budget)),
    }
    if problem.unit != "MACs":  # a latency problem: the cost fields are predicted nanoseconds
        data["cost_unit"] = problem.unit
    return Profile(buckets, data, evals)
