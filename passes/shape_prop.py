"""ShapePropPass: record every node's output shape, without running the model's arithmetic.

Writes ``fxprune.shape`` (:class:`~fxprune.ir.TensorInfo`, or a tuple of them for tuple outputs)
and, for non-tensor nodes (``x.size(1)``, ``x.shape``), ``fxprune.value`` with the concrete value.

The graph is interpreted under ``torch._subclasses.FakeTensorMode``: inputs, parameters and
buffers are replaced by fake tensors (metadata only, no storage), so the pass costs a few
microseconds per node whatever the model's FLOPs or size, reads no weight, and works on models
whose weights live on the ``meta`` device (they are presented as tensors on the inputs' device).
Shapes are static (the example inputs' sizes), so every ``fxprune.value`` is a plain int/tuple.

Fallback: code fake tensors cannot run (data-dependent Python such as ``if x.sum() > 0`` or
``.item()`` inside a leaf module, an op without a meta kernel) is run once more on the real
tensors, in eval mode under ``torch.no_grad()``, freeing intermediates as soon as they are dead.
The result's ``info["mode"]`` says which ran and ``info["note"]`` why. Models on the meta device
have no real fallback: the fake failure is reported as a :class:`PreconditionError`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode

from fxprune import progress
from fxprune.errors import PreconditionError
from fxprune.ir import META_SHAPE, META_VALUE, TensorInfo
from fxprune.passes._infra import AnalysisManager, Pass, PassResult

__all__ = ["ShapePropPass", "describe", "has_meta_tensors"]


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


def has_meta_tensors(module: torch.nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` lives on the ``meta`` device (no data)."""
    return any(t.is_meta for t in _state(module))


def _state(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, fake: bool, bar: Any = None):
        super().__init__(gm)
        self.fake = fake
        self.bar = bar

    def run_node(self, n: torch.fx.Node) -> Any:
        if self.bar is not None:
            self.bar.update(1)
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
            failure.node = n.name  # for the self-healing compile (fxprune.heal)
            raise failure from err
        info = describe(result)
        n.meta[META_SHAPE] = info
        if info is None:
            n.meta[META_VALUE] = _plain(result)
        else:
            n.meta.pop(META_VALUE, None)
        return result


def _fake_device(inputs: tuple) -> torch.device:
    """The device the fake run pretends to be on: the first real (non-meta) input's."""
    for t in inputs:
        if isinstance(t, torch.Tensor) and not t.is_meta:
            return t.device
    return torch.device("cpu")


def _to_fake(mode: FakeTensorMode, t: torch.Tensor, device: torch.device, memo: dict[int, torch.Tensor]):
    """A fake twin of ``t`` (same size, strides and dtype), on ``t``'s device (``device`` for meta
    tensors). Built from a fresh meta tensor: never reads ``t``'s data, and several times cheaper
    than ``FakeTensorMode.from_tensor``."""
    if id(t) not in memo:
        meta = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="meta")
        memo[id(t)] = mode.fake_tensor_converter.from_meta_and_device(mode, meta, device if t.is_meta else t.device)
    return memo[id(t)]


@contextlib.contextmanager
def _swapped_state(gm: torch.fx.GraphModule, mode: FakeTensorMode, device: torch.device) -> Iterator[None]:
    """Replace every parameter and buffer of ``gm`` by a fake tensor for the duration of the block.

    Tied tensors map to one fake tensor. The module tree is restored exactly afterwards (the same
    tensor objects), whatever happens inside.
    """
    memo: dict[int, torch.Tensor] = {}
    saved: list[tuple[dict, str, Any]] = []
    try:
        for mod in gm.modules():
            for store in (mod._parameters, mod._buffers):
                for key, t in list(store.items()):
                    if t is None:
                        continue
                    saved.append((store, key, t))
                    store[key] = _to_fake(mode, t, device, memo)
        yield
    finally:
        for store, key, t in reversed(saved):
            store[key] = t


@dataclass
class ShapePropPass(Pass):
    """Annotate every node with its output shape (fake tensors; real ones only as a fallback).

    Args:
        inputs: the example inputs, in placeholder order.
        fake: run on fake tensors (the default). ``False`` forces a real run.
    """

    inputs: tuple = ()
    fake: bool = True
    name: ClassVar[str] = "shape-prop"

    def call(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        was_training = gm.training
        gm.eval()
        try:
            if self.fake:
                try:
                    out = self._run_fake(gm)
                    return PassResult(gm, modified=False, info={"mode": "fake", "output": str(describe(out))[:200]})
                except PreconditionError as err:
                    meta = has_meta_tensors(gm) or any(
                        isinstance(t, torch.Tensor) and t.is_meta for t in self.inputs)
                    if meta:
                        raise PreconditionError(
                            f"{err} The model's weights are on the meta device, so the graph can only be "
                            "run on fake tensors, and this model has code that fake tensors cannot run "
                            "(data-dependent Python, an op without a meta kernel). Load real weights."
                        ) from err
                    note = (f"shape propagation ran the model on real tensors: fake tensors could not run "
                            f"{getattr(err, 'failed_at', err)}")
            else:
                note = "shape propagation ran on real tensors (fake=False)"
            from fxprune._buffers import preserve_buffers

            # a forward that updates buffers leaves them as they were (the fake run never touches them)
            with torch.no_grad(), preserve_buffers(gm), progress.bar(
                    total=len(gm.graph.nodes), desc="shape propagation (real tensors)", unit="node") as bar:
                out = _Recorder(gm, fake=False, bar=bar).run(*self.inputs)
        finally:
            gm.train(was_training)
        # meta only: the graph itself is unchanged, so no analysis is invalidated
        return PassResult(gm, modified=False, info={"mode": "real", "note": note, "output": str(describe(out))[:200]})

    def _run_fake(self, gm: torch.fx.GraphModule) -> Any:
        device = _fake_device(self.inputs)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        memo: dict[int, torch.Tensor] = {}
        fake_inputs = tuple(_to_fake(mode, t, device, memo) if isinstance(t, torch.Tensor) else t
                            for t in self.inputs)
        with progress.bar(total=len(gm.graph.nodes), desc="shape propagation", unit="node") as bar, \
                _swapped_state(gm, mode, device), mode, torch.no_grad():
            out = _Recorder(gm, fake=True, bar=bar).run(*fake_inputs)
        return out
