"""The analytical MAC cost model.

Every op's MACs are written as terms ``coef * prod(size(node, dim))`` (see ``fxprune.opset``).
Counting a real graph evaluates the terms with the recorded shapes. Estimating a hypothetical
pruning plan substitutes each size by a linear form of the groups' keep counts
(``size = fixed + sum_g mult[g] * keep[g]``, from the dependency analysis), so the MACs of any
plan are a sum of products of linear forms. :class:`PlanCost` compiles that into a sparse matrix
and evaluates thousands of candidate plans per call with numpy.

Unit: one MAC is one multiply-accumulate. FLOPs = 2 x MACs. Bias additions, norms,
activations, pooling and elementwise ops are not MACs.

No MAC goes uncounted: :func:`calibrate` compares every node's analytical MACs with the
independent measurement of ``cost_models.measured`` (``torch.utils.flop_counter`` formulas on fake
tensors). A node without a rule (an opaque leaf module, an op fxprune does not know) or whose rule
disagrees is counted at its measured MACs as a fixed cost, and the dependency analysis freezes its
channels (with the reason), so the fixed cost stays true for every plan. What neither side can
count makes the count inexact, and says so.
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

from fxprune.ir import MeasuredMacs, TensorInfo, measured_macs, node_module_path, set_measured_macs, shape_of, tensor_info
from fxprune.opset import op_label, rule_for
from fxprune.opset._base import norm_dim

__all__ = ["MacTerm", "MacCount", "MacCostModel", "MacCountAnalysis", "PlanCost", "SpaceForm", "MacCalibration",
           "calibrate", "calibration_of", "META_CALIBRATION"]

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
    measured: dict[str, int] = field(default_factory=dict)  # nodes counted at their measured MACs
    exact: bool = True

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
            fixed = measured_macs(node)
            if fixed is not None:  # calibrated: the measured MACs replace a missing or wrong rule
                if fixed.macs:
                    c.terms.append(MacTerm(node.name, float(fixed.macs), ()))
                continue
            if not rule.known():
                if _may_have_macs(node, gm):
                    uncounted.append(op_label(node, gm))
                continue
            rule.macs(node, c)
        return c.terms, uncounted

    def count(self, gm: torch.fx.GraphModule, *, warn: bool = True) -> MacCount:
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
        cal = calibration_of(gm)
        measured = {n.name: m.macs for n in gm.graph.nodes if (m := measured_macs(n)) is not None}
        if cal is not None:
            uncounted, exact = list(cal.uncounted), cal.exact
        else:
            exact = not uncounted
            for u in uncounted if warn else ():
                logger.warning("MACs of %s are not counted (no cost rule)", u)
        return MacCount(total, dict(per_node_int), dict(per_module), terms, uncounted, measured, exact)


@dataclass(frozen=True)
class MacCountAnalysis:
    """The MAC count of a shape-annotated graph as a cached analysis (``am.get(MacCountAnalysis())``)."""

    def run(self, gm: torch.fx.GraphModule, am: Any = None) -> MacCount:
        return MacCostModel().count(gm)


META_CALIBRATION = "fxprune.mac_calibration"


@dataclass(frozen=True)
class MacCalibration:
    """How the analytical count of a graph compares with the measured one (see :func:`calibrate`).

    Attributes:
        exact: every MAC of the graph is counted (by a rule or by measurement).
        measured_total: the independent count of the graph.
        measured: node -> MACs used instead of a missing or disagreeing rule (channels frozen).
        unverified: nodes whose rule is trusted although the counter cannot see their op.
        uncounted: ops that multiply-accumulate that neither a rule nor the counter can count.
        failed: why the graph could not be measured ("" when it was).
    """

    exact: bool
    measured_total: int
    measured: tuple[tuple[str, int, str], ...] = ()
    unverified: tuple[str, ...] = ()
    uncounted: tuple[str, ...] = ()
    failed: str = ""

    def notes(self) -> list[str]:
        out = []
        if self.measured:
            shown = ", ".join(f"{n} ({m:,})" for n, m, _ in self.measured[:4])
            more = f" and {len(self.measured) - 4} more" if len(self.measured) > 4 else ""
            out.append(f"MACs of {len(self.measured)} node(s) measured (no exact rule; their channels are kept): "
                       f"{shown}{more}")
        if self.uncounted:
            out.append("MACs NOT counted (no rule, no FLOP formula): " + "; ".join(self.uncounted[:4]))
        if self.failed:
            out.append(f"the MAC count could not be checked by measurement ({self.failed})")
        return out


def calibration_of(gm: torch.fx.GraphModule) -> MacCalibration | None:
    return getattr(gm, "meta", {}).get(META_CALIBRATION)


def calibrate(gm: torch.fx.GraphModule, inputs: tuple) -> MacCalibration:
    """Reconcile the analytical count of a shape-annotated ``gm`` with the measured one, node by node.

    A node whose rule is missing or disagrees with the measurement is marked
    (``fxprune.measured_macs``) to be counted at its measured MACs; the dependency analysis freezes
    such nodes. The result is stored on ``gm.meta`` (deep copies keep it) and returned.
    """
    from fxprune.cost_models.measured import measure_graph

    for n in gm.graph.nodes:
        set_measured_macs(n, None)
    gm.meta.pop(META_CALIBRATION, None)
    analytic = MacCostModel().count(gm, warn=False)
    meas = measure_graph(gm, inputs)
    if not meas.ok:
        cal = MacCalibration(False, 0, uncounted=tuple(analytic.uncounted), failed=meas.failed)
        gm.meta[META_CALIBRATION] = cal
        return cal
    measured, unverified, uncounted = [], [], []
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "call_function", "call_method"):
            continue
        a = analytic.per_node.get(n.name, 0)
        m = meas.per_node.get(n.name, 0)
        ops = meas.unmeasured.get(n.name)
        rule = rule_for(n, gm)
        if ops:
            if rule.known() and a > 0:
                unverified.append(n.name)
            else:
                uncounted.append(f"{op_label(n, gm)} runs {', '.join(ops)}")
            continue
        if a != m:
            reason = (f"no MAC rule for {op_label(n, gm)}" if not rule.known()
                      else f"the {rule.name} rule counts {a:,} MACs at {op_label(n, gm)}, measured {m:,}")
            set_measured_macs(n, MeasuredMacs(int(m), reason))
            measured.append((n.name, int(m), reason))
            logger.info("MACs of %s measured: %s", n.name, reason)
    for u in uncounted:
        logger.warning("MACs of %s are not counted", u)
    cal = MacCalibration(not uncounted, meas.total, tuple(measured), tuple(unverified), tuple(uncounted))
    gm.meta[META_CALIBRATION] = cal
    return cal


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
