"""An ASGI middleware for vLLM's OpenAI server: CoSteer arguments checked on the raw JSON.

vLLM's request models declare ``vllm_xargs: dict[str, str | int | float | list[...]]``, so a JSON
``true`` arrives in ``SamplingParams.extra_args`` as ``1``: ``"costeer_T": true`` would be served
as ``T=1`` and ``"costeer_gate_patience": false`` refused with a misleading message. And in a
streamed request (``"stream": true``) vLLM reports an argument refused by ``validate_params``
inside an HTTP 200 event stream. :class:`CoSteerArgsMiddleware` closes both gaps:

* it reads the JSON body of ``POST /v1/completions``, ``/v1/chat/completions``, ``/v1/responses``
  and ``/v1/messages`` (at most ``COSTEER_HTTP_CHECK_MAX_BYTES`` bytes, default 4 MiB) and answers
  HTTP 400, in vLLM's own error format, for a ``costeer_*`` key of ``vllm_xargs`` holding a JSON
  boolean, object or array (the key is named: ``costeer_T must be an integer, got bool True``), and
  for a near miss of a CoSteer key (``"Costeer_context"``: did you mean ``'costeer_context'``?,
  :func:`~costeer_processor.vllm.settings.check_argument_names`);
* for a streamed request carrying CoSteer arguments, it holds the response headers until the first
  event: when that event is vLLM's 4xx error (an argument ``validate_params`` refused, a context
  too long), the client gets that error as a plain HTTP response with its status, not a 200 stream;
  otherwise the headers and events go out unchanged (the first token is not delayed: vLLM sends
  nothing before it; with ``--sse-keep-alive-interval`` a keep-alive comment coming first lets the
  stream through as is, which cannot hide a refusal: vLLM refuses at admission, within milliseconds);
* everything else passes untouched: the body is handed to vLLM exactly as received; a body that is
  not JSON, not a JSON object, or larger than the cap is passed on unread (vLLM's own handling
  applies, and the booleans check is skipped for it: a request that large is not refused here).

``costeer serve`` installs it; with plain ``vllm serve`` pass
``--middleware costeer_processor.vllm.middleware.CoSteerArgsMiddleware``. It also answers
``GET /costeer/status`` with :func:`~costeer_processor.vllm.compat.status` (what this vLLM lets
CoSteer read). vLLM adds ``--middleware`` classes outermost, so these 400s are sent before
vLLM's API-key check and without CORS headers.

Example (a refusal, computed from a raw body)::

    >>> refusal(b'{"vllm_xargs": {"costeer_context": "I am vegan.", "costeer_T": true}}')
    ('vllm_xargs.costeer_T', 'costeer_T must be an integer, got bool True')
    >>> refusal(b'{"vllm_xargs": {"costeer_context": "I am vegan.", "costeer_T": 3}}') is None
    True
"""

from __future__ import annotations

import json
import os
from typing import Any, Awaitable, Callable, Optional

from ..core import number
from . import compat
from .settings import ARG_PREFIX, REQUEST_ARGS, check_argument_names, near_miss_keys

__all__ = ["CHECKED_PATHS", "CoSteerArgsMiddleware", "STATUS_PATH", "error_body", "refusal"]

CHECKED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages"})
STREAM_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})  # their SSE error event is vLLM's JSON
STATUS_PATH = "/costeer/status"
DEFAULT_MAX_BYTES = 4 << 20
FIRST_EVENT_MAX_BYTES = 64 << 10

Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def error_body(message: str, param: Optional[str] = None, code: int = 400, kind: str = "BadRequestError") -> bytes:
    """vLLM's error JSON (``ErrorResponse``): ``{"error": {"message", "type", "param", "code"}}``."""
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


_WANT = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _value_problem(key: str, value: Any) -> Optional[str]:
    """Why vLLM's parsing would alter this JSON value of a CoSteer argument (``None``: it would not)."""
    kind = REQUEST_ARGS.get(key)
    if kind is None:
        return None  # an unknown costeer_* key: validate_params names it with a did-you-mean
    if isinstance(value, (dict, list)):
        got = "object" if isinstance(value, dict) else "array"
        return f"{key} must be {_WANT.get(kind, 'a JSON scalar')}, got JSON {got}"
    if isinstance(value, bool) and kind in ("int", "float"):
        try:
            number(key, value, integer=kind == "int")
        except ValueError as e:
            return str(e)
    if isinstance(value, bool) and kind == "str":
        return f"{key} must be a string, got bool {value}"
    return None


def refusal(body: bytes) -> Optional[tuple[str, str]]:
    """``(param, message)`` when the raw JSON ``body`` holds CoSteer arguments vLLM's parsing would
    alter or that are misspelt; ``None`` otherwise (not JSON, no ``vllm_xargs``, or nothing wrong)."""
    return _inspect(_xargs(_parse(body)))[0]


def _inspect(xargs: Optional[dict]) -> tuple[Optional[tuple[str, str]], bool]:
    """(refusal or ``None``, whether the request carries CoSteer arguments)."""
    if not xargs:
        return None, False
    try:
        check_argument_names(xargs)
    except ValueError as e:
        return (f"vllm_xargs.{near_miss_keys(xargs)[0]}", str(e)), True
    steered = False
    for key, value in xargs.items():
        if isinstance(key, str) and key.startswith(ARG_PREFIX):
            steered = True
            problem = _value_problem(key, value)
            if problem:
                return (f"vllm_xargs.{key}", problem), True
    return None, steered


