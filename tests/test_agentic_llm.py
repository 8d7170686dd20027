"""The Claude analyst: prompt building and parsing (pure), and the real SDK against a local server.

No test needs the internet or a real key: ``MockAnthropicServer`` speaks the Messages API on
127.0.0.1 and the ``anthropic`` SDK is pointed at it with ``base_url``. Retry waits are kept tiny
with ``retry-after-ms``/``retry-after`` headers, timeouts are at most 1 s.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import threading
import time

import pytest

anthropic = pytest.importorskip("anthropic")

from fxprune.errors import LLMError  # noqa: E402
from fxprune.policies.agentic import prompts  # noqa: E402
from fxprune.policies.agentic.llm import (  # noqa: E402
    AnalystUnavailable,
    ClaudeAnalyst,
    default_model,
    model_traits,
)
from fxprune.policies.agentic.prompts import (  # noqa: E402
    PROMPT_VERSION,
    SYSTEM_PROMPT,
    TOOL_NAME,
    Proposal,
    ProposalError,
    build_request,
    parse_response,
    render_history,
    render_profile,
    tool_definition,
)
from fxprune.testing.anthropic_server import (  # noqa: E402
    Delay,
    MockAnthropicServer,
    Refusal,
    Status,
    Text,
    ToolUse,
)

KEY = "sk-ant-test-0123456789-DO-NOT-LEAK"
FAST = {"retry-after-ms": "1"}  # the SDK honours it: retries wait 1 ms


@pytest.fixture()
def profile() -> dict:
    return {
        "model": "resnet50",
        "base_macs": 4089184256,
        "budget_macs": 2044592128,
        "band": [2024146206, 2044592128],
        "min_macs": 612345678,
        "quality_metric": "kl_fidelity (higher is better, 1.0 = identical outputs)",
        "criteria": ["l1", "l2", "bn_scale", "taylor", "snip", "grasp", "synflow"],
        "buckets": [
            {
                "id": "b0",
                "label": "layer1.*.conv1 (3 groups)",
                "groups": 3,
                "kind": "channels",
                "units_per_group": 64,
                "min_keep_ratio": 0.125,
                "mac_share": 0.052,
                "importance": {"mean": 1.0, "cv": 0.41, "p10": 0.43, "p50": 0.97},
                "sensitivity": [[0.25, 0.61], [0.5, 0.83], [0.75, 0.95]],
            },
            {
                "id": "b1",
                "label": "layer2.*.conv2 (4 groups)",
                "groups": 4,
                "kind": "channels",
                "units_per_group": 128,
                "min_keep_ratio": 0.0625,
                "mac_share": 0.231,
                "importance": {"mean": 1.0, "cv": 0.18, "p10": 0.74, "p50": 1.02},
                "sensitivity": [[0.25, 0.32], [0.5, 0.71], [0.75, 0.9]],
            },
            {
                "id": "b2",
                "label": "layer4.*.conv1\n(3 groups)",  # control characters are cleaned
                "groups": 3,
                "kind": "channels",
                "units_per_group": 512,
                "min_keep_ratio": 0.125,
                "mac_share": 0.118,
                "importance": {"mean": 1.0, "cv": 0.66, "p10": 0.21, "p50": 0.93},
                "sensitivity": [[0.25, 0.77], [0.5, 0.92], [0.75, 0.98]],
            },
        ],
        "frozen": ["fc (classifier output)", "conv1 (graph input)"],
    }


def attempt(n: int, quality: float, *, best: bool = False, in_band: bool = True) -> dict:
    r = round(0.4 + 0.05 * n, 3)
    return {
        "attempt": n,
        "analyst": "claude" if n % 2 else "offline",
        "proposal": {"ratios": {"b0": r, "b1": 0.6, "b2": 0.7}, "criterion": "l1"},
        "projected": {"ratios": {"b0": r - 0.03, "b1": 0.57, "b2": 0.68}},
        "macs": 2031234567,
        "in_band": in_band,
        "quality": quality,
        "solver_note": "scaled pruning by 0.94 to fit the band",
        "best_so_far": best,
    }


GOOD = {"rationale": "Protect b1 (steep), prune b2 (flat, weak tail).", "criterion": "taylor",
        "ratios": {"b0": 0.5, "b1": 0.8, "b2": 0.35}, "confidence": 0.6}


def message(*blocks: dict, stop: str = "tool_use", **extra) -> dict:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": list(blocks),
            "stop_reason": stop, "usage": {"input_tokens": 1, "output_tokens": 1}, **extra}


def call(data, name: str = TOOL_NAME) -> dict:
    return {"type": "tool_use", "id": "toolu_1", "name": name, "input": data}


def with_ratios(**ratios) -> dict:
    return {**GOOD, "ratios": {**GOOD["ratios"], **ratios}}


def analyst_for(server: MockAnthropicServer, **options) -> ClaudeAnalyst:
    options.setdefault("timeout", 2.0)
    options.setdefault("max_retries", 2)
    return ClaudeAnalyst(api_key=KEY, base_url=server.base_url, **options)


# ------------------------------------------------------------------------------------------------
# Prompts: pure


def test_tool_schema_lists_every_bucket_and_criterion(profile):
    tool = tool_definition(profile)
    schema = tool["input_schema"]
    assert tool["name"] == TOOL_NAME and "strict" not in tool
    assert list(schema["properties"]) == ["rationale", "criterion", "ratios", "confidence"]
    assert schema["required"] == ["rationale", "criterion", "ratios"]
    assert schema["properties"]["criterion"]["enum"] == profile["criteria"]
    ratios = schema["properties"]["ratios"]
    assert ratios["required"] == ["b0", "b1", "b2"] and ratios["additionalProperties"] is False
    assert ratios["properties"]["b1"]["minimum"] == 0.0625 and ratios["properties"]["b1"]["maximum"] == 1.0

    strict = tool_definition(profile, strict=True)
    assert strict["strict"] is True
    text = json.dumps(strict)
    assert "minimum" not in text and "maxLength" not in text  # unsupported by strict tool schemas
    b1 = strict["input_schema"]["properties"]["ratios"]["properties"]["b1"]
    assert "(0.0625 to 1)" in b1["description"]


def test_render_profile_golden(profile):
    assert render_profile(profile) == "\n".join(
        [
            "model: resnet50",
            "MACs: base 4.089G | budget 2.045G = 0.500 of base | band [2.024G, 2.045G] = [0.495, 0.500]",
            "floor (every bucket at its min keep): 612.346M = 0.150 of base",
            "quality: kl_fidelity (higher is better, 1.0 = identical outputs)",
            "criteria: l1, l2, bn_scale, taylor, snip, grasp, synflow",
            "frozen (never pruned): fc (classifier output); conv1 (graph input)",
            "",
            "buckets (units = channels or heads per group; min = min keep ratio;",
            "imp = per-unit importance cv/p10/p50, mean 1; sens = keep ratio:quality, this bucket alone):",
            "id | groups | units | kind | min | mac% | imp cv/p10/p50 | sens | label",
            "b0 | 3 | 64 | channels | 0.125 | 5.2 | 0.41/0.43/0.97 | 0.25:0.61 0.5:0.83 0.75:0.95"
            " | layer1.*.conv1 (3 groups)",
            "b1 | 4 | 128 | channels | 0.0625 | 23.1 | 0.18/0.74/1.02 | 0.25:0.32 0.5:0.71 0.75:0.9"
            " | layer2.*.conv2 (4 groups)",
            "b2 | 3 | 512 | channels | 0.125 | 11.8 | 0.66/0.21/0.93 | 0.25:0.77 0.5:0.92 0.75:0.98"
            " | layer4.*.conv1 (3 groups)",
        ]
    )


def test_render_history_marks_best_and_details_recent_attempts(profile):
    history = [attempt(n, 0.70 + 0.01 * n, best=n == 3) for n in range(1, 10)]
    text = render_history(history, profile)
    rows = text.splitlines()
    note = "scaled pruning by 0.94 to fit the band"
    assert rows[2] == f"1 | claude | l1 | 2.031G | 0.497 | in | 0.7100 | {note}"
    assert rows[4].startswith("3* | claude | l1 |")  # the Master's best_so_far flag wins
    assert sum(r.split(" | ")[0].endswith("*") for r in rows[2:11]) == 1
    assert "columns: b0 b1 b2" in text
    assert "#3* prop 0.55 0.6 0.7" in text and "#3* proj 0.52 0.57 0.68" in text
    assert "#1 prop" not in text and "#2 prop" not in text  # only the last 6 and the best in full
    assert all(f"#{n} prop" in text for n in range(4, 10))
    assert render_history([], profile).startswith("attempts: none yet")


def test_render_history_best_falls_back_to_highest_in_band_quality(profile):
    history = [attempt(1, 0.8), attempt(2, 0.95, in_band=False), attempt(3, 0.9), attempt(4, 0.85)]
    marks = [r.split(" | ")[0] for r in render_history(history, profile).splitlines()[2:6]]
    assert marks == ["1", "2", "3*", "4"]


def test_build_request_forces_the_tool_and_carries_options(profile):
    history = [attempt(1, 0.812, best=True)]
    request = build_request(profile, history, model="claude-x", max_tokens=123, temperature=None,
                            thinking={"type": "disabled"}, effort="low")
    assert request["tool_choice"] == {"type": "tool", "name": TOOL_NAME, "disable_parallel_tool_use": True}
    assert request["tools"] == [tool_definition(profile)]
    assert request["system"] == SYSTEM_PROMPT
    assert request["model"] == "claude-x" and request["max_tokens"] == 123
    assert request["thinking"] == {"type": "disabled"} and request["output_config"] == {"effort": "low"}
    assert "extra_body" not in request  # no temperature unless asked for
    (turn,) = request["messages"]
    assert turn["role"] == "user" and turn["content"].startswith(f"[{PROMPT_VERSION}] PROFILE")
    assert "Propose attempt 2: call propose_allocation with a keep ratio for each of 3 buckets." in turn[
        "content"
    ]
    assert "FEEDBACK" not in turn["content"]

    again = build_request(profile, history, model="m", max_tokens=1, temperature=0.0, feedback="bad b7",
                          force_tool=False)
    assert again["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert again["extra_body"] == {"temperature": 0.0}  # SDK 2.x has no temperature argument
    assert again["messages"][0]["content"].endswith("FEEDBACK\nbad b7")
    assert "thinking" not in again and "output_config" not in again


def test_system_prompt_explains_the_task():
    phrases = ("keep ratio", "solver", "WHERE to prune", "sens", "Never repeat", "exactly once", "best one")
    for phrase in phrases:
        assert phrase in SYSTEM_PROMPT


def test_parse_valid_reply(profile):
    proposal = parse_response(message({"type": "text", "text": "ok"}, call(GOOD)), profile)
    assert proposal == Proposal({"b0": 0.5, "b1": 0.8, "b2": 0.35}, "taylor", GOOD["rationale"], (), 0.6)
    assert list(proposal.ratios) == ["b0", "b1", "b2"]
    assert proposal.to_json() == {"ratios": {"b0": 0.5, "b1": 0.8, "b2": 0.35}, "criterion": "taylor"}
    with pytest.raises(Exception):
        proposal.criterion = "l1"  # frozen


def test_parse_accepts_the_sdk_message_object(profile):
    sdk_message = anthropic.types.Message.model_validate(message(call(GOOD)))
    assert parse_response(sdk_message, profile).ratios == GOOD["ratios"]


@pytest.mark.parametrize(
    "data, note",
    [
        (with_ratios(b0=0.05), "b0: 0.05 raised to its min keep ratio 0.125"),
        (with_ratios(b0=0.0), "b0: 0 raised to its min keep ratio 0.125"),
        (with_ratios(b2=1.03), "b2: 1.03 clipped to 1"),
        (with_ratios(b1="0.8"), "b1: string '0.8' read as a number"),
        (with_ratios(b9=0.5), "dropped unknown bucket ids b9"),
        ({**GOOD, "criterion": " Taylor"}, "criterion ' Taylor' read as 'taylor'"),
        ({**GOOD, "criterion": "BN-scale"}, "criterion 'BN-scale' read as 'bn_scale'"),
        ({**GOOD, "confidence": 7}, "ignored invalid confidence 7"),
        ({**GOOD, "requireUnique": True}, "ignored unknown fields: requireUnique"),
        ({k: v for k, v in GOOD.items() if k != "rationale"}, "no rationale given"),
        ({**GOOD, "rationale": "x" * 5000}, "rationale truncated from 5000 to 1500 characters"),
    ],
)
def test_parse_repairs_harmless_problems_with_a_note(profile, data, note):
    proposal = parse_response(message(call(data)), profile)
    assert note in proposal.notes
    assert all(b["min_keep_ratio"] <= proposal.ratios[b["id"]] <= 1.0 for b in profile["buckets"])
    assert len(proposal.rationale) <= prompts.MAX_RATIONALE_CHARS


@pytest.mark.parametrize(
    "data, reason",
    [
        ({**GOOD, "ratios": {"b0": 0.5, "b2": 0.4}}, "'ratios' lacks buckets b1"),
        ({**GOOD, "ratios": {"layer1.*.conv1": 0.5}}, "unknown keys layer1.*.conv1 are not bucket ids"),
        ({**GOOD, "ratios": [0.5, 0.8, 0.35]}, "'ratios' must be an object"),
        ({**GOOD, "ratios": None}, "got null"),
        (with_ratios(b1="most"), "b1='most' is not a finite number"),
        (with_ratios(b1=True), "b1=True is not a finite number"),
        (with_ratios(b1=None), "b1=None is not a finite number"),
        (with_ratios(b1=[0.5]), "b1=[0.5] is not a finite number"),
        (with_ratios(b1=math.nan), "b1=nan is not a finite number"),
        (with_ratios(b1=math.inf), "b1=inf is not a finite number"),
        (with_ratios(b1="1e999"), "b1='1e999' is not a finite number"),
        (with_ratios(b1=50), "b1=50 is outside [0, 1]"),
        (with_ratios(b1=-0.2), "b1=-0.2 is outside [0, 1]"),
        (with_ratios(b0=1, b1=1.0, b2=1.0), "prunes nothing"),
        ({**GOOD, "criterion": "magnitude"}, "criterion 'magnitude' is not one of"),
        ({k: v for k, v in GOOD.items() if k != "criterion"}, "criterion None is not one of"),
        ({**GOOD, "criterion": 3}, "criterion 3 is not one of"),
        ([GOOD], "must be a JSON object, got list"),
        ("import os; os.system('x')", "must be a JSON object, got str"),
    ],
)
def test_parse_rejects_invalid_input_with_usable_feedback(profile, data, reason):
    with pytest.raises(ProposalError) as info:
        parse_response(message(call(data)), profile)
    err = info.value
    assert reason in str(err) and err.retryable and isinstance(err, LLMError)
    assert err.feedback.startswith("Your previous reply was rejected: ") and TOOL_NAME in err.feedback


@pytest.mark.parametrize(
    "reply, kind, reason",
    [
        (message({"type": "text", "text": "Here is my plan: b0=0.5"}, stop="end_turn"), "no_tool_call",
         "contained no tool call (stop_reason=end_turn); text was: 'Here is my plan: b0=0.5'"),
        (message(stop="max_tokens"), "no_tool_call", "hit max_tokens before calling the tool"),
        (message(call(GOOD), stop="max_tokens"), "truncated", "cut off at max_tokens"),
        (message(call(GOOD, name="bash")), "wrong_tool", "called ['bash'], not propose_allocation"),
        ({"content": "not a list", "stop_reason": "tool_use"}, "no_tool_call", "contained no tool call"),
    ],
)
def test_parse_rejects_replies_without_a_usable_tool_call(profile, reply, kind, reason):
    with pytest.raises(ProposalError) as info:
        parse_response(reply, profile)
    assert info.value.kind == kind and reason in str(info.value) and info.value.retryable


def test_parse_refusal_is_not_retryable(profile):
    details = {"type": "refusal", "category": "frontier_llm", "explanation": None}
    reply = message(stop="refusal", stop_details=details)
    with pytest.raises(ProposalError) as info:
        parse_response(reply, profile)
    assert info.value.kind == "refusal" and not info.value.retryable
    assert "stop_reason=refusal: frontier_llm" in str(info.value)


def test_parse_uses_the_first_of_several_calls(profile):
    proposal = parse_response(message(call(GOOD), call(with_ratios(b0=0.9))), profile)
    assert proposal.ratios["b0"] == 0.5 and "2 propose_allocation calls; used the first" in proposal.notes


# ------------------------------------------------------------------------------------------------
# Model choice


@pytest.mark.parametrize(
    "model, forced, sampling, thinking",
    [
        ("claude-sonnet-5", True, False, {"type": "disabled"}),
        ("claude-opus-4-8", True, False, {"type": "disabled"}),
        ("claude-opus-4-6", True, True, {"type": "disabled"}),
        ("claude-sonnet-4-5-20250929", True, True, {"type": "disabled"}),
        ("claude-haiku-4-5", True, True, {"type": "disabled"}),
        ("claude-sonnet-5-5", False, False, None),
        ("anthropic.claude-haiku-5-5", False, False, None),
        ("claude-fable-5-1", False, False, None),
        ("claude-3-5-sonnet-20241022", True, True, None),
        ("claude-mythos-preview", False, False, None),
        ("my-proxy-model", True, False, {"type": "disabled"}),
    ],
)
def test_model_traits(model, forced, sampling, thinking):
    traits = model_traits(model)
    assert (traits.forced_tool, traits.sampling, traits.thinking_off) == (forced, sampling, thinking)


def test_default_model_is_listed_by_the_sdk_and_not_deprecated():
    from typing import get_args

    from anthropic.resources.messages.messages import DEPRECATED_MODELS

    listed = {m for arg in get_args(anthropic.types.Model) for m in get_args(arg)}
    model = default_model()
    assert model in listed and model not in DEPRECATED_MODELS
    assert model_traits(model).forced_tool  # the design's forced tool call works with the default
    assert ClaudeAnalyst(api_key=KEY).model == model


# ------------------------------------------------------------------------------------------------
# The real SDK against the local server


def test_valid_tool_call(profile):
    with MockAnthropicServer([ToolUse(GOOD, usage=(1200, 80))]) as server:
        analyst = analyst_for(server)
        proposal = analyst.propose(profile, [])
    assert proposal.ratios == GOOD["ratios"] and proposal.criterion == "taylor" and proposal.confidence == 0.6
    (request,) = server.requests
    assert request.path == "/v1/messages" and request.credential == KEY
    assert "anthropic-version" in request.headers
    body = request.body
    assert body["tool_choice"] == {"type": "tool", "name": TOOL_NAME, "disable_parallel_tool_use": True}
    assert body["tools"][0]["name"] == TOOL_NAME and body["thinking"] == {"type": "disabled"}
    assert "temperature" not in body  # the default model rejects sampling parameters
    assert body["model"] == analyst.model
    stats = analyst.stats
    counts = (stats["calls"], stats["invalid"], stats["input_tokens"], stats["output_tokens"])
    assert counts == (1, 0, 1200, 80)
    assert stats["latency_s"] > 0 and stats["last_error"] is None


@pytest.mark.parametrize(
    "bad, reason",
    [
        (ToolUse(with_ratios(b1="most", b2=[1])), "b1='most' is not a finite number"),
        (ToolUse({**GOOD, "ratios": {"conv1": 0.5}}), "'ratios' lacks buckets b0, b1, b2"),
        (Text("I suggest keeping 50% everywhere."), "contained no tool call"),
        (ToolUse({**GOOD, "criterion": "hessian"}), "criterion 'hessian' is not one of"),
    ],
)
def test_invalid_reply_is_reasked_with_feedback(profile, bad, reason):
    with MockAnthropicServer([bad, ToolUse(GOOD)]) as server:
        analyst = analyst_for(server)
        proposal = analyst.propose(profile, [])
    assert proposal.ratios == GOOD["ratios"]
    first, second = (r.text() for r in server.requests)
    assert "FEEDBACK" not in first
    assert "FEEDBACK\nYour previous reply was rejected: " in second and reason in second
    assert analyst.stats["calls"] == 2 and analyst.stats["invalid"] == 1
    assert reason in analyst.stats["last_error"]


def test_invalid_replies_to_the_end_make_the_analyst_unavailable(profile):
    with MockAnthropicServer([Text("no"), Text("still no")]) as server:
        with pytest.raises(AnalystUnavailable) as info:
            analyst_for(server, max_invalid=1).propose(profile, [])
    assert info.value.kind == "invalid_output" and "2 invalid replies in a row" in str(info.value)
    assert len(server.requests) == 2 and server.remaining == 0


def test_overloaded_529_is_retried_by_the_sdk(profile):
    with MockAnthropicServer([Status(529, headers=FAST), ToolUse(GOOD)]) as server:
        analyst = analyst_for(server)
        assert analyst.propose(profile, []).ratios == GOOD["ratios"]
    assert len(server.requests) == 2 and analyst.stats["calls"] == 1  # the retry is the SDK's


def test_rate_limit_429_with_retry_after_is_retried(profile):
    with MockAnthropicServer([Status(429, headers={"retry-after": "0.01"}), ToolUse(GOOD)]) as server:
        assert analyst_for(server).propose(profile, []).criterion == "taylor"
    assert len(server.requests) == 2


def test_timeout_makes_the_analyst_unavailable(profile):
    start = time.perf_counter()
    with MockAnthropicServer([Delay(5.0, then=ToolUse(GOOD))]) as server:
        with pytest.raises(AnalystUnavailable) as info:
            analyst_for(server, timeout=0.3, max_retries=0).propose(profile, [])
    assert info.value.kind == "timeout" and "timed out after 0.3s" in str(info.value)
    assert time.perf_counter() - start < 3.0  # neither the client nor close() waited out the delay


def test_repeated_500s_make_the_analyst_unavailable(profile):
    with MockAnthropicServer([Status(500, headers=FAST)] * 3 + [ToolUse(GOOD)]) as server:
        analyst = analyst_for(server, max_retries=2)
        with pytest.raises(AnalystUnavailable) as info:
            analyst.propose(profile, [])
    assert info.value.kind == "server" and info.value.status == 500
    assert len(server.requests) == 3 and server.remaining == 1  # 1 try + 2 SDK retries
    assert analyst.stats["last_error"].startswith("server: ")


def test_refusal_makes_the_analyst_unavailable_without_reasking(profile):
    with MockAnthropicServer([Refusal(category="frontier_llm"), ToolUse(GOOD)]) as server:
        with pytest.raises(AnalystUnavailable) as info:
            analyst_for(server).propose(profile, [])
    assert info.value.kind == "refusal" and "frontier_llm" in str(info.value)
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "step, kind",
    [(Status(400, {"type": "error", "error": {"type": "invalid_request_error",
                                              "message": "`temperature` is deprecated for this model."}}),
      "bad_request"),
     (Status(404), "bad_request"),
     (Status(403), "auth")],
)
def test_client_errors_are_not_retried(profile, step, kind):
    with MockAnthropicServer([step, ToolUse(GOOD)]) as server:
        with pytest.raises(AnalystUnavailable) as info:
            analyst_for(server).propose(profile, [])
    assert info.value.kind == kind and len(server.requests) == 1
    if kind == "bad_request" and step.body:
        assert "`temperature` is deprecated for this model." in str(info.value)


def test_history_of_attempt_1_reaches_the_second_request(profile):
    first = attempt(1, 0.812, best=True)
    with MockAnthropicServer([ToolUse(GOOD), ToolUse(with_ratios(b0=0.6))]) as server:
        analyst = analyst_for(server)
        analyst.propose(profile, [])
        analyst.propose(profile, [first])
    before, after = (r.text() for r in server.requests)
    assert "attempts: none yet" in before and "2.031G" not in before
    assert "1* | claude | l1 | 2.031G | 0.497 | in | 0.8120 | scaled pruning by 0.94 to fit the band" in after
    assert "#1* prop 0.45 0.6 0.7" in after and "Propose attempt 2" in after
    assert server.requests[1].body["tool_choice"]["type"] == "tool"


def test_models_that_reject_forced_tools_get_auto_tool_choice(profile):
    with MockAnthropicServer([Text("Let me think about b1 first."), ToolUse(GOOD)]) as server:
        analyst = analyst_for(server, model="claude-sonnet-5-5")
        assert analyst.propose(profile, []).ratios == GOOD["ratios"]
    body = server.requests[0].body
    assert body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert "thinking" not in body and "temperature" not in body and body["max_tokens"] == 16000
    assert "Answer only by calling propose_allocation" in server.requests[1].text()


def test_temperature_is_sent_to_models_that_accept_it(profile):
    with MockAnthropicServer([ToolUse(GOOD)]) as server:
        analyst_for(server, model="claude-sonnet-4-6", temperature=0.0).propose(profile, [])
    assert server.requests[0].body["temperature"] == 0.0


def test_injected_client_is_used(profile):
    with MockAnthropicServer([ToolUse(GOOD)]) as server:
        client = anthropic.Anthropic(api_key=KEY, base_url=server.base_url, max_retries=0)
        assert ClaudeAnalyst.available(client=client)
        analyst = ClaudeAnalyst(client=client, model="claude-opus-4-8")
        assert analyst.propose(profile, []).criterion == "taylor"
    assert server.requests[0].body["model"] == "claude-opus-4-8"


def test_availability_follows_the_key(monkeypatch, profile):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    assert not ClaudeAnalyst.available()
    analyst = ClaudeAnalyst()
    with pytest.raises(AnalystUnavailable) as info:
        analyst.propose(profile, [])  # no network: fails before any client exists
    assert info.value.kind == "no_key" and analyst.stats["calls"] == 0
    assert ClaudeAnalyst.available(KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    assert ClaudeAnalyst.available()


def test_api_key_never_appears_in_logs_exceptions_or_stats(profile, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, the SDK's and httpx's included
    echo = {"type": "error", "error": {"type": "authentication_error", "message": f"bad key {KEY}"}}
    script = [
        ToolUse(GOOD),
        Text("no tool"), ToolUse(GOOD),
        Status(500, headers=FAST), Status(500, headers=FAST),
        Status(401, echo),  # a proxy that echoes the key back
        Refusal(),
        Delay(3.0), Delay(3.0),  # the SDK retries a timeout once
    ]
    errors: list[AnalystUnavailable] = []
    with MockAnthropicServer(script) as server:
        analyst = analyst_for(server, max_retries=1, timeout=0.3)
        for _ in range(6):
            try:
                analyst.propose(profile, [attempt(1, 0.8, best=True)])
            except AnalystUnavailable as err:
                errors.append(err)
    assert [e.kind for e in errors] == ["server", "auth", "refusal", "timeout"]
    assert all(r.credential == KEY for r in server.requests)  # the key did travel
    assert "[redacted]" in str(errors[1])
    texts = [caplog.text, repr(analyst), json.dumps(analyst.stats, default=str)]
    texts += [s for e in errors for s in (str(e), repr(e), e.reason)]
    assert caplog.text and all(KEY not in t for t in texts)


# ------------------------------------------------------------------------------------------------
# The mock server itself


def test_server_routes_exhaustion_and_callables():
    seen = []

    def echo(request):
        seen.append(request.body["max_tokens"])
        return Status(200, {"id": "msg_x", "type": "message", "role": "assistant", "model": "m",
                            "content": [{"type": "text", "text": "raw"}], "stop_reason": "end_turn",
                            "usage": {"input_tokens": 1, "output_tokens": 1}})

    with MockAnthropicServer([echo]) as server:
        client = anthropic.Anthropic(api_key=KEY, base_url=server.base_url, max_retries=3)
        reply = client.messages.create(model="m", max_tokens=7, messages=[{"role": "user", "content": "hi"}])
        assert reply.content[0].text == "raw" and seen == [7]
        with pytest.raises(anthropic.InternalServerError, match="script exhausted"):
            client.messages.create(model="m", max_tokens=7, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(anthropic.NotFoundError):
            client.models.retrieve("claude-x")
    assert [r.path for r in server.requests] == ["/v1/messages", "/v1/messages", "/v1/models/claude-x"]


def test_server_closes_promptly_with_a_request_in_flight():
    before = set(threading.enumerate())
    server = MockAnthropicServer([Delay(30.0)]).start()
    client = anthropic.Anthropic(api_key=KEY, base_url=server.base_url, max_retries=0, timeout=20)
    hello = [{"role": "user", "content": "x"}]
    worker = threading.Thread(target=lambda: client.messages.create(model="m", max_tokens=1, messages=hello))
    worker.start()
    while not server.requests:
        time.sleep(0.01)
    start = time.perf_counter()
    server.close()
    worker.join(timeout=5)
    assert time.perf_counter() - start < 2.0 and not worker.is_alive()
    assert set(threading.enumerate()) <= before  # serving and handler threads are all gone


def test_llm_module_imports_without_the_sdk_being_loaded():
    code = (
        "import sys, fxprune.policies.agentic.llm, fxprune.policies.agentic.prompts, "
        "fxprune.testing.anthropic_server; print('anthropic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
