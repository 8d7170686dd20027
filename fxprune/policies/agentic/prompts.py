"""What the Analysis agent is told and how its answer is read back.

Pure functions only: no SDK import, no I/O. :func:`build_request` turns the Profiling agent's
*profile* and the Master's *history* into the keyword arguments of
``anthropic.Anthropic().messages.create``; :func:`parse_response` turns the reply into a
:class:`Proposal`, treating everything in it as untrusted data.

The contract with the model is one tool, ``propose_allocation``, whose input is::

    {"rationale": str, "criterion": one of profile["criteria"],
     "ratios": {bucket id: keep ratio in [min_keep_ratio, 1]}, "confidence": number in [0, 1]}

``rationale`` comes first in the schema on purpose: with a forced tool call the model cannot
write text before the call, so the rationale is written before the numbers it explains.

Validation rules of :func:`parse_response` (each rejection raises :class:`ProposalError`, whose
message is written to be sent back to the model as feedback):

* reply with ``stop_reason == "refusal"``: rejected, not retryable;
* no ``propose_allocation`` call, a call cut off at ``max_tokens``, input that is not an object:
  rejected;
* a bucket missing from ``ratios``: rejected. Filling it with 1.0 would silently mean "do not
  prune here" and push the solver to prune every other bucket harder; the schema marks every
  bucket required, so an omission is a mistake worth one re-ask;
* keys that are not bucket ids: dropped with a note (current models sometimes invent keys);
* a ratio that is not a number (bools and containers included), NaN or infinite: rejected.
  A string holding a finite number is accepted with a note;
* a ratio below 0 or above 1.05: rejected as absurd (most likely a percentage or a prune
  ratio); in (1, 1.05] clipped to 1, in [0, min_keep_ratio) clipped up to the bucket's floor,
  each with a note;
* every ratio 1.0: rejected (the proposal prunes nothing, so the solver has nothing to scale);
* criterion not among ``profile["criteria"]`` after case/spacing normalisation: rejected;
* rationale missing or not a string: empty, with a note; longer than
  :data:`MAX_RATIONALE_CHARS`: truncated, with a note;
* confidence missing or invalid: ``None`` (invalid values get a note).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from fxprune.errors import LLMError

__all__ = [
    "PROMPT_VERSION",
    "TOOL_NAME",
    "MAX_RATIONALE_CHARS",
    "SYSTEM_PROMPT",
    "Proposal",
    "ProposalError",
    "tool_definition",
    "render_profile",
    "render_history",
    "render_user_message",
    "build_request",
    "parse_response",
]

PROMPT_VERSION = "agentic-v1"
TOOL_NAME = "propose_allocation"
MAX_RATIONALE_CHARS = 1500
DETAIL_LAST = 6  # attempts whose ratio vectors are shown in full (plus the best one)
_ABSURD_RATIO = 1.05  # above this a "keep ratio" is most likely a percentage
_LABEL_CHARS = 60

SYSTEM_PROMPT = """\
You are the Analysis agent of fxprune, a compiler that prunes channels (and attention heads) of a \
neural network until its multiply-accumulate count (MACs) fits a budget.

The user message holds a profile of the model and the attempts made so far. The channels of the \
model are split into buckets: a bucket is a set of structurally identical channel groups (for \
example the first conv of every bottleneck of one stage), and all groups of a bucket share one \
keep ratio.

Decide:
1. ratios: for every bucket id, the keep ratio, i.e. the fraction of its units that SURVIVE \
(1.0 = keep all), between the bucket's min keep ratio and 1.0.
2. criterion: one importance criterion from the profile's list. It ranks the units inside each \
group, so it decides which units go once the counts are fixed.
3. rationale: a few sentences explaining the allocation.

