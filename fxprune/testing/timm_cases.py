"""timm models for fxprune's coverage checks: the list, small oracle inputs, and an independent MAC count.

Used by ``tools/sweep_timm.py`` and ``tests/test_timm.py``. Needs timm (random weights only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["MODELS", "PUBLISHED_GMACS", "ORACLE_INPUTS", "randomize_constant_tensors", "reference_macs",
           "oracle_model"]

MODELS = (
    "resnet50d", "efficientnet_b0", "mobilenetv3_large_100", "convnext_nano", "regnetx_016",
    "vit_small_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "rexnet_100",
    "ghostnet_100", "levit_128s",
)

# Published GMACs, for the report only. resnet50d, efficientnet_b0, convnext_nano, vit_small, deit_tiny
# and swin_tiny are timm's/the papers' rounded figures; the others are the papers' numbers (MobileNetV3
# 219M MAdds, RegNetX-1.6GF, ReXNet-1.0 0.40G, GhostNet-1.0 141M, LeViT-128S 305M) quoted from memory.
PUBLISHED_GMACS = {
    "resnet50d": 4.35, "efficientnet_b0": 0.4, "mobilenetv3_large_100": 0.219, "convnext_nano": 2.5,
    "regnetx_016": 1.6, "vit_small_patch16_224": 4.6, "deit_tiny_patch16_224": 1.3,
    "swin_tiny_patch4_window7_224": 4.5, "rexnet_100": 0.40, "ghostnet_100": 0.141, "levit_128s": 0.305,
}

# Small inputs for the equivalence oracle: (create_model kwargs, image size). CNNs take any size;
# ViT/DeiT/LeViT resize their position tables with img_size; Swin-T needs whole windows at every
# stage, so at 64 px it gets 2x2 windows (shifted windows, masks and the bias table all remain).
ORACLE_INPUTS: dict[str, tuple[dict[str, Any], int]] = {
    "vit_small_patch16_224": ({"img_size": 64}, 64),
    "deit_tiny_patch16_224": ({"img_size": 64}, 64),
    "swin_tiny_patch4_window7_224": ({"img_size": 64, "window_size": 2}, 64),
    "levit_128s": ({"img_size": 128}, 128),
}


def randomize_constant_tensors(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give random values to every floating parameter/buffer whose elements are all equal.

    timm initialises many tensors to a constant (BatchNorm weights of 0 at the end of residual
    branches, zero attention biases, layer scales, running statistics). With them, whole branches
    compute zero and the equivalence oracle would compare nothing; random values make every
    channel matter. Running variances stay positive.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or t.numel() < 2 or not bool((t == t.flatten()[0]).all()):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
    return model


def oracle_model(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The model (random, non-constant weights, eval) and a small input for the equivalence oracle."""
    import timm

    kwargs, size = ORACLE_INPUTS.get(name, ({}, 96))
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    randomize_constant_tensors(model, seed)
    return model, (torch.randn(1, 3, size, size),)


def reference_macs(name: str, x: torch.Tensor, *, fused_attn: bool = False, **kwargs: Any) -> int:
    """MACs counted by ``torch.utils.flop_counter.FlopCounterMode`` (autograd on), halved.

    timm's fused attention is switched off for this run (``fused_attn=False``): on CPU the fused
    SDPA kernel has no FLOP formula and counts as 0, also with autograd enabled (it does not fall
    back to the math path). ``fused_attn=True`` keeps timm's default, to show that gap.
    """
    import timm
    from timm.layers import config as timm_config
    from torch.utils.flop_counter import FlopCounterMode

    fused = timm_config._USE_FUSED_ATTN
    if not fused_attn:
        timm.layers.set_fused_attn(False)
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
    finally:
        timm_config._USE_FUSED_ATTN = fused
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops()) // 2
