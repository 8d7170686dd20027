"""The op registry: what fxprune knows about each operation, in one place.

For every op that can appear in a graph (a module class, a function, a tensor method or an ATen
overload) an :class:`OpRule` answers three questions:

``couple(node, b)``
    How does the op couple the channel spaces of its inputs and outputs? A channel space is one
    dimension of one tensor (``b.space(node, dim)``) or of one parameter (``b.pspace(name, dim)``).
    Rules tie spaces element by element (``b.tie`` for identity, ``b.tie_map`` for offsets,
    blocks and permutations), mark the spaces where prunable channels are produced
    (``b.origin``), freeze spaces that must keep every element (``b.freeze``, always with a
    reason), and declare constraints (``b.blocks``: uniform keep per block; ``b.inexact``:
    channel-mixing normalisation; ``b.align``: a kept size the op's kernel needs a multiple of).
``macs(node, m)``
    The op's multiply-accumulates as ``coef * prod(size(space))`` terms (``m.term``), so the same
    formula counts a real graph and estimates a hypothetical plan.
``rewrite(node, r)``
    After parameters were sliced, fix the node's shape-carrying constants (view sizes, groups,
    normalized_shape, split sizes, module attributes).

An op without a rule gets :data:`UNKNOWN`, which freezes every dimension it touches: unknown ops
reduce what can be pruned, they never crash the pipeline.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np
import torch
import torch.fx

from fxprune.ir import TensorInfo, concrete_value, shape_of, tensor_info

__all__ = [
    "OpRule",
    "UNKNOWN",
    "register",
    "register_module",
    "register_function",
    "register_method",
    "rule_for",
    "op_label",
    "arg",
    "set_arg",
    "tensor_args",
    "norm_dim",
    "shape_source",
    "rewritten_sizes",
    "size_after_rewrite",
    "scaled_size",
    "CouplingBuilder",
    "MacBuilder",
    "RewriteContext",
]


class CouplingBuilder(Protocol):  # implemented in fxprune.passes.dependency_groups
    gm: torch.fx.GraphModule

    def space(self, node: torch.fx.Node, dim: int) -> int: ...
    def pspace(self, param: str, dim: int) -> int: ...
    def vspace(self, node: torch.fx.Node, label: str, size: int) -> int: ...
    def size(self, space: int) -> int: ...
    def tie(self, a: int, b: int) -> None: ...
    def tie_map(self, a: int, ia: np.ndarray, b: int, ib: np.ndarray) -> None: ...
    def freeze(self, space: int, reason: str) -> None: ...
    def freeze_node(self, node: torch.fx.Node, reason: str) -> None: ...
    def origin(self, space: int) -> None: ...
    def inexact(self, space: int, reason: str) -> None: ...
    def blocks(self, space: int, n: int, reason: str) -> None: ...
    def align(self, space: int, elements: int, reason: str) -> None: ...
    def role(self, space: int, role: str) -> None: ...
    def reshape(self, node: torch.fx.Node, src: torch.fx.Node, flexible: Sequence[bool] | None) -> None: ...
    def module(self, node: torch.fx.Node) -> torch.nn.Module: ...
    def param_name(self, node: torch.fx.Node, attr: str) -> str: ...


class MacBuilder(Protocol):  # implemented in fxprune.cost_models.mac
    gm: torch.fx.GraphModule

    def term(self, coef: float, spaces: Iterable[tuple[torch.fx.Node, int]]) -> None: ...
    def module(self, node: torch.fx.Node) -> torch.nn.Module: ...


class RewriteContext(Protocol):  # implemented in fxprune.passes.prune_channels
    gm: torch.fx.GraphModule

    def kept(self, node: torch.fx.Node, dim: int) -> np.ndarray | None: ...
    def new_size(self, node: torch.fx.Node, dim: int) -> int: ...
    def module(self, node: torch.fx.Node) -> torch.nn.Module: ...


class OpRule:
    """Knowledge about one op. Subclasses override what they need."""

    name = "op"

    def couple(self, node: torch.fx.Node, b: CouplingBuilder) -> None:
        b.freeze_node(node, f"no coupling rule for {op_label(node, b.gm)}")

    def macs(self, node: torch.fx.Node, m: MacBuilder) -> None:
        return None

    def rewrite(self, node: torch.fx.Node, r: RewriteContext) -> None:
        return None

    def known(self) -> bool:
        return True


class _Unknown(OpRule):
    name = "unknown"

    def known(self) -> bool:
        return False


UNKNOWN = _Unknown()

_MODULES: dict[type, OpRule] = {}
_FUNCTIONS: dict[Any, OpRule] = {}
_METHODS: dict[str, OpRule] = {}


def register_module(*classes: type) -> Callable[[OpRule], OpRule]:
    def deco(rule):
        inst = rule() if isinstance(rule, type) else rule
        for c in classes:
            _MODULES[c] = inst
        return rule

    return deco


def register_function(*fns: Any) -> Callable[[OpRule], OpRule]:
    def deco(rule):
        inst = rule() if isinstance(rule, type) else rule
        for f in fns:
            if f is not None:
                _FUNCTIONS[f] = inst
        return rule

    return deco


def register_method(*names: str) -> Callable[[OpRule], OpRule]:
    def deco(rule):
        inst = rule() if isinstance(rule, type) else rule
        for n in names:
            _METHODS[n] = inst
        return rule

    return deco


def register(*, modules: Sequence[type] = (), functions: Sequence[Any] = (), methods: Sequence[str] = ()):
    """Register one rule for several op identities (public extension point)."""

    def deco(rule):
        register_module(*modules)(rule)
        register_function(*functions)(rule)
        register_method(*methods)(rule)
        return rule

    return deco


def rule_for(node: torch.fx.Node, gm: torch.fx.GraphModule) -> OpRule:
    """The rule for ``node`` (module rules are found through the class MRO)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        for cls in type(mod).__mro__:
            rule = _MODULES.get(cls)
            if rule is not None:
                return rule
        return UNKNOWN
    if node.op == "call_function":
        rule = _FUNCTIONS.get(node.target)
        if rule is None and isinstance(node.target, torch._ops.OpOverload):
            packet = node.target.overloadpacket
            # custom ops of other libraries (registered by their qualified name: "transformers::grouped_mm_fallback")
            rule = _FUNCTIONS.get(packet) or _FUNCTIONS.get(getattr(packet, "_qualified_op_name", None))
        return rule if rule is not None else UNKNOWN
    if node.op == "call_method":
        return _METHODS.get(node.target, UNKNOWN)
    return _FUNCTIONS.get(node.op, UNKNOWN)  # placeholder / get_attr / output


