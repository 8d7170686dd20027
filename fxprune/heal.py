"""The self-healing compile: a candidate that cannot be built, run or verified never ends a compile.

Building a pruned candidate (``PruneSession.materialize``) can fail in ways no analysis predicted:
an op rule rewrites a node inconsistently (the rewrite raises, or the pruned graph no longer runs
on the example inputs), the counted MACs differ from the cost model's estimate, the independent
count (``torch.utils.flop_counter`` on fake tensors) differs from fxprune's count, or the pruned
graph no longer runs at another batch size although the original does. Each failure is a missing
or wrong rule, to be fixed; meanwhile the compile heals:

1. :func:`build_candidate` builds and checks a candidate; a failure is a :class:`CandidateFailure`
   that names the stage and the fx node(s) (and parameters) where it happened.
2. :func:`culprit_groups` finds the pruned groups whose channels reach those nodes: a group
   reaches a node when one of its channel spaces is a dim of the node, of one of its inputs, or of
   a parameter of the node's module.
3. When the failure cannot be tied to a group, :func:`bisect_groups` finds one by bisection over
   the changed groups (build with the first k pruned; the smallest failing k names the culprit).
4. :meth:`Healer.freeze` records the groups (``session.healed``) with the failure as the reason;
   the problem is solved again with those groups kept whole, and the candidate rebuilt. A compile
   fails only when the failure persists with no pruned group left, with a
   :class:`~fxprune.errors.PostconditionError` that names the op.

Every group frozen this way is listed in ``report.healed`` and printed by the CLI.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.fx

from fxprune.errors import FxpruneError, PostconditionError

__all__ = ["HealedGroup", "CandidateFailure", "Candidate", "build_candidate", "culprit_groups", "bisect_groups", "Healer",
           "MAX_ROUNDS"]

logger = logging.getLogger(__name__)

#: at most this many heal rounds per compile (each freezes at least one group)
MAX_ROUNDS = 24


@dataclass(frozen=True)
class HealedGroup:
    """A group frozen by the self-healing compile, and why."""

    group: int
    name: str
    size: int
    stage: str  # "rewrite" | "run" | "mac-estimate" | "mac-measured" | "batch" | "onnx"
    node: str  # the failing node ("" when the group was found by bisection)
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f" at {self.node}" if self.node else ""
        return f"group {self.group} ({self.name}, {self.size}): {self.stage}{where}: {self.reason}"


class CandidateFailure(PostconditionError):
    """A pruned candidate failed to build, run or verify.

    Attributes:
        stage: "rewrite", "run", "mac-estimate", "mac-measured", "batch" or "onnx".
        nodes: fx node names where it failed (may be empty).
        params: parameter names involved (may be empty).
        groups: group ids directly named by the failure (may be empty).
    """

    def __init__(self, message: str, *, stage: str, nodes: tuple[str, ...] = (), params: tuple[str, ...] = (),
                 groups: tuple[int, ...] = ()):
        super().__init__(message)
        self.stage = stage
        self.nodes = tuple(nodes)
        self.params = tuple(params)
        self.groups = tuple(groups)


# ------------------------------------------------------------------------------ build and check

def _node_of(err: BaseException, gm: torch.fx.GraphModule) -> str | None:
    """The fx node an error names (``.node`` attribute, else ``failed_at`` text)."""
    for e in _chain(err):
        node = getattr(e, "node", None)
        if isinstance(node, str) and node:
            return node
        text = getattr(e, "failed_at", None)
        if isinstance(text, str):
            m = re.match(r"(node|module) '([^']+)'", text)
            if m:
                if m.group(1) == "node":
                    return m.group(2)
                for n in gm.graph.nodes:
                    if n.op == "call_module" and n.target == m.group(2):
                        return n.name
    return None


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _bigger_batch(inputs: tuple) -> tuple | None:
    out = []
    for t in inputs:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        out.append(torch.cat([t, t[:1]], 0))
    return tuple(out)


def _runs_at(gm: torch.fx.GraphModule, inputs: tuple) -> str | None:
    """None when ``gm`` runs on meta copies of ``inputs`` (or meta tensors cannot tell), else the
    failing node's name ("?" when unknown)."""
    from fxprune.cost_models.measured import meta_like, on_meta

    was = gm.training
    gm.eval()
    last: list[str] = []

    class _I(torch.fx.Interpreter):
        def run_node(self, n):
            last[:] = [n.name]
            return super().run_node(n)

    from fxprune.cost_models.measured import MacMeter

    try:
        with on_meta(gm), torch.no_grad(), MacMeter():  # the meter's fast meta kernels
            _I(gm).run(*(meta_like(t) for t in inputs))
        return None
    except Exception as err:
        text = f"{type(err).__name__}: {err}".lower()
        if isinstance(err, NotImplementedError) or "meta" in text or "data-dependent" in text or "item()" in text:
            return None  # meta tensors cannot decide: not a failure of the pruned model
        return last[0] if last else "?"
    finally:
        gm.train(was)


