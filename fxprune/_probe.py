"""Weightless capture probe: torch.export a meta-device copy of the model, then bind real tensors.

``torch.export`` records the model's Python-level constants as they were during the trace: a
``cos.to(dtype=x.dtype)`` becomes ``aten.to(cos, torch.float32)`` and a ``device=x.device``
becomes ``device=cpu``, so the captured graph stays pinned to the capture's dtype and device, and
``model.to(torch.bfloat16)`` breaks it. A literal ``hidden_states.to(torch.float32)`` (an fp32
upcast for precision, as in RMSNorm) records the same constant and must stay as it is.

The probe tells the two apart by exporting a structural copy of the model in which every tensor
lives on the ``meta`` device (no storage: nothing is read or copied, a 7B model costs nothing) and
every floating tensor of the model's compute dtype, and every such float input, uses a *probe
dtype* (``float64`` for a float32/bfloat16/float16 model) that the model never names itself.
In the exported graph:

* a dtype argument equal to the probe dtype was derived from the model's tensors: it becomes the
  dtype of ``fxprune_compute_dtype``, an empty non-persistent buffer of the compute dtype that
  ``.to()``, ``.half()``, ``.bfloat16()`` cast with the weights;
* ``torch.finfo(probe dtype)`` limits (``min``, ``max``, ``eps``, ``tiny``) baked as floats (mask fill
  values) become :func:`fxprune.ops.finfo_value` of that dtype, read at run time;
* a ``device=meta`` argument was derived from a tensor: :func:`fxprune._export.capture_export`
  already turns it into ``<first input>.device``; literal devices (``"cpu"``) stay as written;
* tensor constants created in ``forward`` with the probe dtype are cast back to the compute dtype.

Then :func:`bind_tensors` replaces every meta parameter and buffer by the user's tensor it stands
for (the same storage, never a copy; tied weights stay tied). Models whose weights are on the meta
device themselves (``with torch.device("meta")``, ``init_empty_weights``) are captured the same way
and keep their meta tensors: they can be profiled and planned without weights.

A model the probe cannot export (code that reads tensor values, CPU constants mixed with inputs,
``device.type`` checks that reject ``meta``) is exported on its real tensors instead, with a note:
its dtype casts then stay as recorded.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx
import torch.nn as nn

from fxprune import ops as fx_ops

__all__ = ["Probe", "make_probe", "follow_dtypes", "bind_tensors", "compute_dtype", "DTYPE_ANCHOR",
           "no_stack_traces"]

logger = logging.getLogger(__name__)

#: Name of the empty buffer whose dtype the captured graph's derived dtype arguments read.
DTYPE_ANCHOR = "fxprune_compute_dtype"

_PROBE_CANDIDATES = (torch.float64, torch.float16, torch.bfloat16)


@dataclass
class Probe:
    """A weightless stand-in for a model, for ``torch.export``.

    Attributes:
        model: structural copy of the model whose parameters and buffers are all on ``meta``.
        args / kwargs: the example inputs on ``meta`` (floats of ``dtype`` in ``probe_dtype``).
        real: ``id(meta tensor) -> the model's tensor`` it stands for.
        dtype: the model's compute dtype (the floating dtype most of its elements use), or None.
        probe_dtype: the dtype ``dtype`` is replaced by, or None when no unused dtype was left.
        weightless: the model's own tensors are on ``meta`` (nothing to bind but meta tensors).
    """

    model: nn.Module
    args: tuple
    kwargs: dict
    real: dict[int, torch.Tensor] = field(repr=False)
    dtype: torch.dtype | None
    probe_dtype: torch.dtype | None
    weightless: bool


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen.setdefault(id(t), t)
    return list(seen.values())


def compute_dtype(model: nn.Module, inputs: tuple = ()) -> torch.dtype | None:
    """The floating dtype most parameter/buffer elements of ``model`` use (else the float inputs')."""
    count: Counter = Counter()
    for t in _tensors(model):
        if t.is_floating_point():
            count[t.dtype] += t.numel()
    if not count:
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                count[t.dtype] += t.numel()
    return count.most_common(1)[0][0] if count else None


def make_probe(model: nn.Module, args: tuple, kwargs: dict) -> Probe:
    """The meta-device copy of ``model`` (see the module doc); reads and copies no tensor data."""
    tensors = _tensors(model)
    inputs = tuple(args) + tuple(kwargs.values())
    dtype = compute_dtype(model, inputs)
    used = {t.dtype for t in tensors} | {t.dtype for t in inputs if isinstance(t, torch.Tensor)}
    probe_dtype = next((d for d in _PROBE_CANDIDATES if d not in used), None) if dtype is not None else None

    def retype(t: torch.Tensor) -> torch.dtype:
        return probe_dtype if probe_dtype is not None and t.dtype == dtype else t.dtype

    memo: dict[int, Any] = {}
    real: dict[int, torch.Tensor] = {}
    for t in tensors:
        meta = torch.empty(t.shape, dtype=retype(t), device="meta")
        if isinstance(t, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=t.requires_grad)
        memo[id(t)] = meta
        real[id(meta)] = t
    probe = copy.deepcopy(model, memo)

    def on_meta(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return torch.empty(t.shape, dtype=retype(t), device="meta")

    return Probe(probe, tuple(on_meta(a) for a in args), {k: on_meta(v) for k, v in kwargs.items()}, real,
                 dtype, probe_dtype, weightless=bool(tensors) and all(t.is_meta for t in tensors))


@contextlib.contextmanager
def no_stack_traces() -> Iterator[None]:
    """Tracing without per-node Python stack traces (``torch.fx.config.do_not_emit_stack_traces``).

    fxprune never reads ``node.meta["stack_trace"]``; collecting and symbolizing one traceback per
    node is about a quarter of a ``torch.export`` of a transformer.
    """
    import torch.fx.config as fx_config

    before = getattr(fx_config, "do_not_emit_stack_traces", None)
    if before is None:  # an older torch without the switch
        yield
        return
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces = before


# ------------------------------------------------------------------------------ dtype following

def _finfo_constants(dtype: torch.dtype) -> dict[float, str]:
    info = torch.finfo(dtype)
    out: dict[float, str] = {}
    for name in ("min", "max", "eps", "tiny"):
        out.setdefault(float(getattr(info, name)), name)
    return out


def follow_dtypes(gm: torch.fx.GraphModule, probe: Probe) -> int:
    """Make probe-dtype arguments, finfo constants and tensor constants follow the compute dtype.

    Returns the number of arguments rewritten. Adds the ``fxprune_compute_dtype`` anchor buffer
    when something reads it.
    """
    if probe.probe_dtype is None:
        return 0
    pd, graph = probe.probe_dtype, gm.graph
    limits = _finfo_constants(pd)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor_nodes: dict[str, torch.fx.Node] = {}
    count = 0

    def dtype_node() -> torch.fx.Node:
        if "dtype" not in anchor_nodes:
            gm.register_buffer(DTYPE_ANCHOR, torch.empty(0, dtype=probe.dtype, device="meta"), persistent=False)
            at = placeholders[-1] if placeholders else None
            ctx = graph.inserting_after(at) if at is not None else graph.inserting_before(next(iter(graph.nodes)))
            with ctx:
                anchor = graph.get_attr(DTYPE_ANCHOR)
            with graph.inserting_after(anchor):
                anchor_nodes["dtype"] = graph.call_function(getattr, (anchor, "dtype"))
        return anchor_nodes["dtype"]

    def limit_node(name: str) -> torch.fx.Node:
        if name not in anchor_nodes:
            d = dtype_node()
            with graph.inserting_after(d):
                anchor_nodes[name] = graph.call_function(fx_ops.finfo_value, (d, name))
        return anchor_nodes[name]

    def sub(value: Any) -> Any:
        nonlocal count
        if isinstance(value, torch.dtype) and value == pd:
            count += 1
            return dtype_node()
        if isinstance(value, float) and not math.isnan(value) and value in limits:
            count += 1
            return limit_node(limits[value])
        if isinstance(value, (list, tuple)):
            return type(value)(sub(v) for v in value)
        return value

    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method", "call_module") or node in anchor_nodes.values():
            continue
        node.args = tuple(sub(a) for a in node.args)
        node.kwargs = {k: sub(v) for k, v in node.kwargs.items()}
    return count


# ---------------------------------------------------------------------------------- binding

def bind_tensors(gm: torch.fx.GraphModule, probe: Probe, device: torch.device | None) -> list[str]:
    """Replace the probe's meta tensors in ``gm`` by the model's own tensors (shared, never copied).

    Tensors ``gm`` made itself (BatchNorm's ``num_batches_tracked``, the dtype anchor, constants
    lifted from ``forward``) are created on ``device`` (the model's), in the compute dtype where
    they carry the probe dtype. Tensor constants that are plain attributes become non-persistent
    buffers, so they follow ``.to()`` like the rest of the model. Returns notes.
    """
    notes: list[str] = []
    done: dict[int, torch.Tensor] = {}
    target = device if device is not None and not probe.weightless else torch.device("meta")

    def bound(t: torch.Tensor) -> torch.Tensor:
        if id(t) in done:
            return done[id(t)]
        real = probe.real.get(id(t))
        if real is None:
            dtype = probe.dtype if probe.probe_dtype is not None and t.dtype == probe.probe_dtype else t.dtype
            if t.is_meta:
                # only tensors fxprune's capture creates itself: zero counters and the empty anchor
                new = torch.zeros(t.shape, dtype=dtype, device=target)
            else:
                new = t.to(device=target if target.type != "meta" else t.device, dtype=dtype)
            if isinstance(t, nn.Parameter):
                new = nn.Parameter(new, requires_grad=t.requires_grad)
            real = new
        done[id(t)] = real
        return real

    for mod in gm.modules():
        for store in (mod._parameters, mod._buffers):
            for key, t in list(store.items()):
                if t is not None:
                    store[key] = bound(t)
    # tensor constants the export left as plain attributes: buffers, so .to() moves them
    for mod_name, mod in list(gm.named_modules()):
        for key, value in list(vars(mod).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and not key.startswith("__"):
                delattr(mod, key)
                mod.register_buffer(key, bound(value), persistent=False)
                notes.append(f"{mod_name + '.' if mod_name else ''}{key}")
    return notes
