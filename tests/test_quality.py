"""Tests of fxprune.quality: fidelity (kl / cosine / auto) and accuracy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fxprune.errors import DataError, FxpruneError
from fxprune.quality import FidelityScorer, accuracy, fidelity


def classifier() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3), nn.Linear(64, 5)
    )


def images(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(0))


def perturbed(model: nn.Module, scale: float) -> nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other


class Encoder(nn.Module):
    """Returns a dict (Hugging Face style) or a tuple of (hidden states, pooled)."""

    def __init__(self, as_tuple: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 8)
        self.as_tuple = as_tuple

    def forward(self, x: torch.Tensor):
        h = self.lin(x)
        return (h, h.mean(1)) if self.as_tuple else {"last_hidden_state": h, "pooler_output": h.mean(1)}


def test_identical_models_score_one():
    model = classifier()
    x = images()
    assert fidelity(model, model, x) == 1.0
    assert fidelity(model, copy.deepcopy(model), x, metric="kl") == 1.0
    traced = torch.fx.symbolic_trace(model)
    assert fidelity(model, traced, x, metric="cosine") == pytest.approx(1.0, abs=1e-12)


def test_perturbed_model_scores_lower_and_monotone():
    model = classifier()
    x = images()
    small, large = fidelity(model, perturbed(model, 0.05), x), fidelity(model, perturbed(model, 0.5), x)
    assert 0.0 < large < small < 1.0


def test_kl_value_by_hand():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    with torch.no_grad():
        for m, bias in ((a, [1.0, 0.0, 0.0]), (b, [0.0, 0.0, 0.0])):
            m.weight.zero_()
            m.bias.copy_(torch.tensor(bias))
    p, q = F.softmax(torch.tensor([1.0, 0, 0]).double(), 0), torch.full((3,), 1 / 3, dtype=torch.float64)
    kl = float((p * (p / q).log()).sum())
    assert fidelity(a, b, torch.randn(4, 3)) == pytest.approx(math.exp(-kl), rel=1e-12)


def test_auto_picks_cosine_for_dict_and_tuple_outputs():
    x = torch.randn(4, 5, 6)
    for as_tuple in (False, True):
        enc = Encoder(as_tuple)
        flipped = copy.deepcopy(enc)
        with torch.no_grad():
            flipped.lin.weight.neg_()
            flipped.lin.bias.neg_()
        assert fidelity(enc, enc, x) == pytest.approx(1.0, abs=1e-12)
        assert fidelity(enc, flipped, x) == pytest.approx(-1.0, abs=1e-12)  # cosine of h and -h
        assert -1.0 < fidelity(enc, perturbed(enc, 0.3), x) < 1.0


def test_output_key_selects_the_compared_tensor():
    enc = Encoder()
    x = torch.randn(4, 5, 6)
    other = copy.deepcopy(enc)
    scorer = FidelityScorer(enc, x, output_key="pooler_output")
    assert scorer.metric == "kl"  # pooled output is 2-D [4, 8]
    assert scorer(other) == 1.0
    with pytest.raises(DataError, match="no entry 'missing'"):
        fidelity(enc, other, x, output_key="missing")


def test_modes_are_restored_and_eval_is_used():
    model = classifier().train()
    model[1].eval()
    modes = [m.training for m in model.modules()]
    running = model[1].running_mean.clone()
    x = images()
    # in train mode dropout would make two runs of the same model differ; eval mode gives exactly 1.0
    assert fidelity(model, model, x) == 1.0
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[1].running_mean, running)


def test_scorer_reuses_reference_and_handles_loaders():
    model = classifier()
    x = images(24)
    loader = DataLoader(TensorDataset(x, torch.zeros(24, dtype=torch.long)), batch_size=8)
    scorer = FidelityScorer(model, loader, max_batches=2)
    assert len(scorer.batches) == 2
    cand = perturbed(model, 0.1)
    assert scorer(cand) == pytest.approx(fidelity(model, cand, x[:16]), rel=1e-9)


def test_shape_mismatch_and_non_finite():
    model = classifier()
    x = images()
    narrower = nn.Sequential(*list(copy.deepcopy(model))[:-1], nn.Linear(64, 4))
    with pytest.raises(FxpruneError, match="shape"):
        fidelity(model, narrower, x)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken[-1].bias.fill_(float("nan"))
    assert fidelity(model, broken, x) == 0.0


def test_fidelity_data_errors():
    model = classifier()
    with pytest.raises(DataError, match="empty"):
        fidelity(model, model, [])
    with pytest.raises(DataError, match=r"\[N, 1, H, W\]"):
        fidelity(model, model, torch.randn(4, 3, 6, 6))
    with pytest.raises(ValueError, match="metric"):
        fidelity(model, model, images(), metric="l2")


def test_accuracy():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    assert accuracy(lin, (x, torch.tensor([0, 1, 1, 1]))) == 0.75
    assert accuracy(lin, [(x[:2], torch.tensor([0, 1])), (x[2:], torch.tensor([0, 0]))]) == 0.75
    assert accuracy(lin, [(x[:2], torch.tensor([0, 1])), (x[2:], torch.tensor([0, 0]))], max_batches=1) == 1.0
    assert accuracy(lin, (x, F.one_hot(torch.tensor([0, 1, 0, 1]), 2).float())) == 1.0
    with pytest.raises(DataError, match="labelled"):
        accuracy(lin, x)
    with pytest.raises(DataError, match="expected 4 labels"):
        accuracy(lin, (x, torch.tensor([0, 1])))
