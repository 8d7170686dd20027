"""``count_macs`` and ``profile_macs``: exact analytical MACs of any model, with breakdowns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from fxprune import progress
from fxprune.capture import Captured, capture
from fxprune.cost_models.mac import MacCalibration, MacCostModel, MacCount, calibrate
from fxprune.passes.shape_prop import ShapePropPass

__all__ = ["count_macs", "profile_macs", "MacProfile", "Macs"]


class Macs(int):
    """A MAC count that is an ``int`` and says whether it is exact.

    Attributes:
        exact: every multiply-accumulate of the model is counted (by an exact rule or measured).
        uncounted: the ops whose MACs could not be counted (empty when ``exact``).
        measured: node -> MACs of the nodes counted by measurement (``torch.utils.flop_counter``
            on fake tensors) because fxprune has no exact rule for them.
    """

    exact: bool
    uncounted: tuple[str, ...]
    measured: dict[str, int]

    def __new__(cls, value: int, *, exact: bool = True, uncounted: Sequence[str] = (),
                measured: dict[str, int] | None = None) -> "Macs":
        obj = super().__new__(cls, int(value))
        obj.exact = bool(exact)
        obj.uncounted = tuple(uncounted)
        obj.measured = dict(measured or {})
        return obj

    def __reduce__(self):  # pickles/copies as a plain int plus its flags
        return (_macs, (int(self), self.exact, self.uncounted, self.measured))


def _macs(value, exact, uncounted, measured) -> Macs:
    return Macs(value, exact=exact, uncounted=uncounted, measured=measured)


@dataclass
class MacProfile:
    """MACs and parameters of a model, per node and per module."""

    total: int
    params: int
    per_module: dict[str, int]
    per_node: dict[str, int]
    uncounted: list[str]
    captured: Captured
    exact: bool = True
    measured: dict[str, int] = field(default_factory=dict)
    calibration: MacCalibration | None = None

    def top_modules(self, n: int = 20) -> list[tuple[str, int]]:
        return sorted(self.per_module.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def by_prefix(self, depth: int = 1) -> dict[str, int]:
        """MACs aggregated by the first ``depth`` components of the module path (e.g. stages)."""
        out: dict[str, int] = {}
        for path, v in self.per_module.items():
            key = ".".join(path.split(".")[:depth]) or "(top)"
            out[key] = out.get(key, 0) + v
        return out

    def annotated_graph(self, groups: bool = True) -> str:
        """The captured graph, one line per node, with MACs and the dependency groups it touches."""
        from fxprune.ir import format_graph

        gm = self.captured.gm
        node_groups: dict[str, list[int]] = {}
        if groups:
            from fxprune.passes.dependency_groups import DependencyGroupsAnalysis

            dg = DependencyGroupsAnalysis().run(gm)
            for g in dg.groups:
                for s in g.spaces:
                    key = dg.keys[s]
                    if key[0] == "n":
                        node_groups.setdefault(key[1], []).append(g.id)

        def annotate(node) -> str:
            parts = []
            if self.per_node.get(node.name):
                parts.append(f"{self.per_node[node.name]:,} MACs")
            if node_groups.get(node.name):
                parts.append("groups " + ",".join(f"g{i}" for i in sorted(set(node_groups[node.name]))))
            return "; ".join(parts)

        return format_graph(gm, annotate)

    def to_json(self) -> dict[str, Any]:
        return {"macs": self.total, "params": self.params, "per_module": self.per_module,
                "exact": self.exact, "uncounted": self.uncounted, "measured": self.measured}


def _count(cap: Captured) -> MacCount:
    ShapePropPass(cap.inputs)(cap.gm)
    calibrate(cap.gm, cap.inputs)
    return MacCostModel().count(cap.gm)


def count_macs(model: nn.Module, example_inputs: Any, *, leaf_modules: Sequence[type] = ()) -> Macs:
    """Multiply-accumulates of one forward pass of ``model`` on ``example_inputs``.

    Counts conv and transposed conv (groups, stride, dilation, padding), linear (modules and
    ``F.linear``), matmul/bmm/einsum/tensordot, recurrent layers and attention (QK^T and AV,
    including ``nn.MultiheadAttention`` and ``F.scaled_dot_product_attention``). Norms,
    activations, pooling, bias and elementwise ops are not MACs. FLOPs = 2 x MACs. Ops without an
    exact rule (opaque leaf modules) are measured with ``torch.utils.flop_counter`` on fake tensors.
    The model is not modified.

    Returns:
        a :class:`Macs` (an ``int``); ``.exact`` is False when some op's MACs could not be counted
        (then ``.uncounted`` names them).

    Example:
        >>> import torch, torchvision, fxprune
        >>> fxprune.count_macs(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224))  # doctest: +SKIP
        4089184256
    """
    with progress.stage("capture"):
        cap = capture(model, example_inputs, share_weights=True, leaf_modules=leaf_modules, dynamic=False)
    c = _count(cap)
    return Macs(c.total, exact=c.exact, uncounted=c.uncounted, measured=c.measured)


def profile_macs(model: nn.Module, example_inputs: Any, *, leaf_modules: Sequence[type] = ()) -> MacProfile:
    """Like :func:`count_macs`, with per-module and per-node breakdowns and the parameter count."""
    with progress.stage("capture"):
        cap = capture(model, example_inputs, share_weights=True, leaf_modules=leaf_modules)
    c = _count(cap)
    params = sum(p.numel() for p in model.parameters())
    from fxprune.cost_models.mac import calibration_of

    return MacProfile(c.total, params, c.per_module, c.per_node, c.uncounted, cap, c.exact, c.measured,
                      calibration_of(cap.gm))


_ = torch
