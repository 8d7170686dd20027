"""The analytical MAC cost model.

Every op's MACs are written as terms ``coef * prod(size(node, dim))`` (see ``fxprune.opset``).
Counting a real graph evaluates the terms with the recorded shapes. Estimating a hypothetical
pruning plan substitutes each size by a linear form of the groups' keep counts
(``size = fixed + sum_g mult[g] * keep[g]``, from the dependency analysis), so the MACs of any
plan are a sum of products of linear forms. :class:`PlanCost` compiles that into a sparse matrix
and evaluates thousands of candidate plans per call with numpy.

Unit: one MAC is one multiply-accumulate. FLOPs = 2 x MACs. Bias additions, norms,
activations, pooling and elementwise ops are not MACs.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import scipy.sparse as sp
import torch
import torch.fx

from fxprune.ir import TensorInfo, node_module_path, shape_of, tensor_info
from fxprune.opset import op_label, rule_for
from fxprune.opset._base import norm_dim

__all__ = ["MacTerm", "MacCount", "MacCostModel", "MacCountAnalysis", "PlanCost", "SpaceForm"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MacTerm:
    """``coef * prod(size(space) for space in spaces)`` MACs, produced by node ``node``."""

    node: str
    coef: float
    spaces: tuple[tuple[str, int], ...]


@dataclass
class MacCount:
    """MACs of a graph with per-node and per-module breakdowns."""

    total: int
    per_node: dict[str, int]
    per_module: dict[str, int]
    terms: list[MacTerm] = field(repr=False, default_factory=list)
    uncounted: list[str] = field(default_factory=list)

    def top_modules(self, n: int = 20) -> list[tuple[str, int]]:
        return sorted(self.per_module.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


# Opaque leaf modules that certainly do real work; unknown ones are reported as uncounted.
_NO_MAC_PREFIXES = ("Dropout", "Identity", "ReLU", "GELU", "SiLU", "Sigmoid", "Tanh", "Hard", "Soft", "Pool",
                    "Norm", "Flatten", "Unflatten", "Upsample", "ELU", "Mish", "Threshold", "Shrink")


class _Collector:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.terms: list[MacTerm] = []
        self.current: torch.fx.Node | None = None

    def module(self, node):
        return self.gm.get_submodule(node.target)

    def term(self, coef: float, spaces: Iterable[tuple[torch.fx.Node, int]]):
        keys = []
        for n, d in spaces:
            s = shape_of(n)
            keys.append((n.name, norm_dim(d, len(s))))
        self.terms.append(MacTerm(self.current.name, float(coef), tuple(keys)))


class MacCostModel:
    """Collects MAC terms from a shape-annotated graph (``ShapePropPass`` must have run)."""

    def terms(self, gm: torch.fx.GraphModule) -> tuple[list[MacTerm], list[str]]:
        c = _Collector(gm)
        uncounted = []
        for node in gm.graph.nodes:
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            rule = rule_for(node, gm)
            c.current = node
            if not rule.known():
                if _may_have_macs(node, gm):
                    uncounted.append(op_label(node, gm))
                continue
            rule.macs(node, c)
        return c.terms, uncounted

    def count(self, gm: torch.fx.GraphModule) -> MacCount:
        terms, uncounted = self.terms(gm)
        sizes = _shape_lookup(gm)
        per_node: dict[str, float] = defaultdict(float)
        for t in terms:
            per_node[t.node] += t.coef * math.prod(sizes[k] for k in t.spaces)
        per_node_int = {k: int(round(v)) for k, v in per_node.items()}
        per_module: dict[str, int] = defaultdict(int)
        nodes = {n.name: n for n in gm.graph.nodes}
        for name, v in per_node_int.items():
            per_module[node_module_path(nodes[name]) or name] += v
        total = int(round(sum(per_node.values())))
        for u in uncounted:
            logger.warning("MACs of %s are not counted (no cost rule)", u)
        return MacCount(total, dict(per_node_int), dict(per_module), terms, uncounted)


@dataclass(frozen=True)
class MacCountAnalysis:
    """The MAC count of a shape-annotated graph as a cached analysis (``am.get(MacCountAnalysis())``)."""

    def run(self, gm: torch.fx.GraphModule, am: Any = None) -> MacCount:
        return MacCostModel().count(gm)


def _shape_lookup(gm: torch.fx.GraphModule) -> dict[tuple[str, int], int]:
    out = {}
    for n in gm.graph.nodes:
        info = tensor_info(n)
        if isinstance(info, TensorInfo):
            for d, s in enumerate(info.shape):
                out[(n.name, d)] = s
    return out


def _may_have_macs(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    if node.op == "call_module":
        name = type(gm.get_submodule(node.target)).__name__
        return not any(p in name for p in _NO_MAC_PREFIXES) and any(
            True for _ in gm.get_submodule(node.target).parameters()
        )
    return False


# --------------------------------------------------------------------------- plan evaluation

@dataclass(frozen=True)
class SpaceForm:
    """``size = fixed + sum(mult[g] * keep[g])`` for one channel space."""

    fixed: int
    mult: Mapping[int, int]


class PlanCost:
    """MACs of candidate plans: ``cost(K)`` for a keep matrix ``K`` of shape [n, G] -> int64 [n].

    Built once from the MAC terms and the space forms of the dependency analysis; every
    evaluation is one sparse matrix product plus a gather and a product over at most a few
    factors per term.
    """

    def __init__(self, terms: list[MacTerm], forms: Mapping[tuple[str, int], SpaceForm],
                 sizes: Mapping[tuple[str, int], int], n_groups: int):
        self.n_groups = n_groups
        factor_rows: dict[tuple[str, int], int] = {}
        rows, cols, vals, f0 = [], [], [], []
        const_total = 0.0
        term_coef, term_factors = [], []
        for t in terms:
            coef = t.coef
            idx = []
            for key in t.spaces:
                form = forms.get(key)
                if form is None or not form.mult:
                    coef *= sizes[key] if form is None else form.fixed
                    continue
                if key not in factor_rows:
                    factor_rows[key] = len(f0)
                    f0.append(float(form.fixed))
                    for g, m in form.mult.items():
                        rows.append(factor_rows[key])
                        cols.append(g)
                        vals.append(float(m))
                idx.append(factor_rows[key])
            if not idx:
                const_total += coef
            else:
                term_coef.append(coef)
                term_factors.append(idx)
        n_f = len(f0)
        self.F = sp.csr_matrix((vals, (rows, cols)), shape=(n_f, n_groups)) if n_f else sp.csr_matrix((0, n_groups))
        self.f0 = np.asarray(f0, dtype=np.float64)
        self.const = const_total
        width = max((len(f) for f in term_factors), default=1)
        ones = n_f  # index of a column of ones appended to the factor values
        self.factor_idx = np.full((len(term_factors), width), ones, dtype=np.int64)
        for i, f in enumerate(term_factors):
            self.factor_idx[i, : len(f)] = f
        self.coef = np.asarray(term_coef, dtype=np.float64)

    def __call__(self, keep: np.ndarray) -> np.ndarray:
        k = np.atleast_2d(np.asarray(keep, dtype=np.float64))
        if not len(self.coef):
            return np.full(k.shape[0], int(round(self.const)), dtype=np.int64)
        y = (self.F @ k.T).T + self.f0  # [n, n_f]
        y = np.concatenate([y, np.ones((y.shape[0], 1))], axis=1)
        prod = y[:, self.factor_idx].prod(axis=2)  # [n, T]
        total = prod @ self.coef + self.const
        return np.rint(total).astype(np.int64)

    def gradient(self, keep: np.ndarray) -> np.ndarray:
        """d MACs / d keep[g] at ``keep`` (product rule), shape [G]."""
        k = np.asarray(keep, dtype=np.float64)
        y = self.F @ k + self.f0
        y = np.append(y, 1.0)
        vals = y[self.factor_idx]  # [T, w]
        grad = np.zeros(self.n_groups)
        for j in range(self.factor_idx.shape[1]):
            others = np.prod(np.delete(vals, j, axis=1), axis=1) * self.coef  # [T]
            col = self.factor_idx[:, j]
            valid = col < len(self.f0)
            if not valid.any():
                continue
            w = sp.csr_matrix((others[valid], (np.zeros(valid.sum(), dtype=np.int64), col[valid])),
                              shape=(1, len(self.f0) + 1))[:, : len(self.f0)]
            grad += np.asarray((w @ self.F).todense()).ravel()
        return grad


_ = (Any, torch)
