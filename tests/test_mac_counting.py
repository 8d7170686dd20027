"""MACs of single layers computed by hand, and whole models against torchvision's own figures."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune


def macs(model, *inputs):
    return fxprune.count_macs(model, inputs)


class _Wrap(nn.Module):
    def __init__(self, fn, **mods):
        super().__init__()
        self.fn = fn
        for k, v in mods.items():
            setattr(self, k, v)


class _Wrap1(_Wrap):
    def forward(self, a):
        return self.fn(self, a)


class _Wrap2(_Wrap):
    def forward(self, a, b):
        return self.fn(self, a, b)


class _Wrap3(_Wrap):
    def forward(self, a, b, c):
        return self.fn(self, a, b, c)


def Wrap(fn, **mods):
    """A module running ``fn(self, *inputs)`` (torch.fx needs a fixed number of forward arguments)."""
    import inspect

    n = len(inspect.signature(fn).parameters) - 1
    return {1: _Wrap1, 2: _Wrap2, 3: _Wrap3}[n](fn, **mods)


@pytest.mark.parametrize(
    "cin,cout,k,stride,pad,dil,groups,hw",
    [
        (3, 16, 3, 1, 1, 1, 1, 32),  # plain
        (8, 16, 3, 2, 1, 1, 1, 33),  # stride, odd size
        (8, 8, 3, 1, 2, 2, 1, 20),  # dilation
        (16, 32, 3, 1, 1, 1, 4, 16),  # grouped
        (16, 16, 5, 1, 2, 1, 16, 16),  # depthwise
        (8, 24, 3, 1, 1, 1, 8, 12),  # depthwise multiplier 3
        (8, 16, (1, 7), 1, (0, 3), 1, 1, 10),  # asymmetric kernel
    ],
)
def test_conv2d(cin, cout, k, stride, pad, dil, groups, hw):
    conv = nn.Conv2d(cin, cout, k, stride, pad, dil, groups)
    x = torch.randn(2, cin, hw, hw)
    y = conv(x)
    kh, kw = conv.kernel_size
    expected = 2 * y.shape[2] * y.shape[3] * cout * (cin // groups) * kh * kw
    assert macs(conv, x) == expected


def test_conv1d_conv3d_and_transposed():
    c1 = nn.Conv1d(4, 6, 5, padding=2)
    x1 = torch.randn(1, 4, 50)
    assert macs(c1, x1) == 50 * 6 * 4 * 5
    c3 = nn.Conv3d(2, 4, 3)
    x3 = torch.randn(1, 2, 6, 6, 6)
    assert macs(c3, x3) == 4 * 4 * 4 * 4 * 2 * 27
    ct = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
    xt = torch.randn(1, 8, 7, 7)
    # every input pixel is multiplied into k*k*C_out outputs
    assert macs(ct, xt) == 7 * 7 * 8 * 4 * 16


def test_linear_module_functional_and_3d():
    lin = nn.Linear(20, 30)
    assert macs(lin, torch.randn(4, 20)) == 4 * 20 * 30
    assert macs(lin, torch.randn(2, 7, 20)) == 2 * 7 * 20 * 30

    w = nn.Parameter(torch.randn(12, 20))
    m = Wrap(lambda self, x: F.linear(x, self.w), w=w)
    assert macs(m, torch.randn(3, 20)) == 3 * 20 * 12


def test_matmul_bmm_einsum():
    mm = Wrap(lambda self, a, b: a @ b)
    assert macs(mm, torch.randn(5, 6), torch.randn(6, 7)) == 5 * 6 * 7
    bmm = Wrap(lambda self, a, b: torch.bmm(a, b))
    assert macs(bmm, torch.randn(3, 5, 6), torch.randn(3, 6, 7)) == 3 * 5 * 6 * 7
    bcast = Wrap(lambda self, a, b: torch.matmul(a, b))
    assert macs(bcast, torch.randn(2, 4, 5, 6), torch.randn(6, 7)) == 2 * 4 * 5 * 6 * 7
    ein = Wrap(lambda self, a, b: torch.einsum("bhid,bhjd->bhij", a, b))
    assert macs(ein, torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8)) == 2 * 3 * 5 * 7 * 8
    # an ellipsis broadcast from the right (LongT5's blocked attention), and the implicit output form
    ell = Wrap(lambda self, a, b: torch.einsum("...qhd,...khd->...hqk", a, b))
    assert macs(ell, torch.randn(2, 3, 5, 4, 8), torch.randn(3, 7, 4, 8)) == 2 * 3 * 4 * 5 * 7 * 8
    implicit = Wrap(lambda self, a, b: torch.einsum("...ij,jk", a, b))
    assert macs(implicit, torch.randn(2, 5, 6), torch.randn(6, 7)) == 2 * 5 * 6 * 7


def test_sdpa_counts_qk_and_av():
    m = Wrap(lambda self, q, k, v: F.scaled_dot_product_attention(q, k, v))
    b, h, lq, lk, e, ev = 2, 4, 10, 12, 16, 8
    q, k, v = torch.randn(b, h, lq, e), torch.randn(b, h, lk, e), torch.randn(b, h, lk, ev)
    assert macs(m, q, k, v) == b * h * lq * lk * e + b * h * lq * lk * ev


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention(batch_first):
    e, heads, n, lq, lk = 32, 4, 2, 9, 11
    mha = nn.MultiheadAttention(e, heads, batch_first=batch_first)
    m = Wrap(lambda self, q, kv: self.mha(q, kv, kv, need_weights=False)[0], mha=mha)
    shape_q = (n, lq, e) if batch_first else (lq, n, e)
    shape_k = (n, lk, e) if batch_first else (lk, n, e)
    expected = n * lq * e * e + 2 * n * lk * e * e + 2 * n * lq * lk * e + n * lq * e * e
    assert macs(m, torch.randn(*shape_q), torch.randn(*shape_k)) == expected


def test_mha_kdim_vdim_and_need_weights():
    e, heads, n, lq, lk = 16, 2, 1, 5, 6
    mha = nn.MultiheadAttention(e, heads, kdim=10, vdim=12, batch_first=True)
    m = Wrap(lambda self, q, k, v: self.mha(q, k, v)[0], mha=mha)
    expected = n * lq * e * e + n * lk * 10 * e + n * lk * 12 * e + 2 * n * lq * lk * e + n * lq * e * e
    assert macs(m, torch.randn(n, lq, e), torch.randn(n, lk, 10), torch.randn(n, lk, 12)) == expected


def test_non_mac_ops_count_zero():
    m = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.LayerNorm(4), nn.GELU(), nn.Dropout())
    assert macs(m, torch.randn(2, 4, 8, 8)) == 0
    add = Wrap(lambda self, x: torch.sigmoid(x) * x + 1.0)
    assert macs(add, torch.randn(3, 5)) == 0


def test_profile_breakdown_sums_to_total():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    prof = fxprune.profile_macs(model, torch.randn(1, 3, 8, 8))
    assert prof.total == 6 * 6 * 8 * 27 + 288 * 10
    assert sum(prof.per_module.values()) == prof.total
    assert prof.per_module["0"] == 6 * 6 * 8 * 27
    assert prof.params == sum(p.numel() for p in model.parameters())


def test_count_does_not_modify_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxprune.count_macs(model, torch.randn(2, 3, 8, 8))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# A subset covering every construct family: residual, depthwise/SE, concat, shuffle, grouped,
# permute+LayerNorm, MHA (ViT), window attention (Swin), einsum attention (MaxViT).
ORACLE_MODELS = ["resnet18", "mobilenet_v3_small", "densenet121", "shufflenet_v2_x1_0", "regnet_y_400mf",
                 "convnext_tiny", "vit_b_32", "swin_t", "swin_v2_t", "maxvit_t", "googlenet", "squeezenet1_1",
                 "efficientnet_b0", "mnasnet0_5"]


@pytest.mark.parametrize("name", ORACLE_MODELS)
def test_torchvision_oracle(name):
    """Within 0.5% of torchvision's published GMACs (or equal at its 3-decimal precision)."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models import get_model, get_model_weights

    w = get_model_weights(name).DEFAULT
    size = getattr(w.transforms(), "crop_size", [224])[0]
    from fxprune.models import torchvision_model

    model, _ = torchvision_model(name)
    got = fxprune.count_macs(model, torch.randn(1, 3, size, size)) / 1e9
    ref = w.meta["_ops"]
    assert abs(got - ref) / ref < 0.005 or round(got, 3) == ref, (got, ref)
    _ = torchvision, math


