"""Tests of fxprune.importance: hand-checked criteria, aggregation, data handling, no mutation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fxprune
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from fxprune.errors import DataError
from fxprune.importance import (
    CRITERIA,
    ImportanceScores,
    ParamSlice,
    UnitGroup,
    group_features,
    group_importance,
    label_free_loss,
    weight_saliency,
)


def units(n: int, k: int = 1) -> np.ndarray:
    return np.arange(n * k).reshape(n, k)


def mlp(bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3, bias=bias), nn.Tanh(), nn.Linear(3, 2, bias=bias))


def hidden_group(bias: bool = True) -> UnitGroup:
    slices = [
        ParamSlice("0.weight", 0, units(3), "producer"),
        ParamSlice("2.weight", 1, units(3), "consumer"),
    ]
    if bias:
        slices.append(ParamSlice("0.bias", 0, units(3), "other"))
    return UnitGroup(0, 3, tuple(slices))


class ConvNet(nn.Module):
    """conv(2->3) -> BN -> ReLU -> flatten (each channel owns 4 features) -> dropout -> linear(12->5)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(F.relu(self.bn(self.conv(x))), 1)))


def conv_group() -> UnitGroup:
    return UnitGroup(
        7,
        3,
        (
            ParamSlice("conv.weight", 0, units(3), "producer"),
            ParamSlice("conv.bias", 0, units(3), "other"),
            ParamSlice("bn.weight", 0, units(3), "norm"),
            ParamSlice("bn.bias", 0, units(3), "other"),
            ParamSlice("bn.running_mean", 0, units(3), "other"),
            ParamSlice("bn.running_var", 0, units(3), "other"),
            ParamSlice("fc.weight", 1, units(3, 4), "consumer"),
        ),
    )