def op_label(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    """A readable op name for messages: ``Conv2d``, ``torch.cat``, ``Tensor.view``."""
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} module '{node.target}'"
    if node.op == "call_method":
        return f"Tensor.{node.target} (node '{node.name}')"
    if node.op == "call_function":
        t = node.target
        mod = getattr(t, "__module__", "") or ""
        return f"{mod + '.' if mod else ''}{getattr(t, '__name__', str(t))} (node '{node.name}')"
    return f"{node.op} '{node.name}'"


# ----------------------------------------------------------------------------- argument helpers

def arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional argument ``index`` or keyword ``name`` of a call node."""
    if index is not None and 0 <= index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def set_arg(node: torch.fx.Node, index: int, name: str, value: Any) -> None:
    if index is not None and 0 <= index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Input nodes that carry a single tensor (in argument order)."""
    out = []
    for a in node.all_input_nodes:
        if isinstance(tensor_info(a), TensorInfo):
            out.append(a)
    return out


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def const(a: Any) -> Any:
    """A literal argument or the concrete value recorded for a non-tensor node."""
    return concrete_value(a)


def ishape(a: Any) -> tuple[int, ...] | None:
    return shape_of(a)


def shape_source(s: Any) -> tuple[torch.fx.Node, int] | None:
    """``(tensor, dim)`` when the size ``s`` is read straight off a tensor's shape.

    Recognises ``t.shape[k]``, ``t.size()[k]`` and ``t.size(k)`` (``a, b, c = t.shape`` traces to the
    same getitem; torch.export's ``aten.sym_size.int`` is turned into ``t.size(k)`` at capture).
    Anything else (arithmetic on sizes, a literal) gives None.
    """
    if not isinstance(s, torch.fx.Node):
        return None
    t = k = None
    if s.op == "call_function" and s.target is operator.getitem and isinstance(s.args[0], torch.fx.Node):
        p, idx = s.args[0], s.args[1]
        if not isinstance(idx, int):
            return None
        if p.op == "call_function" and p.target is getattr and len(p.args) > 1 and p.args[1] == "shape":
            t, k = p.args[0], idx
        elif p.op == "call_method" and p.target == "size" and len(p.args) == 1 and not p.kwargs:
            t, k = p.args[0], idx
    elif s.op == "call_method" and s.target == "size":
        d = arg(s, 1, "dim")
        if isinstance(d, int):
            t, k = s.args[0], d
    if not isinstance(t, torch.fx.Node):
        return None
    shape = shape_of(t)
    if shape is None or not -len(shape) <= k < len(shape):
        return None
    return t, norm_dim(k, len(shape))


