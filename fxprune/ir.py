"""IR helpers: the meta keys fxprune writes on fx nodes, typed accessors, and one graph printer.

The IR is a plain ``torch.fx.GraphModule``. Facts about nodes live in ``node.meta`` under keys
defined here (``"fxprune.<noun>"``) and are read and written only through the accessors below.
Values are immutable (tuples, frozen dataclasses) so graphs can be deep-copied safely.

Keys:
    ``fxprune.shape``  -- :class:`TensorInfo` for a tensor output, a tuple of them (or ``None``)
                          for tuple outputs; written by ``ShapePropPass``.
    ``fxprune.value``  -- the concrete Python value of a non-tensor node (ints from ``x.size()``,
                          tuples of ints); written by ``ShapePropPass``.
    ``fxprune.measured_macs`` -- :class:`MeasuredMacs`: the node's MACs as measured on fake tensors,
                          used instead of an op rule that is missing or disagrees; written by
                          ``cost_models.mac.calibrate`` (the node's channels are then frozen).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx

__all__ = [
    "META_SHAPE",
    "META_VALUE",
    "META_MEASURED",
    "MeasuredMacs",
    "measured_macs",
    "set_measured_macs",
    "TensorInfo",
    "tensor_info",
    "set_tensor_info",
    "shape_of",
    "concrete_value",
    "set_concrete_value",
    "target_name",
    "node_module_path",
    "iter_tensor_infos",
    "format_graph",
]

META_SHAPE = "fxprune.shape"
META_VALUE = "fxprune.value"
META_MEASURED = "fxprune.measured_macs"


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one tensor value."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def __str__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"{dt}[{','.join(str(s) for s in self.shape)}]"


def tensor_info(node: torch.fx.Node) -> Any:
    """The recorded :class:`TensorInfo` (or tuple of them, or None) of ``node``'s output."""
    return node.meta.get(META_SHAPE)


def set_tensor_info(node: torch.fx.Node, info: Any) -> None:
    node.meta[META_SHAPE] = info


def shape_of(node: Any) -> tuple[int, ...] | None:
    """Shape of a single-tensor node, or None when the node is not a tensor."""
    if not isinstance(node, torch.fx.Node):
        return None
    info = node.meta.get(META_SHAPE)
    return info.shape if isinstance(info, TensorInfo) else None


def concrete_value(node: Any) -> Any:
    """The concrete value of a non-tensor node, or the argument itself when it is a literal."""
    if isinstance(node, torch.fx.Node):
        return node.meta.get(META_VALUE)
    return node


def set_concrete_value(node: torch.fx.Node, value: Any) -> None:
    node.meta[META_VALUE] = value


@dataclass(frozen=True)
class MeasuredMacs:
    """MACs of one node measured at its recorded shapes, and why the op rule was not used."""

    macs: int
    reason: str


def measured_macs(node: torch.fx.Node) -> MeasuredMacs | None:
    return node.meta.get(META_MEASURED)


def set_measured_macs(node: torch.fx.Node, value: MeasuredMacs | None) -> None:
    if value is None:
        node.meta.pop(META_MEASURED, None)
    else:
        node.meta[META_MEASURED] = value


def iter_tensor_infos(info: Any) -> Iterable[TensorInfo]:
    if isinstance(info, TensorInfo):
        yield info
    elif isinstance(info, (tuple, list)):
        for item in info:
            yield from iter_tensor_infos(item)


def target_name(node: torch.fx.Node) -> str:
    """A stable, readable name for a node's target (``conv2d``, ``add``, ``layer1.0.conv1``...)."""
    t = node.target
    if isinstance(t, str):
        return t
    name = getattr(t, "__name__", None) or str(t)
    return name


def node_module_path(node: torch.fx.Node) -> str:
    """The module path a node belongs to, best effort (``layer1.0.conv1``; "" for top-level ops)."""
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)
    # functional ops on parameters: name them after the first parameter they use
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            return str(arg.target).rsplit(".", 1)[0]
    return ""


def _fmt_arg(a: Any) -> str:
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {_fmt_arg(v)}" for k, v in a.items()) + "}"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    if isinstance(a, float):
        return f"{a:g}"
    return repr(a)


def format_graph(
    gm: torch.fx.GraphModule,
    annotate: Callable[[torch.fx.Node], str] | None = None,
) -> str:
    """Print ``gm`` deterministically, one line per node.

    ``%name = op target(args) : dtype[shape]  # annotation``. Used by golden tests, the report,
    the LLM prompt and debugging; ``annotate`` adds a per-node suffix (group ids, MACs, ...).
    """
    lines = []
    for node in gm.graph.nodes:
        args = ", ".join([_fmt_arg(a) for a in node.args] + [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()])
        info = node.meta.get(META_SHAPE)
        if isinstance(info, TensorInfo):
            ty = f" : {info}"
        elif isinstance(info, (tuple, list)):
            ty = " : (" + ", ".join(str(i) for i in iter_tensor_infos(info)) + ")"
        else:
            ty = ""
        if node.op == "placeholder":
            text = f"%{node.name} = input{ty}"
        elif node.op == "output":
            text = f"return {args}"
        elif node.op == "get_attr":
            text = f"%{node.name} = param {node.target}{ty}"
        elif node.op == "call_module":
            mod = type(gm.get_submodule(node.target)).__name__
            text = f"%{node.name} = {mod}[{node.target}]({args}){ty}"
        elif node.op == "call_method":
            text = f"%{node.name} = .{node.target}({args}){ty}"
        else:
            text = f"%{node.name} = {target_name(node)}({args}){ty}"
        if annotate is not None:
            note = annotate(node)
            if note:
                text = f"{text}  # {note}"
        lines.append(text)
    return "\n".join(lines)
