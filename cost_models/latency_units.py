"""Latency units: the pieces of a graph whose time is measured, as standalone layers.

A *unit* is what a runtime executes as one piece of work: a compute op (conv, depthwise conv,
linear, matmul, attention) together with the per-channel ops that follow it alone and that
runtimes fuse into it (BatchNorm, activations, scalar scale/shift: ``conv -> bn -> relu`` is one
unit, as ONNX Runtime folds and fuses it and PyTorch runs it back to back), or one memory-bound
op that stands alone (a residual ``add`` and the ReLU after it, a squeeze-excitation ``mul``,
pooling, LayerNorm, softmax). Shape ops (view, reshape, permute, flatten, getitem, cat, split)
and identities (dropout, stochastic depth in eval) are free.

A :class:`UnitTemplate` is a unit of a captured graph with its channel dimensions still
symbolic: each tensor dimension that pruning changes is linked to the dependency groups whose
keep counts set it (``size = fixed + sum(mult[g] * keep[g])``, the forms of the dependency
analysis). :meth:`UnitTemplate.concrete` turns it into a :class:`UnitSpec` for one plan: every
shape concrete, hashable, with a canonical :meth:`UnitSpec.key`, so identical layers (the
bottlenecks of a ResNet stage, the twelve blocks of a ViT) are measured once.

A spec is built into a runnable layer for the runtime that times it: :func:`build_torch`
(``nn.Module`` + inputs, any device and dtype) and :func:`build_onnx` (an ONNX model written
directly with ``onnx.helper`` in milliseconds, with the same op patterns fxprune's exporter emits,
so ONNX Runtime fuses them the same way).

Ops without a unit kind whose dimensions pruning changes are listed in
:attr:`Extraction.unmodelled`: their time stays in the model's measured fixed part.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune.ir import TensorInfo
from fxprune.opset.layers import conv_kind

__all__ = [
    "OpSpec",
    "UnitSpec",
    "UnitTemplate",
    "Extraction",
    "extract_units",
    "classify",
    "build_torch",
    "build_onnx",
    "spec_macs",
    "spec_bytes",
    "shapes_at_batch",
]

#: Unary per-channel ops a runtime fuses into the op before them.
FOLLOWERS = frozenset({"bn", "act", "scale", "shift"})
BINARY = frozenset({"add", "mul", "sub", "div"})
ACTS = frozenset({"relu", "relu6", "silu", "gelu", "gelu_tanh", "sigmoid", "hardswish", "hardsigmoid", "tanh"})

_IDENTITY = "identity"
_FREE = "free"


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    """One op of a unit: its kind, static attributes and output shape.

    ``attrs`` is a sorted tuple of ``(name, value)`` pairs (hashable). Kinds: ``conv`` (kernel,
    stride, padding, dilation, groups, depthwise, bias), ``linear`` (bias), ``matmul``, ``sdpa``
    (causal, scale, mask), ``add``/``mul``/``sub``/``div`` (two tensors, broadcasting), ``bn``,
    ``ln`` (nd: normalised trailing dims), ``act`` (fn), ``scale``/``shift`` (x*c, x+c),
    ``softmax`` (dim), ``pool`` (mode, kernel, stride, padding, ceil), ``gap`` (global average
    pool), ``mean`` (dims, keepdim).
    """

    kind: str
    attrs: tuple[tuple[str, Any], ...]
    out: tuple[int, ...]

    def get(self, name: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == name:
                return v
        return default


@dataclass(frozen=True)
class UnitSpec:
    """A concrete unit: ops applied in order to external inputs of fixed shapes.

    The first op consumes the external inputs (one for unary ops and convs, two for binary ops and
    matmul, three or four for attention); every later op is unary and consumes the previous op's
    output.
    """

    ops: tuple[OpSpec, ...]
    inputs: tuple[tuple[int, ...], ...]

    def key(self) -> str:
        """Canonical text of the spec (the measurement cache key, with the runtime settings)."""
        ops = [[o.kind, [[k, _jsonable(v)] for k, v in o.attrs], list(o.out)] for o in self.ops]
        return json.dumps([ops, [list(s) for s in self.inputs]], separators=(",", ":"))

    @property
    def label(self) -> str:
        kinds = "+".join(o.kind if o.kind != "act" else str(o.get("fn")) for o in self.ops)
        return f"{kinds} {'x'.join(str(d) for d in self.inputs[0]) if self.inputs else ''}".strip()


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _attrs(**kw: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, _freeze(v)) for k, v in kw.items()))


def _freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, torch.Size):
        return tuple(int(x) for x in v)
    return v


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ax:
    """A symbolic dimension: axis ``index`` of the unit template."""

    index: int


@dataclass(frozen=True)
class AxisForm:
    """``size = round((fixed + sum(mult[g] * keep[g])) * ratio)`` of one symbolic dimension.

    ``ratio`` scales a dimension that also carries the batch (shapes at another batch size).
    """

    fixed: int
    mult: tuple[tuple[int, int], ...]
    ratio: float = 1.0

    def size(self, keep: Mapping[int, int] | np.ndarray) -> int:
        total = self.fixed + sum(m * int(keep[g]) for g, m in self.mult)
        return int(round(total * self.ratio))

    @property
    def groups(self) -> tuple[int, ...]:
        return tuple(g for g, _ in self.mult)


@dataclass
class UnitTemplate:
    """A unit of a captured graph whose channel dimensions follow the plan.

    Attributes:
        nodes: names of the fx nodes in the unit (anchor first).
        ops: the ops with output shapes that may hold :class:`Ax` entries.
        inputs: external input shapes (may hold :class:`Ax`).
        axes: the symbolic dimensions.
        label: a readable description (module path and kinds).
    """

    nodes: tuple[str, ...]
    ops: tuple[OpSpec, ...]
    inputs: tuple[tuple[Any, ...], ...]
    axes: tuple[AxisForm, ...] = ()
    label: str = ""

    @property
    def groups(self) -> tuple[int, ...]:
        """The dependency groups whose keep counts change this unit, ascending."""
        return tuple(sorted({g for a in self.axes for g in a.groups}))

    def concrete(self, keep: Mapping[int, int] | np.ndarray) -> UnitSpec:
        """The unit at a plan (``keep[g]`` for every group in :attr:`groups`)."""
        sizes = [a.size(keep) for a in self.axes]

        def sub(shape):
            return tuple(sizes[d.index] if isinstance(d, Ax) else int(d) for d in shape)

        inputs = tuple(sub(s) for s in self.inputs)
        ops, shape = [], inputs[0] if inputs else ()
        for o in self.ops:
            attrs = o.attrs
            if o.kind == "conv" and len(shape) > 1 and (o.get("depthwise") or o.get("group_width")):
                # the group count at this width: the same spec as the pruned model's own layer
                attrs = _attrs(**{**{k: v for k, v in o.attrs if k != "group_width"}, "groups": conv_groups(o, shape[1])})
            ops.append(OpSpec(o.kind, attrs, sub(o.out)))
            shape = ops[-1].out
        return UnitSpec(tuple(ops), inputs)


@dataclass
class Extraction:
    """The units of a graph and what could not be modelled."""

    units: list[UnitTemplate]
    unmodelled: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Classification of fx nodes
# --------------------------------------------------------------------------------------------


def _aten(name: str) -> Any:
    try:
        pkt, _, overload = name.partition(".")
        return getattr(getattr(torch.ops.aten, pkt), overload or "default")
    except (AttributeError, RuntimeError):
        return None


def _targets(*names: str) -> set:
    out = set()
    for n in names:
        t = _aten(n)
        if t is not None:
            out.add(t)
    return out


_ADD = {operator.add, operator.iadd, torch.add} | _targets("add.Tensor", "add_.Tensor", "add.Scalar")
_MUL = {operator.mul, operator.imul, torch.mul} | _targets("mul.Tensor", "mul_.Tensor", "mul.Scalar")
_SUB = {operator.sub, torch.sub} | _targets("sub.Tensor")
_DIV = {operator.truediv, torch.div} | _targets("div.Tensor")
_ACT_FN = {
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", torch.tanh: "tanh",
    F.tanh: "tanh",
}
for _n, _fn in (("relu.default", "relu"), ("relu_.default", "relu"), ("silu.default", "silu"),
                ("sigmoid.default", "sigmoid"), ("tanh.default", "tanh"), ("hardswish.default", "hardswish"),
                ("hardsigmoid.default", "hardsigmoid")):
    for _t in _targets(_n):
        _ACT_FN[_t] = _fn
_GELU = {F.gelu} | _targets("gelu.default")
_SDPA = {F.scaled_dot_product_attention} | _targets("scaled_dot_product_attention.default")
_MATMUL = {torch.matmul, operator.matmul, torch.bmm} | _targets("matmul.default", "bmm.default")
_SOFTMAX = {F.softmax, torch.softmax} | _targets("softmax.int", "_softmax.default")
_LAYER_NORM = {F.layer_norm} | _targets("layer_norm.default")
_LINEAR = {F.linear} | _targets("linear.default")
_IDENTITY_FN = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout} | _targets(
    "dropout.default", "clone.default", "alias.default")
_FREE_FN = {torch.flatten, torch.reshape, torch.permute, torch.transpose, operator.getitem, getattr,
            torch.cat, torch.concat, torch.split, torch.chunk, torch.unsqueeze, torch.squeeze,
            torch.stack, torch.narrow} | _targets(
    "view.default", "reshape.default", "permute.default", "transpose.int", "unsqueeze.default",
    "squeeze.dim", "flatten.using_ints", "expand.default", "slice.Tensor", "select.int", "cat.default",
    "split.Tensor", "split_with_sizes.default", "t.default", "contiguous.default", "_unsafe_view.default")
_FREE_METHODS = {"view", "reshape", "permute", "transpose", "flatten", "contiguous", "size", "expand",
                 "unsqueeze", "squeeze", "split", "chunk", "dim", "t", "unflatten", "expand_as", "view_as",
                 "reshape_as", "type_as", "to", "float", "half", "__getitem__", "unbind", "narrow"}
_ACT_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "relu_": "relu", "sigmoid_": "sigmoid"}
_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Sigmoid: "sigmoid",
                nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.Tanh: "tanh"}


def _stochastic_depth_fns() -> set:
    out = set()
    try:
        from torchvision.ops import stochastic_depth

        out.add(stochastic_depth)
    except Exception:  # pragma: no cover - torchvision missing
        pass
    return out


def _shape(n: Any, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    if isinstance(n, torch.fx.Node):
        return shapes.get(n.name)
    return None


def _tensor_args(node: torch.fx.Node, shapes: Mapping[str, tuple[int, ...]]) -> list[torch.fx.Node]:
    return [a for a in node.all_input_nodes if a.name in shapes]


def _arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def classify(node: torch.fx.Node, gm: torch.fx.GraphModule, shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """What a node is for the latency model.

    Returns an :class:`OpSpec` (attributes filled in, ``out`` = the node's output shape), the
    string ``"identity"`` (passes its input through: dropout, stochastic depth in eval),
    ``"free"`` (no time worth modelling: shape ops, constants), or ``None`` (unknown).
    """
    out = shapes.get(node.name)
    if node.op in ("placeholder", "output", "get_attr"):
        return _FREE
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return _classify_module(node, mod, out, shapes)
    if out is None:
        return _FREE  # non-tensor results: sizes, flags
    if node.op == "call_method":
        return _classify_method(node, out, shapes)
    return _classify_function(node, out, shapes)


def _classify_module(node, mod: nn.Module, out, shapes) -> Any:
    if isinstance(mod, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)):
        return _IDENTITY
    if type(mod).__name__ == "StochasticDepth":
        return _IDENTITY
    if isinstance(mod, (nn.Flatten, nn.Unflatten)):
        return _FREE
    if out is None:
        return None
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if mod.padding_mode != "zeros":
            return None
        x = _shape(node.args[0] if node.args else None, shapes)
        if x is None:
            return None
        nd = x[2:]
        pads = _conv_pads(mod.padding, mod.kernel_size, mod.dilation, mod.stride, nd)
        depthwise = mod.groups > 1 and mod.groups == mod.in_channels
        # pruned by whole conv groups (fxprune.opset.layers.conv_kind): the channels per group stay
        whole = conv_kind(node, mod.groups, mod.in_channels, mod.out_channels) == "whole"
        # the group count of a conv pruned by whole groups follows its width: only the width per group is kept
        grouping = {"group_width": mod.in_channels // mod.groups} if whole else {"groups": mod.groups}
        return OpSpec("conv", _attrs(kernel=mod.kernel_size, stride=mod.stride, pads=pads, dilation=mod.dilation,
                                     depthwise=depthwise, bias=mod.bias is not None, **grouping), out)
    if isinstance(mod, nn.Linear):
        return OpSpec("linear", _attrs(bias=mod.bias is not None), out)
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return OpSpec("bn", (), out)
    if isinstance(mod, nn.LayerNorm):
        return OpSpec("ln", _attrs(nd=len(mod.normalized_shape), bias=getattr(mod, "bias", None) is not None), out)
    for cls, fn in _ACT_MODULES.items():
        if type(mod) is cls:
            return OpSpec("act", _attrs(fn=fn), out)
    if isinstance(mod, nn.Hardtanh) and not isinstance(mod, nn.ReLU6):
        return OpSpec("act", _attrs(fn="relu6"), out) if (mod.min_val, mod.max_val) == (0.0, 6.0) else None
    if isinstance(mod, nn.GELU):
        return OpSpec("act", _attrs(fn="gelu_tanh" if mod.approximate == "tanh" else "gelu"), out)
    if isinstance(mod, nn.Softmax):
        return OpSpec("softmax", _attrs(dim=(mod.dim if mod.dim is not None else -1) % len(out)), out)
    if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
        return _pool_spec("max" if isinstance(mod, nn.MaxPool2d) else "avg", mod.kernel_size, mod.stride,
                          mod.padding, mod.ceil_mode, getattr(mod, "dilation", 1),
                          getattr(mod, "count_include_pad", True), out)
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        size = mod.output_size if isinstance(mod.output_size, tuple) else (mod.output_size, mod.output_size)
        return OpSpec("gap", (), out) if tuple(size) == (1, 1) else None
    return None


def _classify_method(node, out, shapes) -> Any:
    name = str(node.target)
    if name in _FREE_METHODS:
        return _FREE
    if name in _ACT_METHODS:
        return OpSpec("act", _attrs(fn=_ACT_METHODS[name]), out)
    if name in ("add", "mul", "sub", "div", "add_", "mul_"):
        return _binary(name.rstrip("_"), node, out, shapes)
    if name == "softmax":
        dim = _arg(node, 1, "dim", -1)
        return OpSpec("softmax", _attrs(dim=int(dim) % len(out)), out)
    if name == "matmul":
        return OpSpec("matmul", (), out)
    if name == "mean":
        return _mean(node, out, shapes)
    return None


def _classify_function(node, out, shapes) -> Any:
    t = node.target
    if t in _IDENTITY_FN or t in _stochastic_depth_fns():
        return _IDENTITY
    if t in _FREE_FN:
        return _FREE
    if t in _ADD:
        return _binary("add", node, out, shapes)
    if t in _MUL:
        return _binary("mul", node, out, shapes)
    if t in _SUB:
        return _binary("sub", node, out, shapes)
    if t in _DIV:
        return _binary("div", node, out, shapes)
    if t in _ACT_FN:
        return OpSpec("act", _attrs(fn=_ACT_FN[t]), out)
    if t is F.hardtanh:
        lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
        return OpSpec("act", _attrs(fn="relu6"), out) if (lo, hi) == (0.0, 6.0) else None
    if t in _GELU:
        approx = node.kwargs.get("approximate", "none")
        return OpSpec("act", _attrs(fn="gelu_tanh" if approx == "tanh" else "gelu"), out)
    if t in _SDPA:
        mask = _arg(node, 3, "attn_mask")
        causal = bool(_arg(node, 5, "is_causal", False))
        scale = node.kwargs.get("scale")
        return OpSpec("sdpa", _attrs(mask=isinstance(mask, torch.fx.Node), causal=causal,
                                     scale=float(scale) if _scalar(scale) else None), out)
    if t in _MATMUL:
        return OpSpec("matmul", (), out)
    if t in _SOFTMAX:
        dim = _arg(node, 1, "dim", -1)
        return OpSpec("softmax", _attrs(dim=int(dim) % len(out)), out) if isinstance(dim, int) else None
    if t in _LAYER_NORM:
        ns = _arg(node, 1, "normalized_shape")
        if not isinstance(ns, (list, tuple)):
            return None
        return OpSpec("ln", _attrs(nd=len(ns), bias=_arg(node, 3, "bias") is not None), out)
    if t in _LINEAR:
        return OpSpec("linear", _attrs(bias=_arg(node, 2, "bias") is not None), out)
    if t is F.adaptive_avg_pool2d:
        size = _arg(node, 1, "output_size")
        size = (size, size) if isinstance(size, int) else tuple(size or ())
        return OpSpec("gap", (), out) if size == (1, 1) else None
    if t in (F.max_pool2d, F.avg_pool2d):
        k = _arg(node, 1, "kernel_size")
        s = _arg(node, 2, "stride") or k
        p = _arg(node, 3, "padding", 0)
        if t is F.max_pool2d:
            return _pool_spec("max", k, s, p, bool(node.kwargs.get("ceil_mode", False)),
                              _arg(node, 4, "dilation", 1), True, out)
        return _pool_spec("avg", k, s, p, bool(_arg(node, 4, "ceil_mode", False)), 1,
                          bool(_arg(node, 5, "count_include_pad", True)), out)
    if t is torch.mean:
        return _mean(node, out, shapes)
    if getattr(t, "__name__", "") in ("arange", "zeros", "ones", "full", "empty", "tensor"):
        return _FREE
    return None


def _binary(kind: str, node, out, shapes) -> Any:
    a, b = node.args[0] if node.args else None, node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    sa, sb = _shape(a, shapes), _shape(b, shapes)
    if sa is not None and sb is not None:
        return OpSpec(kind, (), out)
    if (sa is not None and _scalar(b)) or (sb is not None and _scalar(a)):
        if kind in ("mul", "div"):
            return OpSpec("scale", (), out)
        return OpSpec("shift", (), out)
    return None


def _mean(node, out, shapes) -> Any:
    x = _shape(node.args[0] if node.args else None, shapes)
    dims = _arg(node, 1, "dim")
    if x is None or dims is None:
        return None
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    keep = bool(_arg(node, 2, "keepdim", False))
    return OpSpec("mean", _attrs(dims=tuple(sorted(d % len(x) for d in dims)), keepdim=keep), out)


def _pool_spec(mode, k, s, p, ceil, dilation, count_include_pad, out) -> Any:
    k, s, p, d = (_pair(v) for v in (k, s if s else k, p, dilation))
    if d != (1, 1):
        return None
    return OpSpec("pool", _attrs(mode=mode, kernel=k, stride=s, pads=p + p, ceil=bool(ceil),
                                 count_include_pad=bool(count_include_pad)), out)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return tuple(int(x) for x in v)  # type: ignore[return-value]


def _conv_pads(padding, kernel, dilation, stride, spatial) -> tuple[int, ...]:
    """Explicit (begin..., end...) pads of a conv (``"same"``/``"valid"`` resolved)."""
    n = len(kernel)
    if padding == "valid":
        return (0,) * (2 * n)
    if padding == "same":
        begin, end = [], []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            begin.append(total // 2)
            end.append(total - total // 2)
        return tuple(begin + end)
    p = tuple(padding) if isinstance(padding, (tuple, list)) else (padding,) * n
    return tuple(p) + tuple(p)


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


def shapes_at_batch(gm: torch.fx.GraphModule, inputs: Sequence[Any], batch: int) -> dict[str, tuple[int, ...]]:
    """Every tensor node's shape at ``batch``, from the shapes recorded at the example's batch.

    Dimensions that change between the example batch and twice it are batch-proportional; they
    are scaled, everything else is kept. Runs the graph once at twice the example batch.
    """
    base = _recorded_shapes(gm)
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    b0 = int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 1
    if batch == b0:
        return base
    doubled = [torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() else x for x in inputs]
    other = _run_shapes(gm, doubled)
    out = {}
    for name, shape in base.items():
        s2 = other.get(name)
        if s2 is None or len(s2) != len(shape):
            out[name] = shape
            continue
        out[name] = tuple(int(a + (c - a) * (batch - b0) / b0) if c != a else a for a, c in zip(shape, s2))
    return out


def _recorded_shapes(gm: torch.fx.GraphModule) -> dict[str, tuple[int, ...]]:
    out = {}
    for n in gm.graph.nodes:
        info = n.meta.get("fxprune.shape")
        if isinstance(info, TensorInfo):
            out[n.name] = tuple(int(s) for s in info.shape)
    return out


def _run_shapes(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    class _Rec(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if isinstance(result, torch.Tensor):
                shapes[n.name] = tuple(int(s) for s in result.shape)
            return result

    was = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            _Rec(gm).run(*inputs)
    finally:
        gm.train(was)
    return shapes


def extract_units(gm: torch.fx.GraphModule, forms: Mapping[tuple[str, int], Any] | None = None,
                  shapes: Mapping[str, tuple[int, ...]] | None = None,
                  base_shapes: Mapping[str, tuple[int, ...]] | None = None) -> Extraction:
    """The latency units of ``gm``.

    Args:
        gm: a shape-annotated graph (``ShapePropPass`` has run).
        forms: ``(node, dim) -> SpaceForm`` of the dependency analysis (sizes as a function of the
            plan); without it every unit is concrete (no symbolic dimension).
        shapes: tensor shapes to use (e.g. :func:`shapes_at_batch`); default the recorded ones.
        base_shapes: the shapes the forms were computed at (default the recorded ones); a
            dimension whose size differs from it is scaled by the ratio.
    """
    recorded = _recorded_shapes(gm)
    shapes = dict(shapes) if shapes is not None else recorded
    base_shapes = dict(base_shapes) if base_shapes is not None else recorded
    forms = forms or {}
    users = {n.name: len(n.users) for n in gm.graph.nodes}
    alias: dict[str, torch.fx.Node] = {}  # identity node -> the node it passes through
    units: list[dict[str, Any]] = []
    tail: dict[str, int] = {}  # node name -> unit whose last op it is
    unmodelled: list[str] = []

    def source(n: torch.fx.Node) -> torch.fx.Node:
        while n.name in alias:
            n = alias[n.name]
        return n

    def single_chain(producer: torch.fx.Node, consumer: torch.fx.Node) -> bool:
        """``producer``'s only use is ``consumer``, possibly through identities with one user each."""
        n = consumer
        while True:
            inputs = [a for a in n.all_input_nodes if a.name in shapes]
            if len(inputs) != 1:
                return False
            prev = inputs[0]
            if users.get(prev.name, 0) != 1:
                return False
            if prev is producer:
                return True
            if prev.name not in alias:
                return False
            n = prev

    for node in gm.graph.nodes:
        kind = classify(node, gm, shapes)
        if kind == _IDENTITY:
            ins = [a for a in node.all_input_nodes if a.name in shapes]
            if ins:
                alias[node.name] = ins[0]
            continue
        if kind == _FREE:
            continue
        if kind is None:
            if _varies(node, forms) and node.op != "output":
                unmodelled.append(_node_label(node, gm))
            continue
        spec: OpSpec = kind
        ins = [source(a) for a in _tensor_args(node, shapes)]
        if spec.kind in FOLLOWERS and len(ins) == 1 and ins[0].name in tail and single_chain(ins[0], node):
            u = tail.pop(ins[0].name)
            units[u]["ops"].append((node, spec))
            tail[node.name] = u
            continue
        if spec.kind in ("conv", "linear", "bn", "ln", "act", "scale", "shift", "softmax", "pool", "gap", "mean"):
            ins = ins[:1]
        if not ins:
            continue
        units.append({"ops": [(node, spec)], "inputs": ins})
        tail[node.name] = len(units) - 1

    out = [_template(u, gm, forms, shapes, base_shapes) for u in units]
    return Extraction(out, unmodelled)


def _varies(node: torch.fx.Node, forms: Mapping[tuple[str, int], Any]) -> bool:
    for (name, _), form in forms.items():
        if name == node.name and getattr(form, "mult", None):
            return True
    return False


def _node_label(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(str(node.target))).__name__})"
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"


