"""Rules for matmul-like ops and attention.

MACs: ``matmul``: prod(out.shape) * K. ``einsum`` (two operands): product of every index size.
``scaled_dot_product_attention``: prod(batch) * L * S * (E + Ev) (QK^T and AV).
Window attention (Swin): qkv and output projections plus QK^T and AV inside each window.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune import ops as fx_ops
from fxprune.opset._base import (
    OpRule,
    arg,
    const,
    ishape,
    norm_dim,
    register_function,
    register_method,
    register_module,
    set_arg,
)

__all__ = ["MatmulRule", "GroupedMMRule", "EinsumRule", "SDPARule", "WindowAttentionRule"]


def _tie_batch(b, pairs):
    """Tie right-aligned batch dims of several (node, n_batch_dims) to the output's batch dims."""
    out_node, out_nb = pairs[0]
    for node, nb in pairs[1:]:
        s, os_ = ishape(node), ishape(out_node)
        off = out_nb - nb
        for d in range(nb):
            if s[d] == os_[d + off]:
                b.tie(b.space(node, d), b.space(out_node, d + off))


def _transparent(node, gm) -> bool:
    """Ops that carry attention scores/probabilities without mixing their last dim: reshapes,
    elementwise ops (scale, bias, mask), activations, casts, dropout."""
    from fxprune.opset._base import rule_for
    from fxprune.opset.structural import ElementwiseRule, ReshapeRule, UnaryRule

    rule = rule_for(node, gm)
    return isinstance(rule, (ElementwiseRule, UnaryRule, ReshapeRule)) or rule.name == "aten_reshape"


def _is_softmax_last(node, gm) -> bool:
    from fxprune.opset._base import rule_for
    from fxprune.opset.structural import SoftmaxRule

    if not isinstance(rule_for(node, gm), SoftmaxRule) or not node.args:
        return False
    s = ishape(node.args[0])
    if s is None:
        return False
    d = gm.get_submodule(node.target).dim if node.op == "call_module" else const(arg(node, 1, "dim"))
    return isinstance(d, int) and norm_dim(d, len(s)) == len(s) - 1


def _last(node) -> int | None:
    s = ishape(node)
    return s[-1] if s else None


def feeds_softmax(node, gm, depth: int = 8) -> bool:
    """``node`` (attention scores ``Q K^T``) reaches a softmax over its last dim through transparent ops."""
    frontier, last = [node], _last(node)
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if _last(u) != last:
                    continue
                if _is_softmax_last(u, gm):
                    return True
                if _transparent(u, gm):
                    nxt.append(u)
        frontier = nxt
        if not frontier:
            break
    return False


def from_softmax(node, gm, depth: int = 8) -> bool:
    """``node`` (attention probabilities) comes from a softmax over its last dim through transparent ops."""
    n, last = node, _last(node)
    for _ in range(depth):
        if not isinstance(n, torch.fx.Node) or _last(n) != last:
            return False
        if _is_softmax_last(n, gm):
            return True
        if not _transparent(n, gm) or not n.args or not isinstance(n.args[0], torch.fx.Node):
            return False
        n = n.args[0]
    return False


_SAME_LAYOUT = {"contiguous", "to", "_to_copy", "clone", "detach", "alias", "type_as", "float", "half",
                "bfloat16", "lift_fresh_copy"}


def _op_name(n) -> str:
    if n.op == "call_method":
        return str(n.target)
    t = n.target
    return getattr(getattr(t, "overloadpacket", t), "__name__", str(t))


