"""Capture with ``torch.export`` for models torch.fx cannot trace (filled in by the transformers work)."""

from __future__ import annotations

import torch.nn as nn

from fxprune.errors import TraceError


def capture_export(model: nn.Module, args: tuple, kwargs: dict):
    raise TraceError(
        f"torch.fx could not trace {type(model).__name__} and the torch.export path is not available "
        "for this model yet."
    )