# ------------------------------------------------------------- no uncounted MACs (issue 13 item 9)

def _flop_counter(model, *inputs):
    """torch.utils.flop_counter.FlopCounterMode on real tensors, autograd on, halved."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.enable_grad(), FlopCounterMode(display=False) as fc:
        model(*inputs)
    return fc.get_total_flops() // 2


class _FunctionalConvT(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4, 3, 3))
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return F.conv_transpose2d(x, self.w, self.b, stride=2, padding=1)


class _Tensordot(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4, 6))

    def forward(self, x):
        return torch.tensordot(x, self.w, dims=([1, 2], [0, 1]))


class _Recurrent(nn.Module):
    def __init__(self, cls, **kw):
        super().__init__()
        self.rnn = cls(8, 16, num_layers=2, batch_first=True, **kw)
        self.head = nn.Linear(16 * (2 if kw.get("bidirectional") else 1) if not kw.get("proj_size") else
                              kw["proj_size"] * (2 if kw.get("bidirectional") else 1), 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def test_functional_conv_transpose_is_counted():
    m, x = _FunctionalConvT(), torch.randn(1, 8, 6, 6)
    n = macs(m, x)
    # every input element meets every weight of its group: 36 positions * 8 in * 4 out * 9 taps
    assert n == 6 * 6 * 8 * 4 * 9 == _flop_counter(m, x) and n.exact


def test_conv_transpose_on_the_export_path_is_counted():
    from fxprune.capture import capture
    from fxprune.counting import _count

    m, x = nn.Sequential(nn.ConvTranspose2d(8, 4, 3, stride=2), nn.ReLU()), torch.randn(1, 8, 6, 6)
    cap = capture(m, x, method="export")
    assert _count(cap).total == _flop_counter(m, x) == 6 * 6 * 8 * 4 * 9


def test_tensordot_is_counted():
    m, x = _Tensordot(), torch.randn(10, 8, 4)
    n = macs(m, x)
    assert n == 10 * 6 * 8 * 4 == _flop_counter(m, x) and n.exact and not n.measured  # an exact rule


@pytest.mark.parametrize("cls,kw", [(nn.GRU, {}), (nn.LSTM, {}), (nn.RNN, {}),
                                    (nn.LSTM, {"proj_size": 4, "bidirectional": True}),
                                    (nn.GRU, {"bidirectional": True})])
def test_recurrent_layers_are_counted_exactly(cls, kw):
    from fxprune.cost_models.measured import measure_model

    m, x = _Recurrent(cls, **kw), torch.randn(2, 12, 8)
    gates = {nn.GRU: 3, nn.LSTM: 4, nn.RNN: 1}[cls]
    h, p, dirs = 16, kw.get("proj_size", 0), 2 if kw.get("bidirectional") else 1
    r = p or h
    per_step = sum(dirs * (gates * h * ((8 if layer == 0 else dirs * r) + r) + h * p) for layer in range(2))
    head = 24 * m.head.in_features * 4
    n = macs(m, x)
    assert n == 24 * per_step + head and n.exact and not n.measured
    assert measure_model(m, x)[0] == n  # the independent count agrees (LSTM runs mkldnn_rnn_layer on CPU)
    if cls is not nn.LSTM:  # torch's FlopCounterMode has no formula for the CPU LSTM kernel
        assert n == _flop_counter(m, x)


class _Opaque(nn.Module):
    """A module fxprune keeps opaque (passed as a leaf): its MACs must be measured, not dropped."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.conv(x)
        return y + self.fc(y.mean((2, 3)))[:, :, None, None]