def weight_param(x, gm, depth: int = 6) -> tuple[str, list[int]] | None:
    """``(parameter name, dims)`` when ``x`` is a parameter seen through transposes and casts:
    ``dims[i]`` is the parameter dim behind ``x``'s dim ``i``. Layers written as matmuls on their
    weight (HF ``Conv1D``'s ``addmm(b, x, W)``, Falcon's ``x @ W.T``) produce channels like
    ``nn.Linear`` does."""
    shape = ishape(x)
    if not isinstance(x, torch.fx.Node) or shape is None:
        return None
    perm = list(range(len(shape)))
    n = x
    for _ in range(depth):
        if n.op == "get_attr":
            t = gm
            for part in str(n.target).split("."):
                t = getattr(t, part, None)
            return (str(n.target), perm) if isinstance(t, torch.nn.Parameter) else None
        if n.op not in ("call_function", "call_method") or not n.args or not isinstance(n.args[0], torch.fx.Node):
            return None
        name = _op_name(n)
        src = n.args[0]
        ps = ishape(src)
        if ps is None or len(ps) != len(shape):
            return None
        if name in _SAME_LAYOUT:
            sigma = list(range(len(ps)))
        elif name in ("t", "numpy_T"):
            sigma = list(reversed(range(len(ps))))
        elif name in ("transpose", "swapaxes", "swapdims"):
            d0, d1 = (norm_dim(int(const(n.args[i])), len(ps)) for i in (1, 2))
            sigma = list(range(len(ps)))
            sigma[d0], sigma[d1] = sigma[d1], sigma[d0]
        elif name == "permute":
            dims = n.args[1] if isinstance(n.args[1], (list, tuple)) else n.args[1:]
            sigma = [norm_dim(int(const(d)), len(ps)) for d in dims]
        else:
            return None
        perm = [sigma[p] for p in perm]
        n = src
    return None


def mark_weight_operand(b, node, w, out_dim: int) -> None:
    """``node = x @ w`` with ``w`` a parameter: its output channels are produced there."""
    found = weight_param(w, b.gm)
    sw = ishape(w)
    if found is None or len(sw) != 2:
        return
    name, dims = found
    b.origin(b.space(node, out_dim))
    b.role(b.pspace(name, dims[1]), "producer")
    b.role(b.pspace(name, dims[0]), "consumer")


class MatmulRule(OpRule):
    """matmul / bmm / mm / ``@`` on two tensors: the contracted dim is tied across operands.

    Attention written with matmuls (``softmax(Q K^T) V``, the heads as a dim of their own or folded
    into the batch like DeBERTa's ``[B*H, L, D]``) is pruned by whole heads, as with
    ``scaled_dot_product_attention``: the contracted head dim of ``Q K^T`` (a matmul whose output
    feeds a softmax over its last dim) and the value head dim of ``P V`` (a matmul whose first
    operand comes from such a softmax) are frozen, so reshapes put the projections' channels on
    the heads dim; the batch dims of both carry the ``heads`` role.
    """

    name = "matmul"

    def couple(self, node, b):
        a, c = node.args[0], node.args[1]
        sa, sc, so = ishape(a), ishape(c), ishape(node)
        if sa is None or sc is None or len(sa) < 2 or len(sc) < 2:
            b.freeze_node(node, f"matrix-vector product ({node.name})")
            return
        b.tie(b.space(a, len(sa) - 1), b.space(c, len(sc) - 2))
        b.tie(b.space(a, len(sa) - 2), b.space(node, len(so) - 2))
        b.tie(b.space(c, len(sc) - 1), b.space(node, len(so) - 1))
        _tie_batch(b, [(node, len(so) - 2), (a, len(sa) - 2), (c, len(sc) - 2)])
        if len(so) >= 4:
            for d in range(1, len(so) - 2):
                b.role(b.space(node, d), "heads")
        mark_weight_operand(b, node, c, len(so) - 1)
        scores = len(so) >= 3 and feeds_softmax(node, b.gm)
        probs = len(so) >= 3 and not scores and from_softmax(a, b.gm)
        if scores:
            b.freeze(b.space(a, len(sa) - 1), f"head dim of attention scores '{node.name}' (heads are pruned whole)")
        elif probs:
            b.freeze(b.space(node, len(so) - 1), f"value head dim of attention '{node.name}' (heads are pruned whole)")
        if scores or probs:
            for d in range(len(so) - 2):
                b.role(b.space(node, d), "heads")

    def macs(self, node, m):
        a = node.args[0]
        so = ishape(node)
        m.term(1, [(node, d) for d in range(len(so))] + [(a, len(ishape(a)) - 1)])


