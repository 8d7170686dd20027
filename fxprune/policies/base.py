"""What a ratio-selection policy sees and what it returns.

Policies never see torch.fx nodes. They get a serialisable :class:`PruningProblem` (groups of
coupled channels, their sizes, allowed keep counts, MAC shares, importance statistics, isomorphic
buckets and the budget) and return a :class:`PruningPlan` (how many channels each group keeps).
The budget solver (``fxprune.policies.solver``) then projects any plan onto the MAC band, so a
policy only shapes the allocation; it cannot break the budget.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

__all__ = ["GroupSpec", "PruningProblem", "PruningPlan", "SearchContext", "RatioPolicy", "Constraint",
           "CombinedCost", "format_cost"]


@dataclass(frozen=True)
class GroupSpec:
    """One prunable dependency group, as a policy sees it.

    Attributes:
        id: index of the group in ``PruningProblem.groups`` (0..G-1).
        name: a human label: the module path of the group's first producing layer.
        kind: "channels" (conv/linear outputs) or "heads" (whole attention heads).
        size: number of prunable units (channels or heads) in the original model.
        unit: elements each unit carries in its producing layer (1 for channels, head_dim for heads).
        allowed: the keep counts the solver may pick, ascending; always ends with ``size``.
        bucket: isomorphic bucket key; groups with the same key have the same structure and
            per-channel cost (same op kinds, widths and resolution).
        members: module paths (or node names) of the layers whose weights the group slices.
        mac_share: fraction of the model's MACs that involve this group (0..1).
        importance: per-unit importance, normalised to mean 1 within the group, original order.
        exact: False when the group passes through a channel-mixing normalisation (LayerNorm,
            GroupNorm), where pruning changes the function beyond removing the channel.
        quantum: every keep count is a multiple of this (the conv-group count of grouped convs).
        importance_scale: mean raw importance of the group's units (``importance`` times this is
            the raw criterion value), so groups can be compared on a common scale.
    """

    id: int
    name: str
    kind: str
    size: int
    unit: int
    allowed: tuple[int, ...]
    bucket: str
    members: tuple[str, ...]
    mac_share: float
    importance: tuple[float, ...] | None = None
    exact: bool = True
    quantum: int = 1
    importance_scale: float = 1.0

    @property
    def min_keep(self) -> int:
        return self.allowed[0]

    def nearest_allowed(self, keep: float, mode: str = "nearest") -> int:
        """Snap ``keep`` to an allowed count ("nearest", "down" or "up")."""
        allowed = np.asarray(self.allowed)
        if mode == "down":
            i = int(np.searchsorted(allowed, keep, side="right")) - 1
            return int(allowed[max(i, 0)])
        if mode == "up":
            i = int(np.searchsorted(allowed, keep, side="left"))
            return int(allowed[min(i, len(allowed) - 1)])
        return int(allowed[int(np.argmin(np.abs(allowed - keep)))])


def format_cost(value: float, unit: str) -> str:
    """A cost for messages: ``"1,234 MACs"`` or ``"12.345 ms"`` (``ns`` costs are shown in ms)."""
    if unit == "ns":
        return f"{value / 1e6:.4g} ms"
    return f"{int(value):,} {unit}"


@dataclass(frozen=True)
class Constraint:
    """One cost model used as a constraint: ``cost(K) <= budget``.

    Attributes:
        name: ``"macs"`` or ``"latency"`` (what the cost measures).
        cost: ``[n, G]`` keep matrix -> ``[n]`` int64 costs (``PlanCost``, ``LatencyPlanCost``).
        budget: the upper bound, in ``unit``.
        unit: ``"MACs"`` or ``"ns"`` (predicted nanoseconds).
        base: the cost of the unpruned model.
    """

    name: str
    cost: Callable[[np.ndarray], np.ndarray] = field(repr=False, compare=False)
    budget: float
    unit: str
    base: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "budget": self.budget, "unit": self.unit, "base": self.base}


class CombinedCost:
    """Several constraints as one monotone cost in the first one's unit.

    With ratios ``r_i = cost_i / budget_i`` and ``b0`` the first budget::

        cost = b0 * (max_i r_i)                       when every r_i <= 1
        cost = b0 * (1 + sum_i max(0, r_i - 1))       otherwise

    so ``cost <= b0`` exactly when every constraint holds, the band ``[b0 (1 - tol), b0]`` means the
    binding constraint is within ``tol`` of its budget, and while constraints are violated every
    one of them pulls (a greedy step that saves on any violated constraint lowers the cost). It is
    non-decreasing in every keep count when each constraint is. With one constraint it is that
    constraint's cost, unchanged.
    """

    def __init__(self, constraints: Sequence[Constraint]):
        if not constraints:
            raise ValueError("CombinedCost needs at least one constraint")
        self.constraints = tuple(constraints)

    def __call__(self, keep: np.ndarray) -> np.ndarray:
        first = self.constraints[0]
        if len(self.constraints) == 1:
            return first.cost(keep)
        ratios = np.stack([np.asarray(c.cost(keep), dtype=np.float64) / float(c.budget) for c in self.constraints])
        top = ratios.max(axis=0)
        excess = np.clip(ratios - 1.0, 0.0, None).sum(axis=0)
        b0 = float(first.budget)
        ok = np.floor(top * b0)
        violated = np.maximum(np.ceil((1.0 + excess) * b0), b0 + 1)  # strictly above the budget
        return np.where(top <= 1.0, ok, violated).astype(np.int64)

    def each(self, keep: np.ndarray) -> dict[str, np.ndarray]:
        """Every constraint's own cost of ``keep`` (``[n, G]``), by name."""
        return {c.name: np.asarray(c.cost(keep)) for c in self.constraints}


