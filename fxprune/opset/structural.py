"""Rules for ops without parameters: graph boundaries, elementwise ops, shapes and indexing."""

from __future__ import annotations

import builtins
import operator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune import ops as fx_ops
from fxprune.ir import TensorInfo, tensor_info
from fxprune.opset._base import (
    OpRule,
    _FUNCTIONS,
    arg,
    const,
    ishape,
    norm_dim,
    register_function,
    register_method,
    register_module,
    rewritten_sizes,
    set_arg,
    shape_source,
    tensor_args,
)

__all__ = ["ElementwiseRule", "UnaryRule", "ReshapeRule", "PermuteRule", "CatRule", "SplitRule", "GetItemRule"]


# ------------------------------------------------------------------------------ graph boundary

class PlaceholderRule(OpRule):
    name = "input"

    def couple(self, node, b):
        b.freeze_node(node, "model input")


class OutputRule(OpRule):
    name = "output"

    def couple(self, node, b):
        for a in node.all_input_nodes:
            info = tensor_info(a)
            if isinstance(info, TensorInfo):
                for d in range(info.ndim):
                    b.freeze(b.space(a, d), "model output")
            else:
                b.freeze_node(a, "model output")


class GetAttrRule(OpRule):
    name = "param"

    def couple(self, node, b):
        s = ishape(node)
        if s is None:
            return
        for d in range(len(s)):
            b.tie(b.space(node, d), b.pspace(str(node.target), d))


_FUNCTIONS["placeholder"] = PlaceholderRule()
_FUNCTIONS["output"] = OutputRule()
_FUNCTIONS["get_attr"] = GetAttrRule()


# -------------------------------------------------------------------------------- elementwise

def tie_broadcast(b, node, inputs) -> bool:
    """Tie every input dim to the output dim it broadcasts into; False on a rank problem."""
    out = ishape(node)
    for a in inputs:
        s = ishape(a)
        off = len(out) - len(s)
        if off < 0:
            return False
        for d in range(len(s)):
            if s[d] == out[d + off]:
                b.tie(b.space(a, d), b.space(node, d + off))
            elif s[d] != 1:
                return False
    return True


def _size_sources(node) -> list | None:
    """Per output dim of an expand, the ``(tensor, dim)`` its size is read from, or None."""
    out = ishape(node)
    target = node.target
    name = getattr(getattr(target, "overloadpacket", target), "__name__", str(target))
    rest = [a for a in node.args[1:]]
    if name == "expand_as" and rest and ishape(rest[0]) is not None:
        y = rest[0]
        return [(y, d) if d < len(ishape(y)) else None for d in range(len(out))]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    if not rest and "size" in node.kwargs:
        rest = list(node.kwargs["size"])
    if len(rest) == 1 and isinstance(rest[0], torch.fx.Node) and ishape(rest[0]) is None:
        s = rest[0]  # expand(y.shape) / expand(y.size()): the whole shape of y
        src = None
        if s.op == "call_function" and s.target is getattr and len(s.args) > 1 and s.args[1] == "shape":
            src = s.args[0]
        elif s.op == "call_method" and s.target == "size" and len(s.args) == 1:
            src = s.args[0]
        if isinstance(src, torch.fx.Node) and ishape(src) is not None and len(ishape(src)) == len(out):
            return [(src, d) for d in range(len(out))]
        return None
    if len(rest) != len(out):
        return None
    return [shape_source(a) for a in rest]


def tie_expanded_to_source(b, node, x) -> None:
    """An expanded (broadcast) dim whose size is read off another tensor's dim is tied to that dim:
    its copies follow that tensor's channels (EvoNorm's ``std.expand(x.shape)`` of a grouped x)."""
    xs, out = ishape(x), ishape(node)
    sources = _size_sources(node)
    if not sources:
        return
    off = len(out) - len(xs)
    for d, src in enumerate(sources):
        if src is None or src[0] is x:
            continue
        din = d - off
        broadcast = din < 0 or (xs[din] == 1 and out[d] != 1)
        if broadcast and ishape(src[0])[src[1]] == out[d] and out[d] > 1:
            b.tie(b.space(node, d), b.space(*src))