register_function(torch.matmul, operator.matmul, torch.bmm, torch.mm)(MatmulRule)
register_method("matmul", "bmm", "mm", "__matmul__")(MatmulRule)


_GROUPED_MM_ALIGN = 8


class GroupedMMRule(OpRule):
    """Grouped matmul of a mixture of experts: ``out[s] = x[s] @ w[e(s)]`` with ``x [S, K]``, the
    experts' weights ``w [E, K, N]`` and the rows grouped by expert (``offs``). Like a linear layer
    per expert, with the experts sharing one channel space: ``K`` is tied to ``x``'s channels, ``N``
    to the output's (produced there when ``w`` is a parameter, seen through a transpose), the
    experts dim is kept whole, and ``K`` and ``N`` keep multiples of 8 (the CPU and CUDA kernels
    need 16-byte aligned strides: 8 elements at 16 bits; a hard constraint, never relaxed to reach
    the band as ``channel_multiple`` may be). MACs: ``S * K * N`` (each routed row through one expert).

    ``torch._grouped_mm`` / ``F.grouped_mm`` and transformers' CPU fallback
    (``transformers::grouped_mm_fallback``, the same contract) share this rule."""

    name = "grouped_mm"

    def couple(self, node, b):
        x, w = node.args[0], node.args[1]
        sx, sw, so = ishape(x), ishape(w), ishape(node)
        if sx is None or sw is None or so is None or len(sx) != 2 or len(sw) != 3 or len(so) != 2:
            b.freeze_node(node, f"grouped matmul of unexpected ranks ({node.name})")
            return
        b.tie(b.space(x, 1), b.space(w, 1))
        b.tie(b.space(w, 2), b.space(node, 1))
        b.tie(b.space(x, 0), b.space(node, 0))
        b.freeze(b.space(w, 0), f"experts of grouped matmul '{node.name}' (every expert is kept)")
        for space in (b.space(x, 1), b.space(node, 1)):  # the kernel needs 16-byte strides (8 elements at 16 bits)
            b.align(space, _GROUPED_MM_ALIGN, f"grouped matmul '{node.name}' needs 16-byte aligned strides")
        bias = arg(node, 3, "bias")
        if isinstance(bias, torch.fx.Node) and len(ishape(bias) or ()) == 2:
            b.tie(b.space(bias, 1), b.space(node, 1))
            b.freeze(b.space(bias, 0), f"experts of grouped matmul '{node.name}' (every expert is kept)")
        found = weight_param(w, b.gm)
        if found is not None:
            name, dims = found
            b.origin(b.space(node, 1))
            b.role(b.pspace(name, dims[2]), "producer")
            b.role(b.pspace(name, dims[1]), "consumer")

    def macs(self, node, m):
        m.term(1, [(node, 0), (node, 1), (node.args[0], 1)])


register_function(getattr(torch.ops.aten, "_grouped_mm", None), getattr(torch, "_grouped_mm", None),
                  getattr(F, "grouped_mm", None), "transformers::grouped_mm_fallback")(GroupedMMRule)