def conv_data(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g)


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "dtypes": {k: v.dtype for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [p.grad for p in model.parameters()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["dtypes"] == before["dtypes"]
    assert all(g is None for g in after["grad"])
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


# --------------------------------------------------------------------------------------------
# Magnitude criteria
# --------------------------------------------------------------------------------------------


def test_l1_l2_single_slice_known_weights():
    conv = nn.Conv2d(1, 3, 2, bias=False)
    with torch.no_grad():
        w = torch.tensor([[1.0, -1.0, 0.0, 2.0], [0.5, 0.5, 0.5, 0.5], [-3.0, 0.0, 0.0, 0.0]])
        conv.weight.copy_(w.view(3, 1, 2, 2))
    g = UnitGroup(0, 3, (ParamSlice("weight", 0, units(3), "producer"),))
    l1 = group_importance(conv, [g], "l1")[0]
    l2 = group_importance(conv, [g], "l2")[0]
    raw_l1, raw_l2 = np.array([4.0, 2.0, 3.0]), np.array([6.0, 1.0, 9.0])
    np.testing.assert_allclose(l1, raw_l1 / raw_l1.mean())
    np.testing.assert_allclose(l2, raw_l2 / raw_l2.mean())
    assert l1.dtype == np.float64


def test_magnitude_averages_mean_normalised_producer_and_consumer_excluding_bias():
    model = mlp()
    w1 = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    w2 = torch.tensor([[3.0, 0, 1], [3, -2, 1]])
    with torch.no_grad():
        model[0].weight.copy_(w1)
        model[2].weight.copy_(w2)
        model[0].bias.fill_(100.0)  # biases must not count
    scores = group_importance(model, [hidden_group()], "l1")[0]
    p, c = np.array([1.0, 2, 4]), np.array([6.0, 2, 2])
    np.testing.assert_allclose(scores, (p / p.mean() + c / c.mean()) / 2)


def test_magnitude_k_columns_per_unit_flatten():
    model = ConvNet()
    with torch.no_grad():
        model.fc.weight.copy_(torch.arange(60, dtype=torch.float32).view(5, 12) - 30)
    scores = group_importance(model, [conv_group()], "l1")[7]
    fc = (torch.arange(60.0).view(5, 12) - 30).abs()
    consumer = np.array([float(fc[:, 4 * u : 4 * u + 4].sum()) for u in range(3)])
    producer = model.conv.weight.detach().abs().sum(dim=(1, 2, 3)).double().numpy()
    np.testing.assert_allclose(scores, (producer / producer.mean() + consumer / consumer.mean()) / 2)


def test_zero_mean_slice_is_skipped():
    model = mlp()
    with torch.no_grad():
        model[2].weight.zero_()
    scores = group_importance(model, [hidden_group()], "l2")[0]
    p = model[0].weight.detach().pow(2).sum(1).double().numpy()
    np.testing.assert_allclose(scores, p / p.mean())


def test_bn_scale_known_gammas_and_fallback_note():
    model = ConvNet()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
    no_norm = UnitGroup(1, 3, (ParamSlice("conv.weight", 0, units(3), "producer"),))
    scores = group_importance(model, [conv_group(), no_norm], "bn_scale")
    gamma = np.array([0.5, 2.0, 1.0])
    np.testing.assert_allclose(scores[7], gamma / gamma.mean())
    assert isinstance(scores, ImportanceScores) and scores.criterion == "bn_scale"
    assert 1 in scores.notes and 7 not in scores.notes
    np.testing.assert_allclose(scores[1], group_importance(model, [no_norm], "l1")[1])


def test_random_is_seeded_and_per_group():
    model = mlp()
    g0, g1 = hidden_group(), UnitGroup(1, 2, (ParamSlice("2.weight", 0, units(2), "producer"),))
    a = group_importance(model, [g0, g1], "random", seed=3)
    b = group_importance(model, [g1, g0], "random", seed=3)
    c = group_importance(model, [g0], "random", seed=4)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1].shape == (2,)
    assert not np.array_equal(a[0], c[0])


# --------------------------------------------------------------------------------------------
# Data-driven criteria and SynFlow
# --------------------------------------------------------------------------------------------


def test_synflow_two_layer_linear_by_hand():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    w1, w2 = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    before = snapshot(model)
    sal = weight_saliency(model, "synflow", data=torch.randn(5, 3))
    expected_w1 = w1.abs().double() * w2.abs().double().sum(0)[:, None]  # |W1[i,j]| * sum_k |W2[k,i]|
    expected_w2 = w2.abs().double() * w1.abs().double().sum(1)[None, :]  # |W2[k,i]| * sum_j |W1[i,j]|
    torch.testing.assert_close(sal["0.weight"], expected_w1)
    torch.testing.assert_close(sal["1.weight"], expected_w2)
    assert sal["0.weight"].dtype == torch.float64
    hidden = (
        ParamSlice("0.weight", 0, units(4), "producer"),
        ParamSlice("1.weight", 1, units(4), "consumer"),
    )
    group = UnitGroup(0, 4, hidden)
    scores = group_importance(model, [group], "synflow", data=torch.randn(5, 3))[0]
    np.testing.assert_allclose(scores, (expected_w1.sum(1) + expected_w2.sum(0)).numpy())
    assert_unchanged(model, before)


def explicit_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    ref = copy.deepcopy(model).eval()
    F.cross_entropy(ref(x), y).backward()
    return {n: p.grad.double() for n, p in ref.named_parameters()}


def test_snip_matches_explicit_autograd():
    model = ConvNet()
    x, y = conv_data()
    grads = explicit_grads(model, x, y)
    sal = weight_saliency(model, "snip", data=(x, y))
    for n, p in model.named_parameters():
        torch.testing.assert_close(sal[n], (p.detach().double() * grads[n]).abs(), rtol=1e-5, atol=1e-8)
    scores = group_importance(model, [conv_group()], "snip", data=(x, y))[7]
    expected = (
        sal["conv.weight"].sum(dim=(1, 2, 3))
        + sal["conv.bias"]
        + sal["bn.weight"]
        + sal["bn.bias"]
        + sal["fc.weight"].view(5, 3, 4).sum(dim=(0, 2))
    )
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-10)


