"""DependencyGroupsAnalysis: which channels must be pruned together, and which cannot be pruned.

Model
-----
A *channel space* is one dimension of one tensor in the graph (``("n", node, dim)``), of one
parameter (``("p", qualified_name, dim)``) or a virtual axis an op declares (``("v", node,
label)``, e.g. the heads of a fused attention op). Op rules (``fxprune.opset``) couple spaces
element by element: identity ties (elementwise ops, norms), offset maps (concat, split, slices),
block maps (flatten: one channel owns H*W features; depthwise conv with a channel multiplier) and
permutations (channel shuffle, which is a reshape-transpose-reshape).

1. Rules run over the graph in order and record ties, origins (spaces where a layer *produces*
   channels), freezes (with a reason) and constraints. Reshapes are resolved afterwards, in graph
   order, on a space-level ``networkx`` graph: a merged or split dim is tied through the one dim
   that carries channels (the heads dim, not ``3`` or ``head_dim``, in ``[B, L, 3, H, D]``).
2. Elements of all spaces are unioned through the ties (``scipy.sparse.csgraph``); a connected
   set of elements is an *atom*: the smallest thing that can be removed. An atom is prunable when
   it touches an origin and no frozen space.
3. Atoms that touch the same spaces the same number of times are interchangeable: they form a
   *group*. A group's keep count is what policies choose. Its members are, per space, the
   element indices each atom owns, which is all the rewrite and the cost model need.
4. Groups get an isomorphic *bucket* key: the Weisfeiler-Lehman hash of the group's subgraph of
   fx nodes labelled with op kinds, widths and spatial resolution.

The analysis never mutates the graph.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Sequence

import networkx as nx
import numpy as np
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import torch
import torch.fx

from fxprune.cost_models.mac import SpaceForm
from fxprune.importance import ParamSlice, UnitGroup
from fxprune.ir import TensorInfo, measured_macs, node_module_path, shape_of, tensor_info
from fxprune.opset import op_label, rule_for
from fxprune.opset._base import norm_dim
from fxprune.opset.layers import META_GROUPED_WITHIN, ConvRule
from fxprune.passes._infra import AnalysisManager

__all__ = ["DependencyGroupsAnalysis", "DependencyGraph", "Group", "FrozenGroup", "ParamSlice"]

logger = logging.getLogger(__name__)

SpaceKey = tuple


@dataclass
class Group:
    """A set of interchangeable prunable units (channels or heads)."""

    id: int
    n: int
    spaces: dict[int, np.ndarray]  # space id -> [n, mult] element indices per unit
    kind: str  # "channels" | "heads"
    exact: bool
    block_count: int  # keep must be a multiple of this (grouped convs, GroupNorm)
    block_of: np.ndarray  # [n] block key of each unit
    name: str = ""
    members: tuple[str, ...] = ()
    bucket: str = ""
    inexact_reasons: tuple[str, ...] = ()
    unit: int = 1
    #: keep must be a multiple of this for the pruned model to run at all (kernels that need aligned
    #: strides, ``CouplingBuilder.align``); unlike ``channel_multiple`` never relaxed to reach the band
    align: int = 1


@dataclass
class FrozenGroup:
    """Channels that layers produce but that cannot be pruned, with the reasons."""

    name: str
    n: int
    reasons: tuple[str, ...]


@dataclass
class DependencyGraph:
    """The result of :class:`DependencyGroupsAnalysis`."""

    keys: list[SpaceKey]
    sizes: np.ndarray
    groups: list[Group]
    frozen: list[FrozenGroup]
    space_index: dict[SpaceKey, int] = field(repr=False)
    roles: dict[int, str] = field(repr=False, default_factory=dict)
    ignored: tuple[str, ...] = ()

    def forms(self) -> dict[tuple[str, int], SpaceForm]:
        """Linear forms ``size = fixed + sum mult*keep`` for every node space a group touches."""
        mult: dict[int, dict[int, int]] = defaultdict(dict)
        for g in self.groups:
            for s, idx in g.spaces.items():
                mult[s][g.id] = idx.shape[1]
        out = {}
        for s, m in mult.items():
            key = self.keys[s]
            if key[0] != "n":
                continue
            pruned = sum(k * self.groups[g].n for g, k in m.items())
            out[(key[1], key[2])] = SpaceForm(int(self.sizes[s] - pruned), dict(m))
        return out

    def kept_indices(self, keep_units: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Per space, the sorted element indices that survive when group g keeps units ``keep_units[g]``."""
        removed: dict[int, list[np.ndarray]] = defaultdict(list)
        for g in self.groups:
            units = keep_units.get(g.id)
            if units is None or len(units) == g.n:
                continue
            mask = np.ones(g.n, dtype=bool)
            mask[np.asarray(units, dtype=np.int64)] = False
            for s, idx in g.spaces.items():
                removed[s].append(idx[mask].ravel())
        out = {}
        for s, parts in removed.items():
            drop = np.concatenate(parts)
            keep = np.ones(int(self.sizes[s]), dtype=bool)
            keep[drop] = False
            out[s] = np.flatnonzero(keep)
        return out

    def param_slices(self, group: Group) -> list[ParamSlice]:
        out = []
        for s, idx in group.spaces.items():
            key = self.keys[s]
            if key[0] == "p":
                out.append(ParamSlice(key[1], key[2], idx, self.roles.get(s, "other")))
        return out

    def unit_groups(self) -> list[UnitGroup]:
        """The groups as the importance criteria see them (parameter slices per unit)."""
        return [UnitGroup(g.id, g.n, tuple(self.param_slices(g))) for g in self.groups]

    def summary(self) -> dict[str, Any]:
        return {
            "groups": len(self.groups),
            "prunable_units": int(sum(g.n for g in self.groups)),
            "frozen_groups": len(self.frozen),
            "buckets": len({g.bucket for g in self.groups}),
        }


