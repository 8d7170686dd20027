"""Buffers a model's forward updates in place (``self.count += 1``, ``self.ema.mul_(m)``).

Two problems, one module:

* **Tracing.** torch.fx reads buffers as real tensors while tracing, so an in-place update runs once
  on the traced copy (changing its state) and is missing from the graph. :func:`buffer_state` /
  :func:`mutated_buffers` detect it (tensor version counters, replaced objects); capture then traces
  again with buffers as graph values, and :func:`write_back_reassigned` turns a reassignment
  (``self.count = self.count + 1``, which tracing turns into a dangling value) into an explicit
  ``copy_`` into the buffer.
* **Analyses.** fxprune runs graphs to measure them (shape propagation, importance, fidelity). A
  graph that updates a buffer would leave the captured model, and so the pruned model, in another
  state than the user's. :func:`preserve_buffers` restores every buffer a block changed.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.fx
import torch.nn as nn

__all__ = ["buffer_state", "mutated_buffers", "write_back_reassigned", "preserve_buffers", "BuffersMutated"]


class BuffersMutated(Exception):
    """Raised by tracing when the traced forward updated buffers (their dotted paths)."""

    def __init__(self, names: list[str]):
        super().__init__(", ".join(names))
        self.names = names


def buffer_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Every buffer with its version counter (bumped by each in-place update)."""
    return {name: (b, b._version) for name, b in model.named_buffers(remove_duplicate=False)}


def _buffers_by_path(model: nn.Module) -> dict[str, tuple[nn.Module, str, object]]:
    out = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, value in module._buffers.items():
            out[f"{prefix}.{name}" if prefix else name] = (module, name, value)
    return out


def mutated_buffers(model: nn.Module, before: dict[str, tuple[torch.Tensor, int]]) -> list[str]:
    """Paths of the buffers updated in place or replaced since ``before``."""
    now = _buffers_by_path(model)
    out = []
    for path, (tensor, version) in before.items():
        value = now.get(path, (None, None, None))[2]
        if value is not tensor or tensor._version != version:
            out.append(path)
    return out


def write_back_reassigned(gm_root: nn.Module, graph: torch.fx.Graph,
                          before: dict[str, tuple[torch.Tensor, int]]) -> list[str]:
    """After a trace with buffers as graph values: a buffer the forward *reassigned* now holds a
    ``Proxy``. Put the original tensor back and end the graph with ``buffer.copy_(new value)``."""
    written = []
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    for path, (module, name, value) in _buffers_by_path(gm_root).items():
        if not isinstance(value, torch.fx.Proxy) or path not in before:
            continue
        module._buffers[name] = before[path][0]
        with graph.inserting_before(output):
            target = graph.get_attr(path)
            graph.call_method("copy_", (target, value.node))
        written.append(path)
    return written


@contextlib.contextmanager
def preserve_buffers(module: nn.Module) -> Iterator[None]:
    """Restore the values of the buffers the block updates in place (or replaces)."""
    saved = {name: (b, b._version, b.detach().clone()) for name, b in module.named_buffers(remove_duplicate=False)}
    try:
        yield
    finally:
        now = _buffers_by_path(module)
        with torch.no_grad():
            for path, (tensor, version, copy) in saved.items():
                owner, name, value = now.get(path, (None, None, None))
                if value is not tensor and owner is not None:
                    owner._buffers[name] = tensor
                if tensor._version != version:
                    tensor.copy_(copy)
