"""OwnTensorsPass: give a graph module its own copy of every tensor it still shares with another.

``fxprune.compile`` captures the user's model without copying its weights (the capture shares
their storage, read-only) and builds each pruned candidate as a structural copy of the capture whose
pruned tensors are new ``index_select`` results. What was not pruned (a frozen classifier, a norm
outside every group) still points into the user's storage; this pass clones exactly those tensors,
so the returned model owns all its memory (fine-tuning it never changes the user's model) and
nothing is copied twice. Tied tensors stay tied (one clone, every alias), parameters stay
parameters with their ``requires_grad``. Meta tensors (a model planned without weights) have no
storage to share and are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterable

import torch
import torch.fx
import torch.nn as nn

from fxprune.passes._infra import AnalysisManager, Pass, PassResult

__all__ = ["OwnTensorsPass", "storage_ids"]


def _storage_id(t: torch.Tensor) -> int | None:
    if t.is_meta or t.device.type == "meta":
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None
    return ptr or None


def storage_ids(tensors: Iterable[torch.Tensor]) -> frozenset[int]:
    """The storages (data pointers) behind ``tensors``; meta and empty tensors are skipped."""
    out = set()
    for t in tensors:
        sid = _storage_id(t)
        if sid is not None:
            out.add(sid)
    return frozenset(out)


@dataclass
class OwnTensorsPass(Pass):
    """Clone every parameter/buffer whose storage is one of ``shared`` (see module doc)."""

    shared: frozenset = field(default_factory=frozenset)
    name: ClassVar[str] = "own-tensors"

    def call(self, gm: torch.fx.GraphModule, am: AnalysisManager) -> PassResult:
        clones: dict[int, torch.Tensor] = {}
        originals: list[torch.Tensor] = []  # alive until the end, so no id is reused meanwhile
        n_bytes = 0
        for mod in gm.modules():
            for store in (mod._parameters, mod._buffers):
                for key, t in list(store.items()):
                    if t is None:
                        continue
                    if id(t) not in clones:
                        originals.append(t)
                        if _storage_id(t) not in self.shared:
                            clones[id(t)] = t
                        else:
                            with torch.no_grad():
                                new = t.detach().clone(memory_format=torch.contiguous_format)
                            if isinstance(t, nn.Parameter):
                                new = nn.Parameter(new, requires_grad=t.requires_grad)
                            n_bytes += new.numel() * new.element_size()
                            clones[id(t)] = new
                    store[key] = clones[id(t)]
        copied = sum(1 for k, v in clones.items() if id(v) != k)
        return PassResult(gm, modified=copied > 0, info={"tensors_copied": copied, "bytes_copied": n_bytes})