class _DSU:
    def __init__(self):
        self.parent: list[int] = []
        self.origin: list[bool] = []
        self.frozen: list[bool] = []

    def add(self):
        self.parent.append(len(self.parent))
        self.origin.append(False)
        self.frozen.append(False)

    def find(self, a):
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.origin[ra] = self.origin[ra] or self.origin[rb]
            self.frozen[ra] = self.frozen[ra] or self.frozen[rb]


class _Builder:
    """Implements the ``CouplingBuilder`` protocol of ``fxprune.opset._base``."""

    def __init__(self, gm: torch.fx.GraphModule, ignored: Callable[[str], bool]):
        self.gm = gm
        self.ignored = ignored
        self.keys: list[SpaceKey] = []
        self.sizes: list[int] = []
        self.index: dict[SpaceKey, int] = {}
        self.ties: list[tuple[int, int]] = []
        self.identical: dict[int, list[int]] = defaultdict(list)  # element-for-element ties
        self.maps: list[tuple[int, np.ndarray, int, np.ndarray]] = []
        self.frozen: dict[int, str] = {}
        self.origins: set[int] = set()
        self.inexact_: dict[int, str] = {}
        self.blocks_: list[tuple[int, int, str]] = []
        self.align_: dict[int, int] = {}
        self.roles: dict[int, str] = {}
        self.reshapes: list[tuple[torch.fx.Node, torch.fx.Node, Any]] = []
        self.dsu = _DSU()
        self.params = dict(gm.named_parameters(remove_duplicate=False))
        self.buffers = dict(gm.named_buffers(remove_duplicate=False))
        # tied tensors (an embedding shared with the output Linear) are one tensor under several
        # names: every name maps to the first, so their channel spaces are the same spaces and
        # the tie can never be pruned apart (rows of one alias sliced, columns of the other)
        first: dict[int, str] = {}
        self.canonical: dict[str, str] = {}
        for name, t in list(self.params.items()) + list(self.buffers.items()):
            self.canonical[name] = first.setdefault(id(t), name)

    # -- spaces
    def _get(self, key: SpaceKey, size: int) -> int:
        sid = self.index.get(key)
        if sid is None:
            sid = len(self.keys)
            self.index[key] = sid
            self.keys.append(key)
            self.sizes.append(int(size))
            self.dsu.add()
            if key[0] == "p" and self.ignored(key[1].rsplit(".", 1)[0]):
                self.freeze(sid, f"'{key[1].rsplit('.', 1)[0]}' is in ignore")
        return sid

    def space(self, node: torch.fx.Node, dim: int) -> int:
        info = tensor_info(node)
        if not isinstance(info, TensorInfo):
            raise ValueError(f"node {node.name} is not a single tensor")
        d = norm_dim(dim, info.ndim)
        return self._get(("n", node.name, d), info.shape[d])

    def pspace(self, param: str, dim: int) -> int:
        param = self.canonical.get(param, param)
        t = self.params.get(param)
        if t is None:
            t = self.buffers.get(param)
        if t is None:
            mod_path, _, attr = param.rpartition(".")
            t = getattr(self.gm.get_submodule(mod_path) if mod_path else self.gm, attr)
        d = norm_dim(dim, t.dim())
        return self._get(("p", param, d), t.shape[d])

    def vspace(self, node: torch.fx.Node, label: str, size: int) -> int:
        return self._get(("v", node.name, label), size)

    def size(self, space: int) -> int:
        return self.sizes[space]

    def module(self, node):
        return self.gm.get_submodule(node.target)

    # -- couplings
    def tie(self, a: int, b: int) -> None:
        if a == b:
            return
        if self.sizes[a] != self.sizes[b]:
            self.freeze(a, f"size mismatch between {self.keys[a]} and {self.keys[b]}")
            self.freeze(b, f"size mismatch between {self.keys[a]} and {self.keys[b]}")
            return
        self.ties.append((a, b))
        self.identical[a].append(b)
        self.identical[b].append(a)
        self.dsu.union(a, b)

    def tie_map(self, a: int, ia: np.ndarray, b: int, ib: np.ndarray) -> None:
        ia = np.asarray(ia, dtype=np.int64)
        ib = np.asarray(ib, dtype=np.int64)
        self.maps.append((a, ia, b, ib))
        self.dsu.union(a, b)

    def freeze(self, space: int, reason: str) -> None:
        self.frozen.setdefault(space, reason)
        self.dsu.frozen[self.dsu.find(space)] = True

    def freeze_node(self, node: torch.fx.Node, reason: str) -> None:
        for a in node.all_input_nodes:
            self._freeze_value(a, reason)
        self._freeze_value(node, reason)

    def _freeze_value(self, node: torch.fx.Node, reason: str) -> None:
        info = tensor_info(node)
        if isinstance(info, TensorInfo):
            for d in range(info.ndim):
                self.freeze(self.space(node, d), reason)
        elif isinstance(info, (tuple, list)):
            import operator

            for u in node.users:
                if u.op == "call_function" and u.target is operator.getitem and isinstance(tensor_info(u), TensorInfo):
                    for d in range(tensor_info(u).ndim):
                        self.freeze(self.space(u, d), reason)

    def origin(self, space: int) -> None:
        self.origins.add(space)
        self.dsu.origin[self.dsu.find(space)] = True

    def inexact(self, space: int, reason: str) -> None:
        self.inexact_.setdefault(space, reason)

    def blocks(self, space: int, n: int, reason: str) -> None:
        self.blocks_.append((space, int(n), reason))

    def align(self, space: int, elements: int, reason: str) -> None:
        """The space's kept size must be a multiple of ``elements`` (a kernel's stride alignment)."""
        self.align_[space] = math.lcm(self.align_.get(space, 1), max(int(elements), 1))

    def role(self, space: int, role: str) -> None:
        if role == "consumer" and self.roles.get(space) == "producer" and self.keys[space][0] == "p":
            # one tensor read on both sides (an embedding tied to the output Linear): removing a
            # channel of it also removes the channel from the layer that reads it, like a consumer
            self.roles[space] = role
            return
        self.roles.setdefault(space, role)

    def reshape(self, node, src, flexible) -> None:
        self.reshapes.append((node, src, flexible))


