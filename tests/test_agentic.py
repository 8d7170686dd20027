"""policy="agentic": the Master loop with the offline analyst and with Claude through the real
anthropic SDK against a local Messages-API server."""

from __future__ import annotations

import pytest
import torch

import fxprune
from fxprune.testing.anthropic_server import Delay, MockAnthropicServer, Status, ToolUse
from fxprune.testing.zoo import tiny_model


@pytest.fixture(scope="module")
def residual():
    model, inputs = tiny_model("residual")
    calib = [torch.randn(8, 3, 16, 16)]
    return model, inputs, calib


def attempts(res):
    return [a for a in res.report.attempts if a.get("attempt") != "summary"]


def summary(res):
    return [a for a in res.report.attempts if a.get("attempt") == "summary"][0]


def test_offline_agentic_lands_in_band_and_reports_every_attempt(residual):
    model, inputs, calib = residual
    res = fxprune.compile(model, inputs, mac_budget="50%", policy="agentic", calibration_data=calib,
                          channel_multiple=1, tolerance=0.02, policy_options={"max_attempts": 6})
    r = res.report
    assert r.in_band
    att = attempts(res)
    assert att[0]["analyst"] == "baseline:global"
    assert [a["attempt"] for a in att] == list(range(1, len(att) + 1))
    assert all(a["analyst"] in ("baseline:global", "offline") for a in att)
    for a in att:
        if a.get("quality") is not None:
            assert r.lower_macs <= a["macs"] <= r.budget_macs
            assert set(a["projected"]["ratios"]) == set(a["proposal"]["ratios"])
    s = summary(res)
    assert "offline" in s["analyst"] and s["stop"]
    best = max(a["quality"] for a in att if a.get("quality") is not None)
    assert s["best_quality"] == best
    assert "agentic" in " ".join(r.notes)


def test_offline_agentic_is_deterministic(residual):
    model, inputs, calib = residual
    kw = dict(mac_budget="40%", policy="agentic", calibration_data=calib, channel_multiple=1, tolerance=0.02,
              policy_options={"max_attempts": 4, "sensitivity": (0.5,)})
    a = fxprune.compile(model, inputs, **kw)
    b = fxprune.compile(model, inputs, **kw)
    assert a.keep == b.keep
    assert [x.get("quality") for x in a.report.attempts] == [x.get("quality") for x in b.report.attempts]


def _ratios_reply(value):
    """A server step answering with the same keep ratio for every bucket the request offers."""

    def step(request):
        tool = request.body["tools"][0]
        ids = tool["input_schema"]["properties"]["ratios"]["required"]
        return ToolUse({"rationale": "prune the wide layers", "criterion": "l1",
                        "ratios": {b: value for b in ids}})

    return step


def _claude_options(server, **extra):
    return {"llm": "claude", "base_url": server.base_url, "api_key": "sk-test-not-a-real-key",
            "max_attempts": 3, "sensitivity": (0.5,), "max_retries": 1, "timeout": 5.0, **extra}


def test_claude_tool_calls_history_and_repair(residual):
    model, inputs, calib = residual
    # first proposal prunes far more than the budget needs: the solver repairs it into the band
    with MockAnthropicServer([_ratios_reply(0.15), _ratios_reply(0.8), _ratios_reply(0.6)]) as server:
        res = fxprune.compile(model, inputs, mac_budget="50%", policy="agentic", calibration_data=calib,
                              channel_multiple=1, tolerance=0.02, policy_options=_claude_options(server))
        requests = list(server.requests)
    att = attempts(res)
    claude = [a for a in att if a["analyst"] == "claude"]
    assert len(claude) >= 2
    first = claude[0]
    assert first["proposal"]["ratios"] and all(v == 0.15 for v in first["proposal"]["ratios"].values())
    assert first["in_band"] and "scaled" in first["solver_note"]
    assert res.report.in_band
    # the second request carries the first Claude attempt's outcome (its MACs and quality)
    second = requests[1].text()
    assert f"{first['macs'] / 1e6:.3f}M" in second or f"{first['macs'] / 1e9:.3f}G" in second
    assert f"{first['quality']:.4f}" in second
    body = requests[0].body
    assert body["tool_choice"]["type"] == "tool" and body["tool_choice"]["name"] == "propose_allocation"
    assert "sk-test-not-a-real-key" not in res.report.dumps()


def test_claude_529_is_retried(residual):
    model, inputs, calib = residual
    script = [Status(529, headers={"retry-after": "0"}), _ratios_reply(0.7), _ratios_reply(0.6), _ratios_reply(0.5)]
    with MockAnthropicServer(script) as server:
        res = fxprune.compile(model, inputs, mac_budget="50%", policy="agentic", calibration_data=calib,
                              channel_multiple=1, tolerance=0.02, policy_options=_claude_options(server))
    assert any(a["analyst"] == "claude" and a.get("quality") is not None for a in attempts(res))
    assert res.report.in_band


def test_timeout_falls_back_to_offline_and_keeps_the_result(residual):
    model, inputs, calib = residual
    script = [Delay(3.0, then=_ratios_reply(0.5))] * 4
    with MockAnthropicServer(script) as server:
        res = fxprune.compile(model, inputs, mac_budget="50%", policy="agentic", calibration_data=calib,
                              channel_multiple=1, tolerance=0.02,
                              policy_options=_claude_options(server, timeout=0.5, max_retries=0, max_attempts=4))
    att = attempts(res)
    errors = [a for a in att if a.get("error")]
    assert errors and errors[0]["fallback"] == "offline"
    assert any(a["analyst"] == "offline" for a in att)
    assert "offline analyst took over" in summary(res)["analyst"]
    assert res.report.in_band


def test_malformed_then_valid(residual):
    model, inputs, calib = residual
    bad = ToolUse({"rationale": "x", "criterion": "l1", "ratios": {"nope": 0.5}})
    with MockAnthropicServer([bad, _ratios_reply(0.6), _ratios_reply(0.5), _ratios_reply(0.7)]) as server:
        res = fxprune.compile(model, inputs, mac_budget="50%", policy="agentic", calibration_data=calib,
                              channel_multiple=1, tolerance=0.02, policy_options=_claude_options(server))
        second = server.requests[1].text()
    assert "FEEDBACK" in second
    assert any(a["analyst"] == "claude" and a.get("quality") is not None for a in attempts(res))


def test_agentic_quality_at_least_global_on_digits():
    """On a CNN trained on sklearn digits, agentic (offline) is never worse than global."""
    from fxprune.quality import fidelity
    from fxprune.testing.digits import load_digits_data, train_digits_cnn

    data = load_digits_data()
    model, _ = train_digits_cnn(data, epochs=6, width=16)
    x = data.x_train[:1]
    calib = [data.x_test[:128]]
    for budget in ("30%", "50%"):
        g = fxprune.compile(model, (x,), mac_budget=budget, policy="global", calibration_data=calib)
        a = fxprune.compile(model, (x,), mac_budget=budget, policy="agentic", calibration_data=calib,
                            policy_options={"max_attempts": 5, "sensitivity": (0.5,)})
        assert a.report.in_band and g.report.in_band
        held = [data.x_test[128:]]
        assert fidelity(model, a.model, calib) >= fidelity(model, g.model, calib) - 1e-9
        _ = held