def _parse(body: bytes) -> Any:
    if b"vllm_xargs" not in body and b"\\u" not in body:  # the key may be written with \u escapes
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep: vLLM answers it
        return None


def _xargs(doc: Any) -> Optional[dict]:
    xargs = doc.get("vllm_xargs") if isinstance(doc, dict) else None
    return xargs if isinstance(xargs, dict) else None


async def _respond(send: Send, status: int, body: bytes, headers: tuple = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Replay:
    """``receive`` for the app: the messages already read, then the server's own ``receive``."""

    def __init__(self, messages: list, receive: Receive):
        self.messages, self.receive = messages, receive

    async def __call__(self) -> Message:
        if self.messages:
            return self.messages.pop(0)
        return await self.receive()


class _FirstEventGuard:
    """``send`` for a streamed steered request: a first SSE event that is a 4xx error becomes that
    HTTP error; anything else goes out unchanged."""

    def __init__(self, send: Send):
        self.send = send
        self.start: Optional[Message] = None
        self.held: list = []
        self.state = "wait"  # wait -> pass | replaced

    async def __call__(self, message: Message) -> None:
        if self.state == "pass":
            return await self.send(message)
        if self.state == "replaced":
            return None  # the rest of the refused stream ("data: [DONE]") is dropped
        kind = message.get("type")
        if kind == "http.response.start" and self.start is None:
            kind_of_body = dict(message.get("headers") or []).get(b"content-type", b"").lower()
            if message.get("status") == 200 and kind_of_body.startswith(b"text/event-stream"):
                self.start = message
                return None
        elif kind == "http.response.body" and self.start is not None:
            self.held.append(message)
            data = b"".join(m.get("body", b"") for m in self.held)
            if b"\n\n" not in data and b"\r\n\r\n" not in data and message.get("more_body", False) \
                    and len(data) <= FIRST_EVENT_MAX_BYTES:
                return None  # the first event is not complete yet
            error = _first_event_error(data)
            if error is None:
                return await self._flush()
            self.state = "replaced"
            keep = tuple((k, v) for k, v in self.start.get("headers") or []
                         if k.lower() not in (b"content-type", b"content-length", b"transfer-encoding"))
            return await _respond(self.send, error[0], error[1], keep)
        await self._flush()
        return await self.send(message)

    async def _flush(self) -> None:
        self.state = "pass"
        if self.start is not None:
            await self.send(self.start)
        for m in self.held:
            await self.send(m)


def _first_event_error(data: bytes) -> Optional[tuple[int, bytes]]:
    """(status, body) when the first SSE event of ``data`` is ``data: {"error": {..., "code": 4xx}}``."""
    first = data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    for line in first.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        try:
            doc = json.loads(line[5:])
        except (ValueError, RecursionError):
            return None
        err = doc.get("error") if isinstance(doc, dict) else None
        code = err.get("code") if isinstance(err, dict) else None
        if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 500:
            return code, json.dumps({"error": err}).encode()
        return None
    return None


class CoSteerArgsMiddleware:
    """Pure ASGI middleware (``vllm serve --middleware costeer_processor.vllm.middleware.CoSteerArgsMiddleware``).

    ``max_body_bytes``: the largest body read and checked (default ``COSTEER_HTTP_CHECK_MAX_BYTES``
    or 4 MiB); a larger one is passed on unread, chunk by chunk as it arrives.
    """

    def __init__(self, app, max_body_bytes: Optional[int] = None):
        self.app = app
        if max_body_bytes is None:
            raw = os.environ.get("COSTEER_HTTP_CHECK_MAX_BYTES", "").strip()
            try:
                max_body_bytes = int(raw) if raw else DEFAULT_MAX_BYTES
            except ValueError:
                raise ValueError(f"COSTEER_HTTP_CHECK_MAX_BYTES={raw!r} is not a whole number of bytes") from None
        self.max_body_bytes = max(0, int(max_body_bytes))
        compat.startup_check()  # the API server's start: version and layout warnings, once

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        method = scope.get("method")
        if method == "GET" and path == STATUS_PATH:
            return await _respond(send, 200, json.dumps(compat.status()).encode())
        if method != "POST" or path not in CHECKED_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if b"json" not in headers.get(b"content-type", b"").lower() or (
                declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes):
            return await self.app(scope, receive, send)

        messages, size, complete = [], 0, False
        while True:
            message = await receive()
            messages.append(message)
            if message.get("type") != "http.request":
                break  # the client went away: the app sees the same
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                break  # too large to check: handed on as it comes
            if not message.get("more_body", False):
                complete = True
                break
        if not complete:
            return await self.app(scope, _Replay(messages, receive), send)
        body = b"".join(m.get("body", b"") for m in messages)
        refused, steered = _inspect(_xargs(_parse(body)))
        if refused is not None:
            return await _respond(send, 400, error_body(refused[1], refused[0]))
        replay = _Replay([{"type": "http.request", "body": body, "more_body": False}], receive)
        return await self.app(scope, replay, _FirstEventGuard(send) if steered and path in STREAM_PATHS else send)