@dataclass(frozen=True)
class PruningProblem:
    """The ratio-selection problem: choose a keep count per group under a cost band.

    ``cost`` maps a keep matrix of shape ``[n, G]`` (one candidate plan per row, keep counts in
    group order) to the cost of each candidate as an int64 array of shape ``[n]``: by default the
    exact MACs (the analytical cost model evaluated with numpy: thousands of calls per second are
    fine). With a latency budget it is the predicted latency in nanoseconds of the measured
    per-group model (``unit == "ns"``), or, with several budgets, a :class:`CombinedCost` of all
    ``constraints`` in the first one's unit. The fields named ``*_macs`` and ``budget``/``lower``
    are in ``unit`` (MACs unless said otherwise), so policies and the solver work on any cost.

    Attributes:
        groups: the prunable groups.
        base_macs: cost of the original model (MACs, or ``unit``).
        budget: the upper end of the band (inclusive).
        lower: the lower end of the band (inclusive).
        min_macs: cost with every group at its minimum allowed keep.
        fixed_macs: cost that no group can change (frozen groups, the stem, the classifier, ...).
        frozen: human-readable list of what could not be pruned and why.
        fixed_where: the ops holding most of ``fixed_macs`` (``"36 x LSTM module (3.397 G; the largest ...)"``), for
            the message when the budget is below what can be built.
        unit: ``"MACs"`` or ``"ns"``.
        constraints: with several budgets, each one (the first is the unit's); empty for a plain
            MAC problem.
    """

    groups: tuple[GroupSpec, ...]
    base_macs: int
    budget: int
    lower: int
    min_macs: int
    fixed_macs: int
    cost: Callable[[np.ndarray], np.ndarray] = field(repr=False, compare=False)
    frozen: tuple[str, ...] = ()
    unit: str = "MACs"
    constraints: tuple[Constraint, ...] = ()
    fixed_where: tuple[str, ...] = ()

    def fmt(self, value: float) -> str:
        """``value`` in this problem's unit, for messages."""
        return format_cost(value, self.unit)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([g.size for g in self.groups], dtype=np.int64)

    def full_keep(self) -> np.ndarray:
        return self.sizes.copy()

    def macs(self, keep: Mapping[int, int] | Sequence[int] | np.ndarray) -> int:
        """Exact MACs of one plan (a mapping gid->keep or a dense vector)."""
        return int(self.cost(self.dense(keep)[None, :])[0])

    def dense(self, keep: Mapping[int, int] | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(keep, Mapping):
            vec = self.full_keep()
            for gid, k in keep.items():
                vec[int(gid)] = int(k)
            return vec
        return np.asarray(keep, dtype=np.int64)

    def buckets(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, list[int]] = {}
        for g in self.groups:
            out.setdefault(g.bucket, []).append(g.id)
        return {k: tuple(v) for k, v in out.items()}

    def to_json(self) -> dict[str, Any]:
        """Everything but ``cost``, as plain JSON types."""
        return {
            "base_macs": self.base_macs,
            "budget": self.budget,
            "lower": self.lower,
            "min_macs": self.min_macs,
            "fixed_macs": self.fixed_macs,
            "frozen": list(self.frozen),
            "unit": self.unit,
            "constraints": [c.to_json() for c in self.constraints],
            "groups": [dataclasses.asdict(g) for g in self.groups],
        }


@dataclass(frozen=True)
class PruningPlan:
    """How many units each group keeps. Groups not named keep everything."""

    keep: Mapping[int, int]
    policy: str = ""
    rationale: str = ""
    criterion: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "keep": {str(k): int(v) for k, v in sorted(self.keep.items())},
            "policy": self.policy,
            "rationale": self.rationale,
            "criterion": self.criterion,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


@dataclass
class SearchContext:
    """What a search policy may use besides the problem.

    Attributes:
        quality: scores a plan (higher is better) by building the pruned model and evaluating it
            (the user's ``evaluate`` or label-free fidelity). ``None`` when no signal is available.
        quality_name: what ``quality`` measures, for reports and prompts.
        seed: the run's seed.
        log: callback receiving one dict per search attempt (ends up in the report).
        options: policy-specific options from ``compile(..., policy_options=...)``.
    """

    quality: Callable[[PruningPlan], float] | None = None
    quality_name: str = ""
    seed: int = 0
    log: Callable[[dict[str, Any]], None] = lambda record: None
    options: dict[str, Any] = field(default_factory=dict)


class RatioPolicy(Protocol):
    """A ratio-selection policy."""

    name: str

    def select(self, problem: PruningProblem, ctx: SearchContext) -> PruningPlan:
        ...
