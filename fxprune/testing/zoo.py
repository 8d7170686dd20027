"""Tiny models, one per coupling construct, for tests and examples (random weights, fast)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TINY_MODELS", "tiny_model"]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c1 = nn.Conv2d(16, 24, 3, padding=1)
        self.b1 = nn.BatchNorm2d(24)
        self.c2 = nn.Conv2d(24, 16, 3, padding=1)
        self.b2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = F.relu(self.b1(self.c1(x)))
        x = F.relu(x + self.b2(self.c2(y)))
        return self.head(x.mean((2, 3)))


class ConcatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 16, 3, padding=1)
        self.c = nn.Conv2d(24, 32, 1)
        self.d = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        y = torch.cat([self.a(x), F.relu(self.b(x))], dim=1)
        z = F.relu(self.c(y))
        p, q = z.chunk(2, dim=1)
        z = self.d(p) * torch.sigmoid(q)
        z = F.adaptive_avg_pool2d(z, 4)
        return self.fc(torch.flatten(z, 1))


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.c4 = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = F.relu(self.c1(x))
        a, b = x.chunk(2, dim=1)
        b = F.relu(self.c3(self.c2(b)))
        x = torch.cat((a, b), 1)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        x = F.relu(self.c4(x))
        return self.fc(x.mean((2, 3)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 1)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(4, 32)
        self.c3 = nn.Conv2d(32, 16, 1)
        self.dw = nn.Conv2d(16, 32, 3, padding=1, groups=16)  # depthwise, multiplier 2
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))
        x = self.c3(self.gn(x))
        x = self.dw(x)
        return self.fc(x.amax((2, 3)))


class GroupedWhole(nn.Module):
    """RegNet/ResNeXt style: grouped convs with more groups than channels per group (pruned by whole
    conv groups), one with more output than input channels per group, squeeze-excite, a residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(32)
        self.a = nn.Conv2d(32, 32, 1)
        self.bn_a = nn.BatchNorm2d(32)
        self.b = nn.Conv2d(32, 32, 3, padding=1, groups=8)  # 8 groups of 4
        self.bn_b = nn.BatchNorm2d(32)
        self.se1 = nn.Conv2d(32, 8, 1)
        self.se2 = nn.Conv2d(8, 32, 1)
        self.c = nn.Conv2d(32, 32, 1)
        self.bn_c = nn.BatchNorm2d(32)
        self.e = nn.Conv2d(32, 64, 3, padding=1, groups=16)  # 16 groups: 2 inputs, 4 outputs each
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn_a(self.a(x)))
        y = F.relu(self.bn_b(self.b(y)))
        y = y * torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        x = F.relu(x + self.bn_c(self.c(y)))
        return self.fc(self.e(x).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.se1 = nn.Conv2d(32, 8, 1)
        self.se2 = nn.Conv2d(8, 32, 1)
        self.c2 = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16 * 8 * 8, 3)

    def forward(self, x):
        x = F.hardswish(self.c1(x))
        s = F.hardsigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(x, 1)))))
        x = self.c2(x * s)
        x = F.max_pool2d(x, 2)
        return self.fc(x.flatten(1))


class ConvNeXtish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, stride=2)
        self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.norm = nn.LayerNorm(16)
        self.pw1 = nn.Linear(16, 64)
        self.pw2 = nn.Linear(64, 16)
        self.gamma = nn.Parameter(torch.full((16,), 0.5))
        self.head = nn.Linear(16, 7)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y))))
        x = x + (self.gamma * y).permute(0, 3, 1, 2)
        return self.head(x.mean((-2, -1)))


class TinyAttention(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc1 = nn.Linear(dim, 64)
        self.fc2 = nn.Linear(64, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h[:, 0])


class ManualHeads(nn.Module):
    """timm-style attention: fused qkv linear, reshape into heads, SDPA, merge."""

    def __init__(self, dim=24, heads=3):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.inp = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 2)

    def forward(self, x):
        x = self.inp(x)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(1, 2).reshape(b, n, self.heads * self.hd)
        return self.out(x + self.proj(y))


TINY_MODELS = {
    "residual": (Residual, (2, 3, 16, 16)),
    "concat_split": (ConcatSplit, (2, 3, 16, 16)),
    "shuffle": (Shuffle, (2, 3, 12, 12)),
    "grouped": (Grouped, (2, 3, 10, 10)),
    "grouped_whole": (GroupedWhole, (2, 3, 10, 10)),
    "squeeze_excite": (SqueezeExcite, (2, 3, 16, 16)),
    "convnextish": (ConvNeXtish, (2, 3, 16, 16)),
    "attention": (TinyAttention, (2, 9, 12)),
    "manual_heads": (ManualHeads, (2, 7, 6)),
}


def tiny_model(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """(model in eval mode, example inputs) for one of :data:`TINY_MODELS`."""
    cls, shape = TINY_MODELS[name]
    torch.manual_seed(seed)
    model = cls().eval()
    return model, (torch.randn(*shape),)
