"""``fxprune.compile``: the default pipeline, top to bottom.

    capture -> shape-prop -> dependency groups -> MAC terms -> importance -> problem
            -> policy -> budget solver -> prune channels -> shape-prop -> verify -> report

Each step is a named pass or analysis; the policy only sees a serialisable ``PruningProblem``.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import math
import numbers
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from fxprune import progress
from fxprune.budget import format_macs, parse_mac_budget
from fxprune.capture import Captured, capture, share_tensors
from fxprune.cost_models.mac import MacCalibration, MacCountAnalysis, MacTerm, PlanCost, calibrate
from fxprune.errors import (BandUnreachableError, BudgetUnreachableError, ConfigError, FxpruneError,
                            InvalidBudgetError, PolicyError, PostconditionError, PreconditionError)
from fxprune.passes._infra import AnalysisManager, PassManager, TimingInstrument
from fxprune.passes.dependency_groups import DependencyGraph, DependencyGroupsAnalysis, Group
from fxprune._memory import release_free_memory
from fxprune._plan import WEIGHTLESS_CRITERION, check_weightless, planned_params
from fxprune.passes.fuse_projections import FuseProjectionsPass
from fxprune.passes.own_tensors import OwnTensorsPass, storage_ids
from fxprune.passes.prune_channels import PruneChannelsPass
from fxprune.passes.shape_prop import ShapePropPass, has_meta_tensors
from fxprune.policies.base import GroupSpec, PruningPlan, PruningProblem, SearchContext
from fxprune.policies.solver import Projection, allowed_keeps, project
from fxprune.report import FrozenInfo, GroupDecision, Report, environment

__all__ = ["compile", "compile_at_budget", "CompileResult", "PruneSession", "get_policy", "POLICIES"]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ policies

def _policies() -> dict[str, Callable[..., Any]]:
    from fxprune.policies.heuristic import GlobalPolicy, IsomorphicPolicy, UniformPolicy

    table: dict[str, Callable[..., Any]] = {"uniform": UniformPolicy, "global": GlobalPolicy,
                                            "isomorphic": IsomorphicPolicy}
    try:
        from fxprune.policies.agentic.master import AgenticPolicy

        table["agentic"] = AgenticPolicy
    except ImportError:  # pragma: no cover - during development
        pass
    try:
        from fxprune.policies.rl import RLPolicy

        table["rl"] = RLPolicy
    except ImportError:  # pragma: no cover
        pass
    return table


POLICIES = ("uniform", "global", "isomorphic", "agentic", "rl")


def get_policy(policy: Any, options: dict[str, Any] | None = None):
    """A policy object from a name ("global", ...) or an object with ``select``."""
    if hasattr(policy, "select"):
        return policy
    table = _policies()
    if not isinstance(policy, str) or policy not in table:
        raise PolicyError(f"unknown policy {policy!r}; choose one of {sorted(table)} or pass an object with "
                          "a select(problem, ctx) method")
    cls = table[policy]
    try:
        return cls(**(options or {}).get("init", {}))
    except TypeError as err:
        raise PolicyError(f"policy {policy!r}: bad options: {err}") from err


# ------------------------------------------------------------------------------------ session

def _params(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def choose_units(group: Group, scores: np.ndarray | None, keep: int) -> np.ndarray:
    """The ``keep`` most important units (uniform across conv-group blocks), sorted."""
    if keep >= group.n:
        return np.arange(group.n)
    s = np.asarray(scores if scores is not None else np.zeros(group.n), dtype=np.float64)
    if group.block_count > 1:
        per = keep // group.block_count
        out = []
        for b in range(group.block_count):
            members = np.flatnonzero(group.block_of == b)
            order = members[np.lexsort((members, -s[members]))]
            out.append(order[:per])
        return np.sort(np.concatenate(out))
    order = np.lexsort((np.arange(group.n), -s))
    return np.sort(order[:keep])


@dataclass
class PruneSession:
    """A captured model with its analyses; builds pruned candidates for any keep vector."""

    captured: Captured
    graph: DependencyGraph
    terms: list[MacTerm]
    base_macs: int
    cost: PlanCost
    scores: dict[int, np.ndarray]
    criterion: str
    timings: dict[str, float] = field(default_factory=dict)
    data: Any = None
    loss_fn: Any = None
    seed: int = 0
    _score_cache: dict[str, dict[int, np.ndarray]] = field(default_factory=dict, repr=False)
    _shared: frozenset | None = field(default=None, repr=False)  # storages the user's model owns
    last_passes: list[dict[str, Any]] = field(default_factory=list, repr=False)
    layout: Any = None  # fxprune.hf.Layout: tied / whole groups (layer_uniform)
    hf_source: Any = None  # fxprune.hf.HFSource of a Hugging Face model fxprune can rebuild
    layout_by_default: bool = False  # the layout came from layer_uniform=None (not asked for)
    _deployed: torch.fx.GraphModule | None = field(default=None, repr=False)
    calibration: MacCalibration | None = None
    healed: dict[int, Any] = field(default_factory=dict)  # group id -> fxprune.heal.HealedGroup

    def node_estimates(self, keep: np.ndarray) -> dict[str, int]:
        """The cost model's MACs per node for ``keep`` (to find where a count and an estimate part)."""
        forms = self.graph.forms()
        sizes = _space_sizes(self.gm)
        k = np.asarray(keep, dtype=np.int64)
        out: dict[str, float] = {}
        for t in self.terms:
            v = t.coef
            for key in t.spaces:
                f = forms.get(key)
                v *= sizes[key] if f is None else f.fixed + sum(m * int(k[g]) for g, m in f.mult.items())
            out[t.node] = out.get(t.node, 0.0) + v
        return {n: int(round(v)) for n, v in out.items() if round(v)}

    @property
    def gm(self) -> torch.fx.GraphModule:
        return self.captured.gm

    def scores_for(self, criterion: str | None) -> dict[int, np.ndarray]:
        """Per-unit importance under ``criterion`` (computed once per criterion)."""
        if not criterion or criterion == self.criterion:
            return self.scores
        if criterion not in self._score_cache:
            data = self.data if self.data is not None else _example_data(self.captured)
            self._score_cache[criterion] = _importance(self.gm, self.graph, criterion, data, self.loss_fn, self.seed)
        return self._score_cache[criterion]

    def units(self, keep: np.ndarray, criterion: str | None = None) -> dict[int, np.ndarray]:
        scores = self.scores_for(criterion)
        return {g.id: choose_units(g, scores.get(g.id), int(k))
                for g, k in zip(self.graph.groups, keep) if int(k) < g.n}

    def materialize(self, keep: np.ndarray, criterion: str | None = None) -> tuple[torch.fx.GraphModule, int]:
        """Build the pruned model for ``keep``; the session's graph and tensors are untouched.

        One copy of the weights: the module structure is copied with the capture's tensors shared,
        the rewrite replaces pruned tensors by ``index_select`` results, and only what it left
        shared with the user's model is cloned (``OwnTensorsPass``): the result owns its memory
        and nothing is copied twice. Shapes and MACs come from fake tensors (no forward pass).
        """
        state = list(self.gm.parameters()) + list(self.gm.buffers())
        if self._shared is None:
            self._shared = storage_ids(state)
        gm = copy.deepcopy(self.gm, share_tensors(state))
        units = self.units(keep, criterion)
        timing = TimingInstrument()
        am = AnalysisManager(gm)
        passes = (([PruneChannelsPass(self.graph, units)] if units else [])
                  + [FuseProjectionsPass(), OwnTensorsPass(self._shared), ShapePropPass(self.captured.inputs)])
        try:
            PassManager(passes, instruments=[timing]).run(gm, am)
        except PreconditionError as err:
            if not units:
                raise
            # the inputs ran through the original graph already: what fails now is the rewrite
            raise PostconditionError(
                f"the pruned model no longer runs, at {getattr(err, 'failed_at', err)}. An op "
                "was rewritten inconsistently with the channels removed around it. This is a bug in "
                "fxprune: please report it with the model, and meanwhile pass ignore=[...] with the "
                "module(s) around the failing node to leave them unpruned."
            ) from err
        macs = am.get(MacCountAnalysis()).total
        self.last_passes = timing.records
        gm.eval()
        return gm, macs

    def owned_original(self) -> torch.fx.GraphModule:
        """The unpruned model as a result's ``model``: projections re-fused like
        :meth:`deployed_original`, but owning every tensor (nothing shared with the user's model)."""
        return self.materialize(np.array([g.n for g in self.graph.groups], dtype=np.int64))[0]

    def deployed_original(self) -> torch.fx.GraphModule:
        """The captured model with split projections re-fused (``FuseProjectionsPass``), so it runs as
        fast as the user's model: ``result.original`` and the latency baseline. A copy of the module
        structure on the capture's tensors (no copy of the weights: read-only, like the capture;
        the fused q/k/v of an ``nn.MultiheadAttention`` is a view of its ``in_proj_weight``). Built once."""
        if self._deployed is None:
            gm = copy.deepcopy(self.gm, share_tensors(list(self.gm.parameters()) + list(self.gm.buffers())))
            PassManager([FuseProjectionsPass(), ShapePropPass(self.captured.inputs)]).run(gm, AnalysisManager(gm))
            gm.eval()
            self._deployed = gm
        return self._deployed


