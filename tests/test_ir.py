"""The one graph printer (golden output) and the pass infrastructure."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import PassError
from fxprune.ir import format_graph
from fxprune.passes._infra import AnalysisManager, Pass, PassManager, PassResult, TimingInstrument


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.mean((2, 3)))


def test_annotated_graph_golden():
    torch.manual_seed(0)
    prof = fxprune.profile_macs(Small(), torch.randn(2, 3, 4, 4))
    assert prof.annotated_graph() == """\
%x = input : float32[2,3,4,4]
%conv = Conv2d[conv](%x) : float32[2,8,4,4]  # 6,912 MACs; groups g0
%relu = relu(%conv) : float32[2,8,4,4]  # groups g0
%mean = .mean(%relu, (2, 3)) : float32[2,8]  # groups g0
%fc = Linear[fc](%mean) : float32[2,4]  # 64 MACs
return %fc"""


def test_format_graph_is_deterministic():
    a = fxprune.profile_macs(Small(), torch.randn(1, 3, 4, 4)).captured.gm
    b = fxprune.profile_macs(Small(), torch.randn(1, 3, 4, 4)).captured.gm
    assert format_graph(a) == format_graph(b)


class _Analysis:
    runs = 0

    def run(self, gm, am):
        _Analysis.runs += 1
        return len(gm.graph.nodes)


class _AddOne(Pass):
    name = "add-one"

    def call(self, gm, am):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(torch.add, (out.args[0], 1.0))
        out.args = (new,)
        return PassResult(gm, modified=True)


class _Boom(Pass):
    name = "boom"

    def call(self, gm, am):
        raise RuntimeError("kaput")


def test_pass_manager_invalidates_analyses_recompiles_and_names_failures():
    gm = torch.fx.symbolic_trace(Small())
    x = torch.randn(1, 3, 4, 4)
    before = gm(x)
    am = AnalysisManager(gm)
    key = _Analysis()
    n0 = am.get(key)
    assert am.get(key) == n0 and _Analysis.runs == 1  # cached
    timing = TimingInstrument()
    PassManager([_AddOne()], instruments=[timing]).run(gm, am)
    assert am.cached(key) is None  # not preserved -> invalidated
    assert am.get(key) == n0 + 1
    assert timing.records[0]["pass"] == "add-one" and timing.records[0]["modified"]
    torch.testing.assert_close(gm(x), before + 1.0)  # recompiled after the pass
    with pytest.raises(PassError, match=r"pass 'boom' failed after \['add-one'\]: RuntimeError: kaput"):
        PassManager([_AddOne(), _Boom()]).run(gm)