def _template(unit: dict[str, Any], gm, forms, shapes, base_shapes) -> UnitTemplate:
    axes: list[AxisForm] = []
    index: dict[AxisForm, int] = {}

    def dims(name: str) -> tuple[Any, ...]:
        shape = shapes[name]
        base = base_shapes.get(name, shape)
        out = []
        for d, size in enumerate(shape):
            form = forms.get((name, d))
            if form is None or not form.mult:
                out.append(int(size))
                continue
            ratio = size / base[d] if base[d] and len(base) == len(shape) else 1.0
            ax = AxisForm(int(form.fixed), tuple(sorted((int(g), int(m)) for g, m in form.mult.items())),
                          float(ratio))
            if ax not in index:
                index[ax] = len(axes)
                axes.append(ax)
            out.append(Ax(index[ax]))
        return tuple(out)

    ops = tuple(OpSpec(spec.kind, spec.attrs, dims(node.name)) for node, spec in unit["ops"])
    inputs = tuple(dims(n.name) for n in unit["inputs"])
    first = unit["ops"][0][0]
    path = str(first.target) if first.op == "call_module" else first.name
    kinds = "+".join(s.kind if s.kind != "act" else str(s.get("fn")) for _, s in unit["ops"])
    return UnitTemplate(tuple(n.name for n, _ in unit["ops"]), ops, inputs, tuple(axes), f"{path} [{kinds}]")