def test_taylor_squares_per_batch_sums_on_known_loss():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 1.0]]))
    batches = [torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])]
    loss = lambda out: out.sum()  # noqa: E731  dL/dW[i, j] = sum_n x[n, j] = [1, 1] per batch
    group = UnitGroup(0, 2, (ParamSlice("weight", 0, units(2), "producer"),))
    taylor = group_importance(model, [group], "taylor", data=batches, loss_fn=loss)[0]
    snip = group_importance(model, [group], "snip", data=batches, loss_fn=loss)[0]
    # per batch the unit's contribution is sum_j W[u, j] * 1 = (1 - 1, 2 + 1); Taylor averages its square
    np.testing.assert_allclose(taylor, [0.0, 9.0])
    np.testing.assert_allclose(snip, [2.0, 3.0])
    torch.testing.assert_close(
        weight_saliency(model, "taylor", data=batches, loss_fn=loss)["weight"],
        torch.tensor([[1.0, -1.0], [2.0, 1.0]], dtype=torch.float64),
    )


def test_taylor_does_not_vanish_when_the_mean_gradient_does():
    """At a minimum the batch gradients cancel; per-batch squares keep the signal (Molchanov 2019)."""
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0], [0.5, 0.0]]))
    batches = [torch.tensor([[1.0, 1.0]]), torch.tensor([[-1.0, -1.0]])]  # gradients +1 and -1
    group = UnitGroup(0, 2, (ParamSlice("weight", 0, units(2), "producer"),))
    taylor = group_importance(model, [group], "taylor", data=batches, loss_fn=lambda out: out.sum())[0]
    np.testing.assert_allclose(taylor, [9.0, 0.25])


