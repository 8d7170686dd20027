"""fxprune's own functional ops, used in captured graphs where a library op cannot be pruned.

``window_attention`` computes exactly what torchvision's ``shifted_window_attention`` computes, but
takes ``head_dim`` explicitly instead of deriving it from the input width, so attention heads can
be pruned without touching the residual stream. Capture swaps torchvision's call target for this
one; a saved model refers to it by its import path ``fxprune.ops.window_attention``.

``finfo_value(dtype, "min")`` is ``torch.finfo(dtype).min`` as a graph op: a constant such as a
mask's fill value, read off the compute dtype at run time, so a captured model cast to another
dtype (``.half()``) uses that dtype's limits instead of the ones baked in at capture.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["window_attention", "finfo_value"]

_FINFO_FIELDS = ("min", "max", "eps", "tiny", "smallest_normal")


def finfo_value(dtype: torch.dtype, field: str) -> float:
    """``getattr(torch.finfo(dtype), field)`` for ``field`` in min, max, eps, tiny, smallest_normal."""
    if field not in _FINFO_FIELDS:
        raise ValueError(f"finfo_value: field must be one of {_FINFO_FIELDS}, got {field!r}")
    return float(getattr(torch.finfo(dtype), field))


def _shift_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int], x: torch.Tensor) -> torch.Tensor:
    """Attention mask for shifted windows: -100 between tokens from different regions."""
    region = x.new_zeros((pad_h, pad_w))
    h_bounds = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    w_bounds = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    label = 0
    for h0, h1 in h_bounds:
        for w0, w1 in w_bounds:
            region[h0:h1, w0:w1] = label
            label += 1
    region = region.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    region = region.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    mask = region.unsqueeze(1) - region.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def window_attention(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    relative_position_bias: torch.Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    qkv_bias: Optional[torch.Tensor] = None,
    proj_bias: Optional[torch.Tensor] = None,
    logit_scale: Optional[torch.Tensor] = None,
    training: bool = True,
    head_dim: Optional[int] = None,
) -> torch.Tensor:
    """(Shifted) window multi-head self-attention with relative position bias (Swin v1 and v2).

    Args:
        x: input ``[B, H, W, C]``.
        qkv_weight: ``[3 * num_heads * head_dim, C]``; proj_weight: ``[C_out, num_heads * head_dim]``.
        relative_position_bias: ``[1, num_heads, N, N]`` with ``N = window_size[0] * window_size[1]``.
        head_dim: width of one head; ``None`` means ``C // num_heads`` (torchvision's convention).
        logit_scale: ``[num_heads, 1, 1]`` for Swin v2's cosine attention, else None.

    Returns:
        ``[B, H, W, C_out]``.
    """
    b, h, w, c = x.shape
    hd = head_dim if head_dim is not None else c // num_heads
    pad_r = (window_size[1] - w % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - h % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, _ = x.shape
    shift = list(shift_size)
    if window_size[0] >= pad_h:
        shift[0] = 0
    if window_size[1] >= pad_w:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    n_win = (pad_h // window_size[0]) * (pad_w // window_size[1])
    x = x.view(b, pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * n_win, window_size[0] * window_size[1], c)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        third = qkv_bias.numel() // 3
        qkv_bias[third : 2 * third].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * hd**-0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        mask = _shift_mask(pad_h, pad_w, list(window_size), shift, x)
        attn = attn.view(x.size(0) // n_win, n_win, num_heads, x.size(1), x.size(1))
        attn = attn + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)
    out = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), num_heads * hd)
    out = F.linear(out, proj_weight, proj_bias)
    out = F.dropout(out, p=dropout, training=training)
    c_out = out.shape[-1]
    out = out.view(b, pad_h // window_size[0], pad_w // window_size[1], window_size[0], window_size[1], c_out)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, c_out)
    if sum(shift) > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :h, :w, :].contiguous()