# --------------------------------------------------------------------------------------------
# Work estimates (the fake runtime's clock, and reports)
# --------------------------------------------------------------------------------------------


def conv_groups(op: OpSpec, cin: int) -> int:
    """A conv op's group count at ``cin`` input channels: depthwise convs and convs pruned by whole
    groups (``group_width``) change it with the width; other grouped convs keep it."""
    if op.get("depthwise"):
        return cin
    width = int(op.get("group_width") or 0)
    return max(cin // width, 1) if width else int(op.get("groups"))


def spec_macs(spec: UnitSpec, pad: int = 1) -> float:
    """Multiply-accumulates of a spec, channel counts rounded up to multiples of ``pad``."""

    def up(c: int) -> int:
        return int(math.ceil(c / pad) * pad) if pad > 1 else c

    total = 0.0
    shape = spec.inputs[0] if spec.inputs else ()
    for op in spec.ops:
        if op.kind == "conv":
            cin, cout = shape[1], op.out[1]
            groups = conv_groups(op, cin)
            per_group_in = cin // max(groups, 1)
            per_group_in = per_group_in if op.get("depthwise") else up(per_group_in)
            total += shape[0] * math.prod(op.out[2:]) * up(cout) * per_group_in * math.prod(op.get("kernel"))
        elif op.kind == "linear":
            total += math.prod(op.out[:-1]) * up(op.out[-1]) * up(shape[-1])
        elif op.kind == "matmul" and len(spec.inputs) >= 2:
            a = spec.inputs[0]
            total += math.prod(op.out) * up(a[-1])
        elif op.kind == "sdpa":
            q, k = spec.inputs[0], spec.inputs[1]
            total += math.prod(q[:-1]) * k[-2] * (up(q[-1]) + up(spec.inputs[2][-1]))
        shape = op.out
    return total


def spec_bytes(spec: UnitSpec, pad: int = 1, itemsize: int = 4) -> float:
    """Bytes read and written by a spec's activations (channel dim 1 rounded up to ``pad``)."""

    def numel(s):
        if len(s) >= 2 and pad > 1:
            s = (s[0], int(math.ceil(s[1] / pad) * pad), *s[2:])
        return math.prod(s)

    total = sum(numel(s) for s in spec.inputs)
    total += sum(numel(o.out) for o in spec.ops)
    return float(total * itemsize)


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


class _Act(nn.Module):
    def __init__(self, fn: str):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        fn = self.fn
        if fn == "relu":
            return F.relu(x)
        if fn == "relu6":
            return F.relu6(x)
        if fn == "silu":
            return F.silu(x)
        if fn == "gelu":
            return F.gelu(x)
        if fn == "gelu_tanh":
            return F.gelu(x, approximate="tanh")
        if fn == "sigmoid":
            return torch.sigmoid(x)
        if fn == "hardswish":
            return F.hardswish(x)
        if fn == "hardsigmoid":
            return F.hardsigmoid(x)
        if fn == "tanh":
            return torch.tanh(x)
        raise ValueError(f"unknown activation {fn!r}")


class _Op(nn.Module):
    """One op of a unit as a module (weights random, shapes from the spec)."""

    def __init__(self, op: OpSpec, in_shape: tuple[int, ...]):
        super().__init__()
        self.kind = op.kind
        self.op = op
        k = op.kind
        if k == "conv":
            cin, cout = in_shape[1], op.out[1]
            groups = conv_groups(op, cin)
            nd = len(op.get("kernel"))
            cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
            pads = op.get("pads")
            sym = tuple(pads[:nd]) == tuple(pads[nd:])
            self.pad = None if sym else tuple(x for i in reversed(range(nd)) for x in (pads[i], pads[nd + i]))
            self.mod = cls(cin, cout, op.get("kernel"), op.get("stride"), tuple(pads[:nd]) if sym else 0,
                           op.get("dilation"), groups, bias=bool(op.get("bias")))
        elif k == "linear":
            self.mod = nn.Linear(in_shape[-1], op.out[-1], bias=bool(op.get("bias")))
        elif k == "bn":
            c = in_shape[1]
            self.mod = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(in_shape)](c)
        elif k == "ln":
            nd = int(op.get("nd"))
            self.mod = nn.LayerNorm(tuple(in_shape[-nd:]), bias=bool(op.get("bias", True)))
        elif k == "act":
            self.mod = _Act(str(op.get("fn")))
        elif k == "pool":
            cls = nn.MaxPool2d if op.get("mode") == "max" else nn.AvgPool2d
            kw = dict(kernel_size=op.get("kernel"), stride=op.get("stride"), padding=tuple(op.get("pads")[:2]),
                      ceil_mode=bool(op.get("ceil")))
            if cls is nn.AvgPool2d:
                kw["count_include_pad"] = bool(op.get("count_include_pad"))
            self.mod = cls(**kw)
        else:
            self.mod = None

    def forward(self, *xs):
        k = self.kind
        if self.mod is not None:
            x = xs[0]
            if k == "conv" and self.pad is not None:
                x = F.pad(x, self.pad)
            return self.mod(x)
        if k == "add":
            return xs[0] + xs[1]
        if k == "mul":
            return xs[0] * xs[1]
        if k == "sub":
            return xs[0] - xs[1]
        if k == "div":
            return xs[0] / xs[1]
        if k == "scale":
            return xs[0] * 0.5
        if k == "shift":
            return xs[0] + 0.5
        if k == "softmax":
            return torch.softmax(xs[0], int(self.op.get("dim")))
        if k == "gap":
            return F.adaptive_avg_pool2d(xs[0], 1)
        if k == "mean":
            return xs[0].mean(dim=tuple(self.op.get("dims")), keepdim=bool(self.op.get("keepdim")))
        if k == "matmul":
            return torch.matmul(xs[0], xs[1])
        if k == "sdpa":
            mask = xs[3] if len(xs) > 3 else None
            return F.scaled_dot_product_attention(xs[0], xs[1], xs[2], attn_mask=mask,
                                                  is_causal=bool(self.op.get("causal")) and mask is None,
                                                  scale=self.op.get("scale"))
        raise ValueError(f"unknown op kind {k!r}")


