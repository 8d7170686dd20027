"""ShapePropPass: run the graph once on example inputs and record every node's output shape.

Writes ``fxprune.shape`` (:class:`~fxprune.ir.TensorInfo`, or a tuple of them for tuple outputs)
and, for non-tensor nodes (``x.size(1)``, ``x.shape``), ``fxprune.value`` with the concrete value.
Runs in eval mode under ``torch.no_grad()`` and frees intermediate tensors as soon as they are
dead, so peak memory is that of one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx

from fxprune.errors import PreconditionError
from fxprune.ir import META_SHAPE, META_VALUE, TensorInfo
from fxprune.passes._infra import AnalysisManager, Pass, PassResult

__all__ = ["ShapePropPass", "describe"]


def describe(value: Any) -> Any:
    """TensorInfo for tensors, tuples of descriptions for tuples, None otherwise."""
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(int(s) for s in value.shape), value.dtype)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(describe(v) for v in value)
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Size):
        return tuple(int(v) for v in value)
    if isinstance(value, (int, float, bool, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, (int, float, bool)) for v in value):
        return type(value)(value)
    return None


class _Recorder(torch.fx.Interpreter):
    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as err:
            what = (str(err).strip().splitlines() or [""])[0][:300]
            where = f"module '{n.target}'" if n.op == "call_module" else f"node '{n.name}'"
            failure = PreconditionError(
                f"running the model on the example inputs failed at {where}: {type(err).__name__}: {what}. "
                "Check that example_inputs match what the model expects (shape, dtype, keyword names)."
            )
            failure.failed_at = f"{where}: {type(err).__name__}: {what}"
            raise failure from err
        info = describe(result)
        n.meta[META_SHAPE] = info
        if info is None:
            n.meta[META_VALUE] = _plain(result)
        else:
            n.meta.pop(META_VALUE, None)
        return result


@dataclass
class ShapePropPass(Pass):
    """Annotate every node with its output shape, running ``inputs`` through the graph."""

    inputs: tuple = ()
    name: ClassVar[str] = "shape-prop"

    def call(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        from fxprune._buffers import preserve_buffers

        was_training = gm.training
        gm.eval()
        try:
            with torch.no_grad(), preserve_buffers(gm):  # a forward that updates buffers leaves them as they were
                out = _Recorder(gm).run(*self.inputs)
        finally:
            gm.train(was_training)
        # meta only: the graph itself is unchanged, so no analysis is invalidated
        return PassResult(gm, modified=False, info={"output": str(describe(out))[:200]})
