"""Opaque leaf modules captured with ``torch.export`` and inlined into the ``torch.fx`` graph.

timm keeps some modules out of ``torch.fx`` traces (``register_notrace_module``) because their
forward does what symbolic tracing cannot: ``math.ceil`` on a shape and an ``if`` on it
(MobileViT-v2's ``MobileVitV2Block``), ``torch.autocast(device_type=x.device.type)`` (EfficientViT's
``LiteMLA``), shape-dependent padding (TinyViT, EfficientViT-MSRA's ``LocalWindowAttention``)...
As opaque leaves their channels cannot be pruned and their MACs are only measured: where they carry
most of the model's MACs a budget becomes unreachable.

``torch.export`` runs the real Python code on fake tensors, so it records such a module as an
ATen-level graph (``fxprune._export.capture_export``: layers become modules again, sizes read off
tensors stay symbolic). :func:`export_leaves` does that for every call of an opaque leaf, on the
inputs the call receives when the model runs on the example inputs, and splices the recorded graph
into the parent graph in place of the ``call_module`` node; the recorded modules are installed at
the leaf's path (in the captured copy only: the user's model and the traced copy are untouched).
fxprune's rules cover both torch-level and ATen-level ops, so the result is one graph. It is kept
only when it reproduces the model's outputs on the example inputs; a leaf that cannot be exported
stays opaque (measured, channels frozen).
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Sequence

import torch
import torch.fx
import torch.nn as nn
from torch.utils._pytree import LeafSpec

__all__ = ["export_leaves"]

logger = logging.getLogger(__name__)


def _record_inputs(gm: torch.fx.GraphModule, names: set[str], args: tuple, kwargs: dict) -> dict[str, tuple]:
    """The (args, kwargs) each named call_module node receives when ``gm`` runs on the example."""
    seen: dict[str, tuple] = {}

    class _Rec(torch.fx.Interpreter):
        def run_node(self, n):
            if n.name in names:
                a, kw = self.fetch_args_kwargs_from_env(n)
                seen[n.name] = (a, kw)
            return super().run_node(n)

    from fxprune.capture import buffers_restored

    with torch.no_grad(), buffers_restored(gm):
        _Rec(gm).run(*args, *kwargs.values())
    return seen


def _varying_dims(gm: torch.fx.GraphModule, names: set[str], args: tuple, kwargs: dict,
                  at_example: dict[str, tuple]) -> tuple[list[tuple], dict[str, list[list[int]]]]:
    """The dims of each leaf input that follow the model's input sizes.

    The graph runs again at the other input sizes the model accepts (``dynamic_sizes`` probes:
    smaller and larger images, odd sizes, other sequence lengths); a dim of a leaf's input whose
    size changed at any of them follows the input sizes and is exported as dynamic, whatever the
    leaf's layout (NHWC blocks, token sequences). Several probes, because a deep stage can have the
    same size at two input sizes (64 and 48 px both give 2x2 after a stride of 32).
    Returns ``([(args, kwargs) of each probe], {node name: [dims per input]})``; without a probe
    only the batch dim is dynamic.
    """
    from fxprune.dynamic_sizes import probe_inputs, probe_sizes, size_classes

    examples = list(args) + list(kwargs.values())
    n_args = len(args)
    probes: list[tuple] = []
    varying: dict[str, list[set[int]]] = {}
    for cls in size_classes(examples):
        for target in probe_sizes(cls.size, cls.family, cls.tokens):
            new_inputs, _ = probe_inputs(cls, examples, target)
            p_args, p_kwargs = tuple(new_inputs[:n_args]), dict(zip(kwargs, new_inputs[n_args:]))
            try:
                other = _record_inputs(gm, names, p_args, p_kwargs)
            except Exception as err:
                logger.debug("leaf inputs at another size: %s", err)
                continue
            probes.append((p_args, p_kwargs))
            for name, (a, kw) in at_example.items():
                b, kwb = other.get(name, ((), {}))
                t1 = list(a) + list(kw.values())
                t2 = list(b) + list(kwb.values())
                dims = varying.setdefault(name, [set() for _ in t1])
                for k, (x, y) in enumerate(zip(t1, t2)):
                    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dim() == y.dim():
                        dims[k].update(d for d in range(x.dim()) if x.shape[d] != y.shape[d])
    return probes, {name: [sorted(d) for d in dims] for name, dims in varying.items()}


def _same_at(gm: torch.fx.GraphModule, new: torch.fx.GraphModule, probe: tuple) -> bool:
    """``new`` computes what ``gm`` computes at the probe inputs (the example check's tolerance)."""
    from fxprune.capture import _same_outputs

    return _same_outputs(gm, new, *probe)


def _container(sub: torch.fx.GraphModule) -> nn.Module:
    """A plain module holding what the exported graph refers to (submodules, parameters, constants)."""
    box = nn.Module()
    for name, mod in sub.named_children():
        box.add_module(name, mod)
    for name, p in sub._parameters.items():
        box.register_parameter(name, p)
    for name, b in sub._buffers.items():
        box.register_buffer(name, b, persistent=name not in sub._non_persistent_buffers_set)
    for name, v in vars(sub).items():
        if isinstance(v, torch.Tensor) and name not in box._parameters and name not in box._buffers:
            setattr(box, name, v)
    return box


def _install(root: nn.Module, path: str, module: nn.Module) -> None:
    """Set ``root.<path>`` to ``module``, copying the modules on the way (copy on write) so that
    modules shared with the traced model are not changed."""
    parts = path.split(".")
    parent = root
    for p in parts[:-1]:
        child = parent._modules[p]
        clone = copy.copy(child)
        clone._modules = type(child._modules)(child._modules)
        parent._modules[p] = clone
        parent = clone
    parent._modules[parts[-1]] = module


def _splice(graph: torch.fx.Graph, node: torch.fx.Node, sub: torch.fx.GraphModule, prefix: str) -> bool:
    """Replace ``node`` (a call_module) with a copy of ``sub.graph`` whose targets live under ``prefix``."""
    placeholders = [p for p in sub.graph.nodes if p.op == "placeholder"]
    inputs = list(node.args) + list(node.kwargs.values())
    if len(placeholders) != len(inputs) or not all(isinstance(a, torch.fx.Node) for a in inputs):
        return False
    info = getattr(sub.graph._codegen, "pytree_info", None)
    out_spec = getattr(info, "out_spec", None)
    before = set(graph.nodes)
    val_map = dict(zip(placeholders, inputs))
    with graph.inserting_before(node):
        out = graph.graph_copy(sub.graph, val_map)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    new = [n for n in graph.nodes if n not in before]
    for n in new:
        if n.op in ("get_attr", "call_module"):
            n.target = f"{prefix}.{n.target}"
        stack = n.meta.get("nn_module_stack")
        if stack:
            n.meta["nn_module_stack"] = {k: ((f"{prefix}.{v[0]}" if v[0] else prefix), v[1]) if isinstance(v, tuple)
                                         else v for k, v in stack.items()}
    if out_spec is None or isinstance(out_spec, LeafSpec) or out_spec.num_leaves == 1 and len(outs) == 1:
        node.replace_all_uses_with(outs[0])
    else:
        import operator

        users = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                   and u.args[1] < len(outs) for u in users) or out_spec.num_leaves != len(outs):
            for n in reversed(new):
                graph.erase_node(n)
            return False
        for u in users:
            u.replace_all_uses_with(outs[u.args[1]])
            graph.erase_node(u)
    graph.erase_node(node)
    return True


