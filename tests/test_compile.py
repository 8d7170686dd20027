"""fxprune.compile: the budget guarantee, the public API contract, and fuzzed architectures."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxprune
from fxprune import BandUnreachableError, BudgetUnreachableError, InvalidBudgetError
from fxprune.testing.zoo import TINY_MODELS, tiny_model


def in_band(res, tolerance=0.01):
    r = res.report
    return r.budget_macs * (1 - tolerance) <= res.macs <= r.budget_macs


@pytest.fixture(scope="module")
def resnet18():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return tv.models.resnet18().eval(), torch.randn(1, 3, 112, 112)


@pytest.mark.parametrize("policy", ["uniform", "global", "isomorphic"])
@pytest.mark.parametrize("budget", ["30%", 0.5, "70%"])
def test_band_holds_resnet18(resnet18, policy, budget):
    model, x = resnet18
    res = fxprune.compile(model, (x,), mac_budget=budget, policy=policy)
    assert in_band(res)
    assert res.macs == fxprune.count_macs(res.model, x)
    assert res.macs == res.report.estimated_macs


@pytest.mark.parametrize("tolerance", [0.01, 0.005])
@pytest.mark.parametrize("seed", range(3))
def test_random_absolute_budgets(resnet18, tolerance, seed):
    model, x = resnet18
    rng = np.random.default_rng(seed)
    base = fxprune.count_macs(model, x)
    budget = int(base * rng.uniform(0.25, 0.95))
    res = fxprune.compile(model, (x,), mac_budget=budget, tolerance=tolerance)
    assert budget * (1 - tolerance) <= res.macs <= budget
    assert res.report.budget_macs == budget


def test_result_api(resnet18, tmp_path):
    model, x = resnet18
    res = fxprune.compile(model, (x,), mac_budget="50%")
    assert res.base_macs == fxprune.count_macs(model, x)
    assert res.params < res.base_params
    assert res.base_params == sum(p.numel() for p in model.parameters())
    assert res.params == sum(p.numel() for p in res.model.parameters())
    d = res.report.to_json()
    assert d["in_band"] and d["macs"] == res.macs and d["schema"] == "fxprune.report/1"
    json.dumps(d, default=str)
    text = str(res.report)
    assert "IN BAND" in text and "layer1" in text
    # another batch size, train mode with BatchNorm statistic updates, backward
    m = res.model
    with torch.no_grad():
        assert m(torch.randn(3, 3, 112, 112)).shape == (3, 1000)
    m.train()
    bn = next(mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    loss = m(torch.randn(4, 3, 112, 112)).logsumexp(1).mean()
    loss.backward()
    assert not torch.equal(before, bn.running_mean)
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_user_model_is_never_mutated(resnet18):
    model, x = resnet18
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mods = {k: id(v) for k, v in model.named_modules()}
    res = fxprune.compile(model, (x,), mac_budget="40%")
    assert model.training
    assert {k: id(v) for k, v in model.named_modules()} == mods
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the pruned model owns its weights: training it leaves the original untouched
    for p in res.model.parameters():
        for q in model.parameters():
            assert p.data_ptr() != q.data_ptr()
    model.eval()


def test_deterministic(resnet18):
    model, x = resnet18
    a = fxprune.compile(model, (x,), mac_budget="45%", seed=3)
    b = fxprune.compile(model, (x,), mac_budget="45%", seed=3)
    assert a.keep == b.keep and a.macs == b.macs
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_channel_multiple(resnet18):
    model, x = resnet18
    res = fxprune.compile(model, (x,), mac_budget="50%", channel_multiple=8)
    for g in res.report.groups:
        assert g.keep == g.size or (g.keep * g.unit) % 8 == 0, g
    convs = [m for m in res.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)


def test_unchanged_at_or_above_original(resnet18):
    model, x = resnet18
    res = fxprune.compile(model, (x,), mac_budget=1.0)
    assert res.macs == res.base_macs
    assert any("unchanged" in n for n in res.report.notes)
    res = fxprune.compile(model, (x,), mac_budget="150%")
    assert res.macs == res.base_macs


def test_unreachable_budget_carries_min_macs(resnet18):
    model, x = resnet18
    with pytest.raises(BudgetUnreachableError) as err:
        fxprune.compile(model, (x,), mac_budget=0.001)
    assert 0 < err.value.min_macs < fxprune.count_macs(model, x)
    assert "smallest model" in str(err.value)


class _RecurrentHead(nn.Module):
    """Most MACs in an LSTM whose channels fxprune keeps whole (two stacked layers)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)  # its outputs can be pruned
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.rnn = nn.LSTM(16, 64, num_layers=2, batch_first=True)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        y = self.conv(torch.relu(self.stem(x))).flatten(2).transpose(1, 2)  # [B, HW, 16]
        y, _ = self.rnn(y)
        return self.fc(y.mean(1))