def open_session(model: nn.Module, example_inputs: Any, *, ignore: Any = None, importance: str = "l1",
                 calibration_data: Any = None, loss_fn: Any = None, capture_method: str = "auto",
                 leaf_modules: Sequence[type] = (), seed: int = 0, layer_uniform: bool | None = None,
                 dynamic: bool = True, grouped_convs: str = "within") -> PruneSession:
    t0 = time.perf_counter()
    # the capture shares the user's tensors (read-only): materialize() copies only what it prunes
    with progress.stage("capture"):
        cap = capture(model, example_inputs, method=capture_method, leaf_modules=leaf_modules, share_weights=True,
                      dynamic=dynamic)
    t1 = time.perf_counter()
    am = AnalysisManager(cap.gm)
    prop = ShapePropPass(cap.inputs)(cap.gm, am)
    if prop.info.get("note"):
        cap.notes.append(prop.info["note"])
    cal = calibrate(cap.gm, cap.inputs)  # measured MACs where a rule is missing or wrong (channels frozen)
    t2 = time.perf_counter()
    ignore_names, ignore_fn = _ignore_spec(ignore, cap.gm, model)
    with progress.stage("dependency groups and MACs"):
        graph = am.get(DependencyGroupsAnalysis(ignore=ignore_names, ignore_fn=ignore_fn, grouped_convs=grouped_convs))
        count = am.get(MacCountAnalysis())
    release_free_memory()  # the analysis' temporaries, before the pruned weights are allocated
    terms = count.terms
    t3 = time.perf_counter()
    sizes = _space_sizes(cap.gm)
    cost = PlanCost(terms, graph.forms(), sizes, len(graph.groups))
    base = count.total
    if graph.groups and int(cost(np.array([g.n for g in graph.groups], dtype=np.int64))[0]) != base:
        raise PostconditionError("the plan cost model disagrees with the MAC count of the unpruned graph; "
                                 "this is a bug in fxprune (please report it with the model)")
    scores = _importance(cap.gm, graph, importance,
                         calibration_data if calibration_data is not None else _example_data(cap), loss_fn, seed)
    release_free_memory()
    t4 = time.perf_counter()
    timings = {"capture": t1 - t0, "shape_prop": t2 - t1, "analysis": t3 - t2, "importance": t4 - t3}
    session = PruneSession(cap, graph, terms, base, cost, scores, importance, timings, calibration_data, loss_fn, seed,
                           calibration=cal)
    _set_layout(session, model, layer_uniform)
    return session


def _space_sizes(gm: torch.fx.GraphModule) -> dict[tuple[str, int], int]:
    sizes = {}
    for n in gm.graph.nodes:
        info = n.meta.get("fxprune.shape")
        if hasattr(info, "shape"):
            for d, s in enumerate(info.shape):
                sizes[(n.name, d)] = s
    return sizes


