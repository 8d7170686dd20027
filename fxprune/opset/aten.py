"""Rules for ATen overloads (``torch.ops.aten.*``), as they appear in graphs captured by torch.export.

A graph captured with ``torch.export`` (see ``fxprune._export``) calls ATen ops directly:
``aten.view.default(x, [s0, s1, -1, 64])``, ``aten.transpose.int(x, 1, 2)``,
``aten.scaled_dot_product_attention.default(q, k, v, mask, scale=0.125)`` ... Most take their
arguments in the same positions as the ``torch`` / ``torch.nn.functional`` functions, so the same
rule classes apply and are registered here by overload packet (every overload of
``aten.add`` finds the elementwise rule). Where the positions or the op's identity matter
(reshapes, permutes, slices, split, embedding, einsum, roll) a small adapter reads the ATen
signature. Parametrised layers are normally turned back into modules at capture; the ATen rules
below cover the calls that stay functional (a linear on a computed weight, a norm without affine).
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from fxprune.opset._base import (
    OpRule,
    arg,
    const,
    ishape,
    norm_dim,
    register_function,
    rewritten_sizes,
    set_arg,
)
from fxprune.opset.attention import EinsumRule, MatmulRule, SDPARule, feeds_softmax, mark_weight_operand
from fxprune.opset.layers import (
    BatchNormRule,
    ChannelPassRule,
    ConvRule,
    ConvTransposeRule,
    GroupNormRule,
    LayerNormRule,
    LinearRule,
)
from fxprune.opset.structural import (
    couple_slice,
    interleaved,
    CatRule,
    ElementwiseRule,
    ExpandRule,
    FactoryRule,
    MetaRule,
    NormReduceRule,
    PadRule,
    ReduceRule,
    RepeatRule,
    RollRule,
    SoftmaxRule,
    SplitRule,
    StackRule,
    UnaryRule,
    tie_broadcast,
)

__all__ = [
    "AtenReshapeRule",
    "AtenExpandRule",
    "AtenPermuteRule",
    "AtenSliceRule",
    "AtenSelectRule",
    "AtenIndexRule",
    "AtenSplitRule",
    "AtenEmbeddingRule",
    "AtenEinsumRule",
    "AtenRollRule",
    "AddmmRule",
]

aten = torch.ops.aten


def _ops(*names: str) -> list:
    """The ATen overload packets that exist in this torch build."""
    out = []
    for n in names:
        packet = getattr(aten, n, None)
        if packet is not None:
            out.append(packet)
    return out


def _name(node) -> str:
    """The ATen op name of a node (``view``, ``transpose``...)."""
    t = node.target
    return getattr(getattr(t, "overloadpacket", t), "__name__", str(t))


# ------------------------------------------------------------------- rules reused as they are

register_function(*_ops("sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "size", "dim", "numel",
                        "_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range",
                        "sym_constrain_range_for_size"))(MetaRule)

_ELEMENTWISE = (
    "multiply", "subtract", "divide",
    "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "pow", "where", "masked_fill",
    "eq", "ne", "gt", "lt", "ge", "le", "maximum", "minimum", "fmax", "fmin", "__and__", "__or__", "__xor__",
    "bitwise_and", "bitwise_or", "bitwise_xor", "logical_and", "logical_or", "logical_xor", "fmod",
    "remainder", "atan2", "lerp", "addcmul", "addcdiv", "hypot", "copysign", "clamp", "clip",
    "xlogy", "isclose", "copy",
)

_UNARY = (
    "gelu", "tanh", "relu", "relu6", "sigmoid", "silu", "mish", "erf", "exp", "exp2", "log", "log2", "log1p",
    "expm1", "neg", "abs", "sqrt", "rsqrt", "reciprocal", "square", "sign", "sin", "cos", "floor", "ceil",
    "round", "trunc", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu", "elu", "selu", "celu",
    "softplus", "softshrink", "hardshrink", "threshold", "logit", "nan_to_num", "clamp_min", "clamp_max",
    "logical_not", "bitwise_not", "isnan", "isinf", "isfinite",
    "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "bernoulli",
    "clone", "contiguous", "alias", "detach", "lift_fresh_copy", "to", "_to_copy", "type_as",
    "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "positive",
    "fill", "zero", "uniform", "normal",
)


def _inplace(names) -> list[str]:
    """The in-place variants (``add_``, ``relu_``, ``masked_fill_``...) of ``names``.

    An in-place op writes its result into its first argument and returns it, so it couples
    channels exactly like its out-of-place form (the first argument, the other tensors broadcast
    into it, and the output are tied): ``hidden_state += residual`` in HF ResNet is an
    ``aten.add_`` that ties the residual stream like ``aten.add``. ``copy_(dst, src)`` is
    elementwise (``src`` broadcasts into ``dst``); ``fill_``/``zero_``/``uniform_``/``normal_``
    keep their argument's shape.
    """
    return [n + "_" for n in names if not n.endswith("_")]


register_function(*_ops(*_ELEMENTWISE, *_inplace(_ELEMENTWISE)))(ElementwiseRule)
register_function(*_ops(*_UNARY, *_inplace(_UNARY)))(UnaryRule)

register_function(*_ops(
    "arange", "zeros", "ones", "full", "empty", "scalar_tensor", "rand", "randn", "randint", "linspace",
    "eye",
    "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "empty_strided", "tensor",
))(FactoryRule)

register_function(*_ops("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"))(SoftmaxRule)
register_function(*_ops("mean", "sum", "nansum", "nanmean", "amax", "amin", "var", "std", "logsumexp", "prod",
                        "any", "all", "argmax", "argmin"))(ReduceRule)

register_function(*_ops("linalg_vector_norm", "norm"))(NormReduceRule)

register_function(*_ops("matmul", "bmm", "mm"))(MatmulRule)
register_function(*_ops("linear"))(LinearRule)
register_function(*_ops("scaled_dot_product_attention"))(SDPARule)
register_function(*_ops("conv1d", "conv2d", "conv3d"))(ConvRule)
register_function(*_ops("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"))(ConvTransposeRule)
register_function(*_ops("layer_norm", "rms_norm"))(LayerNormRule)
register_function(*_ops("group_norm"))(GroupNormRule)
register_function(*_ops("batch_norm", "instance_norm"))(BatchNormRule)
register_function(*_ops(
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_nearest3d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d",
    "_upsample_nearest_exact2d", "_upsample_bilinear2d_aa",
))(ChannelPassRule)
register_function(*_ops("constant_pad_nd", "pad"))(PadRule)
register_function(*_ops("cat", "concat", "concatenate"))(CatRule)
register_function(*_ops("stack"))(StackRule)
register_function(*_ops("repeat", "tile"))(RepeatRule)


# -------------------------------------------------------------------------------- reshapes

_SIZED_RESHAPES = ("view", "_unsafe_view", "reshape", "view_copy")


class ArgReduceRule(OpRule):
    """``aten.max.dim`` / ``aten.min.dim`` (values and indices) over one dim: the other dims pass
    through to every output; the reduced dim is kept whole, since the indices point into it (GPT-OSS
    subtracts the row max of its attention logits and sinks)."""

    name = "arg_reduce"

    def couple(self, node, b):
        x = node.args[0]
        xs = ishape(x)
        dim = const(arg(node, 1, "dim"))
        if xs is None or dim is None:
            b.freeze_node(node, f"reduction over every dim with indices ({node.name})")
            return
        d0 = norm_dim(int(dim), len(xs))
        keep = bool(const(arg(node, 2, "keepdim", False)))
        outs = [node] if ishape(node) is not None else [u for u in node.users if u.target is operator.getitem]
        b.freeze(b.space(x, d0), f"reduced with indices by '{node.name}'")
        for out in outs:
            if ishape(out) is None or len(ishape(out)) != len(xs) - (0 if keep else 1):
                b.freeze_node(node, f"reduction with indices of unexpected shape ({node.name})")
                return
            j = 0
            for d in range(len(xs)):
                if d != d0:
                    b.tie(b.space(x, d), b.space(out, j))
                if d != d0 or keep:
                    j += 1


register_function(aten.max.dim, aten.min.dim)(ArgReduceRule)


class AtenReshapeRule(OpRule):
    """``aten.view / _unsafe_view / reshape`` (sizes at position 1), ``flatten.using_ints``,
    ``unflatten.int`` (sizes at position 2), ``squeeze``, ``unsqueeze``, ``view_as``.

    Coupling is the builder's reshape resolution (see ``ReshapeRule``); a size given as ``-1`` or
    computed from another tensor (``x.size(0)``) is flexible, so ``[B, L, H*D] -> [B, L, -1, D]``
    puts the channels on the heads dim. The rewrite writes the new literal sizes (heads kept).
    """

    name = "aten_reshape"

    def couple(self, node, b):
        flexible = None
        if _name(node) in _SIZED_RESHAPES:
            sizes = arg(node, 1, "size", None) if _name(node) != "reshape" else arg(node, 1, "shape", None)
            if isinstance(sizes, (list, tuple)):
                flexible = [isinstance(s, torch.fx.Node) or (isinstance(s, int) and s < 0) for s in sizes]
        b.reshape(node, node.args[0], flexible)

    def rewrite(self, node, r):
        name = _name(node)
        if name in _SIZED_RESHAPES:
            sizes = node.args[1] if len(node.args) > 1 else None
            if not isinstance(sizes, (list, tuple)):
                return
            new = rewritten_sizes(node, sizes, r)
            if new is not None:
                _set_sizes_pos(node, new)
        elif name == "unflatten":
            dim = norm_dim(int(const(node.args[1])), len(ishape(node.args[0])))
            sizes = list(const(node.args[2]))
            new = [r.new_size(node, dim + i) if s != -1 else -1 for i, s in enumerate(sizes)]
            if new != sizes:
                set_arg(node, 2, "sizes", list(new))


register_function(*_ops(*_SIZED_RESHAPES, "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
                        "reshape_as", "squeeze_copy", "unsqueeze_copy"))(AtenReshapeRule)


def _set_sizes_pos(node, sizes):
    old = node.args[1]
    node.args = (node.args[0], tuple(sizes) if isinstance(old, tuple) else list(sizes), *node.args[2:])


class AtenExpandRule(ExpandRule):
    """``aten.expand(x, size)``, ``expand_as``, ``broadcast_to``: equal dims tied; the rewrite updates
    literal sizes of pruned dims."""

    name = "aten_expand"

    def rewrite(self, node, r):
        if _name(node) not in ("expand", "broadcast_to", "expand_copy"):
            return
        sizes = node.args[1] if len(node.args) > 1 else None
        if not isinstance(sizes, (list, tuple)):
            return
        new = rewritten_sizes(node, sizes, r, offset=len(ishape(node)) - len(sizes))
        if new is not None:
            _set_sizes_pos(node, new)


register_function(*_ops("expand", "expand_as", "broadcast_to", "expand_copy"))(AtenExpandRule)


# --------------------------------------------------------------------------------- permutes

class AtenPermuteRule(OpRule):
    """``aten.permute(x, dims)``, ``transpose.int(x, d0, d1)``, ``t``, ``movedim``, ``swapaxes``."""

    name = "aten_permute"

    @staticmethod
    def perm(node, nd):
        name = _name(node)
        if name in ("transpose", "swapaxes", "swapdims", "transpose_copy"):
            d0, d1 = (norm_dim(int(const(node.args[i])), nd) for i in (1, 2))
            p = list(range(nd))
            p[d0], p[d1] = p[d1], p[d0]
            return p
        if name in ("t", "numpy_T"):
            return list(reversed(range(nd)))
        if name == "movedim":
            src, dst = const(node.args[1]), const(node.args[2])
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src = [norm_dim(s, nd) for s in src]
            dst = [norm_dim(s, nd) for s in dst]
            p = [None] * nd
            for s, d in zip(src, dst):
                p[d] = s
            rest = iter(d for d in range(nd) if d not in src)
            return [q if q is not None else next(rest) for q in p]
        return [norm_dim(int(const(d)), nd) for d in const(node.args[1])]

    def couple(self, node, b):
        x = node.args[0]
        for out_d, in_d in enumerate(self.perm(node, len(ishape(x)))):
            b.tie(b.space(x, in_d), b.space(node, out_d))


register_function(*_ops("permute", "transpose", "t", "movedim", "swapaxes", "swapdims", "numpy_T",
                        "permute_copy", "transpose_copy"))(AtenPermuteRule)


# ------------------------------------------------------------------------- slice / select / index

_INT_MAX = 2**63 - 1


class AtenSliceRule(OpRule):
    """``aten.slice.Tensor(x, dim=0, start=None, end=None, step=1)``.

    A full-range slice ties the dim; a unit-step partial slice maps the kept range; an interleaved
    one (``x[..., 1::2]``) keeps whole blocks; computed bounds (``end = L``) and other strides
    freeze the dim. The rewrite moves literal bounds when the sliced dim lost channels.
    """

    name = "aten_slice"

    @staticmethod
    def _parts(node):
        x = node.args[0]
        nd = len(ishape(x))
        dim = norm_dim(int(const(arg(node, 1, "dim", 0))), nd)
        start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
        return x, dim, start, end, step

    def couple(self, node, b):
        x, dim, start, end, step = self._parts(node)
        xs = ishape(x)
        for d in range(len(xs)):
            if d != dim:
                b.tie(b.space(x, d), b.space(node, d))
        if any(isinstance(v, torch.fx.Node) for v in (start, end, step)):
            if (start in (None, 0)) and isinstance(end, torch.fx.Node) and const(end) is not None and \
                    const(end) >= xs[dim] and step in (None, 1):
                b.tie(b.space(x, dim), b.space(node, dim))  # x[:, :x.size(1)] is the whole dim
                return
            b.freeze(b.space(x, dim), f"slice with computed bounds ({node.name})")
            b.freeze(b.space(node, dim), f"slice with computed bounds ({node.name})")
            return
        couple_slice(b, node, x, dim, dim, start, end, step)

    def rewrite(self, node, r):
        x, dim, start, end, step = self._parts(node)
        if any(isinstance(v, torch.fx.Node) for v in (start, end, step)):
            return
        kept = r.kept(x, dim)
        if kept is None:
            return
        rng = range(*slice(start, end, step).indices(ishape(x)[dim]))
        if len(rng) == ishape(x)[dim]:
            return  # whole dim: the bounds still cover it
        if interleaved(ishape(x)[dim], start, end, step):  # whole blocks were pruned: the phase stays
            set_arg(node, 3, "end", len(kept))
            return
        lo, hi = np.searchsorted(kept, [rng.start, rng.stop])
        set_arg(node, 2, "start", int(lo))
        set_arg(node, 3, "end", int(hi))


register_function(*_ops("slice", "slice_copy"))(AtenSliceRule)


class AtenSelectRule(OpRule):
    """``aten.select.int(x, dim, index)``: the selected dim is frozen, the others pass through."""

    name = "aten_select"

    def couple(self, node, b):
        x = node.args[0]
        xs = ishape(x)
        dim = norm_dim(int(const(node.args[1])), len(xs))
        b.freeze(b.space(x, dim), f"indexed by a constant ({node.name})")
        for d in range(len(xs)):
            if d != dim:
                b.tie(b.space(x, d), b.space(node, d if d < dim else d - 1))


register_function(*_ops("select", "select_copy"), torch.select)(AtenSelectRule)


class NarrowRule(OpRule):
    """``torch.narrow(x, dim, start, length)`` (capture's form of a slice with run-time bounds): the
    narrowed dim is frozen, the others pass through."""

    name = "narrow"

    def couple(self, node, b):
        x = node.args[0]
        xs = ishape(x)
        dim = norm_dim(int(const(node.args[1])), len(xs))
        for d in range(len(xs)):
            if d == dim:
                b.freeze(b.space(x, d), f"narrowed dim ({node.name})")
                b.freeze(b.space(node, d), f"narrowed dim ({node.name})")
            else:
                b.tie(b.space(x, d), b.space(node, d))


register_function(*_ops("narrow", "narrow_copy"), torch.narrow)(NarrowRule)


class AtenIndexRule(OpRule):
    """Gathers (``aten.index.Tensor``, ``gather``, ``index_select``, ``take_along_dim``): the indexed
    dims of the source are frozen; the dims they do not index pass through.

    ``aten.index.Tensor(x, [None, ..., idx, None, ...])`` with one index tensor is ``x[..., idx, ...]``:
    the output is ``x.shape[:d] + idx.shape + x.shape[d+1:]``, so the other dims of ``x`` are tied to
    the output and can be pruned. A relative-position bias gathers its table's rows this way
    (``table[index.view(-1)]``, ``[(2w-1)^2, heads] -> [w^4, heads]``): the heads column stays tied to
    the attention heads and the table is sliced with them, each kept head gathering its own column.
    """

    name = "aten_index"

    def couple(self, node, b):
        x = node.args[0]
        xs, os_ = ishape(x), ishape(node)
        name = _name(node)
        if name == "index" and xs is not None and os_ is not None and self._one_index(node, b, x, xs, os_):
            return
        if name in ("gather", "take_along_dim") and xs is not None and os_ is not None and \
                self._along_dim(node, b, x, xs, os_):
            return
        if name == "index_select" and xs is not None and os_ is not None and len(xs) == len(os_):
            dim = norm_dim(int(const(node.args[1])), len(xs))
            for d in range(len(xs)):
                if d == dim:
                    b.freeze(b.space(x, d), f"gathered by a tensor index ({node.name})")
                    b.freeze(b.space(node, d), f"gathered by a tensor index ({node.name})")
                else:
                    b.tie(b.space(x, d), b.space(node, d))
            return
        b.freeze_node(node, f"gathered by a tensor index ({name} '{node.name}')")

    @staticmethod
    def _along_dim(node, b, x, xs, os_) -> bool:
        """``gather(x, dim, index)``: ``out[..., k, ...] = x[..., index[..., k, ...], ...]`` along ``dim``;
        every other dim of ``x``, ``index`` and the output is aligned element for element (DeBERTa
        gathers its relative-position scores this way, per batch*head row)."""
        index = arg(node, 2, "index") if _name(node) == "gather" else arg(node, 1, "indices")
        dim = arg(node, 1, "dim") if _name(node) == "gather" else arg(node, 2, "dim")
        ins = ishape(index) if isinstance(index, torch.fx.Node) else None
        if ins is None or not isinstance(const(dim), int) or len(ins) != len(xs) or tuple(ins) != tuple(os_):
            return False
        d = norm_dim(int(const(dim)), len(xs))
        reason = f"gathered by a tensor index ({node.name})"
        b.freeze(b.space(x, d), reason)
        b.tie(b.space(index, d), b.space(node, d))
        for k in range(len(xs)):
            if k == d:
                continue
            if xs[k] != os_[k]:
                b.freeze(b.space(x, k), reason)
                b.freeze(b.space(node, k), reason)
                continue
            b.tie(b.space(x, k), b.space(node, k))
            b.tie(b.space(index, k), b.space(node, k))
        return True

    @staticmethod
    def _one_index(node, b, x, xs, os_) -> bool:
        indices = node.args[1] if len(node.args) > 1 else node.kwargs.get("indices")
        if not isinstance(indices, (list, tuple)):
            return False
        tensors = [(d, it) for d, it in enumerate(indices) if it is not None]
        if len(tensors) != 1 or not isinstance(tensors[0][1], torch.fx.Node):
            return False
        d, idx = tensors[0]
        ins = ishape(idx)
        if ins is None or d >= len(xs) or len(os_) != len(xs) - 1 + len(ins):
            return False
        if tuple(os_[d:d + len(ins)]) != tuple(ins):
            return False
        reason = f"gathered by a tensor index ({node.name})"
        b.freeze(b.space(x, d), reason)
        for k in range(len(ins)):
            b.tie(b.space(idx, k), b.space(node, d + k))
        for k in range(len(xs)):
            if k != d:
                b.tie(b.space(x, k), b.space(node, k if k < d else k - 1 + len(ins)))
        return True


register_function(torch.index_select, *_ops("index", "gather", "index_select", "take_along_dim", "masked_select",
                        "take"))(AtenIndexRule)


# ------------------------------------------------------------------------------- split / unbind

class AtenSplitRule(SplitRule):
    """``aten.split.Tensor(x, size, dim)``, ``split_with_sizes``, ``chunk``, ``tensor_split``,
    ``unbind.int``."""

    name = "aten_split"

    def _dim(self, node, nd):
        if _name(node) == "unbind":
            return norm_dim(int(const(arg(node, 1, "dim", 0))), nd)
        return norm_dim(int(const(arg(node, 2, "dim", 0))), nd)

    def couple(self, node, b):
        if _name(node) == "unbind":
            node_target = node.target
            node.target = torch.unbind  # the parent rule recognises unbind by its torch identity
            try:
                super().couple(node, b)
            finally:
                node.target = node_target
            return
        super().couple(node, b)

    def rewrite(self, node, r):
        if _name(node) == "unbind":
            return
        super().rewrite(node, r)


register_function(*_ops("split", "split_with_sizes", "chunk", "tensor_split", "unbind", "unsafe_split",
                        "unsafe_chunk", "split_copy"))(AtenSplitRule)


# ---------------------------------------------------------------------------------- layers

class AtenEmbeddingRule(OpRule):
    """``aten.embedding(weight, indices, ...)``: the embedding dim comes from weight dim 1."""

    name = "aten_embedding"

    def couple(self, node, b):
        w, idx = node.args[0], node.args[1]
        xs, os_ = ishape(idx), ishape(node)
        for d in range(len(xs)):
            b.tie(b.space(idx, d), b.space(node, d))
        s = b.space(w, 1)
        out = b.space(node, len(os_) - 1)
        b.tie(out, s)
        b.origin(out)
        b.role(s, "producer")
        b.freeze(b.space(w, 0), f"vocabulary rows of '{node.name}'")


register_function(*_ops("embedding"))(AtenEmbeddingRule)


class AtenEinsumRule(EinsumRule):
    """``aten.einsum(equation, tensors, path=None)``."""

    name = "aten_einsum"

    @staticmethod
    def _operands(node):
        return const(node.args[0]), list(node.args[1])


register_function(*_ops("einsum"))(AtenEinsumRule)


class AtenRollRule(RollRule):
    """``aten.roll(x, shifts, dims)`` / ``aten.flip(x, dims)``."""

    name = "aten_roll"

    def couple(self, node, b):
        x = node.args[0]
        xs = ishape(x)
        dims = const(arg(node, 2, "dims")) if _name(node) == "roll" else const(arg(node, 1, "dims"))
        dims = [dims] if isinstance(dims, int) else list(dims or range(len(xs)))
        dims = {norm_dim(d, len(xs)) for d in dims}
        for d in range(len(xs)):
            b.tie(b.space(x, d), b.space(node, d))
            if d in dims:
                b.freeze(b.space(node, d), f"rolled/flipped dim ({node.name})")


register_function(*_ops("roll", "flip"))(AtenRollRule)


def _param_name(gm, a) -> str | None:
    """The qualified name of the parameter a ``get_attr`` node reads (None for anything else)."""
    if not (isinstance(a, torch.fx.Node) and a.op == "get_attr"):
        return None
    path, _, attr = str(a.target).rpartition(".")
    try:
        owner = gm.get_submodule(path) if path else gm
    except AttributeError:
        return None
    return str(a.target) if attr in owner._parameters else None


class AtenIm2colRule(OpRule):
    """``aten.im2col`` (``F.unfold`` / ``nn.Unfold``): ``[B, C, H, W] -> [B, C*kh*kw, L]``; channel
    ``c`` owns the ``kh*kw`` rows ``c*kh*kw ...``, so the rows follow the input's channels."""

    name = "aten_im2col"

    def couple(self, node, b):
        x = node.args[0]
        xs, os_ = ishape(x), ishape(node)
        if xs is None or os_ is None or len(xs) not in (3, 4) or len(os_) != len(xs) - 1:
            b.freeze_node(node, f"im2col with unexpected shapes ({node.name})")
            return
        batched = len(xs) == 4
        c_in, c_out = (1, 1) if batched else (0, 0)
        k = os_[c_out] // xs[c_in] if xs[c_in] else 0
        if k * xs[c_in] != os_[c_out]:
            b.freeze_node(node, f"im2col with unexpected shapes ({node.name})")
            return
        if batched:
            b.tie(b.space(x, 0), b.space(node, 0))
        j = np.arange(os_[c_out])
        b.tie_map(b.space(node, c_out), j, b.space(x, c_in), j // k)
        for d in range(c_in + 1, len(xs)):
            b.freeze(b.space(x, d), f"unfolded positions ({node.name})")
        b.freeze(b.space(node, len(os_) - 1), f"unfolded positions ({node.name})")


register_function(*_ops("im2col"))(AtenIm2colRule)


class AddmmRule(OpRule):
    """``aten.addmm(bias, a, b)`` / ``torch.addmm`` / ``baddbmm``: ``bias + a @ b``.

    On two computed tensors it is a matmul (coupling, bias broadcast). When ``b`` is a 2-D
    parameter it is a layer: transformers' ``Conv1D`` (GPT-2, GPT-J's MLPs...) computes
    ``addmm(bias, x.view(-1, nx), weight)`` with ``weight`` of shape ``[nx, nf]``, so the output
    features are produced by weight dim 1 (an origin, like ``nn.Linear``'s dim 0) and the input
    features are read by weight dim 0.
    """

    name = "addmm"

    def couple(self, node, b):
        bias, x, w = node.args[0], node.args[1], node.args[2]
        sx, sw, so = ishape(x), ishape(w), ishape(node)
        w_name = _param_name(b.gm, w) if len(sw) == 2 else None
        if w_name is not None:
            out_f, in_f = b.space(node, len(so) - 1), b.space(x, len(sx) - 1)
            b.tie(b.space(x, len(sx) - 2), b.space(node, len(so) - 2))
            w_in, w_out = b.pspace(w_name, 0), b.pspace(w_name, 1)
            b.tie(in_f, w_in)
            b.tie(out_f, w_out)
            b.origin(out_f)
            b.role(w_out, "producer")
            b.role(w_in, "consumer")
            bias_name = _param_name(b.gm, bias)
            if bias_name is not None and len(ishape(bias)) == 1:
                bs = b.pspace(bias_name, 0)
                b.tie(out_f, bs)
                b.role(bs, "other")
                return
        else:
            b.tie(b.space(x, len(sx) - 1), b.space(w, len(sw) - 2))
            b.tie(b.space(x, len(sx) - 2), b.space(node, len(so) - 2))
            b.tie(b.space(w, len(sw) - 1), b.space(node, len(so) - 1))
            for d in range(len(so) - 2):
                b.tie(b.space(x, d), b.space(node, d))
        if isinstance(bias, torch.fx.Node) and ishape(bias) is not None:
            if not tie_broadcast(b, node, [bias]):
                b.freeze_node(node, f"unexpected bias broadcast in '{node.name}'")
                return
        if w_name is None:
            mark_weight_operand(b, node, w, len(so) - 1)  # a transposed/cast weight (W.t())
        if _name(node) == "baddbmm" and feeds_softmax(node, b.gm):  # scores with a bias (Bloom's ALiBi)
            b.freeze(b.space(x, len(sx) - 1), f"head dim of attention scores '{node.name}' (heads are pruned whole)")
            b.role(b.space(node, 0), "heads")

    def macs(self, node, m):
        x = node.args[1]
        so = ishape(node)
        m.term(1, [(node, d) for d in range(len(so))] + [(x, len(ishape(x)) - 1)])


register_function(*_ops("addmm", "baddbmm"), torch.addmm)(AddmmRule)