def export_leaves(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, is_target: Callable[[nn.Module], bool],
                  same_outputs: Callable[[torch.fx.GraphModule], bool], notes: list[str]) -> torch.fx.GraphModule:
    """``gm`` with every opaque ``call_module`` leaf for which ``is_target(module)`` holds captured with
    ``torch.export`` and inlined; ``gm`` itself when none can be or the result differs
    (``same_outputs(new_gm)`` is False). The dims of the leaves' inputs that follow the model's
    input sizes stay symbolic, checked at other input sizes the model accepts."""
    targets = [n for n in gm.graph.nodes if n.op == "call_module" and is_target(gm.get_submodule(n.target))]
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    targets = [n for n in targets if calls[n.target] == 1]  # a module called twice stays opaque
    if not targets:
        return gm
    names = {n.name for n in targets}
    try:
        inputs = _record_inputs(gm, names, args, kwargs)
    except Exception as err:  # pragma: no cover - the traced graph ran in capture already
        logger.debug("recording leaf inputs failed: %s", err)
        return gm
    probes, varying = _varying_dims(gm, names, args, kwargs, inputs)
    new, kinds, kept = _spliced(gm, targets, inputs, varying)
    if new is None:
        return gm
    if not same_outputs(new):
        notes.append("timm: modules recorded with torch.export did not reproduce the model's outputs; kept "
                     "opaque: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())))
        return gm
    what = ("timm: captured with torch.export (not traceable by torch.fx): "
            + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items()))
            + (f"; kept opaque: {', '.join(kept[:4])}" if kept else ""))
    if all(_same_at(gm, new, p) for p in probes):
        notes.append(what)
        return new
    # a size branch of the example was recorded (TinyViT at 224 px: its last stage is exactly one
    # window, so the padding path is skipped): record the leaves again at a probe size, the
    # irregular one first, where the general path runs, and keep that if it reproduces everywhere
    for p in reversed(probes):
        try:
            at_probe = _record_inputs(gm, names, *p)
        except Exception:  # pragma: no cover - the probe ran in _varying_dims
            continue
        again, _, _ = _spliced(gm, targets, at_probe, varying)
        if again is not None and same_outputs(again) and all(_same_at(gm, again, q) for q in probes):
            notes.append(what + "; recorded at another input size, where the modules take their general path")
            return again
    notes.append(what + "; the recorded modules follow the example's input size only: the input size is "
                 "fixed to the example's")
    return new


def _spliced(gm: torch.fx.GraphModule, targets: list[torch.fx.Node], inputs: dict[str, tuple],
             varying: dict[str, list[list[int]]]) -> tuple[torch.fx.GraphModule | None, dict[str, int], list[str]]:
    """``gm`` with each target leaf exported at ``inputs[node name]`` and spliced in (None: none could be)."""
    from fxprune._export import capture_export

    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    root = copy.copy(gm)
    kinds: dict[str, int] = {}
    kept: list[str] = []
    for orig in targets:
        a, kw = inputs.get(orig.name, ((), {}))
        mod = gm.get_submodule(orig.target)
        tensors = list(a) + list(kw.values())
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            kept.append(orig.target)
            continue
        try:
            sub = capture_export(mod, tuple(a), dict(kw), [], size_dims=varying.get(orig.name))
        except Exception as err:
            logger.debug("torch.export of leaf %s failed: %s", orig.target, err)
            kept.append(orig.target)
            continue
        if not _splice(graph, by_name[orig.name], sub, str(orig.target)):
            kept.append(orig.target)
            continue
        _install(root, str(orig.target), _container(sub))
        kinds[type(mod).__name__] = kinds.get(type(mod).__name__, 0) + 1
    if not kinds:
        return None, kinds, kept
    graph.lint()
    new = torch.fx.GraphModule(root, graph, type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    new.eval()
    return new, kinds, kept


_ = Sequence
