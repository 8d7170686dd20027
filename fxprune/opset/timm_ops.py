"""timm: rules for the helpers timm keeps out of torch.fx traces, and capture-time substitutions.

timm is optional and heavy to import, so nothing here imports it at module import time.
:func:`install` registers the rules once timm is loaded (``fxprune.opset`` calls it when timm is
already imported; capture calls it whenever it captures with timm loaded).

Rules
    ``window_reverse`` / ``grid_reverse`` (Swin v1/v2, MaxViT, GC ViT, DaViT...) are registered by
    timm as not-traceable functions, so they appear as single calls in the graph. They move tokens
    between windows and the image grid and keep the channel dim (last, or dim 1 for the ``_nchw``
    variants): channels pass through, the spatial dims are positional. No MACs.

Substitutions (:func:`prepare_model`, on capture's private copy only)
    *Fused attention*: every timm module with a ``fused_attn`` flag has two paths that compute the
    same function: ``F.scaled_dot_product_attention`` or an explicit ``q @ k^T -> softmax -> @ v``.
    Capture switches the flag on, so attention always reaches fxprune as SDPA, whose rule prunes
    heads whole (Swin's ``WindowAttention`` defaults to the explicit path, which would otherwise
    let the per-head width be pruned instead of heads).
    *LeViT*: ``Attention`` and ``AttentionDownsample`` have no fused path (and cache their bias in
    a dict in eval mode); they get a forward that computes the same thing through SDPA with the
    learned attention bias ``attention_biases[:, attention_bias_idxs]`` (``[heads, Nq, Nk]``) as
    the additive mask and ``scale=key_dim**-0.5``. Heads then couple the qkv/kv/q projections, the
    bias table rows and the output projection, and the rewrite updates every ``num_heads`` view.
"""

from __future__ import annotations

import sys

import torch.nn as nn
import torch.nn.functional as F

from fxprune.opset._base import OpRule, ishape, register_function

__all__ = ["install", "prepare_model", "WindowReverseRule"]

_installed = False


class WindowReverseRule(OpRule):
    """timm's ``window_reverse`` / ``grid_reverse`` (and ``_nchw`` variants): channels pass through."""

    name = "timm_window_reverse"

    def __init__(self, channel_dim: int):
        self.channel_dim = channel_dim

    def couple(self, node, b):
        x = node.args[0]
        xs, os_ = ishape(x), ishape(node)
        if xs is None or os_ is None:
            b.freeze_node(node, f"window reverse without a tensor input ({node.name})")
            return
        cin = self.channel_dim % len(xs)
        cout = self.channel_dim % len(os_)
        b.tie(b.space(x, cin), b.space(node, cout))
        for d in range(len(xs)):
            if d != cin:
                b.freeze(b.space(x, d), f"window layout of '{node.name}'")
        for d in range(len(os_)):
            if d != cout:
                b.freeze(b.space(node, d), f"window layout of '{node.name}'")


_WINDOW_FUNCS = {"window_reverse": -1, "grid_reverse": -1, "window_reverse_nchw": 1, "grid_reverse_nchw": 1}


# ------------------------------------------------------------------------------------- LeViT

def _levit_attention_forward(self, x):
    """``timm.models.levit.Attention.forward`` through SDPA (same function)."""
    bias = self.attention_biases[:, self.attention_bias_idxs]  # [heads, N, N]
    if self.use_conv:
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).view(B, self.num_heads, -1, H * W).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=2)
        x = F.scaled_dot_product_attention(q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1),
                                           attn_mask=bias, scale=self.scale)
        x = x.transpose(-2, -1).reshape(B, -1, H, W)
    else:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split(
            [self.key_dim, self.key_dim, self.val_dim], dim=3)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=bias, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, -1)
    return self.proj(x)


def _levit_attention_downsample_forward(self, x):
    """``timm.models.levit.AttentionDownsample.forward`` through SDPA (same function)."""
    bias = self.attention_biases[:, self.attention_bias_idxs]  # [heads, Nq, Nk]
    if self.use_conv:
        B, C, H, W = x.shape
        HH, WW = (H - 1) // self.stride + 1, (W - 1) // self.stride + 1
        k, v = self.kv(x).view(B, self.num_heads, -1, H * W).split([self.key_dim, self.val_dim], dim=2)
        q = self.q(x).view(B, self.num_heads, self.key_dim, -1)
        x = F.scaled_dot_product_attention(q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1),
                                           attn_mask=bias, scale=self.scale)
        x = x.transpose(-2, -1).reshape(B, -1, HH, WW)
    else:
        B, N, C = x.shape
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        q = self.q(x).view(B, -1, self.num_heads, self.key_dim)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=bias, scale=self.scale)
        x = x.transpose(1, 2).flatten(2)
    return self.proj(x)


_SUBSTITUTES: dict[type, type] = {}


def _levit_substitutes() -> None:
    try:
        from timm.models import levit
    except Exception:  # pragma: no cover - timm without LeViT
        return
    for cls, fwd in ((levit.Attention, _levit_attention_forward),
                     (levit.AttentionDownsample, _levit_attention_downsample_forward)):
        _SUBSTITUTES[cls] = type(f"Fx{cls.__name__}", (cls,), {"forward": fwd, "__module__": __name__})


# --------------------------------------------------------------------------------- install

def install() -> bool:
    """Register the timm rules (idempotent). False when timm cannot be imported."""
    global _installed
    if _installed:
        return True
    try:
        from timm.layers import _fx as timm_fx
    except Exception:
        return False
    for fn in getattr(timm_fx, "_autowrap_functions", ()):
        dim = _WINDOW_FUNCS.get(getattr(fn, "__name__", ""))
        if dim is not None and callable(fn):
            register_function(fn)(WindowReverseRule(dim))
    _levit_substitutes()
    _installed = True
    return True


def prepare_model(model: nn.Module, notes: list[str]) -> None:
    """Capture-time substitutions on capture's private copy of a model that uses timm modules."""
    if "timm" not in sys.modules or not install():
        return
    fused = 0
    swapped: dict[str, int] = {}
    for mod in model.modules():
        cls = type(mod)
        sub = _SUBSTITUTES.get(cls)
        if sub is not None:
            mod.__class__ = sub
            mod.attention_bias_cache = {}
            swapped[cls.__name__] = swapped.get(cls.__name__, 0) + 1
            continue
        if getattr(mod, "fused_attn", None) is False and cls.__module__.startswith("timm."):
            mod.fused_attn = True
            fused += 1
    if fused:
        notes.append(f"timm: fused_attn switched on in {fused} attention modules (same function through "
                     "F.scaled_dot_product_attention; heads are pruned whole)")
    for name, n in sorted(swapped.items()):
        notes.append(f"timm: {n} LeViT {name} modules computed through F.scaled_dot_product_attention")