def test_an_unreachable_budget_names_the_ops_that_hold_the_fixed_macs():
    torch.manual_seed(0)
    model, x = _RecurrentHead().eval(), torch.randn(1, 3, 16, 16)
    with pytest.raises(BudgetUnreachableError) as err:
        fxprune.compile(model, (x,), mac_budget="30%")
    text = str(err.value)
    assert "cannot be pruned at all, most of it in LSTM module 'rnn'" in text, text
    assert err.value.min_macs > 0.3 * fxprune.count_macs(model, x)
    model.stem = nn.Identity()  # now nothing at all can be pruned: the same names in that message
    model.conv = nn.Conv2d(3, 16, 3, padding=1)
    with pytest.raises(BudgetUnreachableError, match=r"nothing in this model can be pruned.*LSTM module 'rnn'"):
        fxprune.compile(model, (x,), mac_budget="30%")


@pytest.mark.parametrize("bad", ["half", -3, True, None, "50 percent"])
def test_invalid_budget(resnet18, bad):
    model, x = resnet18
    with pytest.raises(InvalidBudgetError):
        fxprune.compile(model, (x,), mac_budget=bad)


def test_ignore_leaves_module_untouched(resnet18):
    model, x = resnet18
    res = fxprune.compile(model, (x,), mac_budget="50%", ignore=["layer2.0.conv1"])
    conv = res.model.get_submodule("layer2.0.conv1")
    assert conv.weight.shape == model.layer2[0].conv1.weight.shape
    assert in_band(res)
    res2 = fxprune.compile(model, (x,), mac_budget="50%", ignore=lambda name, mod: name.startswith("layer3"))
    assert res2.model.get_submodule("layer3.0.conv1").weight.shape == model.layer3[0].conv1.weight.shape


def test_heads_are_kept_whole():
    model, inputs = tiny_model("attention")
    res = fxprune.compile(model, inputs, mac_budget="50%", channel_multiple=1, tolerance=0.05)
    # the q/k/v projections capture split are packed back into one linear + split after the rewrite
    packed = res.model.get_submodule("attn.in_proj")
    (split,) = [n for n in res.model.graph.nodes if n.op == "call_function" and n.target is torch.split]
    sizes = split.args[1]
    assert sum(sizes) == packed.out_features and all(s % 8 == 0 for s in sizes)  # head_dim 8: whole heads only
    assert [g for g in res.report.groups if g.kind == "heads"]
    assert in_band(res, 0.05)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_models_compile(name):
    model, inputs = tiny_model(name)
    res = fxprune.compile(model, inputs, mac_budget="60%", channel_multiple=1, tolerance=0.05)
    assert in_band(res, 0.05)
    assert res.macs == fxprune.count_macs(res.model, inputs)
    with torch.no_grad():
        out = res.model(*[torch.cat([t, t], 0) for t in inputs])
    assert out.shape[0] == 2 * inputs[0].shape[0]


# ----------------------------------------------------------------------------------- fuzzing

