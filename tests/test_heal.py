"""The self-healing compile (fxprune/heal.py): a candidate that fails to build, run or verify has
the groups behind the failure frozen, and the compile solves again; it fails only when nothing
prunable is left, with an error that names the op."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from fxprune.cost_models.measured import measure_model
from fxprune.errors import PostconditionError
from fxprune.heal import CandidateFailure, Healer, bisect_groups

tvm = pytest.importorskip("torchvision.models")


def _maxvit() -> nn.Module:
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    return MaxVit(input_size=(64, 64), stem_channels=16, partition_size=4, block_channels=[32, 64],
                  block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()


def _break_shape_sources(monkeypatch):
    """A wrong rule: sizes read off other tensors' shapes are no longer tracked (MaxViT's reshape
    back to the block input's ``x.shape[-1]`` then goes stale after pruning)."""
    import fxprune.opset._base as base

    monkeypatch.setattr(base, "shape_source", lambda s: None)


def _check(res, x):
    r = res.report
    assert r.lower_macs <= res.macs <= r.budget_macs
    assert fxprune.count_macs(res.model, x) == res.macs == r.measured_macs
    assert measure_model(res.model, x)[0] == res.macs
    with torch.no_grad():
        assert res.model(torch.randn(2, *x.shape[1:])).shape[0] == 2


def test_a_broken_rewrite_is_healed_by_freezing_the_groups_that_reach_the_failing_node(monkeypatch):
    _break_shape_sources(monkeypatch)
    x = torch.randn(1, 3, 64, 64)
    res = fxprune.compile(_maxvit(), (x,), mac_budget="50%")
    healed = res.report.healed
    assert healed and all(h["stage"] == "run" and h["node"].startswith("reshape") for h in healed), [(h["stage"], h["node"]) for h in healed]
    assert all("no longer runs" in h["reason"] for h in healed)
    ids = {h["group"] for h in healed}
    assert all(g.keep == g.size for g in res.report.groups if g.id in ids)  # kept whole
    assert any(g.keep < g.size for g in res.report.groups if g.id not in ids)  # the rest is pruned
    _check(res, x)
    text = str(res.report)
    assert "self-healed: froze group" in text and "reshape" in text


def test_healing_also_covers_candidates_a_search_policy_builds(monkeypatch):
    _break_shape_sources(monkeypatch)
    x = torch.randn(1, 3, 64, 64)
    res = fxprune.compile(_maxvit(), (x,), mac_budget="50%", policy="agentic",
                          policy_options={"llm": "offline", "max_attempts": 2, "sensitivity": (0.5,)})
    assert res.report.healed
    _check(res, x)


def test_bisection_finds_the_group_when_the_failure_names_no_node():
    keep = np.array([4, 8, 2, 8, 3, 1])
    full = np.array([8, 8, 8, 8, 8, 8])
    culprit = 4

    def fails(plan):
        return plan[culprit] < full[culprit]

    assert bisect_groups(fails, keep, full) == culprit
    assert bisect_groups(lambda plan: True, keep, full) is None  # fails unpruned: not a pruning failure
    assert bisect_groups(fails, full, full) is None


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(torch.relu(self.c3(x)).mean((2, 3)))


def test_a_failure_without_a_node_is_bisected(monkeypatch):
    """A check that fails whenever c2's output group is pruned, and names no node: bisection finds it."""
    import fxprune.heal as heal

    real = heal.build_candidate

    def build(session, keep, criterion=None, **kw):
        g = next(g for g in session.graph.groups if g.name == "c2")
        if keep[g.id] < g.n:
            raise CandidateFailure("a check failed somewhere", stage="mac-measured")
        return real(session, keep, criterion, **kw)

    monkeypatch.setattr(heal, "build_candidate", build)
    x = torch.randn(1, 3, 16, 16)
    res = fxprune.compile(_Net(), (x,), mac_budget="60%", tolerance=0.05)
    assert [h["name"] for h in res.report.healed] == ["c2"] and res.report.healed[0]["node"] == ""
    assert "found by bisection" in str(res.report)
    _check(res, x)


def test_when_nothing_prunable_is_left_the_error_names_the_op(monkeypatch):
    import fxprune.heal as heal

    def build(session, keep, criterion=None, **kw):
        raise CandidateFailure("the pruned model no longer runs, at node 'mean': RuntimeError: boom",
                               stage="run", nodes=("mean",))

    monkeypatch.setattr(heal, "build_candidate", build)
    with pytest.raises(PostconditionError, match=r"nothing prunable is left.*node 'mean'|node 'mean'.*nothing"):
        fxprune.compile(_Net(), (torch.randn(1, 3, 16, 16),), mac_budget="60%", tolerance=0.5)


def test_healer_freezes_only_pruned_groups_reaching_the_node():
    from fxprune._compile import open_session

    session = open_session(_Net(), (torch.randn(1, 3, 16, 16),))
    keep = np.array([g.n // 2 for g in session.graph.groups])
    conv3 = next(n.name for n in session.gm.graph.nodes if n.op == "call_module" and n.target == "c3")
    h = Healer(session)
    gids = h.freeze(CandidateFailure("x", stage="rewrite", nodes=(conv3,)), keep)
    names = sorted(session.graph.groups[g].name for g in gids)
    assert names == ["c2", "c3"]  # c3's input channels (c2's group) and its output channels
    assert set(session.healed) == set(gids)


def test_an_unreachable_budget_after_healing_names_the_frozen_groups_and_their_ops():
    """A budget that only the frozen groups put out of reach: the error says which groups the
    self-healing compile froze, at which node and op, and the first failure."""
    from types import SimpleNamespace

    from fxprune._compile import _healed_context
    from fxprune.errors import BandUnreachableError, BudgetUnreachableError
    from fxprune.heal import HealedGroup

    class Net(nn.Module):
        def forward(self, x):
            return x.view(x.shape[0], -1)

    gm = torch.fx.symbolic_trace(Net())
    view = next(n.name for n in gm.graph.nodes if n.op == "call_method")
    healed = {3: HealedGroup(3, "blocks.4.conv_pw", 672, "run", view,
                             "the pruned model no longer runs, at node 'view': RuntimeError: shape is invalid")}
    session = SimpleNamespace(healed=healed, gm=gm)
    err = _healed_context(session, BudgetUnreachableError("a budget of 10 MACs is below 20", min_macs=20, budget=10))
    assert isinstance(err, BudgetUnreachableError) and err.min_macs == 20 and err.budget == 10
    text = str(err)
    assert "froze 1 group(s)" in text and f"blocks.4.conv_pw (run at {view}, op view)" in text
    assert "First failure: the pruned model no longer runs" in text
    band = _healed_context(session, BandUnreachableError("no plan in the band", best_macs=5, budget=10, lower=9))
    assert isinstance(band, BandUnreachableError) and band.lower == 9 and "op view" in str(band)
    plain = BudgetUnreachableError("x", min_macs=1, budget=0)
    assert _healed_context(SimpleNamespace(healed={}, gm=gm), plain) is plain  # nothing healed: unchanged
