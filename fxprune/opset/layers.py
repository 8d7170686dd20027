"""Rules for parametrised layers: convolution, linear, normalisation, embedding, pooling.

MAC conventions (one multiply-accumulate per weight use, bias excluded):

* conv:        N * prod(out_spatial) * prod(kernel) * C_out * C_in / groups
* conv^T:      N * prod(in_spatial)  * prod(kernel) * C_in  * C_out / groups
* linear:      prod(out.shape) * in_features
* norms, activations, pooling, bias and elementwise ops: 0
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.opset._base import (
    OpRule,
    op_label,
    arg,
    const,
    ishape,
    norm_dim,
    register_function,
    register_module,
    scaled_size,
    set_arg,
)

__all__ = ["ConvRule", "LinearRule", "BatchNormRule", "LayerNormRule", "GroupNormRule"]


class _Weights:
    """Uniform access to a layer's parameters, whether module attributes or get_attr nodes."""

    def __init__(self, node, gm, names=("weight", "bias"), positions=(1, 2)):
        self.node = node
        self.gm = gm
        self.is_module = node.op == "call_module"
        self.refs = {}
        if self.is_module:
            mod = gm.get_submodule(node.target)
            for n in names:
                if isinstance(getattr(mod, n, None), torch.Tensor):
                    self.refs[n] = f"{node.target}.{n}"
        else:
            for n, pos in zip(names, positions):
                a = arg(node, pos, n)
                if isinstance(a, torch.fx.Node):
                    # a get_attr of a parameter/buffer is referred to by name, so that roles
                    # (producer/consumer) land on the parameter, as for modules (F.linear in timm's Linear)
                    by_name = a.op == "get_attr" and _is_tensor_attr(gm, str(a.target))
                    self.refs[n] = str(a.target) if by_name else a

    def has(self, n):
        return n in self.refs

    def space(self, b, n, dim):
        ref = self.refs[n]
        return b.pspace(ref, dim) if isinstance(ref, str) else b.space(ref, dim)

    def shape(self, n):
        ref = self.refs[n]
        if isinstance(ref, str):
            return tuple(self.gm.get_parameter(ref).shape) if _is_param(self.gm, ref) else tuple(
                self.gm.get_buffer(ref).shape
            )
        return ishape(ref)

    def tensor(self, n):
        ref = self.refs[n]
        target = ref if isinstance(ref, str) else ref.target
        return _get_tensor(self.gm, target)

    def set_tensor(self, n, value):
        ref = self.refs[n]
        target = ref if isinstance(ref, str) else ref.target
        _set_tensor(self.gm, target, value)


def _is_param(gm, name):
    mod_path, _, attr = name.rpartition(".")
    mod = gm.get_submodule(mod_path) if mod_path else gm
    return attr in mod._parameters


def _is_tensor_attr(gm, name):
    mod_path, _, attr = name.rpartition(".")
    try:
        mod = gm.get_submodule(mod_path) if mod_path else gm
    except AttributeError:
        return False
    return attr in mod._parameters or attr in mod._buffers


def _get_tensor(gm, target):
    mod_path, _, attr = target.rpartition(".")
    mod = gm.get_submodule(mod_path) if mod_path else gm
    return getattr(mod, attr)


def _set_tensor(gm, target, value):
    mod_path, _, attr = target.rpartition(".")
    mod = gm.get_submodule(mod_path) if mod_path else gm
    if attr in mod._parameters:
        old = mod._parameters[attr]
        mod._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        setattr(mod, attr, value)


# --------------------------------------------------------------------------------- convolution

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def couple_positions(b, node, x, first: int, one_to_one: bool) -> None:
    """Spatial dims ``first..`` of ``x`` and ``node``: tied when the op maps positions one to one
    (a 1x1 kernel keeping the size), else frozen: positions a kernel, a stride or a resize mixes
    cannot carry prunable channels (CoaT aggregates its embedding along a Conv1d's length)."""
    xs, os_ = ishape(x), ishape(node)
    for d in range(first, min(len(xs), len(os_))):
        if one_to_one and xs[d] == os_[d]:
            b.tie(b.space(x, d), b.space(node, d))
        else:
            b.freeze(b.space(x, d), f"spatial dim {d} of '{node.name}'")
            b.freeze(b.space(node, d), f"spatial dim {d} of '{node.name}'")