def rewritten_sizes(node: torch.fx.Node, sizes: Sequence[Any], r: RewriteContext, offset: int = 0) -> list[Any] | None:
    """The size arguments of a view/reshape/expand after the rewrite, or None if none changes.

    A dim whose size changes gets the new literal size (channel dims are static after pruning).
    A size read off another tensor's shape (``x.shape[-1]``) is kept symbolic only while that
    tensor's dim has the same new size as this output dim: MaxViT's attention reshapes its heads
    back to ``x.shape[-1]`` of the block input, which is a different dependency group, so pruning
    the block's channels but not its heads (or the reverse) would otherwise leave a stale size.
    ``-1`` stays ``-1``. ``offset``: output dims before the first size (``expand`` may add leading dims).
    """
    out = shape_of(node)[offset:]
    new, changed = list(sizes), False
    for d, s in enumerate(sizes):
        if isinstance(s, int) and s < 0:
            continue
        n = r.new_size(node, d + offset)
        after = size_after_rewrite(s, r)
        if after == n:
            continue  # literal or symbolic, it already gives the new size (and stays symbolic)
        if n != out[d] or after is not None:
            new[d] = scaled_size(node, s, n, out[d], r) if shape_source(s) is None else n
            changed = True
    return new if changed else None


_SIZE_ARITH = {
    operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
    operator.floordiv: operator.floordiv, operator.mod: operator.mod, operator.neg: operator.neg,
}


def size_after_rewrite(s: Any, r: RewriteContext, _depth: int = 0) -> int | None:
    """The value a symbolic size (an fx node computing an int from tensor shapes) takes once the
    channels are pruned, or None when it cannot be told.

    ``x.shape[k]`` becomes the new size of that dim; integer arithmetic on such sizes is
    re-evaluated (CoaT's ``C // num_heads`` changes when ``C`` is pruned although the head dim does
    not). Literals are themselves.
    """
    if isinstance(s, bool):
        return None
    if isinstance(s, int):
        return s
    if not isinstance(s, torch.fx.Node) or _depth > 16:
        return None
    src = shape_source(s)
    if src is not None:
        return r.new_size(*src)
    if s.op == "call_function" and s.target in _SIZE_ARITH and not s.kwargs:
        vals = [size_after_rewrite(a, r, _depth + 1) for a in s.args]
        if any(v is None for v in vals):
            return None
        try:
            return int(_SIZE_ARITH[s.target](*vals))
        except Exception:
            return None
    return None


def _reads_pruned_size(s: Any, r: RewriteContext, depth: int = 12) -> bool:
    """Whether the size expression ``s`` reads a tensor dim that the rewrite changes."""
    if not isinstance(s, torch.fx.Node):
        return False
    if depth <= 0 or isinstance(tensor_info(s), TensorInfo):
        return True  # too deep to tell, or a value computed from a tensor's data: assume it changes
    src = shape_source(s)
    if src is not None:
        t, k = src
        return r.new_size(t, k) != shape_of(t)[k]
    if _reads_shape(s):
        return True  # a shape read fxprune cannot attribute to one dim: assume it changes
    return any(_reads_pruned_size(a, r, depth - 1) for a in s.all_input_nodes)


def _reads_shape(s: torch.fx.Node) -> bool:
    if s.op == "call_method" and s.target == "size":
        return True
    if s.op == "call_function" and s.target is getattr and len(s.args) > 1 and s.args[1] == "shape":
        return True
    return s.op == "call_function" and s.target is operator.getitem and isinstance(s.args[0], torch.fx.Node) \
        and _reads_shape(s.args[0])


def scaled_size(node: torch.fx.Node, s: Any, n: int, old: int, r: RewriteContext) -> Any:
    """The new size of a pruned dim whose size was computed (``s``, e.g. ``batch * heads``).

    When ``s`` reads no pruned dim it still evaluates to ``old`` at the example, so ``s * n // old``
    is ``n`` there and keeps following the dynamic sizes ``s`` reads: heads folded into the batch
    (DeBERTa's ``[B*H, L, L]``) stay ``B*H'`` at any batch size. Otherwise the literal ``n``.
    """
    if not isinstance(s, torch.fx.Node) or _reads_pruned_size(s, r) or old <= 0:
        return n
    graph = node.graph
    with graph.inserting_before(node):
        prod = graph.call_function(operator.mul, (s, n))
        return graph.call_function(operator.floordiv, (prod, old))