def test_taylor_uses_consumer_slices():
    """Removing a unit removes it from the layers that read it: only consumer slices count."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model[1].weight.copy_(torch.tensor([[3.0, 0.5]]))
    x = torch.tensor([[1.0, 1.0]])
    both = UnitGroup(0, 2, (ParamSlice("0.weight", 0, units(2), "producer"),
                            ParamSlice("1.weight", 1, units(2), "consumer")))
    consumer_only = UnitGroup(0, 2, (ParamSlice("1.weight", 1, units(2), "consumer"),))
    loss = lambda out: out.sum()  # noqa: E731
    a = group_importance(model, [both], "taylor", data=[x], loss_fn=loss)[0]
    b = group_importance(model, [consumer_only], "taylor", data=[x], loss_fn=loss)[0]
    np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(a, [9.0, 0.25])  # (w2 * h)^2 with h = [1, 1]


def test_grasp_matches_explicit_hessian_vector_product():
    model = mlp()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone() for p in model.parameters())

    def loss_of(*ps: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, dict(zip(names, ps)), (x,)), y)

    grad = torch.autograd.grad(loss_of(*[p.requires_grad_() for p in params]), params)
    _, hg = torch.autograd.functional.hvp(loss_of, params, tuple(gr.detach() for gr in grad))
    sal = weight_saliency(model, "grasp", data=(x, y))
    for n, p, h in zip(names, params, hg):
        torch.testing.assert_close(sal[n], (p.detach() * h).double(), rtol=1e-4, atol=1e-7)
    scores = group_importance(model, [hidden_group()], "grasp", data=(x, y))[0]
    expected = sal["0.weight"].sum(1) + sal["2.weight"].sum(0) + sal["0.bias"]
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-10)


def test_gradients_average_over_batches_and_max_batches():
    model = ConvNet()
    x, y = conv_data(8)
    whole = weight_saliency(model, "taylor", data=(x, y))
    halves = weight_saliency(model, "taylor", data=[(x[:4], y[:4]), (x[4:], y[4:])])
    first = weight_saliency(model, "taylor", data=[(x[:4], y[:4]), (x[4:], y[4:])], max_batches=1)
    only = weight_saliency(model, "taylor", data=(x[:4], y[:4]))
    for n in whole:  # eval mode: the mean of two equal-size batch losses is the whole-batch loss
        torch.testing.assert_close(halves[n], whole[n], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(first[n], only[n])


@pytest.mark.parametrize("criterion", CRITERIA)
def test_no_criterion_mutates_the_model(criterion):
    model = ConvNet().train()
    model.bn.eval()  # a mixed-mode model must come back mixed
    model.fc.bias.requires_grad_(False)
    x, y = conv_data()
    before = snapshot(model)
    scores = group_importance(model, [conv_group()], criterion, data=(x, y))
    assert scores[7].shape == (3,) and np.isfinite(scores[7]).all()
    assert_unchanged(model, before)


def test_group_features_does_not_mutate_and_has_proxies():
    model = ConvNet().train()
    x, y = conv_data()
    before = snapshot(model)
    feats = group_features(model, [conv_group()], data=(x, y))[7]
    assert_unchanged(model, before)
    assert feats["n_units"] == 3.0
    assert feats["params_per_unit"] == 2 * 9 + 1 + 2 + 5 * 4  # conv filter, conv bias, BN affine, fc block
    for proxy in ("l1", "l2", "snip", "grasp", "synflow"):
        assert {f"{proxy}_sum", f"{proxy}_mean", f"{proxy}_cv", f"{proxy}_share"} <= feats.keys()
    for proxy in ("l1", "l2", "snip", "synflow"):
        assert 0.0 < feats[f"{proxy}_share"] <= 1.0
    assert -1.0 <= feats["grasp_share"] <= 1.0
    assert all(isinstance(v, float) for v in feats.values())
    data_free = group_features(model, [conv_group()])[7]
    assert "snip_sum" not in data_free and "l2_mean" in data_free


# --------------------------------------------------------------------------------------------
# Data forms, label-free losses, outputs
# --------------------------------------------------------------------------------------------


def test_data_forms_agree():
    model = ConvNet()
    x, y = conv_data(8)
    ref = group_importance(model, [conv_group()], "snip", data=(x, y))[7]
    forms = [
        [x, y],  # a list [x, y] with labels of another shape is one (x, y) batch
        [(x, y)],
        DataLoader(TensorDataset(x, y), batch_size=8),
        DataLoader([{"x": xi, "label": yi} for xi, yi in zip(x, y)], batch_size=8),
        {"x": x, "labels": y},
    ]
    for data in forms:
        scores = group_importance(model, [conv_group()], "snip", data=data)[7]
        np.testing.assert_allclose(scores, ref, rtol=1e-6)


def test_label_free_loss_has_gradient():
    model = ConvNet()
    x, _ = conv_data()
    for data in (x, [x[:3], x[3:]], DataLoader(TensorDataset(x), batch_size=3)):
        scores = group_importance(model, [conv_group()], "snip", data=data)[7]
        assert (scores > 0).all()


class DictOutput(nn.Module):
    """Hugging Face style: token ids in, a dict with last_hidden_state out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 6)
        self.proj = nn.Linear(6, 4)
        self.out = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        h = self.norm(self.out(torch.relu(self.proj(self.emb(input_ids)))))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return {"last_hidden_state": h, "pooler": h.mean(1)}


def test_dict_output_model_with_kwargs_batches():
    model = DictOutput()
    ids = torch.randint(0, 10, (4, 5))
    slices = (
        ParamSlice("proj.weight", 0, units(4), "producer"),
        ParamSlice("out.weight", 1, units(4), "consumer"),
    )
    group = UnitGroup(0, 4, slices)
    data = [{"input_ids": ids, "attention_mask": torch.ones(4, 5)}]
    for criterion in ("taylor", "snip", "grasp", "synflow"):
        scores = group_importance(model, [group], criterion, data=data)[0]
        assert scores.shape == (4,) and np.isfinite(scores).all()
    # the label-free loss keeps a real gradient through the final LayerNorm
    assert (group_importance(model, [group], "snip", data=data)[0] > 1e-3).all()