class ElementwiseRule(OpRule):
    """Elementwise ops with broadcasting: every tensor argument is tied to the output."""

    name = "elementwise"

    def couple(self, node, b):
        if ishape(node) is None:
            b.freeze_node(node, f"elementwise op '{node.name}' without a single tensor output")
            return
        if not tie_broadcast(b, node, tensor_args(node)):
            b.freeze_node(node, f"unexpected broadcast in '{node.name}'")


class UnaryRule(OpRule):
    """Ops whose output has the shape of their first argument (activations, casts, dropout...)."""

    name = "unary"

    def couple(self, node, b):
        x = node.args[0] if node.args else None
        if not isinstance(x, torch.fx.Node) or ishape(x) is None or ishape(node) != ishape(x):
            b.freeze_node(node, f"'{node.name}' does not keep its input's shape")
            return
        for d in range(len(ishape(x))):
            b.tie(b.space(x, d), b.space(node, d))


_ELEMENTWISE_FUNCS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.mod,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.maximum, torch.minimum, torch.where, torch.pow, torch.lerp,
    torch.addcmul, torch.addcdiv, torch.masked_fill, torch.eq, torch.ne, torch.gt, torch.lt,
    torch.ge, torch.le, torch.logical_and, torch.logical_or, torch.atan2, torch.fmod,
    torch.remainder, torch.hypot, torch.copysign,
]
_ELEMENTWISE_METHODS = [
    "add", "sub", "mul", "div", "truediv", "pow", "maximum", "minimum", "masked_fill", "where",
    "add_", "sub_", "mul_", "div_", "masked_fill_", "lerp", "addcmul", "eq", "ne", "gt", "lt",
    "ge", "le", "__add__", "__mul__", "__sub__", "__truediv__", "__radd__", "__rmul__",
]
register_function(*_ELEMENTWISE_FUNCS)(ElementwiseRule)
register_method(*_ELEMENTWISE_METHODS)(ElementwiseRule)

_UNARY_FUNCS = [
    operator.neg, operator.pos, operator.invert, torch.neg, torch.abs, torch.exp, torch.log,
    torch.sqrt, torch.rsqrt, torch.sigmoid, torch.tanh, torch.relu, torch.erf, torch.sin,
    torch.cos, torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max, torch.sign,
    torch.square, torch.reciprocal, torch.log1p, torch.expm1, torch.floor, torch.ceil,
    torch.round, torch.zeros_like, torch.ones_like, torch.full_like, torch.rand_like,
    torch.randn_like, torch.empty_like, torch.nan_to_num, torch.logit, torch.exp2, torch.log2,
    torch.special.expit, torch.detach, torch.clone, torch.bernoulli,
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.elu,
    F.selu, F.celu, F.leaky_relu, F.softplus, F.softsign, F.tanhshrink, F.hardshrink,
    F.softshrink, F.logsigmoid, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.threshold,
    torch.nn.functional.relu_, torch.relu_, torch.sigmoid_, torch.tanh_,
]
_UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt",
    "abs", "neg", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "float", "half",
    "double", "bfloat16", "to", "type", "type_as", "contiguous", "clone", "detach", "detach_",
    "requires_grad_", "sign", "square", "reciprocal", "pow_", "exp_", "floor", "ceil",
    "round", "zero_", "fill_", "uniform_", "normal_", "bernoulli", "bernoulli_",
    "sin", "cos", "erf", "log1p", "nan_to_num", "softplus", "hardswish",
]
register_function(*_UNARY_FUNCS)(UnaryRule)
register_method(*_UNARY_METHODS)(UnaryRule)
register_module(
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU, nn.Softplus, nn.Softsign,
    nn.LogSigmoid, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)(UnaryRule)


class MetaRule(OpRule):
    """Ops that only read metadata (``x.size()``, ``x.dim()``, ``x.shape``): no coupling."""

    name = "meta"

    def couple(self, node, b):
        return None