def _parse_einsum(eq: str, ranks: list[int]):
    """``(operand specs, output spec)`` with one letter per dim, or None (an equation it cannot read).

    An ellipsis becomes letters of its own, broadcast from the right across the operands as
    einsum does (``"...qhd,...khd->...hqk"``: LongT5's blocked attention).
    """
    eq = eq.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    ins = lhs.split(",")
    if len(ins) != len(ranks):
        return None
    ell = ""
    if "..." in eq:
        spare = [ch for ch in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if ch not in eq]
        widths = [r - len(spec.replace("...", "")) if "..." in spec else 0 for spec, r in zip(ins, ranks)]
        most = max(widths)
        if min(widths) < 0 or most > len(spare):
            return None
        ell = "".join(spare[:most])
        ins = [spec.replace("...", ell[most - w:]) for spec, w in zip(ins, widths)]
        rhs = rhs.replace("...", ell)
    if not arrow:  # implicit output: the broadcast dims, then the letters used once, sorted
        letters = "".join(ins)
        rhs = ell + "".join(sorted(ch for ch in set(letters) if letters.count(ch) == 1 and ch not in ell))
    if any("." in spec for spec in ins + [rhs]) or any(len(spec) != r for spec, r in zip(ins, ranks)):
        return None
    return ins, rhs


class EinsumRule(OpRule):
    name = "einsum"

    @staticmethod
    def _operands(node):
        ops = list(node.args[1:])
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        return const(node.args[0]), ops

    def couple(self, node, b):
        eq, ops = self._operands(node)
        parsed = _parse_einsum(eq, [len(ishape(op)) for op in ops])
        if parsed is None:
            b.freeze_node(node, f"einsum '{eq}' not supported ({node.name})")
            return
        ins, rhs = parsed
        first = {}
        for letter, d in zip(rhs, range(len(rhs))):
            first.setdefault(letter, (node, d))
        for op, spec in zip(ops, ins):
            s = ishape(op)
            for d, letter in enumerate(spec):
                if letter in first:
                    n0, d0 = first[letter]
                    if ishape(n0)[d0] == s[d]:
                        b.tie(b.space(n0, d0), b.space(op, d))
                else:
                    first[letter] = (op, d)

    def macs(self, node, m):
        eq, ops = self._operands(node)
        parsed = _parse_einsum(eq, [len(ishape(op)) for op in ops])
        if parsed is None or len(ops) < 2:
            return
        ins, rhs = parsed
        spaces = {}
        for op, spec in zip(ops, ins):
            s = ishape(op)
            for d, letter in enumerate(spec):
                if letter not in spaces or ishape(spaces[letter][0])[spaces[letter][1]] == 1:
                    spaces[letter] = (op, d)
                _ = s
        m.term(len(ops) - 1, list(spaces.values()))


register_function(torch.einsum, torch.functional.einsum)(EinsumRule)


class TensordotRule(OpRule):
    """``torch.tensordot(a, b, dims)``: channels are frozen (the contraction may merge several
    dims); MACs are ``prod(out.shape) * prod(contracted dims of a)``."""

    name = "tensordot"

    @staticmethod
    def contracted(node) -> list[int] | None:
        a = node.args[0]
        sa = ishape(a)
        dims = const(node.args[2]) if len(node.args) > 2 else const(node.kwargs.get("dims", 2))
        if sa is None:
            return None
        if isinstance(dims, int):
            return list(range(len(sa) - dims, len(sa)))
        if isinstance(dims, (list, tuple)) and len(dims) == 2:
            da = dims[0]
            da = [da] if isinstance(da, int) else list(da)
            return [norm_dim(int(d), len(sa)) for d in da]
        return None

    def couple(self, node, b):
        b.freeze_node(node, f"tensordot contraction ({node.name})")

    def macs(self, node, m):
        dims = self.contracted(node)
        so = ishape(node)
        if dims is None or so is None:
            return
        a = node.args[0]
        m.term(1, [(node, d) for d in range(len(so))] + [(a, d) for d in dims])


register_function(torch.tensordot, torch.functional.tensordot)(TensordotRule)
_aten_tensordot = getattr(torch.ops.aten, "tensordot", None)
if _aten_tensordot is not None:
    register_function(_aten_tensordot)(TensordotRule)


