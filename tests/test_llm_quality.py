"""Quality tools for language models: activation importance (Minitron) and token-level distillation."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.finetune import causal_lm_loss, token_distillation_loss
from fxprune.importance import ParamSlice, UnitGroup, group_importance

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
from test_llm import VOCAB, make, tokens  # noqa: E402


def test_activation_scores_follow_the_activations_and_skip_padding():
    """fc2 reads 8 hidden units; unit j is relu(j + 100·pad·[j == 0]): only padding makes unit 0 large."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(2, 8)
            self.fc2 = nn.Linear(8, 3)
            with torch.no_grad():
                self.fc1.weight.zero_()
                self.fc1.weight[0, 1] = 100.0  # input feature 1 is the padding flag
                self.fc1.bias.copy_(torch.arange(8.0))

        def forward(self, x, attention_mask):
            return self.fc2(F.relu(self.fc1(x)))

    net = Net()
    x = torch.zeros(2, 5, 2)
    mask = torch.ones(2, 5, dtype=torch.long)
    x[:, -2:, 1] = 1.0  # the last two tokens are padding, with a huge unit-0 activation
    mask[:, -2:] = 0
    group = UnitGroup(0, 8, (ParamSlice("fc1.weight", 0, np.arange(8), "producer"),
                             ParamSlice("fc2.weight", 1, np.arange(8), "consumer")))
    for crit in ("activation", "activation_l2"):
        s = group_importance(net, [group], crit, data=[{"x": x, "attention_mask": mask}])[0]
        want = np.arange(8.0)
        np.testing.assert_allclose(s, want / want.mean(), rtol=1e-9)  # unit 0 is 0 on every real token
        unmasked = group_importance(net, [group], crit, data=[{"x": x, "attention_mask": torch.ones_like(mask)}])[0]
        assert unmasked[0] > unmasked[7]  # padding counted: unit 0 looks most important
    with pytest.raises(fxprune.errors.DataError, match="calibration data"):
        group_importance(net, [group], "activation")


def test_activation_importance_reads_conv1d_inputs_in_the_captured_graph():
    """GPT-2's MLP is addmm on Conv1D weights (functional in the graph): its neuron scores are the
    mean |gelu(c_fc(x))| the original model produces on the non-padding tokens."""
    from fxprune._compile import open_session

    model = make("gpt2")
    x = tokens(2, 12)
    x["attention_mask"][1, -5:] = 0
    session = open_session(model, x, importance="activation", calibration_data=[x])
    mlp0 = next(g for g in session.graph.groups if g.name.endswith("h.0.mlp.c_fc"))
    seen = []
    hook = model.transformer.h[0].mlp.c_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(**x, use_cache=False)
    hook.remove()
    act = seen[0][x["attention_mask"].bool()].abs().mean(0).double().numpy()
    # a unit's index in the group is the channel it owns in c_fc's output
    owned = next(idx for sid, idx in mlp0.spaces.items() if session.graph.keys[sid][0] == "n")[:, 0]
    want = act[owned]
    np.testing.assert_allclose(session.scores[mlp0.id], want / want.mean(), rtol=1e-5)


def test_token_distillation_masks_padding_and_is_zero_for_the_teacher():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 6, 11, generator=g)
    s = t.clone()
    mask = torch.ones(2, 6)
    mask[0, 4:] = 0
    s[0, 4:] += 5 * torch.randn(2, 11, generator=g)  # differs only on padding
    assert token_distillation_loss(s, t, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert token_distillation_loss(s, t, None).item() > 0.1
    labels = torch.randint(0, 11, (2, 6), generator=g)
    want = F.cross_entropy(t[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(causal_lm_loss(t, labels), want)


def test_finetune_distils_a_pruned_causal_lm_towards_its_teacher():
    teacher = make("llama")
    calib = [tokens(4, 16, seed=s) for s in range(4)]
    res = fxprune.compile(teacher, tokens(), mac_budget="50%", importance="activation", calibration_data=calib)
    student = copy.deepcopy(res.model)

    def kl(model):
        with torch.no_grad():
            return float(np.mean([token_distillation_loss(model(**b).logits, teacher(**b, use_cache=False).logits,
                                                          b["attention_mask"]).item() for b in calib]))

    before = kl(student)
    out = fxprune.finetune(student, calib, teacher=teacher, epochs=8, optimizer="adamw", lr=3e-3, progress=False)
    assert out.steps == 32 and np.isfinite(out.history).all()
    assert kl(student) < 0.7 * before
    with torch.no_grad():  # the student still is a causal LM of the same shape
        assert student(**tokens(1, 5)).logits.shape == (1, 5, VOCAB)


def test_fidelity_of_a_causal_lm_is_token_kl_and_ignores_padding():
    from fxprune.quality import FidelityScorer

    model = make("llama")
    batch = tokens(2, 10)
    batch["attention_mask"][1, -3:] = 0
    scorer = FidelityScorer(model, [batch])
    assert scorer.metric == "token_kl"
    assert scorer(model) == pytest.approx(1.0, abs=1e-9)
    res = fxprune.compile(model, tokens(), mac_budget="50%")
    score = scorer(res.model)
    with torch.no_grad():
        want = token_distillation_loss(res.model(**batch).logits.double(), model(**batch, use_cache=False).logits.double(),
                                       batch["attention_mask"]).item()
    assert score == pytest.approx(np.exp(-want), rel=1e-6) and score < 1.0