register_method("size", "dim", "numel", "get_device", "is_contiguous", "ndimension", "nelement")(MetaRule)
register_function(builtins.getattr, torch.numel, torch.is_tensor, torch.is_floating_point)(MetaRule)
register_function(fx_ops.finfo_value)(MetaRule)  # a dtype limit read at run time (capture of dtype casts)


class FactoryRule(OpRule):
    """New tensors of a given size (``zeros``, ``arange``, ``full``...).

    Their dims are free: what they are combined with decides. When a dim ends up pruned (Bloom's
    ALiBi slopes come from ``arange(1, 1 + heads)`` and follow the heads they bias), the rewrite
    keeps the factory call as it is and selects the kept elements right after it, so every kept
    element has the value it had in the original (``arange`` values included).
    """

    name = "factory"

    def couple(self, node, b):
        return None

    def rewrite(self, node, r):
        s = ishape(node)
        cuts = [(d, r.kept(node, d)) for d in range(len(s or ()))]
        cuts = [(d, k) for d, k in cuts if k is not None and len(k) != s[d]]
        if not cuts:
            return
        graph = r.gm.graph
        with graph.inserting_before(node):
            cur = graph.create_node(node.op, node.target, node.args, node.kwargs)
            cur.meta.update(node.meta)
            for i, (d, kept) in enumerate(cuts):
                attr = _free_attr(r.gm, f"_fxprune_kept_{node.name}_{d}")
                r.gm.register_buffer(attr, torch.as_tensor(np.asarray(kept), dtype=torch.long))
                idx = graph.get_attr(attr)
                if i < len(cuts) - 1:
                    cur = graph.call_function(torch.index_select, (cur, d, idx))
                else:  # the last selection becomes the node itself: its users and name stay
                    node.op, node.target, node.args, node.kwargs = "call_function", torch.index_select, (cur, d, idx), {}


