"""Tied groups: several dependency groups decided by one keep count.

A Hugging Face config has one ``intermediate_size`` and one ``num_attention_heads`` for every
layer, so a plan with per-layer widths cannot be rebuilt as the original class. Tying the groups
that play the same role in every layer (the MLP of layer 0, 1, 2 ... ; the heads of every layer)
makes them *one* decision variable: the policies and the solver see a smaller
:class:`~fxprune.policies.base.PruningProblem` in which each tie is one group, and the plan they
return is expanded back to one keep count per dependency group before the rewrite. Nothing in the
solver or the policies knows about ties.

A tie member may carry a multiplier: GPT-2's config ties the attention width to the residual
width (``n_embd = n_head * head_dim``), so its residual group keeps ``head_dim`` channels per kept
head (``keep[residual] = head_dim * keep[heads]``).

Which units each member keeps is still decided per member (its own importance ranking); only the
counts are shared. The tie's importance for ranking is the members' importances sorted and summed
rank by rank: removing the tie's last unit removes the least important unit of every member.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np

from fxprune.policies.base import GroupSpec, PruningProblem

__all__ = ["Tie", "TiedProblem", "layer_ties", "collapse", "expand_keep", "full_problem", "layer_key"]

_LAYER_INDEX = re.compile(r"(?:(?<=\.)|^)\d+(?=\.|$)")


@dataclass(frozen=True)
class Tie:
    """Groups decided together: ``keep[g] = mult * x`` for every ``(g, mult)`` in ``members``.

    The first member has multiplier 1; its allowed keep counts (filtered so every member's count is
    allowed) are the tie's.
    """

    members: tuple[tuple[int, int], ...]
    reason: str = ""

    @property
    def lead(self) -> int:
        return self.members[0][0]


@dataclass(frozen=True)
class TiedProblem(PruningProblem):
    """A problem whose groups are ties of the groups of ``full`` (``keep_full = keep @ matrix``)."""

    full: PruningProblem | None = field(default=None, repr=False, compare=False)
    matrix: np.ndarray | None = field(default=None, repr=False, compare=False)
    ties: tuple[Tie, ...] = ()

    def expand(self, keep: np.ndarray) -> np.ndarray:
        """Keep counts of the full problem's groups for keep counts of this problem's groups."""
        k = np.asarray(keep, dtype=np.int64)
        return k @ self.matrix


def expand_keep(problem: PruningProblem, keep: np.ndarray) -> np.ndarray:
    """``keep`` expanded to every dependency group (the identity for an untied problem)."""
    return problem.expand(keep) if isinstance(problem, TiedProblem) else np.asarray(keep, dtype=np.int64)


def full_problem(problem: PruningProblem) -> PruningProblem:
    """The problem with one group per dependency group."""
    return problem.full if isinstance(problem, TiedProblem) and problem.full is not None else problem


def layer_key(path: str) -> str:
    """A module path with its layer indices masked: ``model.layers.3.mlp.up_proj`` ->
    ``model.layers.#.mlp.up_proj``."""
    return _LAYER_INDEX.sub("#", path)


def layer_ties(groups: Iterable, *, reason: str = "same keep count in every layer") -> list[Tie]:
    """Ties of groups that play the same role in different layers.

    Groups (anything with ``id``, ``kind``, ``members`` and ``size``/``n``) are tied when they have
    the same kind and size and their member module paths are equal once layer indices are masked
    (``blocks.3.attn.qkv`` and ``blocks.7.attn.qkv``). Groups whose members carry no layer index,
    and roles that occur once, are left alone.
    """
    by_key: dict[tuple, list[int]] = {}
    for g in groups:
        members = tuple(getattr(g, "members", ()) or ())
        if not members or not any(_LAYER_INDEX.search(m) for m in members):
            continue
        size = int(getattr(g, "size", getattr(g, "n", 0)))
        key = (g.kind, size, int(getattr(g, "unit", 1)), tuple(sorted({layer_key(m) for m in members})))
        by_key.setdefault(key, []).append(int(g.id))
    return [Tie(tuple((gid, 1) for gid in ids), reason) for ids in by_key.values() if len(ids) > 1]


def _check(problem: PruningProblem, ties: Sequence[Tie]) -> None:
    seen: set[int] = set()
    n = len(problem.groups)
    for t in ties:
        if not t.members or t.members[0][1] != 1:
            raise ValueError(f"a tie's first member must have multiplier 1: {t}")
        for gid, mult in t.members:
            if not 0 <= gid < n or mult < 1:
                raise ValueError(f"bad tie member ({gid}, {mult}) for a problem of {n} groups")
            if gid in seen:
                raise ValueError(f"group {gid} is in two ties")
            seen.add(gid)


