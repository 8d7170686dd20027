"""A local Messages-API server for tests: the real ``anthropic`` SDK talks to it over HTTP.

The server plays a *script*: each ``POST /v1/messages`` consumes the next step, in order.

Example:
    >>> import anthropic
    >>> with MockAnthropicServer([Status(529, headers={"retry-after-ms": "1"}),
    ...                           ToolUse({"criterion": "l1"})]) as server:
    ...     client = anthropic.Anthropic(api_key="test-key", base_url=server.base_url)
    ...     reply = client.messages.create(model="m", max_tokens=64,
    ...                                    messages=[{"role": "user", "content": "hi"}])
    ...     [b.type for b in reply.content], len(server.requests)
    (['tool_use'], 2)

Steps: :class:`ToolUse` (a ``tool_use`` reply), :class:`Text` (text only, no tool call),
:class:`Status` (an HTTP error or any raw body), :class:`Delay` (wait, then play another step;
provokes client timeouts), :class:`Refusal` (``stop_reason == "refusal"``), or a callable that
receives the :class:`RecordedRequest` and returns a step. Every request is recorded
(``server.requests``: method, path, lower-cased headers, parsed JSON body) whether or not the
script had a step left. When the script is exhausted the server answers 500 with
``x-should-retry: false`` (so the SDK does not retry) unless a ``default`` step was given.

Standard library only. Each response closes its connection, delays wake up when the server
closes, and :meth:`MockAnthropicServer.close` joins every handler thread, so no thread outlives
the ``with`` block.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Mapping, Union

__all__ = [
    "MockAnthropicServer",
    "RecordedRequest",
    "ToolUse",
    "Text",
    "Status",
    "Delay",
    "Refusal",
    "Step",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToolUse:
    """Reply with one ``tool_use`` block.

    Attributes:
        input: the tool input (any JSON value; tests pass malformed ones on purpose).
        name: the tool name.
        text: optional text block placed before the tool call.
        stop_reason: ``"tool_use"``; ``"max_tokens"`` simulates a cut-off call.
        usage: ``(input_tokens, output_tokens)``; None estimates them from the sizes.
    """

    input: Any
    name: str = "propose_allocation"
    text: str | None = None
    stop_reason: str = "tool_use"
    usage: tuple[int, int] | None = None


@dataclass(frozen=True)
class Text:
    """Reply with text only (no tool call)."""

    text: str
    stop_reason: str = "end_turn"
    usage: tuple[int, int] | None = None


@dataclass(frozen=True)
class Refusal:
    """Reply with ``stop_reason == "refusal"`` (and ``stop_details`` when a category is given)."""

    text: str = ""
    category: str | None = None
    explanation: str | None = None


@dataclass(frozen=True)
class Status:
    """Answer with an HTTP status.

    Attributes:
        status: the status code (429, 500, 529, ...; 200 with a ``body`` sends a raw reply).
        body: a JSON value or a string sent as is; None gives the API's error shape
            ``{"type": "error", "error": {"type": ..., "message": ...}}``.
        headers: extra response headers (``retry-after``, ``retry-after-ms``, ``x-should-retry``).
    """

    status: int
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Delay:
    """Wait ``seconds`` (cut short when the server closes), then play ``then``."""

    seconds: float
    then: "Step" = field(default_factory=lambda: Text("late reply"))


Step = Union[ToolUse, Text, Refusal, Status, Delay, Callable[["RecordedRequest"], Any]]


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received.

    Attributes:
        method: "POST", "GET", ...
        path: the path without the query string.
        headers: header names lower-cased.
        body: the parsed JSON body, or None when it was empty or not JSON.
        raw: the raw body bytes.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes

    @property
    def credential(self) -> str | None:
        """The key the client presented: ``x-api-key``, or the token of ``authorization: Bearer``.

        SDK 2.x sends API keys as a bearer token; older SDKs used ``x-api-key``.
        """
        if "x-api-key" in self.headers:
            return self.headers["x-api-key"]
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        return token if scheme.lower() == "bearer" and token else None

    def text(self) -> str:
        """All text of the request's ``system`` and user messages, joined by newlines."""
        body = self.body if isinstance(self.body, Mapping) else {}
        parts: list[str] = []
        system = body.get("system")
        parts += [system] if isinstance(system, str) else [b.get("text", "") for b in system or ()]
        for message in body.get("messages") or ():
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            else:
                parts += [b.get("text", "") for b in content or () if isinstance(b, Mapping)]
        return "\n".join(parts)


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


