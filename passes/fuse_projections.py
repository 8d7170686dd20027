"""FuseProjectionsPass: pack the q/k/v projections capture split back into one linear + split.

Capture replaces ``nn.MultiheadAttention`` by :class:`~fxprune.capture.DecomposedMultiheadAttention`,
whose query, key and value projections are three ``nn.Linear`` layers so their heads can be pruned
(``research/gpu_latency.md``: ViT-B/16 captured but not pruned ran 14% slower than the original at
batch 1 on a GPU, three GEMMs where the original ran one). After the rewrite, when the three read the
same tensor (self-attention), this pass puts the packed form back::

    q = q_proj(x); k = k_proj(x); v = v_proj(x)
        ->
    qkv = in_proj(x)                                   # one nn.Linear, out = q_out + k_out + v_out
    q, k, v = torch.split(qkv, [q_out, k_out, v_out], dim=-1)

``in_proj.weight = cat(W_q, W_k, W_v)`` (rows) and ``in_proj.bias = cat(b_q, b_k, b_v)``, so
``in_proj(x)[..., :q_out] == q_proj(x)`` exactly in exact arithmetic (the same dot products; a
fused GEMM may sum in another order, within float rounding). The slices are views, as in
PyTorch's own multi-head attention, and the following ``view``/``transpose`` work on them
unchanged.

Only children of ``DecomposedMultiheadAttention`` (what capture itself split; the tracer records the
owner's class in each node's ``nn_module_stack``) are fused, so graphs
whose projections came separate from the user's model (Hugging Face attention: ``query``, ``key``,
``value``) keep their parameter names; ``FuseProjectionsPass(enabled=False)`` turns the pass off.
The result uses only ``nn.Linear``, ``torch.split`` and ``operator.getitem``: it saves and loads with
``fxprune.save``/``load`` and exports to ONNX (``Split``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx
import torch.nn as nn

from fxprune.passes._infra import AnalysisManager, Pass, PassResult

__all__ = ["FuseProjectionsPass", "fuse_projections"]

_PROJ = ("q_proj", "k_proj", "v_proj")


@dataclass
class FuseProjectionsPass(Pass):
    """Fuse the q/k/v ``nn.Linear`` of every decomposed attention that reads one input."""

    enabled: bool = True
    name: ClassVar[str] = "fuse-projections"

    def call(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        if not self.enabled:
            return PassResult(gm, modified=False, info={"fused": 0})
        by_target = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
        owners = sorted({path for n in by_target.values() for path in [_decomposed_owner(n)] if path is not None})
        fused = []
        for path in owners:
            nodes = [by_target.get(f"{path}.{p}" if path else p) for p in _PROJ]
            if any(n is None for n in nodes) or not _fusable(gm, nodes):
                continue
            _fuse(gm, path, nodes)
            fused.append(path)
        if fused:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified=bool(fused), info={"fused": len(fused), "modules": fused[:8]})


def _decomposed_owner(node: torch.fx.Node) -> str | None:
    """The module path of the ``DecomposedMultiheadAttention`` a projection node was traced in.

    The graph module keeps only plain containers on the way to its leaves, so the owner's class is
    read from the node's ``nn_module_stack`` (recorded by the tracer at capture).
    """
    from fxprune.capture import DecomposedMultiheadAttention

    target = str(node.target)
    parent, _, leaf = target.rpartition(".")
    if leaf not in _PROJ:
        return None
    for key, value in (node.meta.get("nn_module_stack") or {}).items():
        path, cls = value if isinstance(value, tuple) and len(value) == 2 else (key, value)
        if path == parent and isinstance(cls, type) and issubclass(cls, DecomposedMultiheadAttention):
            return parent
    return None


def _fusable(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> bool:
    source = nodes[0].args[0] if nodes[0].args else None
    if not isinstance(source, torch.fx.Node):
        return False
    mods = [gm.get_submodule(str(n.target)) for n in nodes]
    for n, m in zip(nodes, mods):
        if type(m) is not nn.Linear or len(n.args) != 1 or n.kwargs or n.args[0] is not source:
            return False
    first = mods[0]
    same = all((m.bias is None) == (first.bias is None) and m.in_features == first.in_features
               and m.weight.dtype == first.weight.dtype and m.weight.device == first.weight.device for m in mods)
    return same


def _rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts, 0)``; a view, not a copy, when the parts are consecutive rows of one
    tensor (the q/k/v capture cut from an ``nn.MultiheadAttention``'s ``in_proj_weight`` and left
    unpruned: the fused weight is that tensor again)."""
    with torch.no_grad():
        first = parts[0].detach()
        if not first.is_meta and all(p.is_contiguous() for p in parts):
            storage, offset = first.untyped_storage(), first.storage_offset()
            consecutive = True
            for p in parts:
                if p.untyped_storage().data_ptr() != storage.data_ptr() or p.storage_offset() != offset:
                    consecutive = False
                    break
                offset += p.numel()
            if consecutive:
                rows = sum(p.shape[0] for p in parts)
                return first.as_strided((rows, *first.shape[1:]), torch.empty((rows, *first.shape[1:]),
                                        device="meta").stride(), first.storage_offset())
        return torch.cat([p.detach() for p in parts], dim=0)


def _fuse(gm: torch.fx.GraphModule, path: str, nodes: list[torch.fx.Node]) -> None:
    owner = gm.get_submodule(path) if path else gm
    mods = [gm.get_submodule(str(n.target)) for n in nodes]
    sizes = [m.out_features for m in mods]
    first = mods[0]
    # scale: built on meta (no allocation, no random init), then given the packed tensors
    packed = nn.Linear(first.in_features, sum(sizes), bias=first.bias is not None, device="meta",
                       dtype=first.weight.dtype)
    packed.weight = nn.Parameter(_rows([m.weight for m in mods]), requires_grad=first.weight.requires_grad)
    if first.bias is not None:
        packed.bias = nn.Parameter(_rows([m.bias for m in mods]), requires_grad=first.bias.requires_grad)
    packed.train(first.training)
    name = "in_proj"
    owner.add_module(name, packed)
    target = f"{path}.{name}" if path else name
    graph = gm.graph
    anchor = min(nodes, key=lambda n: list(graph.nodes).index(n))
    with graph.inserting_before(anchor):
        qkv = graph.call_module(target, (nodes[0].args[0],))
        parts = graph.call_function(torch.split, (qkv, sizes), {"dim": -1})
        outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(nodes))]
    for old, new in zip(nodes, outs):
        new.meta.update({k: v for k, v in old.meta.items() if k in ("nn_module_stack", "stack_trace")})
        old.replace_all_uses_with(new)
        graph.erase_node(old)
    for p in _PROJ:
        if hasattr(owner, p):
            delattr(owner, p)


def fuse_projections(gm: torch.fx.GraphModule) -> int:
    """Fuse in place (outside a pass manager); returns the number of attentions fused."""
    result = FuseProjectionsPass().call(gm, AnalysisManager(gm))
    return int(result.info.get("fused", 0))