You do not have to hit the budget. A deterministic solver projects your ratios onto the MAC band \
(rescaling the amount of pruning while keeping your allocation's shape as far as it can, rounding \
keep counts to hardware-friendly multiples and honouring min keep ratios), so the budget is met \
whatever you propose. Each attempt's solver note says how it changed the proposal. Spend your \
effort on WHERE to prune:
- mac% is the share of base MACs that touch a bucket (shares overlap: a layer between two pruned \
buckets counts in both, and its MACs scale with the product of their keep ratios). Pruning where \
mac% is high buys the most MACs.
- sens lists (keep ratio: quality) pairs measured with only that bucket pruned and the rest \
intact. A flat curve means the bucket tolerates pruning; a steep one means protect it. Prefer \
buckets that give the most MACs per unit of quality lost.
- imp describes per-unit importance inside a group (mean 1): a high cv with a low p10 means a \
tail of weak units that is cheap to remove; a low cv means all units matter alike.
- The quality metric is named in the profile; higher is better.

Learn from the history: compare the quality of in-band attempts, refine around the best one \
(marked *), move away from what scored poorly, and read the solver notes. Never repeat an earlier \
proposal: a repeat costs an evaluation and teaches nothing. Change several buckets by at least \
0.05 or switch the criterion; if quality has plateaued, try a structurally different allocation.

Answer by calling the propose_allocation tool exactly once, with a number for every bucket id \
listed in the profile and nothing else."""


class ProposalError(LLMError):
    """The analyst's reply could not be turned into a valid :class:`Proposal`.

    Attributes:
        reason: what was wrong, phrased so that it can be sent back to the model.
        retryable: False when asking again is pointless (the model refused).
        kind: short machine-readable category ("refusal", "no_tool_call", "invalid_input", ...).
    """

    def __init__(self, reason: str, *, retryable: bool = True, kind: str = "invalid_input"):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.kind = kind

    @property
    def feedback(self) -> str:
        """The text appended to the next request so that the model can fix its reply."""
        return (
            f"Your previous reply was rejected: {self.reason}\n"
            f"Call {TOOL_NAME} again with a corrected input."
        )


@dataclass(frozen=True)
class Proposal:
    """A validated allocation proposed by an analyst.

    Attributes:
        ratios: keep ratio per bucket id, for every bucket of the profile, in profile order.
        criterion: the importance criterion, one of ``profile["criteria"]``.
        rationale: the analyst's explanation (capped at :data:`MAX_RATIONALE_CHARS`).
        notes: what validation changed (clipped ratios, dropped keys, ...), for the report.
        confidence: the analyst's self-reported confidence in [0, 1], if it gave one.
    """

    ratios: dict[str, float]
    criterion: str
    rationale: str
    notes: tuple[str, ...] = ()
    confidence: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The proposal as plain JSON types (the ``proposal`` entry of a history record)."""
        return {"ratios": dict(self.ratios), "criterion": self.criterion}


# ----------------------------------------------------------------------------------------------
# Tool definition


def tool_definition(profile: Mapping[str, Any], *, strict: bool = False) -> dict[str, Any]:
    """The ``propose_allocation`` tool for one profile.

    Every bucket id is an explicit, required property of ``ratios`` (no free-form map), and the
    criterion is an enum of the profile's criteria, so the schema itself tells the model what is
    allowed.

    Args:
        profile: the Profiling agent's profile.
        strict: emit a schema for the API's strict (grammar-constrained) tool mode, which does not
            support numeric or length bounds; the bounds then move into the descriptions.

    Returns:
        A tool definition for the ``tools`` argument of ``messages.create``.
    """
    buckets = _buckets(profile)

    def number(lo: float, hi: float, description: str) -> dict[str, Any]:
        if strict:
            return {"type": "number", "description": f"{description} ({lo:g} to {hi:g})"}
        return {"type": "number", "minimum": lo, "maximum": hi, "description": description}

    ratio_props = {
        b["id"]: number(float(b.get("min_keep_ratio", 0.0)), 1.0, f"keep ratio of {_label(b)}")
        for b in buckets
    }
    rationale: dict[str, Any] = {
        "type": "string",
        "description": f"Why this allocation, in a few sentences (at most {MAX_RATIONALE_CHARS} characters).",
    }
    if not strict:
        rationale["maxLength"] = MAX_RATIONALE_CHARS
    schema = {
        "type": "object",
        "properties": {
            "rationale": rationale,
            "criterion": {
                "type": "string",
                "enum": list(_criteria(profile)),
                "description": "Importance criterion that ranks units inside each group.",
            },
            "ratios": {
                "type": "object",
                "description": "Keep ratio (fraction of units kept) for every bucket id.",
                "properties": ratio_props,
                "required": [b["id"] for b in buckets],
                "additionalProperties": False,
            },
            "confidence": number(0.0, 1.0, "How confident you are that this beats the best attempt"),
        },
        "required": ["rationale", "criterion", "ratios"],
        "additionalProperties": False,
    }
    tool: dict[str, Any] = {
        "name": TOOL_NAME,
        "description": (
            "Propose how many units each bucket keeps (as keep ratios) and which importance "
            "criterion ranks them. A solver then fits the proposal into the MAC band and the "
            "pruned model is scored; the result appears in the next request's history."
        ),
        "input_schema": schema,
    }
    if strict:
        tool["strict"] = True
    return tool


# ----------------------------------------------------------------------------------------------
# Rendering (compact, table-like text; deterministic for golden tests)


def render_profile(profile: Mapping[str, Any]) -> str:
    """The profile as compact text: budget as a fraction of base MACs, one row per bucket."""
    base = float(profile["base_macs"])
    budget = float(profile["budget_macs"])
    lo, hi = (float(x) for x in profile.get("band", (budget, budget)))
    lines = [f"model: {_clean(str(profile.get('model', '?')), 80)}"]
    if profile.get("cost_unit") == "ns":  # a latency budget: the cost is predicted latency, not MACs
        lines.append(
            f"predicted latency (the cost to fit, instead of MACs): base {base / 1e6:.4g} ms | budget "
            f"{budget / 1e6:.4g} ms = {budget / base:.3f} of base | band [{lo / base:.3f}, {hi / base:.3f}] of base"
        )
    else:
        lines.append(
            f"MACs: base {_macs(base)} | budget {_macs(budget)} = {budget / base:.3f} of base"
            f" | band [{_macs(lo)}, {_macs(hi)}] = [{lo / base:.3f}, {hi / base:.3f}]"
        )
    if profile.get("min_macs") is not None:
        floor = float(profile["min_macs"])
        lines.append(f"floor (every bucket at its min keep): {_macs(floor)} = {floor / base:.3f} of base")
    lines.append(f"quality: {_clean(str(profile.get('quality_metric', 'unknown')), 120)}")
    lines.append("criteria: " + ", ".join(_criteria(profile)))
    frozen = [_clean(str(f), _LABEL_CHARS) for f in profile.get("frozen", ()) or ()]
    if frozen:
        lines.append("frozen (never pruned): " + "; ".join(frozen))
    lines.append("")
    lines.append("buckets (units = channels or heads per group; min = min keep ratio;")
    lines.append(
        "imp = per-unit importance cv/p10/p50, mean 1; sens = keep ratio:quality, this bucket alone):"
    )
    lines.append("id | groups | units | kind | min | mac% | imp cv/p10/p50 | sens | label")
    for b in _buckets(profile):
        imp = b.get("importance") or {}
        sens = " ".join(f"{_ratio(r)}:{_ratio(q)}" for r, q in _pairs(b.get("sensitivity")))
        lines.append(
            " | ".join(
                [
                    b["id"],
                    str(b.get("groups", "?")),
                    str(b.get("units_per_group", "?")),
                    str(b.get("kind", "channels")),
                    _ratio(b.get("min_keep_ratio")),
                    _pct(b.get("mac_share")),
                    "/".join(_num(imp.get(k)) for k in ("cv", "p10", "p50")),
                    sens or "-",
                    _label(b),
                ]
            )
        )
    return "\n".join(lines)


def render_history(history: Sequence[Mapping[str, Any]], profile: Mapping[str, Any]) -> str:
    """Earlier attempts as compact text: one summary row each, ratio rows for the recent ones.

    The best attempt is marked ``*``: the latest one the Master flagged ``best_so_far``, else the
    in-band attempt with the highest quality.
    """
    if not history:
        return "attempts: none yet (this is the first proposal)."
    base = float(profile["base_macs"])
    ids = [b["id"] for b in _buckets(profile)]
    best = _best_index(history)
    lines = ["attempts (oldest first; * = best so far; MACs/base; band = in or out of the MAC band):"]
    lines.append("# | analyst | criterion | MACs | /base | band | quality | solver note")
    for i, att in enumerate(history):
        proposal = att.get("proposal") or {}
        macs = att.get("macs")
        lines.append(
            " | ".join(
                [
                    f"{att.get('attempt', i + 1)}{'*' if i == best else ''}",
                    _clean(str(att.get("analyst", "?")), 20),
                    _clean(str(proposal.get("criterion", "?")), 20),
                    _macs(float(macs)) if _is_number(macs) else "?",
                    f"{float(macs) / base:.3f}" if _is_number(macs) else "?",
                    {True: "in", False: "out"}.get(att.get("in_band"), "?"),
                    _num(att.get("quality"), digits=4),
                    _clean(str(att.get("solver_note") or att.get("error") or "-"), 160),
                ]
            )
        )
    detail = sorted(set(range(max(0, len(history) - DETAIL_LAST), len(history))) | ({best} - {None}))
    lines.append("")
    lines.append("keep ratios (prop = proposed, proj = after the solver); columns: " + " ".join(ids))
    for i in detail:
        att = history[i]
        tag = f"#{att.get('attempt', i + 1)}{'*' if i == best else ''}"
        for row, source in (("prop", att.get("proposal")), ("proj", att.get("projected"))):
            ratios = (source or {}).get("ratios") or {}
            if ratios:
                lines.append(f"{tag} {row} " + " ".join(_ratio(ratios.get(k)) for k in ids))
    return "\n".join(lines)


def render_user_message(
    profile: Mapping[str, Any], history: Sequence[Mapping[str, Any]], feedback: str | None = None
) -> str:
    """The whole user turn: profile, history, the request, and feedback on an invalid reply."""
    n = len(history) + 1
    parts = [
        f"[{PROMPT_VERSION}] PROFILE",
        render_profile(profile),
        "",
        "HISTORY",
        render_history(history, profile),
        "",
        f"Propose attempt {n}: call {TOOL_NAME} with a keep ratio for each of "
        f"{len(_buckets(profile))} buckets.",
    ]
    if feedback:
        parts += ["", "FEEDBACK", _clean(feedback, 2000, keep_newlines=True)]
    return "\n".join(parts)


def build_request(
    profile: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    *,
    model: str,
    max_tokens: int,
    temperature: float | None,
    feedback: str | None = None,
    force_tool: bool = True,
    thinking: Mapping[str, Any] | None = None,
    effort: str | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for ``client.messages.create(**request)``.

    Args:
        profile: the Profiling agent's profile.
        history: earlier attempts, oldest first.
        model: Claude model id.
        max_tokens: output token cap.
        temperature: sampling temperature, or None to leave it out. The installed SDK has no
            ``temperature`` argument any more (current models reject sampling parameters), so it
            travels in ``extra_body``; only pass it for models that still accept it.
        feedback: what was wrong with the previous reply, appended to the user turn.
        force_tool: force the ``propose_allocation`` call (``tool_choice`` type "tool"). False
            gives ``tool_choice`` "auto" for models that reject forced tool use; the system
            prompt still asks for exactly one call.
        thinking: a ``thinking`` config to send (e.g. ``{"type": "disabled"}`` next to a forced
            tool call on models that think by default), or None to leave it out.
        effort: ``output_config.effort`` ("low" ... "max"), or None to leave it out.
        strict: use the strict (grammar-constrained) tool schema.

    Returns:
        A dict with ``model``, ``max_tokens``, ``system``, ``messages``, ``tools`` and
        ``tool_choice``, plus ``thinking``, ``output_config`` and ``extra_body`` when asked for.
    """
    tool_choice: dict[str, Any] = (
        {"type": "tool", "name": TOOL_NAME, "disable_parallel_tool_use": True}
        if force_tool
        else {"type": "auto", "disable_parallel_tool_use": True}
    )
    request: dict[str, Any] = {
        "model": model,
        "max_tokens": int(max_tokens),
        "system": SYSTEM_PROMPT,
        "messages": [{"role": "user", "content": render_user_message(profile, history, feedback)}],
        "tools": [tool_definition(profile, strict=strict)],
        "tool_choice": tool_choice,
    }
    if thinking is not None:
        request["thinking"] = dict(thinking)
    if effort is not None:
        request["output_config"] = {"effort": effort}
    if temperature is not None:
        request["extra_body"] = {"temperature": float(temperature)}
    return request


# ----------------------------------------------------------------------------------------------
# Parsing


def parse_response(message: Any, profile: Mapping[str, Any]) -> Proposal:
    """Validate a Messages API reply and turn its tool call into a :class:`Proposal`.

    Args:
        message: the SDK's ``Message`` object or an equivalent dict.
        profile: the profile the request was built from.

    Returns:
        The validated proposal; ``notes`` lists everything validation changed.

    Raises:
        ProposalError: the reply is unusable; ``str(err)`` is meant as feedback for the model.
    """
    msg = _as_dict(message)
    stop = msg.get("stop_reason")
    content = msg.get("content")
    blocks = [_as_dict(b) for b in content] if isinstance(content, list) else []
    if stop == "refusal":
        details = msg.get("stop_details") if isinstance(msg.get("stop_details"), Mapping) else {}
        why = ", ".join(_clean(str(details[k]), 200) for k in ("category", "explanation") if details.get(k))
        raise ProposalError(
            "the model refused to answer (stop_reason=refusal" + (f": {why})" if why else ")"),
            retryable=False,
            kind="refusal",
        )
    calls = [b for b in blocks if b.get("type") == "tool_use"]
    if not calls:
        text = " ".join(str(b.get("text", "")) for b in blocks if b.get("type") == "text")
        why = "hit max_tokens before calling the tool" if stop == "max_tokens" else "contained no tool call"
        raise ProposalError(
            f"the reply {why} (stop_reason={stop}); text was: {_clean(text, 200)!r}. "
            f"Answer only by calling {TOOL_NAME}.",
            kind="no_tool_call",
        )
    ours = [b for b in calls if b.get("name") == TOOL_NAME]
    if not ours:
        names = sorted({_clean(str(b.get("name")), 40) for b in calls})
        raise ProposalError(f"the reply called {names}, not {TOOL_NAME}", kind="wrong_tool")
    if stop == "max_tokens":
        raise ProposalError(
            f"the {TOOL_NAME} call was cut off at max_tokens; keep the rationale shorter", kind="truncated"
        )
    data = ours[0].get("input")
    if not isinstance(data, Mapping):
        raise ProposalError(f"the tool input must be a JSON object, got {type(data).__name__}")
    notes: list[str] = []
    if len(ours) > 1:
        notes.append(f"{len(ours)} {TOOL_NAME} calls; used the first")
    extra = sorted(set(map(str, data)) - {"rationale", "criterion", "ratios", "confidence"})
    if extra:
        notes.append("ignored unknown fields: " + ", ".join(_clean(k, 40) for k in extra[:10]))
    ratios = _parse_ratios(data.get("ratios"), profile, notes)
    criterion = _parse_criterion(data.get("criterion"), profile, notes)
    rationale = _parse_rationale(data.get("rationale"), notes)
    confidence = _parse_confidence(data.get("confidence"), notes)
    return Proposal(ratios, criterion, rationale, tuple(notes), confidence)


def _parse_ratios(raw: Any, profile: Mapping[str, Any], notes: list[str]) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        raise ProposalError(f"'ratios' must be an object mapping bucket ids to numbers, got {_type(raw)}")
    buckets = _buckets(profile)
    ids = [b["id"] for b in buckets]
    unknown = sorted(str(k) for k in raw if k not in ids)
    missing = [i for i in ids if i not in raw]
    if missing:
        msg = f"'ratios' lacks buckets {_few(missing)}; give a keep ratio for every one of {_few(ids)}"
        if unknown:
            msg += f" (unknown keys {_few(unknown)} are not bucket ids)"
        raise ProposalError(msg)
    if unknown:
        notes.append(f"dropped unknown bucket ids {_few(unknown)}")
    out: dict[str, float] = {}
    errors: list[str] = []
    for b in buckets:
        value = _to_float(raw[b["id"]], b["id"], notes)
        if value is None:
            errors.append(f"{b['id']}={_clean(repr(raw[b['id']]), 30)} is not a finite number")
            continue
        floor = float(b.get("min_keep_ratio", 0.0))
        if value < 0.0 or value > _ABSURD_RATIO:
            errors.append(f"{b['id']}={value:g} is outside [0, 1] (a keep ratio, not a percentage)")
        elif value > 1.0:
            notes.append(f"{b['id']}: {value:g} clipped to 1")
            value = 1.0
        elif value < floor:
            notes.append(f"{b['id']}: {value:g} raised to its min keep ratio {floor:g}")
            value = floor
        out[b["id"]] = value
    if errors:
        raise ProposalError("invalid ratios: " + "; ".join(errors[:8]) + ("; ..." if len(errors) > 8 else ""))
    if all(v >= 1.0 for v in out.values()):
        raise ProposalError("every ratio is 1.0, so the proposal prunes nothing; the budget needs pruning")
    return out


def _to_float(value: Any, key: str, notes: list[str]) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        notes.append(f"{key}: string {_clean(value, 20)!r} read as a number")
        value = number
    if not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _parse_criterion(raw: Any, profile: Mapping[str, Any], notes: list[str]) -> str:
    criteria = _criteria(profile)
    if isinstance(raw, str):
        key = _norm(raw)
        for c in criteria:
            if _norm(c) == key:
                if c != raw:
                    notes.append(f"criterion {_clean(raw, 30)!r} read as {c!r}")
                return c
    raise ProposalError(f"criterion {_clean(repr(raw), 40)} is not one of {list(criteria)}")


def _parse_rationale(raw: Any, notes: list[str]) -> str:
    if not isinstance(raw, str):
        notes.append("no rationale given")
        return ""
    text = _clean(raw, len(raw) + 1, keep_newlines=True)
    if len(text) > MAX_RATIONALE_CHARS:
        notes.append(f"rationale truncated from {len(text)} to {MAX_RATIONALE_CHARS} characters")
        text = text[: MAX_RATIONALE_CHARS - 1] + "…"
    return text


def _parse_confidence(raw: Any, notes: list[str]) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, (int, float)) and not isinstance(raw, bool) and 0.0 <= float(raw) <= 1.0:
        return float(raw)
    notes.append(f"ignored invalid confidence {_clean(repr(raw), 30)}")
    return None


# ----------------------------------------------------------------------------------------------
# Helpers


def _buckets(profile: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    buckets = list(profile.get("buckets") or ())
    ids = [b.get("id") for b in buckets]
    if not buckets or not all(isinstance(i, str) and i for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"profile needs buckets with unique, non-empty string ids, got {ids!r}")
    return buckets


def _criteria(profile: Mapping[str, Any]) -> tuple[str, ...]:
    criteria = tuple(str(c) for c in profile.get("criteria") or ())
    if not criteria:
        raise ValueError("profile lists no importance criteria")
    return criteria


def _best_index(history: Sequence[Mapping[str, Any]]) -> int | None:
    flagged = [i for i, a in enumerate(history) if a.get("best_so_far")]
    if flagged:
        return flagged[-1]
    scored = [
        (float(a["quality"]), -i)
        for i, a in enumerate(history)
        if a.get("in_band") and _is_number(a.get("quality"))
    ]
    return -max(scored)[1] if scored else None


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return dump()
    keys = ("type", "stop_reason", "stop_details", "content", "name", "input", "text")
    return {k: getattr(obj, k) for k in keys if hasattr(obj, k)}


def _pairs(raw: Any) -> Iterable[tuple[Any, Any]]:
    for item in raw or ():
        if isinstance(item, (list, tuple)) and len(item) == 2:
            yield item[0], item[1]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _num(x: Any, digits: int = 2) -> str:
    return f"{float(x):.{digits}f}" if _is_number(x) else "?"


def _ratio(x: Any) -> str:
    """A ratio with up to four decimals and no trailing zeros (0.0625, 0.5, 1)."""
    return f"{float(x):.4f}".rstrip("0").rstrip(".") if _is_number(x) else "?"


def _pct(x: Any) -> str:
    return f"{100 * float(x):.1f}" if _is_number(x) else "?"


def _macs(x: float) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3f}{unit}"
    return f"{x:.0f}"


def _label(bucket: Mapping[str, Any]) -> str:
    return _clean(str(bucket.get("label") or bucket["id"]), _LABEL_CHARS)


def _few(items: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(_clean(str(i), 40) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _type(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def _norm(s: str) -> str:
    return re.sub(r"[\s\-]+", "_", s.strip().lower())


def _clean(text: str, limit: int, *, keep_newlines: bool = False) -> str:
    """Printable text of at most ``limit`` characters (control characters dropped)."""
    allowed = "\n" if keep_newlines else ""
    text = "".join(ch if ch.isprintable() or ch in allowed else " " for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
