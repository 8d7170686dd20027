"""The equivalence oracle: pruning must equal zeroing the pruned channels in their consumers.

For any plan, the physically pruned model computes exactly what the original computes once the
pruned channels are zeroed where they are consumed (the input side of conv/linear/projection
weights, per conv group for grouped convolutions). This needs no trained weights, so it checks
the dependency groups and the rewrite on any architecture. Groups marked inexact (LayerNorm,
GroupNorm and other channel-mixing normalisations) change the function by design and are left
whole by :func:`random_plan` unless asked.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.fx

from fxprune.ir import shape_of
from fxprune.opset import rule_for
from fxprune.opset.layers import ConvRule, conv_kind
from fxprune.passes.dependency_groups import DependencyGraph

__all__ = ["random_plan", "masked_reference", "prune_with_units", "check_equivalence"]


def random_plan(graph: DependencyGraph, rng: np.random.Generator, *, exact_only: bool = True,
                min_frac: float = 0.25) -> dict[int, np.ndarray]:
    """Random unit subsets per group (uniform per conv-group block), as ``keep_units``."""
    plan = {}
    for g in graph.groups:
        if exact_only and not g.exact:
            continue
        if g.n < 2 or rng.random() < 0.2:
            continue
        k_blocks = g.block_count
        per_block = g.n // k_blocks
        keep_per_block = int(rng.integers(max(1, int(min_frac * per_block)), per_block + (0 if per_block > 1 else 1)))
        keep_per_block = max(1, min(keep_per_block, per_block))
        units = []
        for b in range(k_blocks):
            members = np.flatnonzero(g.block_of == b)
            units.append(rng.choice(members, size=keep_per_block, replace=False))
        plan[g.id] = np.sort(np.concatenate(units))
    return plan


def _removed(graph: DependencyGraph, keep_units: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Per space, the element indices that the plan removes."""
    out: dict[int, list[np.ndarray]] = {}
    for g in graph.groups:
        units = keep_units.get(g.id)
        if units is None:
            continue
        mask = np.ones(g.n, dtype=bool)
        mask[np.asarray(units)] = False
        for s, idx in g.spaces.items():
            out.setdefault(s, []).append(idx[mask].ravel())
    return {s: np.concatenate(v) for s, v in out.items()}


def masked_reference(gm: torch.fx.GraphModule, graph: DependencyGraph,
                     keep_units: dict[int, np.ndarray]) -> torch.fx.GraphModule:
    """A copy of ``gm`` with every removed channel zeroed in its consumers."""
    ref = copy.deepcopy(gm)
    removed = _removed(graph, keep_units)
    with torch.no_grad():
        for s, idx in removed.items():
            key = graph.keys[s]
            if key[0] == "p" and graph.roles.get(s) == "consumer" and len(idx):
                mod_path, _, attr = key[1].rpartition(".")
                t = getattr(ref.get_submodule(mod_path) if mod_path else ref, attr)
                t.index_fill_(key[2], torch.as_tensor(idx, dtype=torch.long), 0.0)
        # grouped convolutions consume their input per group: zero W[group rows, local column]
        for node in ref.graph.nodes:
            if node.op != "call_module" or not isinstance(rule_for(node, ref), ConvRule):
                continue
            mod = ref.get_submodule(node.target)
            x = node.args[0]
            cin = shape_of(x)[1]
            if conv_kind(node, mod.groups, cin, mod.weight.shape[0]) != "grouped":
                continue
            sid = graph.space_index.get(("n", x.name, 1))
            if sid is None or sid not in removed:
                continue
            per_in = cin // mod.groups
            per_out = mod.weight.shape[0] // mod.groups
            for c in removed[sid]:
                b, local = divmod(int(c), per_in)
                mod.weight[b * per_out:(b + 1) * per_out, local] = 0.0
    return ref


def prune_with_units(gm: torch.fx.GraphModule, graph: DependencyGraph, keep_units: dict[int, np.ndarray],
                     inputs: tuple) -> torch.fx.GraphModule:
    from fxprune.passes.prune_channels import PruneChannelsPass
    from fxprune.passes.shape_prop import ShapePropPass

    pruned = copy.deepcopy(gm)
    PruneChannelsPass(graph, keep_units)(pruned)
    pruned.graph.lint()
    pruned.recompile()
    ShapePropPass(inputs)(pruned)
    return pruned


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat(v)]
    return []


def check_equivalence(gm: torch.fx.GraphModule, graph: DependencyGraph, keep_units: dict[int, np.ndarray],
                      inputs: tuple, *, atol: float = 1e-4, rtol: float = 1e-4) -> float:
    """Max abs difference between the pruned model and the masked reference (raises on mismatch)."""
    pruned = prune_with_units(gm, graph, keep_units, inputs)
    ref = masked_reference(gm, graph, keep_units)
    pruned.eval()
    ref.eval()
    with torch.no_grad():
        a = _flat(pruned(*inputs))
        b = _flat(ref(*inputs))
    worst = 0.0
    for x, y in zip(a, b):
        diff = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        scale = y.double().abs().max().item() if y.numel() else 0.0
        worst = max(worst, diff)
        if diff > atol + rtol * scale:
            raise AssertionError(f"pruned output differs from the masked reference by {diff:.3g} (scale {scale:.3g})")
    return worst