def _free_attr(gm, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


register_method("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor")(FactoryRule)
register_function(torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor,
                  torch.linspace, torch.eye, torch.rand, torch.randn, torch.randint)(FactoryRule)


# -------------------------------------------------------------------------- softmax / reduce

def _dim_arg(node, pos=1, name="dim"):
    d = const(arg(node, pos, name))
    return d


class SoftmaxRule(OpRule):
    """Softmax-like ops: the normalised dim mixes all its elements, so it is frozen."""

    name = "softmax"

    def couple(self, node, b):
        x = node.args[0]
        s = ishape(x)
        if node.op == "call_module":
            d = b.module(node).dim
        else:
            d = _dim_arg(node)
        for i in range(len(s)):
            b.tie(b.space(x, i), b.space(node, i))
        if d is None:
            for i in range(len(s)):
                b.freeze(b.space(node, i), f"softmax over all elements ({node.name})")
        else:
            b.freeze(b.space(node, norm_dim(d, len(s))), f"softmax axis of '{node.name}'")


register_function(F.softmax, torch.softmax, F.log_softmax, torch.log_softmax, torch.special.softmax)(SoftmaxRule)
register_method("softmax", "log_softmax")(SoftmaxRule)
register_module(nn.Softmax, nn.LogSoftmax)(SoftmaxRule)


class NormalizeRule(OpRule):
    """``F.normalize``: channels stay prunable along the normalised dim, but inexactly."""

    name = "normalize"

    def couple(self, node, b):
        x = node.args[0]
        s = ishape(x)
        d = norm_dim(int(const(arg(node, 2, "dim", 1))), len(s))
        for i in range(len(s)):
            b.tie(b.space(x, i), b.space(node, i))
        b.inexact(b.space(node, d), f"normalised by '{node.name}'")


register_function(F.normalize)(NormalizeRule)


class ReduceRule(OpRule):
    """Reductions over given dims (mean, sum, amax, var...). The other dims pass through.

    A reduced dim that carries channels stays prunable but inexact: the reduction then runs over
    the kept channels only.
    """

    name = "reduce"
    dim_pos, keepdim_pos = 1, 2  # positions of dim and keepdim in the call

    def couple(self, node, b):
        x = node.args[0]
        xs, os_ = ishape(x), ishape(node)
        if os_ is None:
            b.freeze_node(node, f"reduction with several outputs ({node.name})")
            return
        dims = const(arg(node, self.dim_pos, "dim"))
        if dims is None:
            dims = list(range(len(xs)))
        elif isinstance(dims, int):
            dims = [dims]
        dims = sorted(norm_dim(int(d), len(xs)) for d in dims)
        keep = bool(const(arg(node, self.keepdim_pos, "keepdim", False)))
        j = 0
        for d in range(len(xs)):
            if d in dims:
                b.inexact(b.space(x, d), f"reduced by '{node.name}'")
                if keep:
                    j += 1
                continue
            b.tie(b.space(x, d), b.space(node, j))
            j += 1


register_function(torch.sum, torch.nansum, torch.mean, torch.amax, torch.amin, torch.var, torch.std,
                  torch.logsumexp, torch.nanmean, torch.prod)(ReduceRule)
register_method("sum", "nansum", "mean", "amax", "amin", "var", "std", "logsumexp", "nanmean", "prod")(ReduceRule)


class NormReduceRule(ReduceRule):
    """Vector norms over given dims (``x.norm(p, dim, keepdim)``, ``torch.linalg.vector_norm``):
    a reduction whose order ``p`` comes before ``dim`` (ConvNeXt-V2's global response norm takes
    the spatial L2 norm of every channel)."""

    name = "norm_reduce"
    dim_pos, keepdim_pos = 2, 3


register_function(torch.norm, torch.linalg.vector_norm, torch.linalg.norm)(NormReduceRule)
register_method("norm")(NormReduceRule)


# --------------------------------------------------------------------------------- permutes

class PermuteRule(OpRule):
    name = "permute"

    def _perm(self, node, nd):
        t = node.target
        if t in ("transpose", "swapaxes", "swapdims") or t in (torch.transpose, torch.swapaxes, torch.swapdims):
            d0 = norm_dim(int(const(node.args[1])), nd)
            d1 = norm_dim(int(const(node.args[2])), nd)
            perm = list(range(nd))
            perm[d0], perm[d1] = perm[d1], perm[d0]
            return perm
        if t in ("t",) or t is torch.t:
            return list(reversed(range(nd)))
        if t in ("movedim",) or t is torch.movedim:
            src, dst = const(node.args[1]), const(node.args[2])
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src = [norm_dim(s, nd) for s in src]
            dst = [norm_dim(s, nd) for s in dst]
            rest = [d for d in range(nd) if d not in src]
            perm = [None] * nd
            for s, d in zip(src, dst):
                perm[d] = s
            it = iter(rest)
            return [p if p is not None else next(it) for p in perm]
        dims = node.args[1:] if node.op == "call_method" else node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        if not dims:
            dims = const(arg(node, 1, "dims"))
        return [norm_dim(int(const(d)), nd) for d in dims]

    def couple(self, node, b):
        x = node.args[0]
        nd = len(ishape(x))
        perm = self._perm(node, nd)
        for out_d, in_d in enumerate(perm):
            b.tie(b.space(x, in_d), b.space(node, out_d))


register_function(torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim, torch.t)(PermuteRule)
register_method("permute", "transpose", "swapaxes", "swapdims", "movedim", "t")(PermuteRule)


# --------------------------------------------------------------------------------- reshapes

def _size_args(node):
    """The list of size arguments of view/reshape/expand (or None when not literal-list form)."""
    if node.op == "call_method":
        rest = list(node.args[1:])
        if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
            return list(rest[0]), "tuple"
        if not rest and "size" in node.kwargs:
            return list(node.kwargs["size"]), "kw"
        if not rest and "shape" in node.kwargs:
            return list(node.kwargs["shape"]), "kwshape"
        return rest, "varargs"
    shape = arg(node, 1, "shape")
    if isinstance(shape, (list, tuple)):
        return list(shape), "fn"
    return None, None


def _set_size_args(node, sizes, form):
    if form == "tuple":
        node.args = (node.args[0], tuple(sizes) if isinstance(node.args[1], tuple) else list(sizes))
    elif form == "kw":
        node.kwargs = {**node.kwargs, "size": tuple(sizes)}
    elif form == "kwshape":
        node.kwargs = {**node.kwargs, "shape": tuple(sizes)}
    elif form == "varargs":
        node.args = (node.args[0], *sizes)
    elif form == "fn":
        old = arg(node, 1, "shape")
        set_arg(node, 1, "shape", tuple(sizes) if isinstance(old, tuple) else list(sizes))


class ReshapeRule(OpRule):
    """view / reshape / flatten / unflatten / squeeze / unsqueeze.

    Dims are matched by products. A dim kept as is is tied; merged or split dims go to the
    builder's reshape resolution, which picks the one dim that carries channels (e.g. the heads
    dim when ``[B, L, 3*H*D]`` becomes ``[B, L, 3, H, D]``).
    """

    name = "reshape"

    def couple(self, node, b):
        x = node.args[0]
        flexible = None
        if node.target in ("view", "reshape", torch.reshape):
            sizes, _ = _size_args(node)
            if sizes is not None:
                flexible = [isinstance(s, torch.fx.Node) or (isinstance(s, int) and s < 0) for s in sizes]
        b.reshape(node, x, flexible)

    def rewrite(self, node, r):
        if node.target not in ("view", "reshape", torch.reshape):
            if node.target in ("unflatten", torch.unflatten):
                self._rewrite_unflatten(node, r)
            return
        sizes, form = _size_args(node)
        if sizes is None:
            return
        new = rewritten_sizes(node, sizes, r)
        if new is not None:
            _set_size_args(node, new, form)

    def _rewrite_unflatten(self, node, r):
        dim = int(const(arg(node, 1, "dim")))
        sizes = list(const(arg(node, 2, "sizes")))
        nd_in = len(ishape(node.args[0]))
        dim = norm_dim(dim, nd_in)
        new = [r.new_size(node, dim + i) if s != -1 else -1 for i, s in enumerate(sizes)]
        if new != sizes:
            set_arg(node, 2, "sizes", tuple(new))


register_method("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as")(ReshapeRule)
register_function(torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze)(ReshapeRule)
register_module(nn.Flatten, nn.Unflatten)(ReshapeRule)


class ExpandRule(OpRule):
    """expand / expand_as / broadcast_to: dims of equal size are tied, broadcast dims are new."""

    name = "expand"

    def couple(self, node, b):
        x = node.args[0]
        if not tie_broadcast(b, node, [x]):
            b.freeze_node(node, f"unexpected expand in '{node.name}'")
            return
        tie_expanded_to_source(b, node, x)

    def rewrite(self, node, r):
        if node.target != "expand":
            return
        sizes, form = _size_args(node)
        new = rewritten_sizes(node, sizes, r) if sizes is not None else None
        if new is not None:
            _set_size_args(node, new, form)


register_method("expand", "expand_as", "broadcast_to")(ExpandRule)
register_function(torch.broadcast_to)(ExpandRule)


class RepeatRule(OpRule):
    """repeat / tile: output element j of a repeated dim comes from input element j % n."""

    name = "repeat"

    def couple(self, node, b):
        x = node.args[0]
        xs, os_ = ishape(x), ishape(node)
        off = len(os_) - len(xs)
        for d in range(len(xs)):
            n, m = xs[d], os_[d + off]
            if n == m:
                b.tie(b.space(x, d), b.space(node, d + off))
            elif m % n == 0:
                j = np.arange(m)
                b.tie_map(b.space(node, d + off), j, b.space(x, d), j % n)
            else:
                b.freeze_node(node, f"repeat with uneven sizes ({node.name})")
                return

    def rewrite(self, node, r):
        """A repeat count computed as ``total // <size of the repeated dim>`` (DeBERTa repeats its
        per-head relative-position projections ``q.size(0) // num_heads`` times to fill batch*heads)
        divides by the dim's new size once its heads were pruned."""
        if node.op != "call_method" or len(node.args) < 2:
            return
        x = node.args[0]
        xs = ishape(x)
        counts = list(node.args[1]) if isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
        off = len(counts) - len(xs)
        changed = False
        for d in range(len(xs)):
            c = counts[d + off] if 0 <= d + off < len(counts) else None
            old, new = xs[d], r.new_size(x, d)
            if new == old or not isinstance(c, torch.fx.Node) or c.op != "call_function" or \
                    c.target is not operator.floordiv or len(c.args) != 2 or c.args[1] != old:
                continue
            with r.gm.graph.inserting_before(node):
                counts[d + off] = r.gm.graph.call_function(operator.floordiv, (c.args[0], new))
            changed = True
        if changed:
            node.args = (x, counts) if isinstance(node.args[1], (list, tuple)) else (x, *counts)


register_method("repeat", "tile")(RepeatRule)
register_function(torch.tile)(RepeatRule)


# ------------------------------------------------------------------------------ cat / split

def _dim_of(node, pos, name, nd, default=0):
    return norm_dim(int(const(arg(node, pos, name, default))), nd)


class CatRule(OpRule):
    """torch.cat: each input's dim maps to an offset range of the output's dim."""

    name = "cat"

    def couple(self, node, b):
        inputs = list(arg(node, 0, "tensors"))
        out = ishape(node)
        d = _dim_of(node, 1, "dim", len(out))
        off = 0
        for a in inputs:
            s = ishape(a)
            if s is None or len(s) != len(out):
                b.freeze_node(node, f"cat of non-matching tensors ({node.name})")
                return
            for i in range(len(out)):
                if i != d:
                    b.tie(b.space(a, i), b.space(node, i))
            n = s[d]
            if n:
                b.tie_map(b.space(node, d), np.arange(off, off + n), b.space(a, d), np.arange(n))
            off += n


register_function(torch.cat, torch.concat, torch.concatenate)(CatRule)


class StackRule(OpRule):
    name = "stack"

    def couple(self, node, b):
        inputs = list(arg(node, 0, "tensors"))
        out = ishape(node)
        d = _dim_of(node, 1, "dim", len(out))
        for a in inputs:
            s = ishape(a)
            for i in range(len(s)):
                b.tie(b.space(a, i), b.space(node, i if i < d else i + 1))
        b.freeze(b.space(node, d), f"stacked dim of '{node.name}'")


register_function(torch.stack)(StackRule)


def _tuple_users(node):
    """getitem users of a tuple-producing node: [(index, user)] or None if used otherwise.

    Negative indices (``spx[-1]`` in Res2Net and EdgeNeXt) are made non-negative.
    """
    users = []
    infos = tensor_info(node)
    n = len(infos) if isinstance(infos, (tuple, list)) else None
    for u in node.users:
        if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int):
            idx = u.args[1]
            if idx < 0:
                if n is None or idx < -n:
                    return None
                idx += n
            users.append((idx, u))
        else:
            return None
    return users