def _tie_importance(groups: Sequence[GroupSpec], tie: Tie, size: int) -> np.ndarray:
    """Per tie unit ``r``: the raw importance of rank ``r`` (``mult`` ranks for a multiplied member)
    of every member, most important first."""
    out = np.zeros(size)
    for gid, mult in tie.members:
        g = groups[gid]
        imp = np.asarray(g.importance if g.importance is not None else np.ones(g.size), dtype=np.float64)
        raw = np.sort(imp * g.importance_scale)[::-1]
        usable = min(len(raw) // mult, size) * mult
        out[: usable // mult] += raw[:usable].reshape(-1, mult).sum(axis=1)
    return out


def collapse(problem: PruningProblem, ties: Sequence[Tie]) -> PruningProblem:
    """The problem with every tie as one group (``problem`` itself when there are no ties).

    Groups in no tie stay as they are (renumbered). Each tie's allowed keep counts are its lead's
    counts ``x`` for which ``mult * x`` is allowed for every member (or is its full size).
    """
    ties = [t for t in ties if len(t.members) > 1 or t.members[0][1] != 1]
    if not ties:
        return problem
    _check(problem, ties)
    groups = problem.groups
    G = len(groups)
    in_tie = {gid for t in ties for gid, _ in t.members}
    units: list[Tie] = []
    for g in groups:  # graph order: a tie sits where its lead was
        if g.id not in in_tie:
            units.append(Tie(((g.id, 1),)))
        else:
            units.extend(t for t in ties if t.lead == g.id)
    matrix = np.zeros((len(units), G), dtype=np.int64)
    for i, t in enumerate(units):
        for gid, mult in t.members:
            matrix[i, gid] = mult

    def cost(keep: np.ndarray) -> np.ndarray:
        return problem.cost(np.atleast_2d(np.asarray(keep, dtype=np.int64)) @ matrix)

    specs: list[GroupSpec] = []
    for i, t in enumerate(units):
        lead = groups[t.lead]
        if len(t.members) == 1 and t.members[0][1] == 1:
            specs.append(replace(lead, id=i))
            continue
        allowed = tuple(x for x in lead.allowed
                        if all(m * x in groups[g].allowed or m * x == groups[g].size for g, m in t.members)
                        and all(m * x <= groups[g].size for g, m in t.members))
        if not allowed or allowed[-1] != lead.size:
            allowed = tuple(sorted(set(allowed) | {lead.size}))
        raw = _tie_importance(groups, t, lead.size)
        scale = float(raw.mean()) if raw.size and raw.mean() > 0 else 1.0
        members: list[str] = []
        for g, _ in t.members:
            members += [m for m in groups[g].members if m not in members]
        specs.append(GroupSpec(
            i, f"{lead.name} (+{len(t.members) - 1} tied)", lead.kind, lead.size, lead.unit, allowed,
            f"tied:{lead.bucket}", tuple(members), 0.0, tuple((raw / scale).tolist()),
            all(groups[g].exact for g, _ in t.members), lead.quantum, scale))
    n = len(specs)
    full_keep = np.array([s.size for s in specs], dtype=np.int64)
    if n:
        K = np.repeat(full_keep[None, :], n, axis=0)
        K[np.arange(n), np.arange(n)] = 0
        shares = (problem.base_macs - cost(K)) / max(problem.base_macs, 1)
        specs = [replace(s, mac_share=float(sh)) for s, sh in zip(specs, shares)]
    mins = np.array([s.allowed[0] for s in specs], dtype=np.int64)
    min_macs = int(cost(mins[None, :])[0]) if n else problem.base_macs
    fixed = int(cost(np.zeros((1, n), dtype=np.int64))[0]) if n else problem.base_macs
    # constraints (a latency budget beside a MAC budget) are read through the same matrix
    constraints = tuple(replace(c, cost=lambda K, f=c.cost: f(np.atleast_2d(np.asarray(K, dtype=np.int64)) @ matrix))
                        for c in problem.constraints)
    return TiedProblem(tuple(specs), problem.base_macs, problem.budget, problem.lower, min_macs, fixed, cost,
                       problem.frozen, unit=problem.unit, constraints=constraints,
                       full=problem, matrix=matrix, ties=tuple(ties))


def apply_layout(problem: PruningProblem, ties: Sequence[Tie] = (), fixed: dict[int, str] | None = None,
                 allowed: dict[int, Sequence[int]] | None = None) -> PruningProblem:
    """Leave the ``fixed`` groups whole (their only allowed keep is their size), keep the groups in
    ``allowed`` to those keep counts (intersected with their own; the size stays allowed), then
    :func:`collapse`."""
    allowed = allowed or {}

    def narrowed(g):
        if g.id in (fixed or {}):
            return replace(g, allowed=(g.size,))
        if g.id in allowed:
            ok = set(allowed[g.id]) | {g.size}
            return replace(g, allowed=tuple(k for k in g.allowed if k in ok) or (g.size,))
        return g

    if fixed or allowed:
        groups = tuple(narrowed(g) for g in problem.groups)
        problem = replace(problem, groups=groups)
        mins = np.array([g.allowed[0] for g in groups], dtype=np.int64)
        problem = replace(problem, min_macs=int(problem.cost(mins[None, :])[0]) if len(groups) else problem.min_macs)
    return collapse(problem, ties)