@dataclass
class Candidate:
    """A built, checked candidate: the pruned model, its MACs and their independent count."""

    gm: torch.fx.GraphModule
    macs: int
    measured: int | None = None  # torch.utils.flop_counter on fake tensors (None: not checked)


def build_candidate(session, keep: np.ndarray, criterion: str | None = None, *, estimate: int | None = None,
                    verify: bool = True) -> Candidate:
    """Build the pruned model for ``keep`` and check it; raise :class:`CandidateFailure` on failure.

    Checks (with ``verify``): counted MACs == ``estimate`` (the cost model), counted MACs == the
    independent measured count, node by node; the pruned graph runs at another batch size where
    the original does; with ``verify="onnx"`` also ONNX export and ONNX Runtime parity (a failure
    there names no node: it is bisected).
    """
    from fxprune.cost_models.mac import MacCostModel
    from fxprune.cost_models.measured import measure_graph

    gm0 = session.gm
    try:
        pruned, macs = session.materialize(keep, criterion)
    except FxpruneError as err:
        node = _node_of(err, gm0)
        stage = "run" if "no longer runs" in str(err) else "rewrite"
        params = tuple(p for e in _chain(err) for p in getattr(e, "params", ()) or ())
        groups = tuple(g for e in _chain(err) for g in getattr(e, "groups", ()) or ())
        raise CandidateFailure(str(err), stage=stage, nodes=(node,) if node else (), params=params,
                               groups=groups) from err
    if not verify:
        return Candidate(pruned, macs)
    count = MacCostModel().count(pruned, warn=False)
    if estimate is not None and macs != estimate:
        est = session.node_estimates(keep)
        bad = tuple(n for n in sorted(set(est) | set(count.per_node)) if est.get(n, 0) != count.per_node.get(n, 0))
        raise CandidateFailure(
            f"the rewritten model has {macs:,} MACs but the cost model predicted {estimate:,} (nodes "
            f"{', '.join(bad[:5]) or '?'})", stage="mac-estimate", nodes=bad)
    cal = getattr(session, "calibration", None)
    unverified = set(cal.unverified) if cal is not None else set()
    meas = measure_graph(pruned, session.captured.inputs)
    if meas.ok:
        bad = tuple(n.name for n in pruned.graph.nodes
                    if n.name not in unverified and n.name not in meas.unmeasured
                    and meas.per_node.get(n.name, 0) != count.per_node.get(n.name, 0))
        if bad:
            first = bad[0]
            raise CandidateFailure(
                f"the pruned model's MACs at node '{first}' are {count.per_node.get(first, 0):,} by fxprune's "
                f"rules but {meas.per_node.get(first, 0):,} measured (torch.utils.flop_counter)",
                stage="mac-measured", nodes=bad)
    if verify == "onnx":
        _check_onnx(pruned, session.captured.inputs)
    big = _bigger_batch(session.captured.inputs)
    if big is not None:
        where = _runs_at(pruned, big)
        if where is not None and _runs_at(gm0, big) is None:
            raise CandidateFailure(f"the pruned model no longer runs at batch size {big[0].shape[0]} (node "
                                   f"'{where}') although the original does", stage="batch",
                                   nodes=(where,) if where != "?" else ())
    return Candidate(pruned, macs, meas.total if meas.ok else None)


def _check_onnx(gm: torch.fx.GraphModule, inputs: tuple) -> None:
    """Export to ONNX and compare with ONNX Runtime at batch sizes 1 and 2 (the ``verify="onnx"`` check)."""
    from fxprune.export import export_onnx, onnx_parity

    try:
        proto = export_onnx(gm, inputs)
        par = onnx_parity(gm, inputs, proto, batch_sizes=(1, 2))
    except FxpruneError as err:
        raise CandidateFailure(f"the pruned model does not export to ONNX: {err}", stage="onnx") from err
    if not par.ok:
        raise CandidateFailure(f"ONNX Runtime differs from the pruned model: {par.summary()}", stage="onnx")


# ------------------------------------------------------------------------------ culprits

def culprit_groups(session, failure: CandidateFailure, keep: np.ndarray) -> list[int]:
    """Pruned groups (``keep < n``) whose channels reach the failing nodes or parameters."""
    graph = session.graph
    gm = session.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    names: set[str] = set()
    modules: set[str] = set()
    for name in failure.nodes:
        n = nodes.get(name)
        if n is None:
            continue
        names.add(n.name)
        names.update(a.name for a in n.all_input_nodes)
        names.update(t.name for t in _shape_reads(n))
        if n.op == "call_module":
            modules.add(str(n.target))
        names.update(a.name for a in n.all_input_nodes if a.op == "get_attr")
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                modules.add(str(a.target).rsplit(".", 1)[0])
    params = set(failure.params)
    out = set(int(g) for g in failure.groups)
    for g in graph.groups:
        if keep[g.id] >= g.n:
            continue
        for s in g.spaces:
            key = graph.keys[s]
            if key[0] in ("n", "v") and key[1] in names:
                out.add(g.id)
                break
            if key[0] == "p" and (key[1] in params or key[1].rsplit(".", 1)[0] in modules):
                out.add(g.id)
                break
    return sorted(g for g in out if keep[g] < graph.groups[g].n)