class RandomNet(nn.Module):
    """A random stack of the constructs fxprune must handle."""

    def __init__(self, plan, width):
        super().__init__()
        self.plan = plan
        c = width
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.layers = nn.ModuleList()
        for kind, w in plan:
            if kind == "conv":
                self.layers.append(nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()))
                c = w
            elif kind == "residual":
                self.layers.append(nn.Sequential(nn.Conv2d(c, w, 1), nn.ReLU(), nn.Conv2d(w, c, 3, padding=1)))
            elif kind == "dw":
                self.layers.append(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c)))
            elif kind == "concat":
                self.layers.append(nn.ModuleList([nn.Conv2d(c, w, 1), nn.Conv2d(c, w, 3, padding=1)]))
                c = 2 * w
            elif kind == "se":
                self.layers.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, max(c // 4, 1), 1),
                                                 nn.ReLU(), nn.Conv2d(max(c // 4, 1), c, 1), nn.Sigmoid()))
            elif kind == "pool":
                self.layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.fc = nn.Linear(c * 4, 5)

    def forward(self, x):
        x = self.stem(x)
        for (kind, _), layer in zip(self.plan, self.layers):
            if kind == "residual":
                x = x + layer(x)
            elif kind == "concat":
                x = torch.cat([layer[0](x), F.relu(layer[1](x))], 1)
            elif kind == "se":
                x = x * layer(x)
            else:
                x = layer(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=st.lists(st.tuples(st.sampled_from(["conv", "residual", "dw", "concat", "se", "pool"]),
                            st.sampled_from([4, 8, 12, 16, 24])), min_size=1, max_size=6),
    width=st.sampled_from([8, 16]),
    budget=st.floats(0.2, 0.95),
    multiple=st.sampled_from([1, 4, 8]),
)
def test_fuzz_random_architectures(plan, width, budget, multiple):
    torch.manual_seed(0)
    model = RandomNet(plan, width).eval()
    x = torch.randn(1, 3, 16, 16)
    try:
        res = fxprune.compile(model, (x,), mac_budget=budget, channel_multiple=multiple, tolerance=0.05)
    except BudgetUnreachableError as err:
        assert err.min_macs > budget * fxprune.count_macs(model, x) * 0.999
        return
    except BandUnreachableError as err:  # only when no combination of keep counts lands in the band
        assert err.best_macs <= err.budget and err.needed_tolerance > 0.05
        return
    assert res.macs <= res.report.budget_macs
    assert res.macs == fxprune.count_macs(res.model, x)
    if res.macs < res.base_macs:
        assert res.macs >= res.report.budget_macs * 0.95
    with torch.no_grad():
        assert res.model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_data_criterion_without_calibration_data_is_noted(caplog):
    """Taylor on the example input alone works but says so (report note and a warning)."""
    import logging

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    x = torch.randn(2, 3, 12, 12)
    model(x)
    with caplog.at_level(logging.WARNING, logger="fxprune"):
        res = fxprune.compile(model, (x,), mac_budget="60%", importance="taylor", policy="uniform", tolerance=0.05)
    assert any("calibration_data" in n for n in res.report.notes)
    assert any("calibration_data" in r.getMessage() for r in caplog.records)
    res = fxprune.compile(model, (x,), mac_budget="60%", importance="taylor", policy="uniform", tolerance=0.05,
                          calibration_data=[torch.randn(4, 3, 12, 12)])
    assert not any("calibration_data" in n for n in res.report.notes)


class _Recurrent(nn.Module):
    def __init__(self, kind: str, bidirectional: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.rnn = getattr(nn, kind)(16, 32, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(64 if bidirectional else 32, 10)

    def forward(self, x):
        y = torch.relu(self.stem(x)).flatten(2).transpose(1, 2)  # a sequence of H*W steps
        y, _ = self.rnn(y)
        return self.fc(y.mean(1))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_recurrent_layers_have_their_hidden_units_and_inputs_pruned(kind, bidirectional):
    """A one-layer LSTM/GRU/RNN: hidden units pruned (every gate block, both directions, the output
    features), its input features with the conv that makes them; exact MACs; the oracle holds."""
    from fxprune.capture import capture
    from fxprune.passes.dependency_groups import DependencyGroupsAnalysis
    from fxprune.passes.shape_prop import ShapePropPass
    from fxprune.testing.equivalence import check_equivalence, random_plan

    torch.manual_seed(0)
    model, x = _Recurrent(kind, bidirectional).eval(), torch.randn(1, 3, 8, 8)
    res = fxprune.compile(model, (x,), mac_budget="50%")
    rnn = res.model.rnn
    assert rnn.hidden_size < 32 and rnn.input_size < 16
    assert rnn.weight_hh_l0.shape[1] == rnn.hidden_size
    assert res.report.lower_macs <= res.macs <= res.report.budget_macs
    assert fxprune.count_macs(res.model, x) == res.macs and fxprune.count_macs(res.model, x).exact
    with torch.no_grad():
        assert res.model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    cap = capture(model, (torch.randn(2, 3, 8, 8),))
    ShapePropPass(cap.inputs)(cap.gm)
    dg = DependencyGroupsAnalysis().run(cap.gm)
    rng = np.random.default_rng(0)
    for _ in range(3):
        check_equivalence(cap.gm, dg, random_plan(dg, rng), cap.inputs, atol=1e-4)


class _InterleavedGLU(torch.nn.Module):
    """A gated MLP whose gate and up halves are interleaved in one projection (GPT-OSS's experts)."""

    def __init__(self, d=32, inner=64):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, 2 * inner), torch.nn.Linear(inner, d)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.nn.functional.silu(h[..., ::2]) * h[..., 1::2])


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_interleaved_gate_up_keeps_each_pair_together(capture):
    """Pruning unit j of an interleaved projection removes rows 2j and 2j+1 together: the pruned model
    equals the original with the dropped units' columns of fc2 zeroed."""
    torch.manual_seed(0)
    model, x = _InterleavedGLU().eval(), torch.randn(4, 32)
    res = fxprune.compile(model, x, mac_budget="55%", capture=capture, channel_multiple=1)
    assert res.report.lower_macs <= res.macs <= res.report.budget_macs
    w2 = dict(res.model.named_parameters())["fc2.weight"]
    assert w2.shape[1] < 64
    kept = [next(j for j in range(64) if torch.equal(model.fc2.weight[:, j], w2[:, i])) for i in range(w2.shape[1])]
    masked = copy.deepcopy(model)
    with torch.no_grad():
        drop = [j for j in range(64) if j not in kept]
        masked.fc2.weight[:, drop] = 0
        torch.testing.assert_close(res.model(x), masked(x), atol=1e-5, rtol=1e-4)