def test_label_free_loss_gradients():
    z = torch.randn(3, 5, 8, requires_grad=True)
    hidden = F.layer_norm(z, (8,))
    (g,) = torch.autograd.grad(label_free_loss(hidden), z)
    assert g.abs().max() > 1e-3  # output energy would be constant here: 0.5 * mean(hidden**2) == 0.5
    (g_energy,) = torch.autograd.grad(0.5 * F.layer_norm(z, (8,)).pow(2).mean(), z)
    assert g_energy.abs().max() < 1e-5
    logits = torch.randn(4, 3, requires_grad=True)
    (g,) = torch.autograd.grad(label_free_loss(logits), logits)
    expected = (F.softmax(logits, 1) - F.one_hot(logits.argmax(1), 3)) / 4
    torch.testing.assert_close(g, expected.detach())
    single = torch.randn(4, 1, requires_grad=True)
    assert label_free_loss(single).item() == pytest.approx(0.5 * single.pow(2).mean().item())


def test_graph_module_scores_equal_eager():
    model = ConvNet()
    gm = torch.fx.symbolic_trace(model)
    x, y = conv_data()
    for criterion in ("l1", "snip", "synflow"):
        a = group_importance(model, [conv_group()], criterion, data=(x, y))[7]
        b = group_importance(gm, [conv_group()], criterion, data=(x, y))[7]
        np.testing.assert_allclose(a, b, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, match",
    [
        ([], "empty list"),
        (DataLoader(TensorDataset(torch.empty(0, 2, 4, 4)), batch_size=2), "empty DataLoader"),
        (torch.randn(4, 3, 4, 4), r"\[N, 2, H, W\].*\[4, 3, 4, 4\]"),
        (torch.randint(0, 5, (4, 2, 4, 4)), r"floating-point.*torch.int64"),
        ((torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2])), r"expected 4 labels.*got 3"),
        ((torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 9])), r"labels in \[0, 5\)"),
        (torch.empty(0, 2, 4, 4), "non-empty batch"),
        ("images/", "expected tensors"),
        (None, "needs calibration data"),
    ],
)
def test_bad_data_raises_data_error(data, match):
    model = ConvNet()
    before = snapshot(model)
    with pytest.raises(DataError, match=match):
        group_importance(model, [conv_group()], "snip", data=data)
    assert_unchanged(model, before)


def test_data_errors_for_synflow():
    with pytest.raises(DataError, match="shape of one input"):
        group_importance(ConvNet(), [conv_group()], "synflow")
    with pytest.raises(DataError, match="3 channels"):
        group_importance(ConvNet(), [conv_group()], "synflow", data=torch.randn(1, 3, 4, 4))


def test_invalid_groups_and_criterion():
    model = ConvNet()
    with pytest.raises(fxprune.ConfigError, match="unknown criterion"):
        group_importance(model, [conv_group()], "hessian")
    with pytest.raises(ValueError, match="neither a parameter nor a buffer"):
        group_importance(model, [UnitGroup(0, 3, (ParamSlice("nope.weight", 0, units(3)),))])
    with pytest.raises(ValueError, match="out of range"):
        group_importance(model, [UnitGroup(0, 4, (ParamSlice("conv.weight", 0, units(4), "producer"),))])
    with pytest.raises(ValueError, match="n_units=2"):
        UnitGroup(0, 2, (ParamSlice("conv.weight", 0, units(3), "producer"),))
    with pytest.raises(ValueError, match="role"):
        ParamSlice("conv.weight", 0, units(3), "input")


def test_two_element_list_heuristic():
    model = ConvNet()
    x, y = conv_data(8)
    as_pair = group_importance(model, [conv_group()], "taylor", data=[x, y])[7]
    np.testing.assert_allclose(as_pair, group_importance(model, [conv_group()], "taylor", data=(x, y))[7])
    two_batches = group_importance(model, [conv_group()], "taylor", data=[x[:4], x[4:]])[7]
    unlabelled = group_importance(model, [conv_group()], "taylor", data=[(x[:4],), (x[4:],)])[7]
    np.testing.assert_allclose(two_batches, unlabelled)