class SplitRule(OpRule):
    """split / chunk / tensor_split / unbind (tuple outputs, read through getitem)."""

    name = "split"

    def _dim(self, node, nd):
        t = node.target
        if t in ("unbind", torch.unbind):
            return _dim_of(node, 1, "dim", nd)
        return _dim_of(node, 2, "dim", nd)

    def couple(self, node, b):
        x = node.args[0]
        xs = ishape(x)
        infos = tensor_info(node)
        users = _tuple_users(node)
        if users is None or not isinstance(infos, (tuple, list)):
            b.freeze_node(node, f"split result used as a whole ({node.name})")
            return
        d = self._dim(node, len(xs))
        unbind = node.target in ("unbind", torch.unbind)
        offsets = np.cumsum([0] + [1 if unbind else i.shape[d] for i in infos])
        if unbind:
            b.freeze(b.space(x, d), f"unbind dim of '{node.name}'")
        for idx, u in users:
            us = ishape(u)
            for i in range(len(xs)):
                if i == d:
                    if not unbind and us[d]:
                        n = us[d]
                        b.tie_map(b.space(u, d), np.arange(n), b.space(x, d), np.arange(offsets[idx], offsets[idx] + n))
                    continue
                j = i if (not unbind or i < d) else i - 1
                b.tie(b.space(x, i), b.space(u, j))

    def rewrite(self, node, r):
        if node.target in ("unbind", torch.unbind):
            return
        x = node.args[0]
        d = self._dim(node, len(ishape(x)))
        infos = tensor_info(node)
        users = dict(_tuple_users(node) or [])
        new_sizes = []
        for idx, info in enumerate(infos):
            u = users.get(idx)
            new_sizes.append(r.new_size(u, d) if u is not None else info.shape[d])
        if new_sizes != [i.shape[d] for i in infos]:
            node.op = "call_function"
            node.target = torch.split
            node.args = (x, new_sizes, d)
            node.kwargs = {}