# ----------------------------------------------------------------------------- reshape logic

def match_dims(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Group dims of shape ``a`` and ``b`` into runs of equal product (size-1 dims skipped)."""
    ia = [d for d in range(len(a)) if a[d] != 1]
    ib = [d for d in range(len(b)) if b[d] != 1]
    groups = []
    i = j = 0
    while i < len(ia) and j < len(ib):
        ga, gb = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                if i >= len(ia):
                    return None
                ga.append(ia[i])
                pa *= a[ia[i]]
                i += 1
            else:
                if j >= len(ib):
                    return None
                gb.append(ib[j])
                pb *= b[ib[j]]
                j += 1
        groups.append((ga, gb))
    if i != len(ia) or j != len(ib):
        return None
    return groups


def _mapped_indices(b: _Builder, space: int) -> list[np.ndarray]:
    """Element maps already recorded from ``space`` (or a space tied to it element for element)
    to one other space: ``index[j]`` for every element ``j``."""
    same, frontier = {space}, [space]
    while frontier:
        nxt = []
        for s in frontier:
            for t in b.identical.get(s, ()):
                if t not in same:
                    same.add(t)
                    nxt.append(t)
        frontier = nxt
    n = b.sizes[space]
    out = []
    for a, ia, c, ic in b.maps:
        if a in same and len(ia) == n and np.array_equal(ia, np.arange(n)):
            out.append(ic)
        elif c in same and len(ic) == n and np.array_equal(ic, np.arange(n)):
            out.append(ia)
    return out


def _index_of_dim(sizes: Sequence[int], k: int) -> np.ndarray:
    """For each element ``j`` of the flattened ``sizes``, its index along dim ``k``."""
    j = np.arange(math.prod(sizes))
    return (j // math.prod(sizes[k + 1:])) % sizes[k]


def _resolve_from_output(b: _Builder, node, src, ga, gb) -> bool:
    """A merge or split whose input dims carry no channels, once its output side does."""
    a, o = shape_of(src), shape_of(node)
    dsu = b.dsu
    in_sp = [b.space(src, d) for d in ga]
    out_sp = [b.space(node, d) for d in gb]
    live = [k for k, s in enumerate(out_sp) if dsu.origin[dsu.find(s)] and not dsu.frozen[dsu.find(s)]]
    if not live:
        return False
    if len(gb) == 1 and len(ga) > 1:  # merge: find the input dim the output's channel map follows
        sizes = [a[d] for d in ga]
        maps = _mapped_indices(b, out_sp[0])
        for k in range(len(ga)):
            idx = _index_of_dim(sizes, k)
            if sizes[k] > 1 and any(np.array_equal(m, idx) for m in maps):
                b.tie_map(out_sp[0], np.arange(len(idx)), in_sp[k], idx)
                return True
        return False
    if len(ga) == 1 and len(gb) > 1 and len(live) == 1:  # split: the one output dim with channels
        sizes = [o[d] for d in gb]
        k = live[0]
        idx = _index_of_dim(sizes, k)
        b.tie_map(in_sp[0], np.arange(len(idx)), out_sp[k], idx)
        return True
    return False


def _freeze_positional(b: _Builder, node, ga, gb, src) -> None:
    a, o = shape_of(src), shape_of(node)
    for s in [b.space(src, d) for d in ga] + [b.space(node, d) for d in gb]:
        b.freeze(s, f"reshape {a}->{o} merges/splits positional dims ({node.name})")


def _resolve_reshape(b: _Builder, node: torch.fx.Node, src: torch.fx.Node, flexible,
                     kept_dims_only: bool = False, pending: list | None = None) -> None:
    a, o = shape_of(src), shape_of(node)
    groups = match_dims(a, o)
    if groups is None:
        if not kept_dims_only:
            b.freeze_node(node, f"reshape {a}->{o} mixes dims ({node.name})")
        return
    dsu = b.dsu
    for ga, gb in groups:
        if len(ga) == 1 and len(gb) == 1:
            if kept_dims_only:
                b.tie(b.space(src, ga[0]), b.space(node, gb[0]))
            continue
        if kept_dims_only:
            continue
        in_sp = [b.space(src, d) for d in ga]
        out_sp = [b.space(node, d) for d in gb]
        carriers = [k for k, s in enumerate(in_sp) if dsu.origin[dsu.find(s)] and not dsu.frozen[dsu.find(s)]]
        if not carriers:
            # frozen channels stay frozen in the dims they are split or merged into (a frozen
            # projection viewed as heads must not have its heads pruned through another tie)
            if any(dsu.origin[dsu.find(s)] and dsu.frozen[dsu.find(s)] for s in in_sp):
                for s, d in zip(out_sp, gb):
                    if o[d] > 1:
                        b.freeze(s, f"reshape of frozen channels ({node.name})")
            elif pending is not None:
                pending.append((node, src, ga, gb))
            else:
                _freeze_positional(b, node, ga, gb, src)
            continue  # merged/split dims carry no channels: they stay positional
        if len(ga) > 1 and len(gb) > 1:
            for s in in_sp + out_sp:
                b.freeze(s, f"reshape {a}->{o} regroups channel dims ({node.name})")
            continue
        if len(gb) == 1:  # merge: one output dim made of several input dims
            if len(carriers) > 1:
                for s in in_sp + out_sp:
                    b.freeze(s, f"reshape merges two channel dims ({node.name})")
                continue
            k = carriers[0]
            sizes = [a[d] for d in ga]
            stride = math.prod(sizes[k + 1 :])
            n = math.prod(sizes)
            j = np.arange(n)
            b.tie_map(out_sp[0], j, in_sp[k], (j // stride) % sizes[k])
        else:  # split: one input dim into several output dims; pick the channel-carrying one
            cands = [k for k, s in enumerate(out_sp) if o[gb[k]] > 1 and not dsu.frozen[dsu.find(s)]]
            if not cands:
                b.freeze(in_sp[0], f"reshape splits channels into frozen dims ({node.name})")
                continue
            sizes = [o[d] for d in gb]
            if len(cands) > 1:
                # a dim merged earlier (DeBERTa's [B*H] from [B, H]) is split back along the
                # dim its channel map follows, not along the first candidate
                n_all = math.prod(sizes)
                j = np.arange(n_all)
                maps = _mapped_indices(b, in_sp[0])
                follow = [k for k in cands
                          if any(np.array_equal(m, (j // math.prod(sizes[k + 1:])) % sizes[k]) for m in maps)]
                if follow:
                    cands = follow
            if flexible is not None and len(cands) > 1:
                flex = [k for k in cands if gb[k] < len(flexible) and flexible[gb[k]]]
                if flex:
                    cands = flex
            k = cands[0]
            stride = math.prod(sizes[k + 1 :])
            n = math.prod(sizes)
            j = np.arange(n)
            b.tie_map(in_sp[0], j, out_sp[k], (j // stride) % sizes[k])
            # the other dims of the split are positions inside the picked one: a channel tie reaching
            # them (timm's CondConv: expert weights [B, out*in] viewed as [B*out, in, kh, kw], whose
            # in-dim meets the incoming channels) could only be cut without cutting the input
            for i, (s, d) in enumerate(zip(out_sp, gb)):
                if i != k and o[d] > 1:
                    b.freeze(s, f"reshape {a}->{o} splits one dim into several: dim {d} stays positional "
                                f"({node.name})")


# ----------------------------------------------------------------------------------- analysis

@dataclass(frozen=True)
class DependencyGroupsAnalysis:
    """Compute dependency groups of a shape-annotated graph (``ShapePropPass`` must have run).

    Attributes:
        ignore: module paths (prefixes) whose parameters must not be touched.
        grouped_convs: how a grouped conv with more groups than channels per group is pruned:
            ``"within"`` its groups (the group count stays; the default) or by ``"whole"`` groups
            (the channels per group stay; see :class:`~fxprune.opset.layers.ConvRule`).
    """

    ignore: tuple[str, ...] = ()
    ignore_fn: Callable[[str], bool] | None = None
    grouped_convs: str = "within"
    name: ClassVar[str] = "dependency-groups"

    def _ignored(self, path: str) -> bool:
        if any(path == p or path.startswith(p + ".") for p in self.ignore):
            return True
        return bool(self.ignore_fn and self.ignore_fn(path))

    def run(self, gm: torch.fx.GraphModule, am: AnalysisManager | None = None) -> DependencyGraph:
        """The groups of ``gm``. With ``grouped_convs="whole"``, grouped convs are first coupled by
        whole conv groups (where :meth:`~fxprune.opset.layers.ConvRule.kind` says so); a conv whose
        groups another op also structures (see :func:`_whole_group_conflicts`) is marked to be
        pruned within its groups, and the graph is analysed once more. The marks are node metadata
        (``fxprune.grouped_within``) that the MAC terms, the rewrite and the latency units read."""
        within = self.grouped_convs == "within"
        for node in gm.graph.nodes:
            node.meta.pop(META_GROUPED_WITHIN, None)
            if within and node.op != "placeholder" and isinstance(rule_for(node, gm), ConvRule):
                node.meta[META_GROUPED_WITHIN] = True
        graph = self._build(gm)
        conflicts = _whole_group_conflicts(gm, graph)
        if conflicts:
            for node in conflicts:
                node.meta[META_GROUPED_WITHIN] = True
            logger.debug("grouped convs pruned within their groups: %s", [n.name for n in conflicts])
            graph = self._build(gm)
        return graph

    def _build(self, gm: torch.fx.GraphModule) -> DependencyGraph:
        b = _Builder(gm, self._ignored)
        for node in gm.graph.nodes:
            info = tensor_info(node)
            has_tensor_in = any(isinstance(tensor_info(a), (TensorInfo, tuple, list)) for a in node.all_input_nodes)
            if node.op in ("call_function", "call_method", "call_module") and info is None and not has_tensor_in:
                continue  # scalar arithmetic on sizes
            rule = rule_for(node, gm)
            try:
                rule.couple(node, b)
            except Exception as err:  # a rule that cannot handle this instance: freeze, never crash
                logger.debug("rule %s failed on %s: %s", rule.name, node.name, err)
                try:
                    b.freeze_node(node, f"{op_label(node, gm)}: {type(err).__name__}: {err}")
                except Exception:
                    pass
            if node.op == "call_module" and self._ignored(str(node.target)):
                b.freeze_node(node, f"'{node.target}' is in ignore")
            fixed = measured_macs(node)
            if fixed is not None:  # counted at its measured MACs: valid only at the recorded shapes
                b.freeze_node(node, f"{fixed.reason} (counted as measured, channels kept)")
        # dims a reshape keeps (one input dim to one output dim) are tied first, so what a later
        # op learns about a dim (a frozen attention head dim) is known when an earlier reshape
        # decides which of the dims it splits carries the channels
        for node, src, flexible in b.reshapes:
            try:
                _resolve_reshape(b, node, src, flexible, kept_dims_only=True)
            except Exception as err:
                b.freeze_node(node, f"reshape {node.name}: {type(err).__name__}: {err}")
        pending: list[tuple] = []
        for node, src, flexible in b.reshapes:
            try:
                _resolve_reshape(b, node, src, flexible, pending=pending)
            except Exception as err:
                b.freeze_node(node, f"reshape {node.name}: {type(err).__name__}: {err}")
        # merges/splits of dims without channels on their input side: a later op may have put
        # channels on their output side (Bloom's ALiBi bias [B, H, L] -> [B*H, 1, L] is added to
        # scores whose [B*H] follows the heads): follow them back to the input dims
        for _ in range(3):
            progress, still = False, []
            for item in pending:
                try:
                    done = _resolve_from_output(b, *item)
                except Exception as err:
                    logger.debug("reshape %s: %s", item[0].name, err)
                    done = True
                progress |= done
                if not done:
                    still.append(item)
            pending = still
            if not progress or not pending:
                break
        # what is left has channels on its output side that follow no input dim (MLP-Mixer's token
        # MLP produces the dim the patch grid was flattened into): positional, so nothing reaching
        # it can be pruned
        for node, src, ga, gb in pending:
            _freeze_positional(b, node, ga, gb, src)
        return _finish(gm, b, ignored=self.ignore)


def _whole_group_conflicts(gm: torch.fx.GraphModule, graph: DependencyGraph) -> list[torch.fx.Node]:
    """Grouped convs coupled by whole conv groups (a ``conv_groups`` virtual axis) where another op
    structures the same channels by groups, so whole groups are not what it can lose: a node or
    parameter dim holding one element per conv group (EvoNorm's or a channel shuffle's
    ``reshape(B, groups, C // groups, ...)`` with a constant group count), a block constraint on the
    units (a GroupNorm), or units that ended frozen. Pruning within the groups keeps the group count
    such ops rely on."""
    group_of = {}
    for g in graph.groups:
        for s in g.spaces:
            group_of[s] = g
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for key, sid in graph.space_index.items():
        if key[0] != "v" or key[2] != "conv_groups" or key[1] not in nodes:
            continue
        g = group_of.get(sid)
        if (g is None or g.block_count > 1
                or any(idx.shape[1] == 1 and graph.keys[s][0] in ("n", "p") for s, idx in g.spaces.items())):
            out.append(nodes[key[1]])
    return out


def _hash64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise; a uint64 ``x`` is hashed in place (one array, no temporaries
    beyond a shift buffer)."""
    x = x if x.dtype == np.uint64 else x.astype(np.uint64)
    t = np.empty_like(x)
    with np.errstate(over="ignore"):
        for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None)):
            np.right_shift(x, np.uint64(shift), out=t)
            x ^= t
            if mul is not None:
                x *= np.uint64(mul)
    return x


def _element_labels(b: _Builder, sizes: np.ndarray, offsets: np.ndarray) -> tuple[int, np.ndarray]:
    """Connected components of the elements of all spaces under the ties and maps (the atoms).

    A tie joins two spaces element by element, and most couplings are ties (every elementwise op,
    norm, activation ...). So spaces joined by ties are first collapsed into one *class* (a
    space-level union-find), and the element-level components are computed on the classes'
    elements with only the maps as edges: the element graph shrinks from every space of the
    model to one space per class. Labels are numbered by their first element (the order
    ``scipy.sparse.csgraph.connected_components`` gives over all elements), so the result is the
    same as joining every element directly.
    """
    n_spaces = len(sizes)
    total = int(offsets[-1])
    if b.ties:
        ta = np.fromiter((a for a, _ in b.ties), dtype=np.int64, count=len(b.ties))
        tc = np.fromiter((c for _, c in b.ties), dtype=np.int64, count=len(b.ties))
        space_adj = sp.coo_matrix((np.ones(len(ta), dtype=np.int8), (ta, tc)), shape=(n_spaces, n_spaces))
        _, cls = csgraph.connected_components(space_adj, directed=False)
    else:
        cls = np.arange(n_spaces)
    n_cls = int(cls.max()) + 1 if n_spaces else 0
    cls_size = np.zeros(n_cls, dtype=np.int64)
    cls_size[cls] = sizes  # tied spaces have equal sizes (tie() freezes and skips a size mismatch)
    cls_off = np.concatenate([[0], np.cumsum(cls_size)])
    n_cls_elems = int(cls_off[-1])
    index_dtype = np.int32 if max(n_cls_elems, total) < 2**31 - 1 else np.int64
    src_parts, dst_parts = [], []
    for a, ia, c, ib in b.maps:
        ok = (ia < sizes[a]) & (ib < sizes[c]) & (ia >= 0) & (ib >= 0)
        src_parts.append((cls_off[cls[a]] + ia[ok]).astype(index_dtype))
        dst_parts.append((cls_off[cls[c]] + ib[ok]).astype(index_dtype))
    if src_parts:
        src, dst = np.concatenate(src_parts), np.concatenate(dst_parts)
    else:
        src = dst = np.zeros(0, dtype=index_dtype)
    adj = sp.coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n_cls_elems, n_cls_elems))
    del src, dst, src_parts, dst_parts
    n_labels, cls_labels = csgraph.connected_components(adj, directed=False)
    del adj
    # number atoms by their first element over all spaces, as a search over all elements would:
    # a class's elements appear first in its first space, at their own positions
    first_space = np.full(n_cls, n_spaces, dtype=np.int64)
    np.minimum.at(first_space, cls, np.arange(n_spaces))
    cls_of_elem = np.repeat(np.arange(n_cls), cls_size)
    first_elem = offsets[first_space[cls_of_elem]] + (np.arange(n_cls_elems) - cls_off[cls_of_elem])
    first_of_label = np.full(n_labels, total, dtype=np.int64)
    np.minimum.at(first_of_label, cls_labels, first_elem)
    rank = np.empty(n_labels, dtype=index_dtype)
    rank[np.argsort(first_of_label, kind="stable")] = np.arange(n_labels, dtype=index_dtype)
    cls_labels = rank[cls_labels]
    del cls_of_elem, first_elem, first_of_label, rank
    # every element of space s at position i is element cls_off[cls[s]] + i of its class
    labels = np.empty(total, dtype=index_dtype)
    for s in range(n_spaces):
        start = int(cls_off[cls[s]])
        labels[offsets[s]:offsets[s + 1]] = cls_labels[start:start + int(sizes[s])]
    return n_labels, labels