class _WithOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = _Opaque()
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.stem(x))).mean((2, 3)))


def test_opaque_leaf_module_is_measured_and_frozen():
    m, x = _WithOpaque(), torch.randn(1, 3, 16, 16)
    n = fxprune.count_macs(m, x, leaf_modules=[_Opaque])
    assert n == _flop_counter(m, x) == fxprune.count_macs(m, x)
    assert n.exact and n.measured == {"block": 16 * 16 * 8 * 8 * 9 + 64}
    prof = fxprune.profile_macs(m, x, leaf_modules=[_Opaque])
    assert prof.exact and prof.to_json()["measured"] == {"block": 16 * 16 * 8 * 8 * 9 + 64}


class _Cdist(nn.Module):
    def forward(self, a, b):
        return torch.cdist(a, b)


def test_a_count_that_is_not_exact_says_so():
    """cdist multiplies matrices inside one ATen kernel without a FLOP formula: not countable."""
    n = fxprune.count_macs(_Cdist(), (torch.randn(1, 16, 8), torch.randn(1, 12, 8)))
    assert isinstance(n, int) and not n.exact
    assert any("cdist" in u for u in n.uncounted), n.uncounted
    assert "cdist" in " ".join(fxprune.profile_macs(_Cdist(), (torch.randn(1, 16, 8), torch.randn(1, 12, 8))).uncounted)