def _set_layout(session: PruneSession, model: nn.Module, layer_uniform: bool | None) -> None:
    """Ties of per-layer groups (on by default for Hugging Face models fxprune can rebuild)."""
    from fxprune.hf import Layout, layout_for, source_of
    from fxprune.tying import layer_ties

    cap = session.captured
    session.hf_source = source_of(model, cap.args, cap.kwargs)
    if layer_uniform is None:
        layer_uniform = session.layout_by_default = session.hf_source is not None
    if not layer_uniform:
        return
    if session.hf_source is not None:
        session.layout = layout_for(session.hf_source, session.graph.groups, session.graph.keys)
    else:
        ties = layer_ties(session.graph.groups)
        session.layout = Layout(ties, {}, [f"layer_uniform: {sum(len(t.members) for t in ties)} groups decided as "
                                           f"{len(ties)} (the same keep count in every layer)"] if ties else [])


def _example_data(cap: Captured) -> list:
    """The example inputs as one unlabelled calibration batch (keyword inputs keep their names, so
    an ``attention_mask`` is recognised as such)."""
    if cap.kwargs and not cap.args:
        return [dict(cap.kwargs)]
    if len(cap.inputs) == 1:
        return [cap.inputs[0]]
    return [(tuple(cap.inputs), None)]


def _ignore_spec(ignore: Any, gm: torch.fx.GraphModule,
                 model: nn.Module | None = None) -> tuple[tuple[str, ...], Callable[[str], bool] | None]:
    if ignore is None:
        return (), None
    if callable(ignore):
        def fn(path: str) -> bool:
            try:
                mod = gm.get_submodule(path)
            except AttributeError:
                mod = None
            try:
                return bool(ignore(path, mod))
            except TypeError:
                return bool(ignore(path))
        return (), fn
    if isinstance(ignore, str):
        ignore = [ignore]
    if not isinstance(ignore, Iterable):
        raise ConfigError(f"ignore must be a list of module names or a predicate (name, module) -> bool, got "
                          f"{ignore!r:.60}")
    names = []
    for item in ignore:
        if isinstance(item, str):
            names.append(item)
        else:
            raise InvalidBudgetError(f"ignore must list module names (strings) or be a predicate, got {item!r}")
    _check_ignore_names(names, gm, model)
    return tuple(names), None


def _check_ignore_names(names: list[str], gm: torch.fx.GraphModule, model: nn.Module | None) -> None:
    """Every ``ignore`` name must be a module path (or a prefix of one) of the model: a typo would
    otherwise silently prune the module the user meant to keep."""
    import difflib

    known: set[str] = set()
    for root in (gm, model):
        if root is None:
            continue
        known.update(name for name, _ in root.named_modules() if name)
        known.update(name.rpartition(".")[0] for name, _ in root.named_parameters() if "." in name)
    unknown = [n for n in names if not any(k == n or k.startswith(n + ".") for k in known)]
    if not unknown:
        return
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.5)
        parts.append(f"{name!r} (closest: {', '.join(repr(c) for c in close)})" if close else repr(name))
    raise ConfigError(
        f"ignore= names that match no module of the model: {'; '.join(parts)}. Use module paths as printed by "
        "model.named_modules() (or `fxprune profile MODEL`), e.g. ignore=['layer4.1.conv2'].")


def _importance(gm, graph: DependencyGraph, criterion: str, data, loss_fn, seed) -> dict[int, np.ndarray]:
    if not graph.groups:
        return {}
    from fxprune._buffers import preserve_buffers
    from fxprune.importance import group_importance

    with preserve_buffers(gm):
        scores = group_importance(gm, graph.unit_groups(), criterion, data=data, loss_fn=loss_fn, seed=seed)
    return {int(k): np.asarray(v, dtype=np.float64) for k, v in scores.items()}


def fixed_where(session: PruneSession, top: int = 3) -> tuple[str, ...]:
    """Where the MACs no group can change are, by kind of op, largest first: ``"36 x LSTM module
    (3.397 G; the largest 'stages.3.blocks.2.rnn_tokens.rnn_v', 94.372 M)"``, or ``"LSTM module 'rnn'
    (1.2 M)"`` for a kind with one node. Each MAC term's part that stays when every group is pruned
    away (its fixed sizes) is summed per node, then per op kind."""
    forms = session.graph.forms()
    sizes = _space_sizes(session.gm)
    per_node: dict[str, float] = defaultdict(float)
    for t in session.terms:
        part = t.coef
        for key in t.spaces:
            form = forms.get(key)
            part *= sizes.get(key, 0) if form is None or not form.mult else form.fixed
        if part > 0:
            per_node[t.node] += part
    nodes = {n.name: n for n in session.gm.graph.nodes}
    kinds: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for name, macs in per_node.items():
        node = nodes.get(name)
        if node is None:
            kind, where = "ops", name
        elif node.op == "call_module":
            kind, where = f"{type(session.gm.get_submodule(node.target)).__name__} module", str(node.target)
        else:
            kind, where = str(getattr(node.target, "__name__", node.target)), name
        kinds[kind].append((macs, where))
    out = []
    for kind, items in sorted(kinds.items(), key=lambda kv: -sum(m for m, _ in kv[1]))[:top]:
        total = sum(m for m, _ in items)
        big, where = max(items)
        if len(items) == 1:
            out.append(f"{kind} '{where}' ({format_macs(int(total))})")
        else:
            out.append(f"{len(items)} x {kind} ({format_macs(int(total))}; the largest '{where}', "
                       f"{format_macs(int(big))})")
    return tuple(out)