register_function(torch.split, torch.chunk, torch.tensor_split, torch.unbind)(SplitRule)
register_method("split", "chunk", "tensor_split", "unbind", "split_with_sizes")(SplitRule)



def interleaved(size: int, start, stop, step) -> bool:
    """Whether ``[start:stop:step]`` (step > 1) takes one phase of every block of ``step`` consecutive
    elements of a dim of ``size``: ``x[..., ::2]`` / ``x[..., 1::2]`` of an interleaved gate/up
    projection (GPT-OSS's experts)."""
    rng = range(*slice(start, stop, step).indices(size))
    return rng.step > 1 and size % rng.step == 0 and rng.start < rng.step and len(rng) == size // rng.step


def couple_slice(b, node, x, d: int, o: int, start, stop, step) -> None:
    """``node`` dim ``o`` is ``x[start:stop:step]`` along dim ``d`` (constant bounds): a whole-dim
    slice ties the two spaces, a contiguous part maps its channels onto x's, an interleaved one
    (:func:`interleaved`) makes each block of ``step`` elements of ``x`` one unit with the output
    element it gives (the sibling phases share the blocks, so pruning keeps the interleaving); any
    other strided slice freezes."""
    size = ishape(x)[d]
    rng = range(*slice(start, stop, step).indices(size))
    if len(rng) == size:
        b.tie(b.space(x, d), b.space(node, o))
    elif (step or 1) == 1 and len(rng):
        b.tie_map(b.space(node, o), np.arange(len(rng)), b.space(x, d), np.asarray(rng))
    elif interleaved(size, start, stop, step):
        k = rng.step
        blocks = b.vspace(x, f"interleaved dim {d} by {k}", size // k)
        b.tie_map(b.space(x, d), np.arange(size), blocks, np.arange(size) // k)
        b.tie_map(b.space(node, o), np.arange(len(rng)), blocks, np.arange(len(rng)))
    else:
        b.freeze(b.space(x, d), f"strided slice ({node.name})")
        b.freeze(b.space(node, o), f"strided slice ({node.name})")


class GetItemRule(OpRule):
    """Indexing ``x[...]``: slices map ranges, ints remove (and freeze) a dim, tensors gather."""

    name = "getitem"

    @staticmethod
    def _items(node, nd):
        idx = node.args[1]
        items = list(idx) if isinstance(idx, tuple) else [idx]
        n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
        out, d = [], 0
        for it in items:
            if it is Ellipsis:
                for _ in range(nd - n_real):
                    out.append((d, slice(None)))
                    d += 1
            elif it is None:
                out.append((None, None))
            else:
                out.append((d, it))
                d += 1
        while d < nd:
            out.append((d, slice(None)))
            d += 1
        return out

    def couple(self, node, b):
        x = node.args[0]
        if not isinstance(tensor_info(x), TensorInfo):
            return  # selecting an output of a multi-output op: its rule handles the coupling
        xs = ishape(x)
        items = self._items(node, len(xs))
        if any(isinstance(it, torch.fx.Node) and isinstance(tensor_info(it), TensorInfo) for _, it in items):
            n_adv = sum(1 for _, it in items if isinstance(it, torch.fx.Node))
            if n_adv > 1:
                b.freeze_node(node, f"advanced indexing with several tensors ({node.name})")
                return
        o = 0
        for d, it in items:
            if d is None:
                o += 1
                continue
            if isinstance(it, slice):
                start, stop, step = (const(it.start), const(it.stop), const(it.step))
                if not all(v is None or isinstance(v, int) for v in (start, stop, step)):
                    b.freeze(b.space(x, d), f"slice with computed bounds ({node.name})")
                    o += 1
                    continue
                couple_slice(b, node, x, d, o, start, stop, step)
                o += 1
            elif isinstance(it, torch.fx.Node) and isinstance(tensor_info(it), TensorInfo):
                b.freeze(b.space(x, d), f"gathered by a tensor index ({node.name})")
                ins = ishape(it)
                for k in range(len(ins)):
                    b.tie(b.space(it, k), b.space(node, o + k))
                o += len(ins)
            else:
                b.freeze(b.space(x, d), f"indexed by a constant ({node.name})")

    def rewrite(self, node, r):
        x = node.args[0]
        if not isinstance(tensor_info(x), TensorInfo):
            return
        xs = ishape(x)
        idx = node.args[1]
        items = list(idx) if isinstance(idx, tuple) else [idx]
        n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
        d, changed = 0, False
        for j, it in enumerate(items):
            if it is Ellipsis:
                d += len(xs) - n_real
                continue
            if it is None:
                continue
            if isinstance(it, slice) and not (it.start is None and it.stop is None):
                kept = r.kept(x, d)
                if kept is not None:  # unit-step and interleaved slices are the only ones tied to a pruned dim
                    bounds = (const(it.start), const(it.stop), const(it.step))
                    rng = range(*slice(*bounds).indices(xs[d]))
                    if interleaved(xs[d], *bounds):  # whole blocks were pruned: the phase stays
                        items[j] = slice(rng.start, None, rng.step)
                    else:
                        lo, hi = np.searchsorted(kept, [rng.start, rng.stop])
                        items[j] = slice(int(lo), int(hi), None)
                    changed = True
            d += 1
        if changed:
            node.args = (x, tuple(items) if isinstance(idx, tuple) else items[0])


register_function(operator.getitem)(GetItemRule)


class PadRule(OpRule):
    """F.pad: dims padded by (0, 0) pass through, padded dims are new."""

    name = "pad"

    def couple(self, node, b):
        x = node.args[0]
        xs = ishape(x)
        pad = list(const(arg(node, 1, "pad")))
        padded = set()
        for i in range(0, len(pad), 2):
            d = len(xs) - 1 - i // 2
            if pad[i] != 0 or pad[i + 1] != 0:
                padded.add(d)
        for d in range(len(xs)):
            if d not in padded:
                b.tie(b.space(x, d), b.space(node, d))
            else:
                b.freeze(b.space(x, d), f"padded dim ({node.name})")


register_function(F.pad)(PadRule)


class RollRule(OpRule):
    """roll / flip: the moved dims are frozen, the others pass through."""

    name = "roll"

    def couple(self, node, b):
        x = node.args[0]
        xs = ishape(x)
        if node.target in ("roll", torch.roll):
            dims = const(arg(node, 2, "dims"))
        else:
            dims = const(arg(node, 1, "dims"))
        dims = [dims] if isinstance(dims, int) else list(dims or range(len(xs)))
        dims = {norm_dim(d, len(xs)) for d in dims}
        for d in range(len(xs)):
            b.tie(b.space(x, d), b.space(node, d))
            if d in dims:
                b.freeze(b.space(node, d), f"rolled/flipped dim ({node.name})")


register_function(torch.roll, torch.flip)(RollRule)
register_method("roll", "flip")(RollRule)
