"""The Analysis agent backed by Claude: one tool call per proposal, through the ``anthropic`` SDK.

:class:`ClaudeAnalyst` builds the request with :func:`~fxprune.policies.agentic.prompts.build_request`,
calls ``messages.create`` and validates the reply with
:func:`~fxprune.policies.agentic.prompts.parse_response`. An invalid reply is re-asked with
feedback (``max_invalid`` times). Everything else that keeps Claude from answering (no key,
timeouts, 429, 529, 5xx, connection errors, 4xx, a refusal, or invalid replies to the end) raises
:class:`AnalystUnavailable`, so the Master has one exception to catch before it falls back to the
offline analyst.

The SDK is imported lazily (first call), so ``fxprune`` imports without it being used.

Model traits. Claude models differ in what a request may contain, and a wrong field is a 400:

* models of generation 5.5 (``claude-*-5-5``) and the Fable/Mythos lines reject forced tool use
  (``tool_choice`` type "tool" or "any"), sampling parameters and ``thinking: disabled``; they
  get ``tool_choice`` "auto", and a reply without the tool call is re-asked like any invalid one;
* generation 5 models and Claude Opus 4.7/4.8 reject non-default sampling parameters and think by
  default, and thinking is incompatible with a forced tool call, so a forced call goes out with
  ``thinking: {"type": "disabled"}`` and without ``temperature``;
* older models accept everything; ``temperature`` is sent (through ``extra_body``: SDK 2.x has no
  ``temperature`` argument any more).

:func:`model_traits` encodes these rules; ``tool_choice=`` overrides the choice.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import typing
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from fxprune.errors import LLMError
from fxprune.policies.agentic.prompts import Proposal, ProposalError, build_request, parse_response

__all__ = [
    "AnalystUnavailable",
    "ClaudeAnalyst",
    "ModelTraits",
    "model_traits",
    "default_model",
    "DEFAULT_MODEL",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "claude-sonnet-5"
"""The default model when the installed SDK cannot be inspected; see :func:`default_model`."""

# Preference order for the default model. Sonnet is the speed/cost tier this job needs (a few
# thousand input tokens and one short tool call per attempt, 5-20 attempts per run); the first
# choice is the newest Sonnet that still accepts a forced tool call (Sonnet 5.5 rejects it).
_PREFERRED_MODELS = ("claude-sonnet-5", "claude-opus-5", "claude-opus-4-8", "claude-sonnet-4-6")
_MAX_REASON_CHARS = 300


class AnalystUnavailable(LLMError):
    """Claude could not deliver a proposal this time; the caller should use the offline analyst.

    Attributes:
        reason: what happened (never contains the API key).
        kind: "no_key", "timeout", "connection", "rate_limit", "overloaded", "server", "auth",
            "bad_request", "http_<status>", "refusal", "invalid_output" or "client".
        status: the HTTP status code, when there was one.
    """

    def __init__(self, reason: str, *, kind: str, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.status = status


@dataclass(frozen=True)
class ModelTraits:
    """What a request to one model may contain.

    Attributes:
        forced_tool: the model accepts ``tool_choice`` type "tool".
        sampling: the model accepts a non-default ``temperature``.
        thinking_off: the ``thinking`` config that switches thinking off next to a forced tool
            call, or None when nothing needs to be sent.
    """

    forced_tool: bool
    sampling: bool
    thinking_off: Mapping[str, str] | None


_MODEL_ID = re.compile(r"claude-(?P<family>[a-z]+)-(?P<major>\d+)(?:-(?P<minor>\d{1,2}))?(?![\d.])")
_LEGACY_ID = re.compile(r"claude-(?:instant-)?\d(?:[.-]\d)?(?:-|$)")
_ALWAYS_THINKING = re.compile(r"claude-(?:fable|mythos)\b")


def model_traits(model: str) -> ModelTraits:
    """The request features one Claude model accepts (see the module docstring for the rules).

    Ids are matched anywhere in the string, so platform forms (``anthropic.claude-sonnet-5-5``,
    ``anthropic/claude-opus-5``) and dated snapshots work. Unknown ids are treated as current
    models that still accept a forced tool call: no temperature, thinking switched off.
    """
    match = _MODEL_ID.search(model)
    version = (int(match["major"]), int(match["minor"] or 0)) if match else None
    if _ALWAYS_THINKING.search(model) or (version is not None and version >= (5, 5)):
        return ModelTraits(forced_tool=False, sampling=False, thinking_off=None)
    if match is None or version is None:
        if _LEGACY_ID.search(model):  # claude-3-5-sonnet-..., claude-2.1: no thinking, sampling ok
            return ModelTraits(forced_tool=True, sampling=True, thinking_off=None)
        return ModelTraits(forced_tool=True, sampling=False, thinking_off={"type": "disabled"})
    modern = version >= (5, 0) or (match["family"] == "opus" and version >= (4, 7))
    return ModelTraits(forced_tool=True, sampling=not modern, thinking_off={"type": "disabled"})


def default_model() -> str:
    """The first of the preferred models that the installed SDK lists and does not deprecate.

    Reads ``anthropic.types.Model`` (the SDK's list of model ids) and the SDK's table of
    deprecated models at runtime. ``claude-sonnet-5`` is first: the newest Sonnet (the tier with
    the right speed and price for 5-20 short calls) that still accepts a forced tool call;
    Claude Sonnet 5.5 returns a 400 for forced ``tool_choice``. Falls back to
    :data:`DEFAULT_MODEL` when the SDK cannot be inspected.
    """
    try:
        import anthropic.types
        from anthropic.resources.messages import messages as sdk_messages
    except ImportError:
        return DEFAULT_MODEL
    listed = {a for arg in typing.get_args(anthropic.types.Model) for a in typing.get_args(arg)}
    deprecated = getattr(sdk_messages, "DEPRECATED_MODELS", {})
    for model in _PREFERRED_MODELS:
        if model in listed and model not in deprecated:
            return model
    return DEFAULT_MODEL


class ClaudeAnalyst:
    """Proposes allocations with Claude: one ``propose_allocation`` call, forced where the model allows.

    Args:
        model: Claude model id; None picks :func:`default_model` (``claude-sonnet-5`` with the
            SDK installed here).
        temperature: sampling temperature, sent only to models that accept it (Claude 4.6 and
            older); current models answer a non-default temperature with a 400, so it is dropped
            for them and the proposal is not bit-for-bit reproducible.
        max_tokens: output token cap; None gives 4096 with a forced tool call and 16000 when the
            model thinks before calling the tool (thinking counts against the cap).
        timeout: seconds per HTTP request; None gives 90 with a forced tool call and 300 when the
            model thinks first.
        max_retries: transport retries done by the SDK (429, 5xx, 529, timeouts, connection
            errors), with its own backoff that honours ``retry-after``.
        max_invalid: re-asks after an invalid reply, each carrying feedback on what was wrong.
        api_key: the key; default ``ANTHROPIC_API_KEY``. Never logged nor put in messages.
        base_url: API root; default ``ANTHROPIC_BASE_URL`` or the SDK's default.
        client: an ``anthropic.Anthropic`` (or anything with ``messages.create``) to use instead
            of building one; ``api_key``, ``base_url``, ``timeout`` and ``max_retries`` are then
            the client's business.
        tool_choice: "tool" (forced call), "auto", or None to follow :func:`model_traits`.
        effort: ``output_config.effort`` ("low" ... "max"), or None for the model's default.
        strict: use the API's strict (grammar-constrained) tool schema.
        time_budget: total seconds of waiting on Claude over the analyst's life (every call and
            SDK retry together); default 600. Once spent, calls fail with kind "time_budget" and
            the Master continues with the offline analyst.
        first_reply_timeout: seconds to wait for the endpoint's *first* reply, retries included;
            default 30 (120 for models that think before calling the tool). An endpoint that
            accepts the connection and never answers costs this long, not ``timeout`` times
            ``max_retries``.

    Attributes:
        stats: usage so far: ``calls`` (requests made, not counting SDK retries), ``invalid``
            (invalid replies), ``input_tokens``, ``output_tokens``, ``latency_s`` (summed wall
            time of the calls), ``last_error`` and ``model``.
    """

    name = "claude"

    def __init__(
        self,
        *,
        model: str | None = None,
        temperature: float | None = 0.0,
        max_tokens: int | None = None,
        timeout: float | None = None,
        max_retries: int = 2,
        max_invalid: int = 2,
        api_key: str | None = None,
        base_url: str | None = None,
        client: Any = None,
        tool_choice: str | None = None,
        effort: str | None = None,
        strict: bool = False,
        time_budget: float | None = None,
        first_reply_timeout: float | None = None,
    ):
        if tool_choice not in (None, "tool", "auto"):
            raise ValueError(f"tool_choice must be 'tool', 'auto' or None, got {tool_choice!r}")
        for name, value in (("time_budget", time_budget), ("first_reply_timeout", first_reply_timeout)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise LLMError(f"{name} must be a number of seconds > 0, got {value!r}")
        self.model = model or default_model()
        self.traits = model_traits(self.model)
        self.force_tool = self.traits.forced_tool if tool_choice is None else tool_choice == "tool"
        self.temperature = temperature
        self.max_tokens = max_tokens or (4096 if self.force_tool else 16000)
        self.timeout = float(timeout or (90.0 if self.force_tool else 300.0))
        self.max_retries = int(max_retries)
        self.max_invalid = int(max_invalid)
        self.base_url = base_url
        self.effort = effort
        self.strict = bool(strict)
        self.time_budget = float(time_budget) if time_budget is not None else 600.0
        self.first_reply_timeout = float(first_reply_timeout) if first_reply_timeout is not None else (
            30.0 if self.force_tool else 120.0)
        self._started: float | None = None
        self._answered = False
        self._api_key = api_key or os.environ.get("ANTHROPIC_API_KEY") or None
        self._client = client
        self.stats: dict[str, Any] = {
            "model": self.model,
            "calls": 0,
            "invalid": 0,
            "input_tokens": 0,
            "output_tokens": 0,
            "latency_s": 0.0,
            "last_error": None,
        }
        if temperature is not None and not self.traits.sampling:
            logger.debug("temperature is not sent to %s: the model rejects sampling parameters", self.model)
        _warn_if_deprecated(self.model)

    def __repr__(self) -> str:
        return f"ClaudeAnalyst(model={self.model!r}, force_tool={self.force_tool})"

    @classmethod
    def available(cls, api_key: str | None = None, *, client: Any = None) -> bool:
        """Whether Claude can be asked: an injected client, an explicit key, or a key in the env."""
        return client is not None or bool(
            api_key or os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")
        )

    def propose(self, profile: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> Proposal:
        """Ask Claude for the next allocation.

        Args:
            profile: the Profiling agent's profile.
            history: earlier attempts, oldest first.

        Returns:
            A validated :class:`~fxprune.policies.agentic.prompts.Proposal`.

        Raises:
            AnalystUnavailable: no key, the API failed after the SDK's retries, the model refused,
                or every reply (1 + ``max_invalid``) was invalid.
        """
        feedback: str | None = None
        for _ in range(self.max_invalid + 1):
            request = build_request(
                profile,
                history,
                model=self.model,
                max_tokens=self.max_tokens,
                temperature=self.temperature if self.traits.sampling else None,
                feedback=feedback,
                force_tool=self.force_tool,
                thinking=self.traits.thinking_off if self.force_tool else None,
                effort=self.effort,
                strict=self.strict,
            )
            message = self._call(request)
            try:
                return parse_response(message, profile)
            except ProposalError as err:
                self.stats["invalid"] += 1
                self.stats["last_error"] = f"{err.kind}: {self._redact(err.reason)}"
                if not err.retryable:
                    reason = f"Claude ({self.model}) unavailable: {self._redact(err.reason)}"
                    raise AnalystUnavailable(reason, kind=err.kind) from None
                logger.warning("invalid reply from %s: %s", self.model, self.stats["last_error"])
                feedback = err.feedback
        raise AnalystUnavailable(
            f"{self.max_invalid + 1} invalid replies in a row; last: {self.stats['last_error']}",
            kind="invalid_output",
        )

    # ------------------------------------------------------------------------------------------

    def _remaining(self) -> tuple[float, str]:
        """Seconds left to wait on Claude, and which budget bounds them."""
        now = time.perf_counter()
        if self._started is None:
            self._started = now
            _status(f"fxprune agentic: asking Claude ({self.model}) for allocation proposals; waiting at most "
                    f"{min(self.first_reply_timeout, self.time_budget):g}s for a first reply "
                    "(policy option llm_first_reply_timeout), then the offline analyst takes over")
        total = self._started + self.time_budget - now
        spent = f"its time budget of {self.time_budget:g}s (llm_time_budget) is spent"
        if self._answered:
            return total, spent
        first = self._started + self.first_reply_timeout - now
        if first < total:
            return first, f"no first reply within {self.first_reply_timeout:g}s (llm_first_reply_timeout)"
        return total, spent

    def _call(self, request: dict[str, Any]) -> Any:
        """One ``messages.create`` call; SDK errors become :class:`AnalystUnavailable`.

        The call runs in a worker thread and is abandoned when the time budget runs out (an endpoint
        that accepts the connection and never answers), so the wait is bounded whatever the SDK's
        per-request timeout and retries are; the per-request timeout is also capped at what is left.
        """
        client = self._get_client()
        import anthropic

        remaining, budget = self._remaining()
        if remaining <= 0:
            raise self._out_of_time(budget)
        self.stats["calls"] += 1
        start = time.perf_counter()
        try:
            message = _call_within(client, request, remaining, min(self.timeout, remaining))
        except _OutOfTime:
            raise self._out_of_time(budget) from None
        except anthropic.AnthropicError as err:
            unavailable = self._unavailable(err)
            self.stats["last_error"] = f"{unavailable.kind}: {unavailable.reason}"
            logger.warning("Claude call failed (%s): %s", unavailable.kind, unavailable.reason)
            raise unavailable from None
        finally:
            elapsed = time.perf_counter() - start
            self.stats["latency_s"] += elapsed
        self._answered = True
        usage = getattr(message, "usage", None)
        self.stats["input_tokens"] += int(getattr(usage, "input_tokens", 0) or 0)
        self.stats["output_tokens"] += int(getattr(usage, "output_tokens", 0) or 0)
        logger.info(
            "Claude %s answered in %.2fs (stop_reason=%s, %s in / %s out tokens)",
            self.model,
            elapsed,
            getattr(message, "stop_reason", None),
            getattr(usage, "input_tokens", "?"),
            getattr(usage, "output_tokens", "?"),
        )
        return message

    def _out_of_time(self, budget: str) -> AnalystUnavailable:
        reason = f"Claude ({self.model}) unavailable: {budget}"
        self.stats["last_error"] = f"time_budget: {reason}"
        _status(f"fxprune agentic: {reason}; continuing with the offline analyst")
        return AnalystUnavailable(reason, kind="time_budget")

    def _get_client(self) -> Any:
        if self._client is None:
            if not self.available(self._api_key):
                self.stats["last_error"] = "no_key: no API key"
                raise AnalystUnavailable(
                    "no Anthropic API key: set ANTHROPIC_API_KEY or pass api_key=", kind="no_key"
                )
            import anthropic

            self._client = anthropic.Anthropic(
                api_key=self._api_key,
                base_url=self.base_url,
                timeout=self.timeout,
                max_retries=self.max_retries,
            )
        return self._client

    def _unavailable(self, err: Exception) -> AnalystUnavailable:
        """Map an SDK exception to an :class:`AnalystUnavailable` with a key-free message."""
        import anthropic

        status = getattr(err, "status_code", None)
        if isinstance(err, anthropic.APITimeoutError):
            kind, what = "timeout", f"timed out after {self.timeout:g}s"
        elif isinstance(err, anthropic.APIConnectionError):
            kind, what = "connection", "could not connect"
        elif status == 429:
            kind, what = "rate_limit", "rate limited (429)"
        elif status == 529:
            kind, what = "overloaded", "API overloaded (529)"
        elif status in (401, 403):
            kind, what = "auth", f"the API refused the credentials ({status})"
        elif status in (400, 404, 413, 422):
            kind = "bad_request"
            what = f"the API rejected the request ({status}; check model, tool_choice and temperature)"
        elif isinstance(status, int) and status >= 500:
            kind, what = "server", f"server error ({status})"
        elif isinstance(status, int):
            kind, what = f"http_{status}", f"HTTP {status}"
        else:
            kind, what = "client", type(err).__name__
        retries = "" if kind in ("auth", "bad_request") else f" (max_retries={self._retries()})"
        detail = self._redact(_api_message(err)) if isinstance(err, anthropic.APIStatusError) else ""
        reason = f"Claude ({self.model}) unavailable: {what}{retries}" + (f": {detail}" if detail else "")
        return AnalystUnavailable(reason, kind=kind, status=status)

    def _retries(self) -> int:
        value = getattr(self._client, "max_retries", None)
        return value if isinstance(value, int) else self.max_retries

    def _redact(self, text: str) -> str:
        """``text`` without any credential, even if a proxy echoed one back."""
        secrets = (
            self._api_key,
            getattr(self._client, "api_key", None),
            os.environ.get("ANTHROPIC_API_KEY"),
            os.environ.get("ANTHROPIC_AUTH_TOKEN"),
        )
        for secret in secrets:
            if isinstance(secret, str) and len(secret) >= 8:
                text = text.replace(secret, "[redacted]")
        return text


class _OutOfTime(Exception):
    """The call did not return within the time left."""


def _call_within(client: Any, request: dict[str, Any], seconds: float, request_timeout: float) -> Any:
    """``client.messages.create(**request)``, given up after ``seconds`` (the worker thread is left to
    finish on its own: a daemon, bounded by the per-request timeout it was given)."""
    import threading

    if hasattr(client, "with_options"):
        try:
            client = client.with_options(timeout=max(request_timeout, 0.05))
        except Exception:  # an injected client with another with_options: use it as it is
            pass
    box: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            box["message"] = client.messages.create(**request)
        except BaseException as err:  # handed to the caller
            box["error"] = err
        finally:
            done.set()

    threading.Thread(target=work, name="fxprune-claude-call", daemon=True).start()
    if not done.wait(seconds):
        raise _OutOfTime()
    if "error" in box:
        raise box["error"]
    return box["message"]


def _status(line: str) -> None:
    """A one-line status message on stderr (also when stderr is not a terminal), unless progress
    output is switched off (``fxprune.progress.set_enabled(False)``, ``FXPRUNE_PROGRESS=0``)."""
    from fxprune import progress

    if progress.status_enabled():
        print(line, file=sys.stderr, flush=True)


def _api_message(err: Exception) -> str:
    """The server's error message (``error.message`` of the body), else the exception text."""
    body = getattr(err, "body", None)
    if isinstance(body, Mapping):
        inner = body.get("error")
        message = inner.get("message") if isinstance(inner, Mapping) else body.get("message")
        if isinstance(message, str):
            return message[:_MAX_REASON_CHARS]
    text = str(err)
    return text[:_MAX_REASON_CHARS]


def _warn_if_deprecated(model: str) -> None:
    try:
        from anthropic.resources.messages import messages as sdk_messages
    except ImportError:
        return
    retired = getattr(sdk_messages, "DEPRECATED_MODELS", {}).get(model)
    if retired:
        logger.warning("%s is deprecated and reaches end-of-life on %s; pick a newer model", model, retired)