def build_problem(session: PruneSession, budget: int, tolerance: float, channel_multiple: int,
                  min_keep_ratio: float, *, tie: bool = True) -> PruningProblem:
    """The MAC problem of ``session`` (its layout's ties applied unless ``tie=False``)."""
    groups = session.graph.groups
    G = len(groups)
    full = np.array([g.n for g in groups], dtype=np.int64)
    # MAC share: what disappears when the group is removed entirely
    K = np.repeat(full[None, :], G, axis=0)
    K[np.arange(G), np.arange(G)] = 0
    shares = (session.base_macs - session.cost(K)) / max(session.base_macs, 1) if G else np.zeros(0)
    specs = []
    for g, share in zip(groups, shares):
        quantum = math.lcm(g.block_count, g.align)
        allowed = allowed_keeps(g.n, blocks=quantum, multiple=channel_multiple, unit=g.unit,
                                heads=g.kind == "heads", min_keep_ratio=min_keep_ratio)
        if g.id in session.healed:  # frozen by the self-healing compile: kept whole
            allowed = (g.n,)
        raw = session.scores.get(g.id)
        scale = float(np.mean(raw)) if raw is not None and len(raw) else 1.0
        imp = tuple((raw / scale).tolist()) if raw is not None and scale > 0 else None
        specs.append(GroupSpec(g.id, g.name, g.kind, g.n, g.unit, allowed, g.bucket, g.members, float(share),
                               imp, g.exact, quantum, scale))
    mins = np.array([s.allowed[0] for s in specs], dtype=np.int64)
    min_macs = int(session.cost(mins[None, :])[0]) if G else session.base_macs
    fixed = int(session.cost(np.zeros((1, G), dtype=np.int64))[0]) if G else session.base_macs
    frozen = tuple(f"{f.name} ({f.n}): {'; '.join(f.reasons[:2])}" for f in session.graph.frozen) + tuple(
        f"{h.name} ({h.size}): self-healing: {h.stage} at {h.node or 'bisection'}" for h in session.healed.values())
    lower = int(math.ceil(budget * (1.0 - tolerance)))
    problem = PruningProblem(tuple(specs), session.base_macs, int(budget), lower, min_macs, fixed, session.cost, frozen,
                             fixed_where=fixed_where(session) if min_macs > budget else ())
    if tie and session.layout is not None:  # ties: one decision per role across layers (fxprune.tying)
        from fxprune.tying import apply_layout

        problem = apply_layout(problem, session.layout.ties, session.layout.fixed, session.layout.allowed)
    return problem


# ------------------------------------------------------------------------------------- result

@dataclass
class CompileResult:
    """What ``fxprune.compile`` returns.

    Attributes:
        model: the pruned model (a ``torch.fx.GraphModule``, eval mode). It owns all its tensors
            (none shares storage with the user's model). ``None`` for a plan (``plan_only``).
        macs / base_macs: MACs of the pruned / original model on the example inputs. For a plan,
            ``macs`` is the exact plan cost model's count (what the rewrite would count).
        params / base_params: parameter counts (for a plan, computed from the groups' slices).
        report: every decision (``report.to_json()`` for pipelines, ``str(report)`` for people).
        example_inputs: the inputs the model was compiled with.
        original: the captured, unpruned model (for benchmarks and ONNX of the baseline). It
            shares the user's tensors (no copy): treat it as read-only.
        keep: units (channels or heads) each dependency group keeps, by group id.
        plan_only: True when only the plan was computed (``compile(..., plan_only=True)``).
    """

    model: torch.fx.GraphModule | None
    macs: int
    base_macs: int
    params: int
    base_params: int
    report: Report
    example_inputs: tuple
    original: torch.fx.GraphModule | None = None
    keep: dict[int, int] = field(default_factory=dict)
    hf_source: Any = field(default=None, repr=False)
    plan_only: bool = False

    def _need_model(self, what: str) -> None:
        if self.model is None:
            raise ConfigError(f"{what} needs a pruned model, and this result is a plan (plan_only=True): "
                              "compile again without plan_only, with the model's weights loaded")

    def to_hf(self, *, verify: bool = True) -> nn.Module:
        """The pruned Hugging Face model as an instance of its original class (``generate``,
        ``save_pretrained``); see :func:`fxprune.hf.to_hf`."""
        from fxprune.hf import to_hf

        self._need_model("to_hf")
        return to_hf(self, verify=verify)

    def export_onnx(self, path: str | None = None, **kwargs: Any):
        """Export the pruned model to ONNX (dynamic batch dimension); returns the ``onnx.ModelProto``."""
        from fxprune.export import export_onnx

        self._need_model("export_onnx")
        with progress.stage("ONNX export"):
            return export_onnx(self.model, self.example_inputs, path, **kwargs)

    def save(self, path: str) -> None:
        from fxprune.serialization import save

        self._need_model("save")
        save(self.model, path)

    def benchmark(self, config: Any = None, **kwargs: Any):
        """Measure original vs pruned latency on ONNX Runtime (see ``fxprune.latency``)."""
        from fxprune.latency import benchmark_result

        self._need_model("benchmark")
        return benchmark_result(self, config, **kwargs)

    def __str__(self) -> str:
        return str(self.report)


# ------------------------------------------------------------------------------------ compile