META_GROUPED_WITHIN = "fxprune.grouped_within"  # set by the dependency analysis (see ``conv_kind``)


def conv_kind(node, groups: int, cin: int, cout: int, plain_weight: bool = True) -> str:
    """:meth:`ConvRule.kind` of a conv node: ``"whole"`` becomes ``"grouped"`` where the dependency
    analysis marked the node: ``grouped_convs="within"`` (the default), or another op structures its
    channels by the same groups (a norm with that many groups, a channel shuffle), so that pruning
    within the groups is what stays valid."""
    kind = ConvRule.kind(groups, cin, cout, plain_weight)
    return "grouped" if kind == "whole" and node.meta.get(META_GROUPED_WITHIN) else kind


class ConvRule(OpRule):
    """Conv{1,2,3}d modules and ``F.conv{1,2,3}d``.

    Coupling: output channels are produced by weight dim 0 (an origin); with ``groups == 1``
    the input channels are consumed by weight dim 1. A depthwise conv (``groups == C_in``) ties
    each input channel to its ``C_out / C_in`` output channels. Any other grouped conv is pruned
    one of two ways (:func:`conv_kind`):

    * ``"whole"`` (with ``grouped_convs="whole"``, the default with a latency budget, for a conv
      with more groups than channels per group, as in RegNet and ResNeXt's early stages): whole
      conv groups are removed, their input and output channels together (one unit per conv
      group, through a virtual axis of the groups); the channels per group stay, so the kernel
      keeps its shape and the group count shrinks;
    * ``"grouped"`` (the default with a MAC budget, always for other shapes and a computed weight,
      and where another op structures the channels by the same groups, which the dependency
      analysis finds): the group count stays; input
      and output channels are pruned uniformly within each group (a block constraint) and the
      weight is rebuilt per group by the rewrite.
    """

    name = "conv"

    def _info(self, node, gm):
        w = _Weights(node, gm)
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            groups = mod.groups
        else:
            groups = int(const(arg(node, 6, "groups", 1)))
        x = node.args[0]
        xs, os_ = ishape(x), ishape(node)
        wshape = w.shape("weight")
        spatial = len(wshape) - 2
        cdim = len(os_) - spatial - 1  # 1 when batched, 0 when not
        return w, groups, x, xs, os_, cdim, wshape

    @staticmethod
    def kind(groups, cin, cout, plain_weight=True):
        """``"dense"``, ``"depthwise"``, ``"whole"`` (may be pruned by whole conv groups) or
        ``"grouped"`` (pruned uniformly within the groups). ``"whole"`` where there are more groups
        than channels per group: whole groups then give more keep counts, and the channels per group
        (the kernel's shape, which decides its speed) stay; :func:`conv_kind` turns it into
        ``"grouped"`` unless the analysis was asked for whole groups. A computed weight (NF-Net's
        standardised one) stays ``"grouped"``."""
        if groups == 1:
            return "dense"
        if groups == cin and cout % cin == 0:
            return "depthwise"
        if plain_weight and cin % groups == 0 and cout % groups == 0 and max(cin, cout) // groups < groups:
            return "whole"
        return "grouped"

    @staticmethod
    def _plain(w) -> bool:
        return isinstance(w.refs["weight"], str)

    def couple(self, node, b):
        w, g, x, xs, os_, c, wshape = self._info(node, b.gm)
        for d in range(c):
            b.tie(b.space(x, d), b.space(node, d))
        couple_positions(b, node, x, c + 1, all(k == 1 for k in wshape[2:]))
        cin, cout = xs[c], os_[c]
        out_c, in_c = b.space(node, c), b.space(x, c)
        w0 = w.space(b, "weight", 0)
        b.tie(out_c, w0)
        b.origin(out_c)
        b.role(w0, "producer")
        if w.has("bias"):
            bs = w.space(b, "bias", 0)
            b.tie(out_c, bs)
            b.role(bs, "other")
        kind = conv_kind(node, g, cin, cout, self._plain(w))
        if kind == "dense":
            w1 = w.space(b, "weight", 1)
            b.tie(in_c, w1)
            b.role(w1, "consumer")
        elif kind == "depthwise":
            mult = cout // cin
            j = np.arange(cout)
            b.tie_map(out_c, j, in_c, j // mult)
        elif kind == "whole":  # conv group k: input channels k*cin/g.., output channels k*cout/g..
            conv_groups = b.vspace(node, "conv_groups", g)
            b.tie_map(in_c, np.arange(cin), conv_groups, np.arange(cin) // (cin // g))
            b.tie_map(out_c, np.arange(cout), conv_groups, np.arange(cout) // (cout // g))
        else:
            b.blocks(out_c, g, f"grouped conv '{node.name}' (groups={g})")
            if self._plain(w):
                b.blocks(in_c, g, f"grouped conv '{node.name}' (groups={g})")
            else:  # the rewrite regroups a parameter; a computed weight (NF-Net's standardised one) cannot be
                b.freeze(in_c, f"grouped conv '{node.name}' on a computed weight: its input channels are kept")

    def macs(self, node, m):
        w, g, x, xs, os_, c, wshape = self._info(node, m.gm)
        ksize = math.prod(wshape[2:])
        spatial = [(node, d) for d in range(len(os_)) if d != c]
        kind = conv_kind(node, g, xs[c], os_[c], self._plain(w))
        if kind in ("depthwise", "whole"):  # the input channels per group are fixed
            m.term(ksize * (xs[c] // g), spatial + [(node, c)])
        else:
            m.term(ksize / g, spatial + [(node, c), (x, c)])

    def rewrite(self, node, r):
        gm = r.gm
        w, g, x, xs, os_, c, wshape = self._info(node, gm)
        cin_old = xs[c]
        cout_old = os_[c]  # the weight may already be sliced: use the recorded shapes
        kind = conv_kind(node, g, cin_old, cout_old, self._plain(w))
        new_cin = r.new_size(x, c)
        new_groups = g
        if kind == "depthwise":
            new_groups = new_cin
        elif kind == "whole":  # whole groups went: the kept rows and all their columns stay
            new_groups = new_cin // (cin_old // g)
        elif kind == "grouped":
            kept_in = r.kept(x, c)
            if kept_in is not None and self._plain(w):
                weight = w.tensor("weight")  # rows already sliced to the kept outputs
                per_in = cin_old // g
                new_rows = weight.shape[0] // g
                keep_local = (kept_in % per_in).reshape(g, -1)
                parts = [
                    weight[i * new_rows : (i + 1) * new_rows][:, torch.as_tensor(keep_local[i], dtype=torch.long)]
                    for i in range(g)
                ]
                w.set_tensor("weight", torch.cat(parts, 0).contiguous())
        if node.op == "call_module":
            mod = r.module(node)
            mod.in_channels = new_cin
            mod.out_channels = mod.weight.shape[0]
            mod.groups = new_groups
        elif new_groups != g:
            # a computed group count keeps what it reads beyond the channels (timm's CondConv folds
            # the batch into the groups: groups = C * B)
            set_arg(node, 6, "groups", scaled_size(node, arg(node, 6, "groups", 1), new_groups, g, r))


register_module(*_CONV_MODULES)(ConvRule)
register_function(F.conv1d, F.conv2d, F.conv3d)(ConvRule)


class ConvTransposeRule(OpRule):
    """ConvTranspose modules and ``F.conv_transpose{1,2,3}d`` (dense; grouped ones are frozen).

    The weight is ``[C_in, C_out / groups, *kernel]``: input channels are consumed by weight dim 0,
    output channels produced by weight dim 1. MACs: ``N * prod(in_spatial) * prod(kernel) * C_in *
    C_out / groups`` (every input element meets every weight of its group once).
    """

    name = "conv_transpose"

    def _info(self, node, gm):
        w = _Weights(node, gm)
        groups = gm.get_submodule(node.target).groups if node.op == "call_module" else int(
            const(arg(node, 6, "groups", 1)))
        x = node.args[0]
        xs, os_ = ishape(x), ishape(node)
        wshape = w.shape("weight")
        c = len(os_) - len(wshape) + 1  # 1 when batched, 0 when not
        return w, groups, x, xs, os_, c, wshape

    def couple(self, node, b):
        w, groups, x, xs, os_, c, wshape = self._info(node, b.gm)
        for d in range(c):
            b.tie(b.space(x, d), b.space(node, d))
        couple_positions(b, node, x, c + 1, all(k == 1 for k in wshape[2:]))
        in_c, out_c = b.space(x, c), b.space(node, c)
        w0, w1 = w.space(b, "weight", 0), w.space(b, "weight", 1)
        b.tie(in_c, w0)
        b.role(w0, "consumer")
        if groups != 1:
            b.freeze(out_c, f"grouped transposed conv '{node.name}'")
            b.freeze(in_c, f"grouped transposed conv '{node.name}'")
            return
        b.tie(out_c, w1)
        b.role(w1, "producer")
        b.origin(out_c)
        if w.has("bias"):
            bs = w.space(b, "bias", 0)
            b.tie(out_c, bs)
            b.role(bs, "other")

    def macs(self, node, m):
        w, groups, x, xs, os_, c, wshape = self._info(node, m.gm)
        k = math.prod(wshape[2:])
        spatial = [(x, d) for d in range(len(xs)) if d != c]
        m.term(k / groups, spatial + [(x, c), (node, c)])

    def rewrite(self, node, r):
        if node.op == "call_module":
            mod = r.module(node)
            mod.in_channels = mod.weight.shape[0]
            mod.out_channels = mod.weight.shape[1] * mod.groups


register_module(*_CONVT_MODULES)(ConvTransposeRule)
register_function(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)(ConvTransposeRule)


# ------------------------------------------------------------------------------------- linear

class LinearRule(OpRule):
    """``nn.Linear`` (and subclasses) and ``F.linear`` on parameters or any tensors."""

    name = "linear"

    def couple(self, node, b):
        w = _Weights(node, b.gm)
        x = node.args[0]
        xs, os_ = ishape(x), ishape(node)
        for d in range(len(os_) - 1):
            b.tie(b.space(x, d), b.space(node, d))
        out_f, in_f = b.space(node, len(os_) - 1), b.space(x, len(xs) - 1)
        w0, w1 = w.space(b, "weight", 0), w.space(b, "weight", 1)
        b.tie(out_f, w0)
        b.tie(in_f, w1)
        b.origin(out_f)
        b.role(w0, "producer")
        b.role(w1, "consumer")
        if w.has("bias"):
            bs = w.space(b, "bias", 0)
            b.tie(out_f, bs)
            b.role(bs, "other")

    def macs(self, node, m):
        x = node.args[0]
        os_ = ishape(node)
        m.term(1, [(node, d) for d in range(len(os_))] + [(x, len(ishape(x)) - 1)])

    def rewrite(self, node, r):
        if node.op == "call_module":
            mod = r.module(node)
            mod.out_features, mod.in_features = mod.weight.shape


register_module(nn.Linear)(LinearRule)
register_function(F.linear)(LinearRule)


class BilinearFreeze(OpRule):
    name = "bilinear"

    def macs(self, node, m):
        mod = m.module(node)
        os_ = ishape(node)
        m.term(mod.weight.shape[1] * mod.weight.shape[2], [(node, d) for d in range(len(os_))])


register_module(nn.Bilinear)(BilinearFreeze)


class RecurrentRule(OpRule):
    """``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``: exact MACs; a one-layer recurrent layer without an LSTM
    projection has its hidden units pruned, and its input features with the layer that makes them.

    Per step, layer and direction: ``gates * hidden * (input + recurrent)`` with gates 1 (RNN),
    3 (GRU), 4 (LSTM), ``recurrent = proj_size or hidden``, plus ``hidden * proj_size`` for an
    LSTM projection; ``input`` is ``input_size`` for the first layer and
    ``directions * (proj_size or hidden)`` after it. Steps = every element of the input but the
    feature dim (``T * B``); packed sequences are not counted (the node is then measured).

    Pruning (one layer, no projection, no initial state passed, only the output sequence used):
    hidden unit ``h`` is row ``g * H + h`` of every gate block of ``weight_ih``/``weight_hh``/the
    biases, column ``h`` of ``weight_hh``, and feature ``d * H + h`` of the output of direction ``d``
    (both directions keep the same units). MACs in terms of the output width ``O = dirs * H``:
    ``gates * O * input + gates * O * O / dirs`` per step. Anything else keeps its channels whole.
    """

    name = "recurrent"

    @staticmethod
    def _output(node, mod):
        """The getitem node of the output sequence when the layer can be pruned, else None."""
        from fxprune.opset.structural import _tuple_users

        if mod.num_layers != 1 or (getattr(mod, "proj_size", 0) or 0) or len(node.args) != 1 or node.kwargs:
            return None
        users = _tuple_users(node)
        if users is None:
            return None
        outs = [u for i, u in users if i == 0]
        if len(outs) != 1 or any(u.users for i, u in users if i != 0):
            return None
        return outs[0]

    @staticmethod
    def _suffixes(mod):
        return ["_l0"] + (["_l0_reverse"] if mod.bidirectional else [])

    def couple(self, node, b):
        mod = b.gm.get_submodule(node.target)
        out = self._output(node, mod)
        if out is None:
            b.freeze_node(node, f"recurrent layer {op_label(node, b.gm)} (its hidden size is pruned only with one "
                                "layer, no projection, no initial state and only the output sequence used)")
            return
        x = node.args[0]
        xs, os_ = ishape(x), ishape(out)
        for d in range(len(xs) - 1):
            b.tie(b.space(x, d), b.space(out, d))
        h = mod.hidden_size
        names = [f"{w}{sfx}" for sfx in self._suffixes(mod) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        w = _Weights(node, b.gm, names=tuple(names))
        hidden = w.space(b, "weight_hh_l0", 1)  # the hidden units (every direction's columns tie to it)
        out_f = b.space(out, len(os_) - 1)
        j = np.arange(os_[-1])
        b.tie_map(out_f, j, hidden, j % h)
        b.origin(out_f)
        in_f = b.space(x, len(xs) - 1)
        for sfx in self._suffixes(mod):
            for n in (f"weight_ih{sfx}", f"weight_hh{sfx}", f"bias_ih{sfx}", f"bias_hh{sfx}"):
                if not w.has(n):
                    continue
                rows = w.space(b, n, 0)
                k = np.arange(w.shape(n)[0])
                b.tie_map(rows, k, hidden, k % h)
                b.role(rows, "producer" if n.startswith("weight") else "other")
            for space, cols in ((in_f, w.space(b, f"weight_ih{sfx}", 1)), (hidden, w.space(b, f"weight_hh{sfx}", 1))):
                b.tie(space, cols)  # a space tied to itself is a no-op
                b.role(cols, "consumer")

    def macs(self, node, m):
        mod = m.module(node)
        x = node.args[0]
        xs = ishape(x)
        if xs is None:
            return
        gates = {"LSTM": 4, "GRU": 3}.get(getattr(mod, "mode", ""), 1)
        steps = [(x, d) for d in range(len(xs) - 1)]
        out = self._output(node, mod)
        if out is not None:  # in node spaces, so that the plan cost follows the pruned widths
            dirs = 2 if mod.bidirectional else 1
            o = (out, len(ishape(out)) - 1)
            m.term(gates, steps + [o, (x, len(xs) - 1)])
            m.term(gates / dirs, steps + [o, o])
            return
        h = mod.hidden_size
        p = getattr(mod, "proj_size", 0) or 0
        r = p or h
        dirs = 2 if mod.bidirectional else 1
        per_step = 0
        for layer in range(mod.num_layers):
            inp = mod.input_size if layer == 0 else dirs * r
            per_step += dirs * (gates * h * (inp + r) + (h * p if p else 0))
        m.term(per_step, steps)

    def rewrite(self, node, r):
        mod = r.module(node)
        if self._output(node, mod) is None:
            return
        mod.input_size = int(mod.weight_ih_l0.shape[1])
        mod.hidden_size = int(mod.weight_hh_l0.shape[1])
        mod._init_flat_weights()  # the layer runs from this list of its (now replaced) parameters


register_module(nn.RNN, nn.GRU, nn.LSTM)(RecurrentRule)


# ------------------------------------------------------------------------------ normalisation

class BatchNormRule(OpRule):
    """BatchNorm/InstanceNorm modules and ``F.batch_norm``: per-channel, exact."""

    name = "batch_norm"

    def couple(self, node, b):
        x = node.args[0]
        xs = ishape(x)
        for d in range(len(xs)):
            b.tie(b.space(x, d), b.space(node, d))
        c = 1 if len(xs) > 1 else 0
        ch = b.space(node, c)
        if node.op == "call_module":
            mod = b.module(node)
            for name in ("weight", "bias", "running_mean", "running_var"):
                if isinstance(getattr(mod, name, None), torch.Tensor):
                    s = b.pspace(f"{node.target}.{name}", 0)
                    b.tie(ch, s)
                    b.role(s, "norm" if name == "weight" else "other")
        else:
            for pos, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
                a = arg(node, pos, name)
                if isinstance(a, torch.fx.Node) and ishape(a) is not None:
                    b.tie(ch, b.space(a, 0))

    def rewrite(self, node, r):
        if node.op == "call_module":
            mod = r.module(node)
            for name in ("weight", "running_mean"):
                t = getattr(mod, name, None)
                if isinstance(t, torch.Tensor):
                    mod.num_features = t.shape[0]
                    break


register_module(nn.modules.batchnorm._NormBase)(BatchNormRule)
register_function(F.batch_norm, F.instance_norm)(BatchNormRule)


class LayerNormRule(OpRule):
    """``nn.LayerNorm``, ``nn.RMSNorm`` and their functional forms: normalise the last k dims.

    Channels stay prunable but the group is marked inexact: the mean and variance are taken over
    the kept channels only, so pruning is more than zeroing.
    """

    name = "layer_norm"

    def _shape_arg(self, node, b_or_r):
        if node.op == "call_module":
            return tuple(b_or_r.module(node).normalized_shape)
        return tuple(const(arg(node, 1, "normalized_shape")))

    def couple(self, node, b):
        x = node.args[0]
        xs = ishape(x)
        k = len(self._shape_arg(node, b))
        for d in range(len(xs)):
            b.tie(b.space(x, d), b.space(node, d))
        for j in range(k):
            d = len(xs) - k + j
            b.inexact(b.space(node, d), f"normalised by {node.name}")
        names = ("weight", "bias")
        if node.op == "call_module":
            mod = b.module(node)
            for name in names:
                if isinstance(getattr(mod, name, None), torch.Tensor):
                    for j in range(k):
                        s = b.pspace(f"{node.target}.{name}", j)
                        b.tie(b.space(node, len(xs) - k + j), s)
                        b.role(s, "norm" if name == "weight" else "other")
        else:
            for pos, name in ((2, "weight"), (3, "bias")):
                a = arg(node, pos, name)
                if isinstance(a, torch.fx.Node) and ishape(a) is not None:
                    for j in range(k):
                        b.tie(b.space(node, len(xs) - k + j), b.space(a, j))

    def rewrite(self, node, r):
        x = node.args[0]
        k = len(self._shape_arg(node, r))
        nd = len(ishape(x))
        new_shape = tuple(r.new_size(x, nd - k + j) for j in range(k))
        if node.op == "call_module":
            r.module(node).normalized_shape = new_shape
        else:
            old = arg(node, 1, "normalized_shape")
            set_arg(node, 1, "normalized_shape", list(new_shape) if isinstance(old, list) else new_shape)


register_module(nn.LayerNorm)(LayerNormRule)
register_function(F.layer_norm)(LayerNormRule)
if hasattr(nn, "RMSNorm"):
    register_module(nn.RMSNorm)(LayerNormRule)
    register_function(getattr(F, "rms_norm", None))(LayerNormRule)


class GroupNormRule(OpRule):
    """GroupNorm: channels pruned uniformly within each of the ``num_groups`` groups."""

    name = "group_norm"

    def couple(self, node, b):
        x = node.args[0]
        xs = ishape(x)
        for d in range(len(xs)):
            b.tie(b.space(x, d), b.space(node, d))
        ch = b.space(node, 1)
        if node.op == "call_module":
            mod = b.module(node)
            groups = mod.num_groups
            for name in ("weight", "bias"):
                if isinstance(getattr(mod, name, None), torch.Tensor):
                    s = b.pspace(f"{node.target}.{name}", 0)
                    b.tie(ch, s)
                    b.role(s, "norm" if name == "weight" else "other")
        else:
            groups = int(const(arg(node, 1, "num_groups")))
            for pos, name in ((2, "weight"), (3, "bias")):
                a = arg(node, pos, name)
                if isinstance(a, torch.fx.Node):
                    b.tie(ch, b.space(a, 0))
        b.blocks(ch, groups, f"GroupNorm '{node.name}' ({groups} groups)")
        b.inexact(ch, f"normalised by {node.name}")

    def rewrite(self, node, r):
        if node.op == "call_module":
            mod = r.module(node)
            mod.num_channels = r.new_size(node, 1)


register_module(nn.GroupNorm)(GroupNormRule)
register_function(F.group_norm)(GroupNormRule)


class EmbeddingRule(OpRule):
    """``nn.Embedding``: the embedding dim is produced by weight dim 1."""

    name = "embedding"

    def couple(self, node, b):
        x = node.args[0]
        xs, os_ = ishape(x), ishape(node)
        for d in range(len(xs)):
            b.tie(b.space(x, d), b.space(node, d))
        if node.op == "call_module":
            s = b.pspace(f"{node.target}.weight", 1)
            rows = b.pspace(f"{node.target}.weight", 0)
        else:
            w = arg(node, 1, "weight")
            s, rows = b.space(w, 1), b.space(w, 0)
        out = b.space(node, len(os_) - 1)
        b.tie(out, s)
        b.origin(out)
        b.role(s, "producer")
        # the rows are what the indices select: never pruned (a weight tied to an output Linear
        # shares them with that Linear's outputs, which are then frozen too)
        b.freeze(rows, f"vocabulary rows of embedding '{node.target if node.op == 'call_module' else node.name}'")

    def rewrite(self, node, r):
        if node.op == "call_module":
            mod = r.module(node)
            mod.embedding_dim = mod.weight.shape[1]


register_module(nn.Embedding)(EmbeddingRule)
register_function(F.embedding)(EmbeddingRule)


class PReLURule(OpRule):
    name = "prelu"

    def couple(self, node, b):
        x = node.args[0]
        xs = ishape(x)
        for d in range(len(xs)):
            b.tie(b.space(x, d), b.space(node, d))
        mod = b.module(node)
        if mod.num_parameters > 1:
            b.tie(b.space(node, 1 if len(xs) > 1 else 0), b.pspace(f"{node.target}.weight", 0))

    def rewrite(self, node, r):
        mod = r.module(node)
        mod.num_parameters = mod.weight.shape[0]


register_module(nn.PReLU)(PReLURule)


# ------------------------------------------------------------------------------------ pooling

class ChannelPassRule(OpRule):
    """Ops that keep batch and channel dims and recompute the spatial ones (pooling, resize)."""

    name = "channel_pass"

    def couple(self, node, b):
        x = node.args[0]
        xs, os_ = ishape(x), ishape(node)
        if os_ is None:
            b.freeze_node(node, f"pooling with several outputs ({node.name})")
            return
        nkeep = 2 if len(xs) >= 3 else 1  # (N, C, *spatial) or unbatched (C, *spatial)
        spatial = len(xs) - nkeep
        if len(os_) != len(xs):
            b.freeze_node(node, f"pooling changed the rank ({node.name})")
            return
        for d in range(len(xs) - spatial):
            b.tie(b.space(x, d), b.space(node, d))
        couple_positions(b, node, x, len(xs) - spatial, False)


register_module(
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)(ChannelPassRule)
register_function(
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    torch._C._nn.avg_pool2d, torch._C._nn.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.lp_pool1d, F.lp_pool2d, F.interpolate, F.upsample,
    torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d,
)(ChannelPassRule)

_ = norm_dim