class SDPARule(OpRule):
    """``F.scaled_dot_product_attention``: heads (batch dims) are tied across q, k, v and output;
    the head dims and the key axis are frozen (heads are pruned whole)."""

    name = "sdpa"

    def couple(self, node, b):
        q, k, v = node.args[0], node.args[1], node.args[2]
        sq, sk, sv, so = ishape(q), ishape(k), ishape(v), ishape(node)
        nb = len(so) - 2
        _tie_batch(b, [(node, nb), (q, len(sq) - 2), (k, len(sk) - 2), (v, len(sv) - 2)])
        if bool(const(arg(node, 7, "enable_gqa", False))) and sq[-3] != sk[-3]:
            b.freeze_node(node, f"grouped-query attention ({node.name})")
            return
        b.tie(b.space(q, len(sq) - 2), b.space(node, nb))  # L
        b.tie(b.space(k, len(sk) - 2), b.space(v, len(sv) - 2))  # S
        b.tie(b.space(q, len(sq) - 1), b.space(k, len(sk) - 1))  # E
        b.tie(b.space(v, len(sv) - 1), b.space(node, nb + 1))  # Ev
        b.freeze(b.space(k, len(sk) - 2), f"key axis of attention '{node.name}'")
        b.freeze(b.space(q, len(sq) - 1), f"head dim of attention '{node.name}' (heads are pruned whole)")
        b.freeze(b.space(v, len(sv) - 1), f"value head dim of attention '{node.name}' (heads are pruned whole)")
        mask = arg(node, 3, "attn_mask")
        if isinstance(mask, torch.fx.Node) and ishape(mask) is not None:
            ms = ishape(mask)
            off = len(so) - len(ms)
            for d in range(len(ms)):
                od = d + off
                if od < nb and ms[d] == so[od]:
                    b.tie(b.space(mask, d), b.space(node, od))
                elif od == nb and ms[d] == so[nb]:
                    b.tie(b.space(mask, d), b.space(node, nb))
                elif od == nb + 1 and ms[d] == sk[-2]:
                    b.tie(b.space(mask, d), b.space(k, len(sk) - 2))
        if nb >= 2:
            for d in range(1, nb):
                b.role(b.space(node, d), "heads")

    def macs(self, node, m):
        q, k = node.args[0], node.args[1]
        sq, sk, so = ishape(q), ishape(k), ishape(node)
        nb = len(so) - 2
        batch_l = [(node, d) for d in range(nb + 1)]
        s_axis = (k, len(sk) - 2)
        m.term(1, batch_l + [s_axis, (q, len(sq) - 1)])  # Q K^T
        m.term(1, batch_l + [s_axis, (node, nb + 1)])  # A V


register_function(F.scaled_dot_product_attention)(SDPARule)


class MultiheadAttentionLeafRule(OpRule):
    """An ``nn.MultiheadAttention`` that capture could not decompose: counted, not pruned."""

    name = "mha_leaf"

    def couple(self, node, b):
        b.freeze_node(node, f"nn.MultiheadAttention '{node.target}' with options fxprune does not decompose")

    def macs(self, node, m):
        mod = m.module(node)
        q, k = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
        sq, sk = ishape(q), ishape(k)
        if len(sq) == 2:
            n, lq, ls = 1, sq[0], sk[0]
        elif mod.batch_first:
            n, lq, ls = sq[0], sq[1], sk[1]
        else:
            n, lq, ls = sq[1], sq[0], sk[0]
        e = mod.embed_dim
        total = n * lq * e * e + n * ls * mod.kdim * e + n * ls * mod.vdim * e + 2 * n * lq * ls * e + n * lq * e * e
        m.term(total, [])


register_module(nn.MultiheadAttention)(MultiheadAttentionLeafRule)


# ----------------------------------------------------------------------- Swin (torchvision)

def _heads_of(node):
    return int(const(arg(node, 5, "num_heads")))