def compile(  # noqa: A001 - the product's name for the operation
    model: nn.Module,
    example_inputs: Any,
    *,
    mac_budget: Any = None,
    latency_budget: Any = None,
    tolerance: float = 0.01,
    policy: Any = "global",
    channel_multiple: int = 8,
    min_keep_ratio: float = 0.1,
    ignore: Any = None,
    importance: str = "l1",
    calibration_data: Any = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    loss_fn: Any = None,
    seed: int = 0,
    verify: bool | str = True,
    policy_options: dict[str, Any] | None = None,
    capture: str = "auto",
    leaf_modules: Sequence[type] = (),
    latency_options: dict[str, Any] | None = None,
    layer_uniform: bool | None = None,
    target: str | None = None,
    dtype: Any = None,
    batch_size: int | None = None,
    plan_only: bool = False,
    grouped_convs: str | None = None,
) -> CompileResult:
    """Compile ``model`` to a MAC budget: a physically smaller model with MACs in the band.

    Args:
        model: any ``nn.Module`` (never modified).
        example_inputs: a tensor, a tuple of tensors, or a dict of keyword tensors.
        mac_budget: absolute MACs (``1.8e9``, ``"1.8G"``, ``"500M"``) or a fraction of the
            original (``0.5``, ``"50%"``).
        latency_budget: a measured-latency budget (``"20ms"``, ``"60%"`` of the original) on
            ``target``: channels are allocated by a per-group latency model measured there
            (importance lost per millisecond saved) and the result is verified by an interleaved
            whole-model measurement; see ``latency_options``. With ``mac_budget`` too, both hold.
        target: where latency is measured: ``"ort-cpu"`` (default), ``"ort-cuda"``, ``"ort-trt"``,
            ``"torch-cuda"`` or ``"torch-cpu"`` (``fxprune.runtimes``).
        dtype: ``"fp32"`` (default), ``"fp16"`` or ``"bf16"`` (PyTorch targets).
        batch_size: the batch the latency is measured at (default 1).
        tolerance: the band is ``[budget * (1 - tolerance), budget]``.
        policy: "uniform", "global", "isomorphic", "agentic", "rl" or an object with ``select``.
        channel_multiple: kept channel counts are multiples of this where the group is large
            enough; attention heads are kept whole.
        min_keep_ratio: every group keeps at least this fraction of its units.
        ignore: module names (or a predicate ``(name, module) -> bool``) to leave untouched.
        importance: channel criterion: "l1", "l2", "bn_scale", "taylor", "snip", "grasp", "synflow".
        calibration_data: batches for data-driven criteria and the label-free quality signal.
        evaluate: ``evaluate(model) -> float`` (higher is better) used by search policies.
        seed: the run's seed (same inputs and seed give the same result).
        verify: check the pruned model: counted MACs equal the estimate and the independent count
            (``torch.utils.flop_counter`` on meta tensors), the band holds, it runs at another batch
            size; ``"onnx"`` also exports it to ONNX and checks ONNX Runtime parity. A candidate
            that fails has the groups behind the failure frozen (``report.healed``) and is rebuilt.
        layer_uniform: keep the same number of units in every layer for groups that play the same
            role (one decision variable per role). ``None``: on for Hugging Face models that
            ``result.to_hf()`` can rebuild (their config has one width per role), off otherwise.
        grouped_convs: how a grouped conv with more groups than channels per group (RegNet,
            ResNeXt's early stages) is pruned: ``"within"`` every group (the group count stays;
            input and output channels of the conv are pruned apart, so its MACs fall with both) or
            by ``"whole"`` groups (the channels per group, so the kernel's shape, stay). ``None``:
            ``"whole"`` with a latency budget (kept groups keep their measured kernel), ``"within"``
            otherwise (more accuracy at equal MACs: ``tools/bench_grouped_conv.py``). Where another
            op relies on the group count (a norm or channel shuffle with as many groups), the conv
            is pruned within its groups either way.
        plan_only: return the plan only (``result.keep`` per group, exact ``macs`` from the plan
            cost model, ``params``, the report; ``result.model`` is None): no pruned model is
            built. A model whose weights are on the meta device can only be planned; it is
            planned with the structure-only ``uniform`` criterion (see ``fxprune._plan``).

    Returns:
        A :class:`CompileResult`.

    Raises:
        InvalidBudgetError: the budget is not understood.
        BudgetUnreachableError: the budget is below the smallest reachable model (``.min_macs``).
        TraceError: the model cannot be captured.
    """
    if mac_budget is None and latency_budget is None:
        raise InvalidBudgetError("give mac_budget (e.g. '50%', 0.5, '1.8G') or latency_budget (e.g. '20ms')")
    if latency_budget is None and (target is not None or dtype is not None or batch_size is not None):
        raise InvalidBudgetError(
            "target=, dtype= and batch_size= say where a latency budget is measured; give latency_budget=... too "
            "(to time a MAC-budget result on a runtime, use result.benchmark(runtime=...))")
    if isinstance(leaf_modules, Iterable) and not isinstance(leaf_modules, (str, type)):
        leaf_modules = tuple(leaf_modules)  # a generator is read once, here
    _check_options(tolerance=tolerance, channel_multiple=channel_multiple, min_keep_ratio=min_keep_ratio,
                   policy=policy, policy_options=policy_options, seed=seed, evaluate=evaluate,
                   leaf_modules=leaf_modules, latency_options=latency_options, importance=importance,
                   grouped_convs=grouped_convs)
    if mac_budget is not None:
        parse_mac_budget(mac_budget, 1)  # a budget that cannot parse fails now, before the capture
    weightless_note = None
    if has_meta_tensors(model):  # built on the meta device: shapes only (see fxprune._plan)
        check_weightless(plan_only=plan_only, policy=policy, evaluate=evaluate, latency_budget=latency_budget)
        weightless_note = (f"the model's weights are on the meta device: planned from shapes alone with the "
                           f"structure-only '{WEIGHTLESS_CRITERION}' criterion (importance={importance!r} needs "
                           "weights), which keeps the first units of each group")
        importance, calibration_data = WEIGHTLESS_CRITERION, None
    if plan_only and latency_budget is not None:
        raise ConfigError("plan_only plans to a MAC budget; a latency budget is met by timing built models")
    if latency_budget is not None:
        from fxprune.latency import compile_to_latency

        return compile_to_latency(
            model, example_inputs, latency_budget=latency_budget, tolerance=tolerance, policy=policy,
            channel_multiple=channel_multiple, min_keep_ratio=min_keep_ratio, ignore=ignore,
            importance=importance, calibration_data=calibration_data, evaluate=evaluate, loss_fn=loss_fn,
            seed=seed, verify=verify, policy_options=policy_options, capture=capture,
            leaf_modules=leaf_modules, options=latency_options or {}, mac_budget=mac_budget,
            target=target, dtype=dtype, batch_size=batch_size, grouped_convs=grouped_convs,
        )
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        session = open_session(model, example_inputs, ignore=ignore, importance=importance,
                               calibration_data=calibration_data, loss_fn=loss_fn, capture_method=capture,
                               leaf_modules=leaf_modules, seed=seed, layer_uniform=layer_uniform,
                               dynamic=not plan_only, grouped_convs=grouped_convs or "within")
        budget = parse_mac_budget(mac_budget, session.base_macs)
        report = _new_report(model, session, policy, importance, mac_budget, budget, tolerance, channel_multiple, seed)
        if weightless_note:
            report.notes.append(weightless_note)
        if budget >= session.base_macs or not session.graph.groups:
            note = ("budget at or above the original's MACs: model returned unchanged" if budget >= session.base_macs
                    else "nothing in this model can be pruned: model returned unchanged")
            report.notes.append(note)
            if budget < session.base_macs:
                where = fixed_where(session)
                raise BudgetUnreachableError(
                    f"{note.split(':')[0]}; the budget {format_macs(budget)} is below the original "
                    f"{format_macs(session.base_macs)}"
                    + (f". The MACs are in {', '.join(where)}, whose channels are frozen (report.frozen says "
                       "why)" if where else ""), min_macs=session.base_macs, budget=budget)
            if plan_only:
                return _plan_result(session, report, {}, start)
            return _result(session, session.owned_original(), session.base_macs, report, {}, start)
        return compile_at_budget(model, session, budget, start, report=report, tolerance=tolerance, policy=policy,
                                 channel_multiple=channel_multiple, min_keep_ratio=min_keep_ratio,
                                 importance=importance, evaluate=evaluate, calibration_data=calibration_data,
                                 seed=seed, verify=verify, policy_options=policy_options, plan_only=plan_only)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _check_options(*, tolerance, channel_multiple, min_keep_ratio, policy, policy_options, seed, evaluate,
                   leaf_modules, latency_options, importance, grouped_convs=None) -> None:
    """Every option of :func:`compile`, checked before any work starts (clear errors, never a raw one)."""
    if not (_is_number(tolerance) and 0 < tolerance < 1):
        raise InvalidBudgetError(f"tolerance must be a number in (0, 1), got {tolerance!r}")
    if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, numbers.Integral) or channel_multiple < 1:
        raise InvalidBudgetError(f"channel_multiple must be a positive int, got {channel_multiple!r}")
    if not (_is_number(min_keep_ratio) and 0 < min_keep_ratio <= 1):
        raise InvalidBudgetError(f"min_keep_ratio must be a number in (0, 1], got {min_keep_ratio!r}"
                                 + (" (a string; pass a float such as 0.1)" if isinstance(min_keep_ratio, str) else ""))
    if policy_options is not None and not isinstance(policy_options, Mapping):
        raise ConfigError(f"policy_options must be a dict such as {{'max_attempts': 10}}, got "
                          f"{type(policy_options).__name__} {policy_options!r:.60}")
    if latency_options is not None and not isinstance(latency_options, Mapping):
        raise ConfigError(f"latency_options must be a dict such as {{'threads': 1}}, got "
                          f"{type(latency_options).__name__} {latency_options!r:.60}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(f"seed must be an int, got {seed!r:.60}")
    if evaluate is not None and not callable(evaluate):
        raise ConfigError(f"evaluate must be a function evaluate(model) -> float, got {type(evaluate).__name__}")
    if not isinstance(importance, str):
        raise ConfigError(f"importance must be a criterion name such as 'l1' or 'taylor', got {importance!r:.60}")
    if isinstance(leaf_modules, (str, type)) or not isinstance(leaf_modules, Iterable) or not all(
            isinstance(c, type) and issubclass(c, nn.Module) for c in leaf_modules):
        raise ConfigError(f"leaf_modules must be a list of nn.Module classes, got {leaf_modules!r:.80}")
    if grouped_convs not in (None, "within", "whole"):
        raise ConfigError(f"grouped_convs must be 'within', 'whole' or None, got {grouped_convs!r:.60}")
    if not hasattr(policy, "select"):
        get_policy(policy, dict(policy_options or {}))  # unknown names and bad options fail now, not after analysis


def compile_at_budget(model: nn.Module, session: PruneSession, budget: int, start: float, *,
                      report: Report | None = None, tolerance: float, policy: Any, channel_multiple: int,
                      min_keep_ratio: float, importance: str, evaluate: Callable[[nn.Module], float] | None,
                      calibration_data: Any, seed: int, verify: bool,
                      policy_options: dict[str, Any] | None, problem: PruningProblem | None = None,
                      plan_only: bool = False) -> CompileResult:
    """Plan, project, rewrite and verify at an absolute MAC ``budget`` below the original's.

    The session (capture, analyses, importance) is reused, so the latency search can build
    candidates at many budgets for the price of one capture. ``report`` defaults to a new one.
    ``problem`` replaces the MAC problem (a latency or multi-constraint problem, whose cost is not
    MACs: then ``budget`` is only recorded, and the exact MAC count is still checked against the
    MAC cost model).
    """
    if report is None:
        report = _new_report(model, session, policy, importance, budget, budget, tolerance, channel_multiple, seed)
    from fxprune.heal import CandidateFailure, Healer, build_candidate
    from fxprune.tying import expand_keep, full_problem

    built_here = problem is None
    if problem is None:
        problem = build_problem(session, budget, tolerance, channel_multiple, min_keep_ratio)
        report.lower_macs = problem.lower

    def per_layer(why: str) -> PruningProblem | None:
        """The untied problem when the default layout (one width per role: what a Hugging Face config
        can express) is what stands between the budget and a plan; to_hf() then says why it cannot
        rebuild the result."""
        if not (built_here and session.layout is not None and session.layout_by_default):
            return None
        untied = build_problem(session, budget, tolerance, channel_multiple, min_keep_ratio, tie=False)
        if untied.min_macs > budget:
            return None
        why = (f"layer_uniform: {why}; planned per layer instead, so result.model is the pruned model and "
               "result.to_hf() cannot rebuild it. A higher budget or tolerance may allow a plan with the config's "
               "one width per role.")
        report.notes.append(why)
        session.layout = None
        if session.hf_source is not None:
            session.hf_source = dataclasses.replace(session.hf_source, refused=why)
        return untied

    if problem.min_macs > budget:
        problem = per_layer(f"a plan {type(model).__name__}'s config can express has {format_macs(problem.min_macs)} "
                            f"MACs at the least, above the budget of {format_macs(budget)}") or problem
    problem = with_healed(problem, session.healed)
    solved_with = len(session.healed)
    pol = get_policy(policy, policy_options)
    t0 = time.perf_counter()
    scored: list = []  # the "candidates scored" bar, opened by the first candidate a search policy builds

    def candidate_done() -> None:
        if not scored:
            scored.append(progress.bar(desc="candidates scored", unit="candidate"))
        scored[0].update(1)

    ctx = None  # the search context of the last problem solved (the healing loop solves again)

    def select(problem: PruningProblem):
        nonlocal ctx
        ctx = _search_context(session, problem, model, evaluate, calibration_data, seed, report,
                              {"criterion": importance, "model_name": type(model).__name__, **(policy_options or {})},
                              on_candidate=candidate_done)
        with progress.stage(f"policy ({getattr(pol, 'name', type(pol).__name__)})"):
            return pol.select(problem, ctx)

    try:
        try:
            plan = select(problem)
        except BandUnreachableError as err:
            untied = per_layer(f"no plan {type(model).__name__}'s config can express lands in the band "
                               f"({str(err).splitlines()[0][:160]})")
            if untied is None:
                raise
            problem = with_healed(untied, session.healed)
            plan = select(problem)
    finally:
        for b in scored:
            b.close()
    report.timings["policy"] = time.perf_counter() - t0
    if plan.rationale:
        report.notes.append(f"policy: {plan.rationale}")
    if session.layout is not None:
        report.notes += [n for n in session.layout.notes if n not in report.notes]
    crit = plan.criterion or None
    if plan_only:
        proj = _project_healed(session, problem, _whole_where_frozen(problem, problem.dense(plan.keep)))
        keep_all = expand_keep(problem, proj.keep)  # one count per dependency group (ties expanded)
        report.estimated_macs = proj.macs
        _group_decisions(report, problem, keep_all)
        return _plan_result(session, report, {g.id: int(k) for g, k in zip(full_problem(problem).groups, keep_all)},
                            start)
    t0 = time.perf_counter()
    # self-healing: a candidate that fails to build, run or verify has its groups frozen, and the
    # plan is solved again (cheap policies choose again; search policies' plans are re-projected)
    healer = Healer(session, verify=verify)
    with progress.stage("rewrite"):
        while True:
            if len(session.healed) != solved_with:
                problem = with_healed(problem, session.healed)
                if isinstance(policy, str) and policy in _CHEAP_POLICIES:
                    try:
                        plan = pol.select(problem, ctx)
                    except (BudgetUnreachableError, BandUnreachableError) as err:
                        raise _healed_context(session, err) from err
                solved_with = len(session.healed)
            proj = _project_healed(session, problem, _whole_where_frozen(problem, problem.dense(plan.keep)))
            keep_all = expand_keep(problem, proj.keep)  # one count per dependency group (ties expanded)
            estimated = proj.macs if problem.unit == "MACs" else int(session.cost(keep_all[None, :])[0])
            try:
                cand = build_candidate(session, keep_all, crit, estimate=estimated, verify=verify)
                break
            except CandidateFailure as failure:
                healer.freeze(failure, keep_all, crit)
    pruned, macs = cand.gm, cand.macs
    report.solver_notes += proj.notes
    report.warnings += [n for n in proj.notes if "not honoured" in n]  # the printed report shows warnings
    if plan.criterion and plan.criterion != importance:
        report.criterion = plan.criterion
    report.timings["rewrite"] = time.perf_counter() - t0
    if verify:
        if problem.unit == "MACs":
            _verify(problem, proj, macs)
        else:
            _verify_constraints(problem, proj, macs, estimated)
    report.estimated_macs = estimated
    report.measured_macs = cand.measured
    report.healed = [h.to_json() for h in session.healed.values()]
    keep = {g.id: int(k) for g, k in zip(full_problem(problem).groups, keep_all)}
    _group_decisions(report, problem, keep_all)
    return _result(session, pruned, macs, report, keep, start)


def _group_decisions(report: Report, problem: PruningProblem, keep_all: np.ndarray) -> None:
    from fxprune.tying import full_problem

    report.groups = [
        GroupDecision(g.id, g.name, g.kind, g.bucket, g.size, int(k), g.unit, g.mac_share, g.exact, g.members)
        for g, k in zip(full_problem(problem).groups, keep_all)
    ]


def _plan_result(session: PruneSession, report: Report, keep: dict[int, int], start: float) -> CompileResult:
    """A plan (``plan_only``): keep counts, exact MACs and params from the cost model, no model built."""
    macs = int(session.cost(np.array([[keep.get(g.id, g.n) for g in session.graph.groups]], dtype=np.int64))[0]) \
        if session.graph.groups else session.base_macs
    report.macs = macs
    report.params = planned_params(session.gm, session.graph, keep)
    report.notes.append("plan only: no pruned model was built (result.model is None); macs come from the exact "
                        "plan cost model, params from the groups' parameter slices")
    report.timings["total"] = time.perf_counter() - start
    return CompileResult(None, macs, session.base_macs, report.params, report.base_params, report,
                         session.captured.inputs, session.gm, keep, plan_only=True)


_CHEAP_POLICIES = ("uniform", "global", "isomorphic")


def with_healed(problem: PruningProblem, healed: dict[int, Any]) -> PruningProblem:
    """``problem`` with every group the self-healing compile froze kept whole (for a tied problem,
    every tie that contains one). ``healed`` is keyed by dependency-group id."""
    import dataclasses

    if not healed:
        return problem
    matrix = getattr(problem, "matrix", None)
    if matrix is not None:
        frozen = {i for i in range(len(problem.groups)) if any(matrix[i, g] for g in healed if g < matrix.shape[1])}
    else:
        frozen = set(healed)
    if all(len(g.allowed) == 1 for g in problem.groups if g.id in frozen):
        return problem
    groups = tuple(dataclasses.replace(g, allowed=(g.size,)) if g.id in frozen else g for g in problem.groups)
    mins = np.array([g.allowed[0] for g in groups], dtype=np.int64)
    min_macs = int(problem.cost(mins[None, :])[0]) if len(groups) else problem.min_macs
    return dataclasses.replace(problem, groups=groups, min_macs=min_macs)


def _whole_where_frozen(problem: PruningProblem, target: np.ndarray) -> np.ndarray:
    """The policy's target with every group that may only stay whole at its size."""
    t = np.asarray(target, dtype=np.float64).copy()
    for i, g in enumerate(problem.groups):
        if len(g.allowed) == 1:
            t[i] = g.allowed[0]
    return t


def _project_healed(session: PruneSession, problem: PruningProblem, target: np.ndarray) -> Projection:
    try:
        return project(problem, target)
    except (BudgetUnreachableError, BandUnreachableError) as err:
        raise _healed_context(session, err) from err


def _healed_context(session: PruneSession, err: Exception) -> Exception:
    """``err`` (budget or band unreachable) saying which groups the self-healing compile froze and at
    which ops: what made the budget unreachable is then named, not only the MAC figures."""
    if not session.healed:
        return err
    ops = {n.name: n.target for n in session.gm.graph.nodes}

    def where(h: Any) -> str:
        if not h.node:
            return f"{h.name} ({h.stage}, found by bisection)"
        op = ops.get(h.node)
        op = (getattr(op, "__name__", None) or str(op)) if op is not None else "?"
        return f"{h.name} ({h.stage} at {h.node}, op {op})"

    healed = list(session.healed.values())
    first = healed[0].reason.strip().splitlines()[0][:240] if healed[0].reason else ""
    more = (f" The self-healing compile froze {len(healed)} group(s) whose pruned model failed: "
            + "; ".join(where(h) for h in healed[:4]) + (f" and {len(healed) - 4} more" if len(healed) > 4 else "")
            + (f". First failure: {first}" if first else "")
            + ". Those ops have no correct channel rule yet: the groups stay whole (result.report.healed).")
    if isinstance(err, BudgetUnreachableError):
        return BudgetUnreachableError(f"{err}{more}", min_macs=err.min_macs, budget=err.budget)
    if isinstance(err, BandUnreachableError):
        return BandUnreachableError(f"{err}{more}", best_macs=err.best_macs, budget=err.budget, lower=err.lower)
    return err


def _verify(problem: PruningProblem, proj: Projection, macs: int) -> None:
    if macs != proj.macs:
        raise PostconditionError(
            f"the rewritten model has {macs:,} MACs but the cost model predicted {proj.macs:,}; this is a bug in "
            "fxprune (please report it with the model)")
    if macs > problem.budget:
        raise PostconditionError(f"the rewritten model has {macs:,} MACs, above the budget {problem.budget:,}")
    if macs < problem.lower:
        raise PostconditionError(
            f"could not land in the band [{problem.lower:,}, {problem.budget:,}] (got {macs:,}); the allowed keep "
            "counts are too coarse for this tolerance. Increase tolerance or lower channel_multiple.")


def _verify_constraints(problem: PruningProblem, proj: Projection, macs: int, estimated: int) -> None:
    """A problem whose cost is not MACs: the MAC count still equals the MAC model's, and a MAC
    constraint (``mac_budget`` beside a latency budget) holds on the counted graph."""
    if macs != estimated:
        raise PostconditionError(
            f"the rewritten model has {macs:,} MACs but the cost model predicted {estimated:,}; this is a bug in "
            "fxprune (please report it with the model)")
    for c in problem.constraints:
        if c.name == "macs" and macs > c.budget:
            raise PostconditionError(f"the rewritten model has {macs:,} MACs, above the MAC budget {int(c.budget):,}")


def _new_report(model, session, policy, importance, spec, budget, tolerance, channel_multiple, seed) -> Report:
    r = Report(
        model=type(model).__name__,
        policy=policy if isinstance(policy, str) else getattr(policy, "name", type(policy).__name__),
        criterion=importance,
        budget_spec=str(spec),
        budget_macs=int(budget),
        lower_macs=int(math.ceil(budget * (1 - tolerance))),
        tolerance=float(tolerance),
        channel_multiple=channel_multiple,
        base_macs=session.base_macs,
        base_params=_params(session.gm),
        seed=seed,
        environment=environment(),
    )
    r.frozen = [FrozenInfo(f.name, f.n, f.reasons) for f in session.graph.frozen]
    r.notes += session.captured.notes
    cal = session.calibration
    if cal is not None:
        r.macs_exact = cal.exact
        r.macs_measured = [{"node": n, "macs": m, "reason": why} for n, m, why in cal.measured]
        r.macs_uncounted = list(cal.uncounted)
        if cal.failed:
            r.macs_uncounted.append(f"could not be measured: {cal.failed}")
    r.timings.update(session.timings)
    from fxprune.importance import DATA_CRITERIA

    crit = str(session.criterion)
    if session.data is None and any(c in crit for c in DATA_CRITERIA):
        note = (f"importance {crit!r} was computed on the example inputs alone (no calibration_data): "
                "pass a few real batches with calibration_data=... for a meaningful ranking")
        logger.warning(note)
        r.notes.append(note)
    return r


def _result(session: PruneSession, pruned, macs, report: Report, keep, start) -> CompileResult:
    report.macs = macs
    report.params = _params(pruned)
    report.timings["total"] = time.perf_counter() - start
    pruned.eval()
    return CompileResult(pruned, macs, session.base_macs, report.params, report.base_params, report,
                         session.captured.inputs, session.deployed_original(), keep, session.hf_source)


def _search_context(session, problem, model, evaluate, calibration_data, seed, report, options,
                    on_candidate: Callable[[], None] | None = None) -> SearchContext:
    """The quality signal for search policies: the user's evaluate, else label-free fidelity.

    Candidates are built by a healer: one that fails to build or run has the failing groups frozen
    (``session.healed``) and is scored with them kept whole; the compile then re-solves.
    """
    from fxprune.heal import Healer

    cache: dict[bytes, float] = {}
    healer = Healer(session, verify=False)

    def quality(plan: PruningPlan) -> float:
        from fxprune.tying import expand_keep

        keep = problem.dense(plan.keep)
        key = keep.tobytes()
        key += (plan.criterion or "").encode()
        if key not in cache:
            built, _ = healer.build(expand_keep(problem, keep), plan.criterion or None)
            cand = built.gm
            del built
            try:
                if evaluate is not None:
                    cache[key] = float(evaluate(cand))
                else:
                    cache[key] = _fidelity(session, cand, calibration_data)
            finally:
                # a GraphModule and its graph reference each other: only the cycle collector frees
                # a candidate, so collect now, or memory would grow with the number of candidates
                del cand
                gc.collect()
                release_free_memory()
                if on_candidate is not None:
                    on_candidate()
        return cache[key]

    name = "evaluate(model) (user)" if evaluate is not None else (
        "fidelity to the original on calibration data" if calibration_data is not None
        else "fidelity to the original on the example inputs")
    return SearchContext(quality=quality, quality_name=name, seed=seed,
                         log=lambda rec: report.attempts.append(rec), options=dict(options or {}))


def _fidelity(session: PruneSession, cand: nn.Module, data: Any) -> float:
    from fxprune.quality import fidelity

    from fxprune._buffers import preserve_buffers

    if data is None:
        data = [session.captured.inputs]
    with preserve_buffers(session.gm):
        return float(fidelity(session.gm, cand, data))


_ = (Iterable, FxpruneError)