def _finish(gm: torch.fx.GraphModule, b: _Builder, ignored: Sequence[str]) -> DependencyGraph:
    sizes = np.asarray(b.sizes, dtype=np.int64)
    n_spaces = len(sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    total = int(offsets[-1])
    n_atoms, labels = _element_labels(b, sizes, offsets)
    small = np.int32 if max(total, n_spaces) < 2**31 - 1 else np.int64  # per-element tables: half the memory
    elem_space = np.repeat(np.arange(n_spaces, dtype=small), sizes)
    elem_pos = (np.arange(total, dtype=np.int64) - offsets[elem_space]).astype(small)

    frozen_space = np.zeros(n_spaces, dtype=bool)
    for s in b.frozen:
        frozen_space[s] = True
    origin_space = np.zeros(n_spaces, dtype=bool)
    for s in b.origins:
        origin_space[s] = True
    atom_frozen = np.bincount(labels, weights=frozen_space[elem_space], minlength=n_atoms) > 0
    atom_origin = np.bincount(labels, weights=origin_space[elem_space], minlength=n_atoms) > 0
    prunable = atom_origin & ~atom_frozen

    groups = _group_atoms(b, labels, elem_space, elem_pos, prunable, origin_space, n_spaces)
    frozen = _frozen_groups(b, labels, elem_space, atom_origin & atom_frozen, n_spaces)
    groups = _apply_blocks(b, groups, labels, elem_space, prunable, sizes, offsets, frozen)
    _label_groups(gm, b, groups)
    # graph order: space ids are created while walking the graph, so the first origin space
    # of a group says where its channels are first produced
    groups.sort(key=lambda g: min((s for s in g.spaces if s in b.origins), default=min(g.spaces)))
    for i, g in enumerate(groups):
        g.id = i
    return DependencyGraph(b.keys, sizes, groups, frozen, b.index, b.roles, tuple(ignored))


def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Where each run of equal values starts in a sorted array (``np.unique``'s ``return_index``
    without its copies and sort)."""
    first = np.ones(len(sorted_values), dtype=bool)
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=first[1:])
    return np.flatnonzero(first)


def _signatures(labels, elem_space, mask, n_spaces):
    """For atoms in ``mask`` (per element), rows (atom, space, count) and a signature hash per atom."""
    # scale: one int64 key per element, sorted in place (np.unique would hold three more copies)
    key = labels[mask].astype(np.int64)
    key *= n_spaces
    key += elem_space[mask]
    key.sort()
    starts = _run_starts(key)
    uk = key[starts]
    counts = np.diff(np.append(starts, len(key)))
    del key, starts
    small = np.int32 if max(len(labels), n_spaces) < 2**31 - 1 else np.int64
    atom = (uk // n_spaces).astype(small)
    space = (uk % n_spaces).astype(small)
    del uk
    h = space.astype(np.uint64)
    h *= np.uint64(1_000_003)
    h += counts.astype(np.uint64)
    h = _hash64(h)
    start = _run_starts(atom)  # rows are sorted by atom
    ua = atom[start]
    sig = np.add.reduceat(h, start) if len(h) else h
    nrows = np.diff(np.append(start, len(atom)))
    sig = _hash64(sig ^ nrows.astype(np.uint64))
    return ua, sig, atom, space, counts


def _group_atoms(b, labels, elem_space, elem_pos, prunable, origin_space, n_spaces) -> list[Group]:
    emask = prunable[labels]
    if not emask.any():
        return []
    ua, sig, row_atom, row_space, row_count = _signatures(labels, elem_space, emask, n_spaces)
    uniq_sig, atom_group = np.unique(sig, return_inverse=True)
    n_groups = len(uniq_sig)
    group_of_atom = np.full(labels.max() + 1, -1, dtype=np.int64)
    group_of_atom[ua] = atom_group
    # rank atoms inside each group by their first element position in the group's first origin space
    del row_atom, row_space, row_count
    le = labels[emask]  # scale: boolean indexing, no int64 index array over every element
    idx_dtype = np.int32 if len(group_of_atom) < 2**31 - 1 else np.int64
    eg = group_of_atom[le].astype(idx_dtype)
    es = elem_space[emask]
    ep = elem_pos[emask]
    # order key for atoms: (is not origin space, space id, position) of their first element
    order = np.lexsort((ep, es, ~origin_space[es], le))
    first = _run_starts(le[order])  # sorted by atom first
    first_e = order[first]
    del order, first
    atoms_sorted = le[first_e]
    atom_key_space = es[first_e]
    atom_key_pos = ep[first_e]
    del first_e
    atom_rank = np.zeros(labels.max() + 1, dtype=np.int64)
    grp = group_of_atom[atoms_sorted]
    ordr = np.lexsort((atom_key_pos, atom_key_space, grp))
    counts_per_group = np.bincount(grp, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts_per_group)[:-1]])
    ranks = np.arange(len(ordr)) - np.repeat(starts, counts_per_group)
    atom_rank[atoms_sorted[ordr]] = ranks
    # element table sorted by (group, space, rank, pos)
    er = atom_rank[le].astype(idx_dtype)
    del le
    srt = np.lexsort((ep, er, es, eg))
    eg = eg[srt]  # one at a time: never two copies of all four
    es = es[srt]
    ep = ep[srt]
    del srt, er  # er only ordered the elements
    groups: list[Group] = []
    bounds = np.flatnonzero(np.diff(eg)) + 1
    g_starts = np.concatenate([[0], bounds])
    g_ends = np.concatenate([bounds, [len(eg)]])
    for gi, (s0, s1) in enumerate(zip(g_starts, g_ends)):
        n = int(counts_per_group[eg[s0]])
        spaces = {}
        sub_s = es[s0:s1]
        sb = np.flatnonzero(np.diff(sub_s)) + 1
        for a0, a1 in zip(np.concatenate([[0], sb]), np.concatenate([sb, [len(sub_s)]])):
            sid = int(sub_s[a0])
            pos = ep[s0 + a0 : s0 + a1]
            spaces[sid] = pos.reshape(n, -1)
        groups.append(Group(gi, n, spaces, "channels", True, 1, np.zeros(n, dtype=np.int64)))
    return groups


def _frozen_groups(b, labels, elem_space, mask_atoms, n_spaces) -> list[FrozenGroup]:
    emask = mask_atoms[labels]
    if not emask.any():
        return []
    ua, sig, row_atom, row_space, row_count = _signatures(labels, elem_space, emask, n_spaces)
    out = []
    atom_rows = defaultdict(list)
    for a, s in zip(row_atom, row_space):
        atom_rows[a].append(s)
    by_sig = defaultdict(list)
    for a, s in zip(ua, sig):
        by_sig[s].append(a)
    for s, atoms in sorted(by_sig.items(), key=lambda kv: min(atom_rows[kv[1][0]])):
        spaces = atom_rows[atoms[0]]
        reasons = []
        for sid in spaces:
            r = b.frozen.get(sid)
            if r and r not in reasons:
                reasons.append(r)
        name = _space_label(b, [sid for sid in spaces if sid in b.origins] or spaces)
        out.append(FrozenGroup(name, len(atoms), tuple(reasons[:4])))
    return out


def _space_label(b, spaces) -> str:
    for sid in spaces:
        key = b.keys[sid]
        if key[0] == "p":
            return key[1].rsplit(".", 1)[0]
    for sid in spaces:
        key = b.keys[sid]
        if key[0] in ("n", "v"):
            return str(key[1])
    return "?"


def _apply_blocks(b, groups, labels, elem_space, prunable, sizes, offsets, frozen) -> list[Group]:
    """Grouped convs / GroupNorm: each group must keep the same number of units per block."""
    by_space = defaultdict(list)
    for g in groups:
        for s in g.spaces:
            by_space[s].append(g)
    bad: dict[int, str] = {}
    for space, nblocks, reason in b.blocks_:
        size = int(sizes[space])
        if nblocks <= 1:
            continue
        if size % nblocks:
            for g in by_space.get(space, []):
                bad[g.id] = f"{reason}: {size} channels not divisible into {nblocks} blocks"
            continue
        per = size // nblocks
        # elements of this space not owned by any prunable group must be spread evenly
        owned = np.zeros(size, dtype=bool)
        for g in by_space.get(space, []):
            owned[g.spaces[space].ravel()] = True
        fixed_per_block = np.bincount(np.flatnonzero(~owned) // per, minlength=nblocks)
        if len(set(fixed_per_block.tolist())) > 1:
            for g in by_space.get(space, []):
                bad[g.id] = f"{reason}: unprunable channels spread unevenly over the blocks"
            continue
        for g in by_space.get(space, []):
            blk = g.spaces[space] // per  # [n, mult]
            if (blk != blk[:, :1]).any():
                bad[g.id] = f"{reason}: a unit spans several blocks"
                continue
            g.block_of = g.block_of * nblocks + blk[:, 0]
    kept = []
    for g in groups:
        if g.id in bad:
            frozen.append(FrozenGroup(_group_name(b, g), g.n, (bad[g.id],)))
            continue
        if g.block_of.any():
            _, inv, counts = np.unique(g.block_of, return_inverse=True, return_counts=True)
            if len(set(counts.tolist())) > 1:
                frozen.append(FrozenGroup(_group_name(b, g), g.n, ("units spread unevenly over conv groups",)))
                continue
            g.block_of = inv
            g.block_count = len(counts)
        kept.append(g)
    return kept


def _group_name(b, g: Group) -> str:
    producers = [s for s in g.spaces if b.roles.get(s) == "producer"]
    return _space_label(b, producers or [s for s in g.spaces if s in b.origins] or list(g.spaces))


def _label_groups(gm: torch.fx.GraphModule, b: _Builder, groups: list[Group]) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for g in groups:
        g.name = _group_name(b, g)
        members = []
        node_names = []
        for s in sorted(g.spaces):
            key = b.keys[s]
            if key[0] == "p":
                m = key[1].rsplit(".", 1)[0]
                if m not in members:
                    members.append(m)
            elif key[0] == "n":
                node_names.append(key[1])
        g.members = tuple(members)
        for sp, idx in g.spaces.items():  # keep * (elements per unit in sp) must be a multiple of align_[sp]
            a = b.align_.get(sp, 1)
            g.align = math.lcm(g.align, a // math.gcd(a, idx.shape[1]))
        reasons = sorted({b.inexact_[s] for s in g.spaces if s in b.inexact_})
        g.exact = not reasons
        g.inexact_reasons = tuple(reasons[:3])
        if any(b.roles.get(s) == "heads" for s in g.spaces):
            g.kind = "heads"
        origin_mults = [g.spaces[s].shape[1] for s in g.spaces if s in b.origins and b.keys[s][0] != "v"]
        g.unit = int(min(origin_mults)) if origin_mults else 1
        g.bucket = _bucket_key(gm, nodes, node_names, g)


def _bucket_key(gm, nodes, node_names, g: Group) -> str:
    """WL hash of the group's node subgraph, labelled with op kind, width share and resolution."""
    sub = nx.DiGraph()
    names = set(node_names)
    for name in names:
        node = nodes[name]
        shape = shape_of(node) or ()
        if node.op == "call_module":
            kind = type(gm.get_submodule(node.target)).__name__
        elif node.op == "get_attr":
            kind = "param"
        else:
            kind = getattr(node.target, "__name__", str(node.target))
        spatial = "x".join(str(s) for s in shape[2:]) if len(shape) > 2 else ""
        sub.add_node(name, label=f"{kind}|{','.join(str(s) for s in shape[1:2])}|{spatial}")
    for name in names:
        for u in nodes[name].users:
            if u.name in names:
                sub.add_edge(name, u.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # networkx notes that directed hashes changed in 3.5
        h = nx.weisfeiler_lehman_graph_hash(sub, node_attr="label", iterations=3)
    return f"{g.kind}:{g.n}:{h[:12]}"


_ = (Iterable, node_module_path)