class WindowAttentionRule(OpRule):
    """``fxprune.ops.window_attention``: heads are the pruning unit of the qkv/proj projections."""

    name = "window_attention"

    def _parts(self, node):
        x, qkv_w, proj_w, rpb = node.args[0], node.args[1], node.args[2], node.args[3]
        nh = _heads_of(node)
        qkv_out = ishape(qkv_w)[0]
        hd = const(arg(node, 13, "head_dim")) or ishape(x)[-1] // nh
        return x, qkv_w, proj_w, rpb, nh, hd, qkv_out

    def couple(self, node, b):
        x, qkv_w, proj_w, rpb, nh, hd, qkv_out = self._parts(node)
        xs = ishape(x)
        if qkv_out != 3 * nh * hd or not isinstance(qkv_w, torch.fx.Node) or not isinstance(proj_w, torch.fx.Node):
            b.freeze_node(node, f"window attention with unexpected shapes ({node.name})")
            return
        for d in range(len(xs) - 1):
            b.tie(b.space(x, d), b.space(node, d))
        heads = b.vspace(node, "heads", nh)
        b.origin(heads)
        b.role(heads, "heads")
        i = np.arange(qkv_out)
        qkv0 = b.space(qkv_w, 0)
        b.tie_map(qkv0, i, heads, (i // hd) % nh)
        b.role(qkv0, "producer")
        qkv1 = b.space(qkv_w, 1)
        b.tie(b.space(x, len(xs) - 1), qkv1)
        b.role(qkv1, "consumer")
        j = np.arange(nh * hd)
        p1 = b.space(proj_w, 1)
        b.tie_map(p1, j, heads, j // hd)
        b.role(p1, "consumer")
        p0 = b.space(proj_w, 0)
        out_c = b.space(node, len(xs) - 1)
        b.tie(out_c, p0)
        b.origin(out_c)
        b.role(p0, "producer")
        if isinstance(rpb, torch.fx.Node) and ishape(rpb) is not None and ishape(rpb)[-3] == nh:
            b.tie(b.space(rpb, len(ishape(rpb)) - 3), heads)
        qkv_b = arg(node, 9, "qkv_bias")
        if isinstance(qkv_b, torch.fx.Node):
            b.tie_map(b.space(qkv_b, 0), i, heads, (i // hd) % nh)
        proj_b = arg(node, 10, "proj_bias")
        if isinstance(proj_b, torch.fx.Node):
            b.tie(b.space(proj_b, 0), out_c)
        ls = arg(node, 11, "logit_scale")
        if isinstance(ls, torch.fx.Node):
            b.tie(b.space(ls, 0), heads)

    def macs(self, node, m):
        x, qkv_w, proj_w, rpb, nh, hd, qkv_out = self._parts(node)
        bsz, h, w, _ = ishape(x)
        ws = list(const(arg(node, 4, "window_size")))
        ph = h + (ws[0] - h % ws[0]) % ws[0]
        pw = w + (ws[1] - w % ws[1]) % ws[1]
        n_win = (ph // ws[0]) * (pw // ws[1])
        n = ws[0] * ws[1]
        tokens = bsz * n_win * n
        m.term(tokens, [(x, 3), (qkv_w, 0)])  # qkv projection
        m.term(2 * bsz * n_win * n * n / 3, [(qkv_w, 0)])  # QK^T and AV over nh*hd = qkv_out / 3
        m.term(tokens, [(proj_w, 1), (proj_w, 0)])  # output projection

    def rewrite(self, node, r):
        x, qkv_w, proj_w, rpb, nh, hd, qkv_out = self._parts(node)
        new_heads = r.new_size(qkv_w, 0) // (3 * hd)
        set_arg(node, 5, "num_heads", new_heads)
        set_arg(node, 13, "head_dim", hd)


register_function(fx_ops.window_attention)(WindowAttentionRule)



_ = (math, register_method, norm_dim)
