"""Tied weights: an embedding shared with the output Linear is pruned together or frozen, never broken.

Regression for issue 13 item 13: compiling a language model whose input embedding is tied to its
output projection crashed with ``INDICES element is out of DATA bounds`` (the two aliases of one
tensor were two unrelated channel spaces, sliced by different groups).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.capture import capture
from fxprune.passes.dependency_groups import DependencyGroupsAnalysis
from fxprune.passes.shape_prop import ShapePropPass
from fxprune.testing.equivalence import check_equivalence, prune_with_units, random_plan

V, D, H = 50, 32, 64


class TiedLM(nn.Module):
    """Embedding -> MLP -> output Linear that shares the embedding matrix (no norm: exact groups)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.fc1 = nn.Linear(D, H)
        self.fc2 = nn.Linear(H, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.fc2(F.relu(self.fc1(self.emb(ids)))))


class TiedScore(TiedLM):
    """The output Linear's vocabulary outputs are reduced inside the graph, so nothing but the tie
    keeps them from looking prunable; pruning them would drop embedding rows the token ids index."""

    def forward(self, ids):
        return super().forward(ids).softmax(-1).amax(-1)


def _analyse(model, ids, method):
    cap = capture(model, ids, method=method)
    ShapePropPass(cap.inputs)(cap.gm)
    return cap, DependencyGroupsAnalysis().run(cap.gm)


@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.parametrize("cls", [TiedLM, TiedScore])
def test_tied_embedding_and_output_linear_are_one_group(cls, method):
    torch.manual_seed(0)
    model = cls().eval()
    ids = torch.randint(0, V, (2, 7))
    cap, graph = _analyse(model, ids, method)
    # the embedding's output channels and the head's input channels are the same columns: one group,
    # which also holds the MLP output that feeds the head
    width = [g for g in graph.groups if g.n == D]
    assert len(width) == 1, [(g.name, g.n) for g in graph.groups]
    assert sorted(g.n for g in graph.groups) == [D, H]  # the vocabulary is never a group
    rng = np.random.default_rng(0)
    for _ in range(3):
        plan = random_plan(graph, rng)
        check_equivalence(cap.gm, graph, plan, cap.inputs)
    pruned = prune_with_units(cap.gm, graph, {width[0].id: np.arange(0, D, 2)}, cap.inputs)
    tensors = {id(p): tuple(p.shape) for p in pruned.parameters()}
    assert (V, D // 2) in tensors.values()  # rows kept, half the columns


@pytest.mark.parametrize("method", ["fx", "export"])
def test_compile_keeps_the_tie_and_the_vocabulary(method):
    torch.manual_seed(0)
    model = TiedScore().eval()
    ids = torch.randint(0, V, (2, 7))
    res = fxprune.compile(model, ids, mac_budget="50%", capture=method)
    assert res.report.lower_macs <= res.macs <= res.report.budget_macs
    emb = res.model.get_submodule("emb") if method == "fx" else None
    if emb is not None:
        assert res.model.get_submodule("head").weight is emb.weight  # still one tensor
        assert emb.weight.shape[0] == V
    assert model.head.weight is model.emb.weight and model.emb.weight.shape == (V, D)  # caller's model untouched
    with torch.no_grad():
        out = res.model(torch.arange(V).view(2, 25))  # every token id still has its row
    assert out.shape == (2, 25) and torch.isfinite(out).all()