class UnitModule(nn.Module):
    """A :class:`UnitSpec` as a runnable module."""

    def __init__(self, spec: UnitSpec):
        super().__init__()
        layers = []
        shape = spec.inputs[0]
        for op in spec.ops:
            layers.append(_Op(op, shape))
            shape = op.out
        self.layers = nn.ModuleList(layers)

    def forward(self, *xs):
        y = self.layers[0](*xs)
        for layer in self.layers[1:]:
            y = layer(y)
        return y


def _sdpa_mask_shape(spec: UnitSpec) -> bool:
    return spec.ops[0].kind == "sdpa" and bool(spec.ops[0].get("mask"))


def build_torch(spec: UnitSpec, *, device: Any = "cpu", dtype: torch.dtype = torch.float32,
                channels_last: bool = False, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The unit as an eval-mode module on ``device``/``dtype`` and random inputs for it.

    Inputs are drawn on the device itself (a batch-256 activation can be hundreds of MB: drawing it
    on the CPU and copying would cost more than timing the layer); weights keep PyTorch's default
    initialisation (values do not change dense kernels' time).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    module = UnitModule(spec).eval().to(device=device, dtype=dtype)
    out = []
    for i, shape in enumerate(spec.inputs):
        if _sdpa_mask_shape(spec) and i == 3:
            x = torch.zeros(shape, device=device, dtype=dtype)
        else:
            x = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(x)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module, tuple(out)


def build_onnx(spec: UnitSpec, opset: int = 17) -> Any:
    """The unit as an fp32 ONNX model (fixed shapes), written directly with ``onnx.helper``.

    The op patterns are those the TorchScript exporter emits for the same layers (Conv with the
    BatchNorm as a separate node ONNX Runtime folds, GELU as the erf formula it fuses, SiLU as
    Sigmoid*x, ReLU6 as Clip, 3-D linears as MatMul+Add), so the runtime's graph optimisations
    treat the unit as they treat it inside the whole model.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes: list[Any] = []
    inits: list[Any] = []
    counter = [0]

    def name(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}_{counter[0]}"

    def const(array: np.ndarray) -> str:
        n = name("c")
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), n))
        return n

    def weight(shape) -> str:
        return const((rng.standard_normal(shape) * 0.05).astype(np.float32))

    def node(op: str, inputs: list[str], **attrs: Any) -> str:
        out = name(op.lower())
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    inputs = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, list(s)) for i, s in enumerate(spec.inputs)]
    xs = [f"x{i}" for i in range(len(spec.inputs))]
    shape = spec.inputs[0]
    cur = xs[0]
    for i, op in enumerate(spec.ops):
        k = op.kind
        if k == "conv":
            cin, cout = shape[1], op.out[1]
            groups = conv_groups(op, cin)
            kernel = list(op.get("kernel"))
            w = weight([cout, cin // groups, *kernel])
            args = [cur, w] + ([const(rng.standard_normal(cout) * 0.05)] if op.get("bias") else [])
            cur = node("Conv", args, kernel_shape=kernel, strides=list(op.get("stride")), pads=list(op.get("pads")),
                       dilations=list(op.get("dilation")), group=groups)
        elif k == "linear":
            cin, cout = shape[-1], op.out[-1]
            if len(shape) == 2:
                args = [cur, weight([cout, cin])] + ([const(rng.standard_normal(cout) * 0.05)] if op.get("bias") else [])
                cur = node("Gemm", args, transB=1)
            else:
                cur = node("MatMul", [cur, weight([cin, cout])])
                if op.get("bias"):
                    cur = node("Add", [cur, const(rng.standard_normal(cout) * 0.05)])
        elif k == "bn":
            c = shape[1]
            cur = node("BatchNormalization", [cur, const(np.ones(c)), const(np.zeros(c)), const(np.zeros(c)),
                                              const(np.ones(c))], epsilon=1e-5)
        elif k == "ln":
            nd = int(op.get("nd"))
            norm = list(shape[-nd:])
            args = [cur, const(np.ones(norm))] + ([const(np.zeros(norm))] if op.get("bias", True) else [])
            cur = node("LayerNormalization", args, axis=-nd, epsilon=1e-5)
        elif k == "act":
            cur = _onnx_act(str(op.get("fn")), cur, node, const)
        elif k in BINARY:
            cur = node({"add": "Add", "mul": "Mul", "sub": "Sub", "div": "Div"}[k], [xs[0], xs[1]])
        elif k == "scale":
            cur = node("Mul", [cur, const(np.array(0.5))])
        elif k == "shift":
            cur = node("Add", [cur, const(np.array(0.5))])
        elif k == "softmax":
            cur = node("Softmax", [cur], axis=int(op.get("dim")))
        elif k == "pool":
            attrs = dict(kernel_shape=list(op.get("kernel")), strides=list(op.get("stride")), pads=list(op.get("pads")),
                         ceil_mode=int(bool(op.get("ceil"))))
            if op.get("mode") == "max":
                cur = node("MaxPool", [cur], **attrs)
            else:
                cur = node("AveragePool", [cur], count_include_pad=int(bool(op.get("count_include_pad"))), **attrs)
        elif k == "gap":
            cur = node("GlobalAveragePool", [cur])
        elif k == "mean":
            cur = node("ReduceMean", [cur], axes=list(op.get("dims")), keepdims=int(bool(op.get("keepdim"))))
        elif k == "matmul":
            cur = node("MatMul", [xs[0], xs[1]])
        elif k == "sdpa":
            q, key, v = xs[0], xs[1], xs[2]
            d = spec.inputs[0][-1]
            scale = op.get("scale")
            s = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(d))
            rank = len(spec.inputs[1])
            perm = list(range(rank - 2)) + [rank - 1, rank - 2]
            kt = node("Transpose", [key], perm=perm)
            scores = node("MatMul", [node("Mul", [q, const(np.array(s))]), node("Mul", [kt, const(np.array(s))])])
            if len(xs) > 3:
                scores = node("Add", [scores, xs[3]])
            cur = node("MatMul", [node("Softmax", [scores], axis=-1), v])
        else:
            raise ValueError(f"no ONNX pattern for unit op {k!r}")
        shape = op.out
    out = helper.make_tensor_value_info(cur, TensorProto.FLOAT, list(spec.ops[-1].out))
    graph = helper.make_graph(nodes, "unit", inputs, [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    return model


def _onnx_act(fn: str, x: str, node, const) -> str:
    if fn == "relu":
        return node("Relu", [x])
    if fn == "relu6":
        return node("Clip", [x, const(np.array(0.0)), const(np.array(6.0))])
    if fn == "silu":
        return node("Mul", [x, node("Sigmoid", [x])])
    if fn == "sigmoid":
        return node("Sigmoid", [x])
    if fn == "tanh":
        return node("Tanh", [x])
    if fn == "hardswish":
        return node("HardSwish", [x])
    if fn == "hardsigmoid":
        return node("HardSigmoid", [x], alpha=1.0 / 6.0, beta=0.5)
    if fn == "gelu":
        erf = node("Erf", [node("Div", [x, const(np.array(math.sqrt(2.0)))])])
        return node("Mul", [node("Mul", [x, node("Add", [erf, const(np.array(1.0))])]), const(np.array(0.5))])
    if fn == "gelu_tanh":
        cube = node("Mul", [node("Mul", [x, x]), x])
        inner = node("Mul", [node("Add", [x, node("Mul", [cube, const(np.array(0.044715))])]),
                             const(np.array(math.sqrt(2.0 / math.pi)))])
        return node("Mul", [node("Mul", [x, node("Add", [node("Tanh", [inner]), const(np.array(1.0))])]),
                            const(np.array(0.5))])
    raise ValueError(f"unknown activation {fn!r}")


_ = (Iterable, field)