class MockAnthropicServer:
    """A scripted Messages API on ``127.0.0.1`` with an ephemeral port.

    Args:
        script: the steps, consumed one per ``POST /v1/messages``.
        default: the step played once the script is exhausted (None: a non-retryable 500).
        api_key: when given, requests presenting another key (``x-api-key`` or bearer token) get a
            401, like the real API.

    Attributes:
        requests: every request received, in order.
        base_url: ``http://127.0.0.1:<port>``, for ``anthropic.Anthropic(base_url=...)``.
    """

    def __init__(
        self, script: Iterable[Step] = (), *, default: Step | None = None, api_key: str | None = None
    ):
        self._script = list(script)
        self._default = default
        self._api_key = api_key
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._ids = itertools.count(1)
        self.requests: list[RecordedRequest] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "MockAnthropicServer":
        """Bind the port and serve in a background thread."""
        if self._httpd is not None:
            return self
        self._closing.clear()
        handler = type("_Handler", (_Handler,), {"server_state": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = False  # server_close() joins the handler threads
        httpd.block_on_close = True
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="MockAnthropicServer",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, wake pending delays and join every thread."""
        if self._httpd is None:
            return
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None

    def __enter__(self) -> "MockAnthropicServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("MockAnthropicServer is not running; use it as a context manager")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def remaining(self) -> int:
        """Steps of the script not played yet."""
        with self._lock:
            return len(self._script)

    # -- request handling (called from handler threads) -------------------------------------

    def _record(self, request: RecordedRequest, *, consume: bool = True) -> Step | None:
        """Record ``request``; return the step to play (the next of the script, or the default)."""
        with self._lock:
            self.requests.append(request)
            if not consume:
                return None
            if self._script:
                return self._script.pop(0)
            return self._default

    def _respond(self, step: Any, request: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
        """Turn a step into (status, headers, body); a broken step becomes a non-retryable 500."""
        try:
            return self._play(step, request)
        except Exception as exc:  # a bad script must fail the test, not hang or retry
            logger.error("mock server: cannot play step %r: %s", step, exc)
            return _error(500, f"MockAnthropicServer: bad step: {exc}", {"x-should-retry": "false"})

    def _play(self, step: Any, request: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
        while isinstance(step, Delay) or callable(step):
            if isinstance(step, Delay):
                self._closing.wait(step.seconds)
                step = step.then
            else:
                step = step(request)
        if step is None:
            return _error(500, "MockAnthropicServer: script exhausted", {"x-should-retry": "false"})
        if isinstance(step, Status):
            if step.body is None:
                return _error(step.status, f"mock status {step.status}", step.headers)
            body = step.body if isinstance(step.body, (str, bytes)) else json.dumps(step.body)
            raw = body.encode() if isinstance(body, str) else body
            return step.status, {"content-type": "application/json", **step.headers}, raw
        return 200, {"content-type": "application/json"}, json.dumps(self._message(step, request)).encode()

    def _message(self, step: ToolUse | Text | Refusal, request: RecordedRequest) -> dict[str, Any]:
        n = next(self._ids)
        content: list[dict[str, Any]] = []
        stop_details = None
        if isinstance(step, ToolUse):
            if step.text:
                content.append({"type": "text", "text": step.text})
            call = {"type": "tool_use", "id": f"toolu_mock_{n:04d}", "name": step.name, "input": step.input}
            content.append(call)
            stop, usage = step.stop_reason, step.usage
        elif isinstance(step, Text):
            content.append({"type": "text", "text": step.text})
            stop, usage = step.stop_reason, step.usage
        elif isinstance(step, Refusal):
            if step.text:
                content.append({"type": "text", "text": step.text})
            stop, usage = "refusal", None
            if step.category or step.explanation:
                stop_details = {"type": "refusal", "category": step.category, "explanation": step.explanation}
        else:
            raise TypeError(f"not a script step: {step!r}")
        if usage is None:
            usage = (max(1, len(request.raw) // 4), max(1, len(json.dumps(content)) // 4))
        body = request.body if isinstance(request.body, Mapping) else {}
        return {
            "id": f"msg_mock_{n:04d}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "claude-mock"),
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "stop_details": stop_details,
            "usage": {
                "input_tokens": int(usage[0]),
                "output_tokens": int(usage[1]),
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }


def _error(status: int, message: str, headers: Mapping[str, str] = ()) -> tuple[int, dict[str, str], bytes]:
    body = {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}
    return status, {"content-type": "application/json", **dict(headers)}, json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # never block a handler thread forever on a silent client
    server_state: MockAnthropicServer

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self._handle()

    def do_GET(self) -> None:  # noqa: N802
        self._handle()

    def _handle(self) -> None:
        state = self.server_state
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        path = self.path.split("?", 1)[0]
        headers = {k.lower(): v for k, v in self.headers.items()}
        request = RecordedRequest(self.command, path, headers, body, raw)
        if self.command != "POST" or path.rstrip("/") != "/v1/messages":
            state._record(request, consume=False)
            self._send(*_error(404, f"mock: no route {self.command} {path}"))
        elif state._api_key is not None and request.credential != state._api_key:
            state._record(request, consume=False)
            self._send(*_error(401, "invalid credentials"))
        else:
            self._send(*state._respond(state._record(request), request))

    def _send(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        try:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("request-id", f"req_mock_{len(self.server_state.requests):04d}")
            self.send_header("content-length", str(len(body)))
            self.send_header("connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timeout) and closed the socket
            logger.debug("mock server: client went away before the reply")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        logger.debug("mock server: %s", format % args)
