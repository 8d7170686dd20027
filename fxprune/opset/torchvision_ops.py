"""Rules for torchvision's functional helpers, registered only when torchvision is imported.

Importing torchvision costs ~170 MB of resident memory and a second of start-up; a model can only
call torchvision's functions if its code imported torchvision, so fxprune registers these rules
when ``torchvision`` is already in ``sys.modules`` (at import of ``fxprune.opset`` and again at
every capture) and never imports it itself.
"""

from __future__ import annotations

import sys

import numpy as np

from fxprune.opset._base import OpRule, ishape, register_function
from fxprune.opset.structural import UnaryRule

_installed = False


class RelPosBiasRule(OpRule):
    """torchvision's ``_get_relative_position_bias``: the heads dim of the table passes through."""

    name = "relative_position_bias"

    def couple(self, node, b):
        table = node.args[0]
        so = ishape(node)
        b.tie(b.space(table, 1), b.space(node, len(so) - 3))
        b.freeze(b.space(table, 0), f"relative position table rows ({node.name})")


class PatchMergingPadRule(OpRule):
    """torchvision's ``_patch_merging_pad``: 4 strided copies of C concatenated on the last dim."""

    name = "patch_merging_pad"

    def couple(self, node, b):
        x = node.args[0]
        xs, so = ishape(x), ishape(node)
        for d in range(len(xs) - 3):
            b.tie(b.space(x, d), b.space(node, d))
        c = xs[-1]
        j = np.arange(so[-1])
        b.tie_map(b.space(node, len(so) - 1), j, b.space(x, len(xs) - 1), j % c)


def install() -> bool:
    """Register the torchvision rules (idempotent) when torchvision is imported; False otherwise."""
    global _installed
    if _installed:
        return True
    if "torchvision" not in sys.modules:
        return False
    try:
        import torchvision.models.swin_transformer as tv_swin
        from torchvision.ops import stochastic_depth
    except Exception:  # pragma: no cover - a broken torchvision install
        return False
    register_function(stochastic_depth)(UnaryRule)  # a per-sample (or per-batch) random mask
    register_function(tv_swin._get_relative_position_bias)(RelPosBiasRule)
    register_function(tv_swin._patch_merging_pad)(PatchMergingPadRule)
    _installed = True
    return True
