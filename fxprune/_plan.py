"""Plans without models: ``compile(..., plan_only=True)`` and models whose weights are on ``meta``.

A plan is the number of units every dependency group keeps. Its MACs come from the exact plan cost
model (``PlanCost``; the estimate equals the MACs the rewrite would count, which every full compile
verifies) and its parameter count from the groups' parameter slices, so neither needs the pruned
model to be built. That makes two things possible:

* planning a model that is too large to prune here, or whose weights are not loaded at all: a model
  built on the meta device (``with torch.device("meta")``, ``accelerate.init_empty_weights``) is
  captured and analysed from shapes alone (fake tensors), never reading or allocating a weight;
* trying budgets quickly before paying for a rewrite.

Importance on meta weights does not exist. A weightless model is planned with the ``uniform``
criterion (every unit of a group scores the same: the allocation follows MAC cost and structure
only) whatever ``importance=`` says, and the report says so. Search policies that score built
candidates (``agentic``, ``rl``, ``evaluate=``) and latency budgets need real weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.nn as nn

from fxprune.errors import ConfigError
from fxprune.passes.dependency_groups import DependencyGraph

__all__ = ["planned_params", "check_weightless", "WEIGHTLESS_CRITERION"]

#: The criterion a model without weights is planned with.
WEIGHTLESS_CRITERION = "uniform"


def planned_params(module: nn.Module, graph: DependencyGraph, keep: dict[int, int]) -> int:
    """Parameters of ``module`` once every group ``g`` keeps ``keep[g]`` units (tied ones once)."""
    removed: dict[int, int] = {}
    for g in graph.groups:
        drop = g.n - int(keep.get(g.id, g.n))
        if drop <= 0:
            continue
        for s, idx in g.spaces.items():
            removed[s] = removed.get(s, 0) + drop * int(idx.shape[1])
    total = 0
    for name, p in module.named_parameters():
        n = 1
        for d, size in enumerate(p.shape):
            sid = graph.space_index.get(("p", name, d))
            n *= int(size) - (removed.get(sid, 0) if sid is not None else 0)
        total += n
    return int(total)


def check_weightless(*, plan_only: bool, policy: Any, evaluate: Any, latency_budget: Any) -> None:
    """Refuse, with what to do instead, what a model on the meta device cannot give."""
    if latency_budget is not None:
        raise ConfigError("the model's weights are on the meta device: a latency budget needs a model that runs; "
                          "load the weights, or plan with mac_budget=... and plan_only=True")
    if not plan_only:
        raise ConfigError(
            "the model's weights are on the meta device, so no pruned model can be built from them. Pass "
            "plan_only=True to get the plan (keep counts per group, exact MACs) without weights, or load "
            "the weights (e.g. from_pretrained) and compile again")
    name = policy if isinstance(policy, str) else getattr(policy, "name", type(policy).__name__)
    if evaluate is not None or name in ("agentic", "rl"):
        raise ConfigError(
            f"policy {name!r}{' with evaluate=' if evaluate is not None else ''} scores pruned candidates, "
            "which needs real weights; a model on the meta device can be planned with policy='global', "
            "'uniform' or 'isomorphic'")


_ = np