def _shape_reads(node: torch.fx.Node, limit: int = 64) -> list[torch.fx.Node]:
    """Tensors whose shapes ``node``'s non-tensor arguments are computed from (``x.shape[-1] // 4``)."""
    from fxprune.ir import TensorInfo, tensor_info

    out, seen = [], set()
    stack = [a for a in node.all_input_nodes if not isinstance(tensor_info(a), TensorInfo)]
    while stack and len(seen) < limit:
        a = stack.pop()
        if a in seen:
            continue
        seen.add(a)
        for b in a.all_input_nodes:
            if isinstance(tensor_info(b), TensorInfo):
                out.append(b)
            else:
                stack.append(b)
    return out


def bisect_groups(fails: Callable[[np.ndarray], bool], keep: np.ndarray, full: np.ndarray) -> int | None:
    """One group whose pruning makes ``fails`` true, by bisection over the changed groups.

    Pruning the first k changed groups (in group order) passes for k = lo and fails for k = hi;
    the smallest failing k names the culprit (``changed[k - 1]``). None when even the full plan
    passes or the failure does not depend on pruning (nothing pruned fails too).
    """
    changed = [int(g) for g in np.flatnonzero(keep < full)]
    if not changed:
        return None

    def plan(k: int) -> np.ndarray:
        p = full.copy()
        idx = changed[:k]
        p[idx] = keep[idx]
        return p

    lo, hi = 0, len(changed)
    if fails(plan(0)):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fails(plan(mid)):
            hi = mid
        else:
            lo = mid
    return changed[hi - 1]


# ------------------------------------------------------------------------------ the healer

@dataclass
class Healer:
    """Builds candidates for one session, freezing the groups that break them.

    ``session.healed`` (group id -> :class:`HealedGroup`) grows as groups are frozen; the compile
    solves its problem with those groups kept whole.
    """

    session: Any
    verify: bool = True
    rounds: int = 0
    max_rounds: int = MAX_ROUNDS
    probes: int = 0
    log: list[str] = field(default_factory=list)

    @property
    def full(self) -> np.ndarray:
        return np.array([g.n for g in self.session.graph.groups], dtype=np.int64)

    def clamp(self, keep: np.ndarray) -> np.ndarray:
        """``keep`` with every healed group at its full size."""
        keep = np.asarray(keep, dtype=np.int64).copy()
        for gid in self.session.healed:
            keep[gid] = self.session.graph.groups[gid].n
        return keep

    def _fails(self, criterion):
        def fails(plan: np.ndarray) -> bool:
            self.probes += 1
            try:
                est = int(self.session.cost(plan[None, :])[0])
                build_candidate(self.session, plan, criterion, estimate=est, verify=self.verify)
                return False
            except CandidateFailure:
                return True
        return fails

    def freeze(self, failure: CandidateFailure, keep: np.ndarray, criterion: str | None = None) -> list[int]:
        """Freeze the groups behind ``failure`` (targeted, else bisection); raise when none is left."""
        self.rounds += 1
        keep = np.asarray(keep, dtype=np.int64)
        gids = culprit_groups(self.session, failure, keep)
        node = failure.nodes[0] if failure.nodes else ""
        if not gids:
            g = bisect_groups(self._fails(criterion), keep, self.full)
            gids = [g] if g is not None else []
            node = ""
        if not gids:
            raise PostconditionError(
                f"the pruned model fails ({failure.stage}: {failure}) and no pruned group can be tied to the "
                f"failure{f' at node {failure.nodes[0]!r}' if failure.nodes else ''}: nothing prunable is left to "
                "freeze. This is a bug in fxprune (please report it with the model); meanwhile pass ignore=[...] "
                "with the module(s) around the failing op.")
        if self.rounds > self.max_rounds:
            raise PostconditionError(
                f"the pruned model still fails after {self.max_rounds} self-healing rounds ({failure.stage}: "
                f"{failure}). This is a bug in fxprune (please report it with the model); meanwhile pass "
                "ignore=[...] with the module(s) around the failing op.")
        reason = _first_line(failure).split(": ", 1)[-1][:240]
        for gid in gids:
            g = self.session.graph.groups[gid]
            h = HealedGroup(gid, g.name, g.n, failure.stage, node, reason)
            self.session.healed[gid] = h
            self.log.append(str(h))
            logger.warning("self-healing compile: froze %s", h)
        return gids

    def build(self, keep: np.ndarray, criterion: str | None = None) -> tuple[Candidate, np.ndarray]:
        """Build ``keep`` (healed groups kept whole); on failure freeze culprits and rebuild the same plan
        with them kept whole (no re-solve: for scoring candidates during a search)."""
        keep = self.clamp(keep)
        while True:
            est = int(self.session.cost(keep[None, :])[0]) if self.verify else None
            try:
                return build_candidate(self.session, keep, criterion, estimate=est, verify=self.verify), keep
            except CandidateFailure as failure:
                self.freeze(failure, keep, criterion)
                keep = self.clamp(keep)
