"""The HTTP layer: an OpenAI-compatible Starlette app over one :class:`~.scheduler.Scheduler`.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (non-streamed, or server-sent
events in OpenAI's chunk format), ``GET /v1/models`` (the upstream's list), ``GET /health``,
``GET /stats``, ``GET /v1/costeer/profiles`` (profile NAMES for the page) and the page at ``/``.
Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``): 400 for a bad
value (naming the field), 404 for an unknown profile or model, 413 for an oversize body, 502 /
503 when the upstream fails; a stream that breaks after its first byte ends with an error event
and ``[DONE]``. With an API key every route but ``/health`` and ``/`` needs
``Authorization: Bearer KEY``. See ``docs/proxy.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import uuid
from typing import Any, AsyncIterator, Optional

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..prompts import ContextTooLongError
from .page import PAGE
from .profiles import PROFILE_HEADER, ProfileError, UnknownProfileError
from .scheduler import Failure, Job, failure_of
from .output import Formatter, TextAssembler
from .service import ProxyService
from .settings import RequestError, parse_request

__all__ = ["create_app"]

logger = logging.getLogger("costeer_processor.proxy")
_OPEN = {"/health", "/"}


def error(status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}}, status)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


_DONE = b"data: [DONE]\n\n"


def _failure_response(f: Failure) -> JSONResponse:
    return error(f.status, f.message, f.type)


def create_app(service: ProxyService) -> Starlette:
    """The Starlette app; its lifespan starts and stops ``service``."""

    def authorized(request: Request) -> bool:
        if service.api_key is None or request.url.path in _OPEN:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {service.api_key}".encode())

    async def read_json(request: Request) -> Any:
        limit = service.max_body
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(f"the request body is {int(declared):,} bytes, over the proxy's limit of {limit:,} "
                               "(--max-body)", status=413)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise RequestError(f"the request body is over the proxy's limit of {limit:,} bytes (--max-body)",
                                   status=413)
        try:
            return json.loads(data)
        except ValueError as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None

    async def generate(request: Request, kind: str) -> Response:
        if not authorized(request):
            return error(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
        try:
            req = parse_request(kind, await read_json(request), service.defaults)
            profile, context = service.context_for(req, request.headers.get(PROFILE_HEADER))
            job_seq = await anyio.to_thread.run_sync(service.prepare, req, context)
        except Exception as e:
            service.count("rejected")
            if isinstance(e, RequestError):
                return error(e.status, str(e), param=e.param)
            if isinstance(e, UnknownProfileError):
                return error(404, str(e), "profile_not_found", "user")
            if isinstance(e, (ProfileError, ContextTooLongError, ValueError, TypeError)):
                return error(400, str(e))
            return _failure_response(failure_of(e))  # the upstream is down or refuses
        seq, model = job_seq
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(seq, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            service.scheduler.submit(job)
        except RuntimeError as e:
            service.scheduler.decoder.release([seq])
            return error(503, str(e), "overloaded")
        service.count("requests")
        fmt = Formatter(kind, model, ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex, service.tokenizer)
        text = TextAssembler(service.tokenizer, req.stop)
        if req.stream:
            return StreamingResponse(_stream(req, job, events, fmt, text, profile), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _whole(request, req, job, events, fmt, text, profile)

    def _extra(req, job: Job, profile: Optional[str], text: TextAssembler) -> dict:
        c = job.seq.counters
        extra = {"steered": not req.plain, "profile": profile, "round_trips": c.round_trips,
                 "steered_tokens": c.steered_tokens, "handoff_at": c.handoff_at, "retries": c.retries,
                 "escalations": c.escalations, "uncertified": c.uncertified}
        if req.return_token_ids:
            extra["token_ids"] = text.ids[:text.completion_tokens]
        return extra

    def _take(req, job: Job, text: TextAssembler, ids, entries) -> tuple[str, list]:
        """New visible text and the log-prob entries of the tokens kept (up to a stop string)."""
        before = len(text.ids)
        delta = text.add(ids)
        if text.stopped:
            job.cancel(finished=True)
            entries = entries[:max(0, text.tokens_at_stop - before)]
        return delta, (entries if req.logprobs is not None else [])

    async def _stream(req, job: Job, events: asyncio.Queue, fmt: Formatter, text: TextAssembler,
                      profile: Optional[str]) -> AsyncIterator[bytes]:
        try:
            if req.kind == "chat":
                yield _sse(fmt.chunk("", first=True))
            while True:
                ev = await events.get()
                if ev[0] == "tokens":
                    if text.stopped:
                        continue
                    delta, entries = _take(req, job, text, ev[1], ev[2])
                    if delta or entries:
                        yield _sse(fmt.chunk(delta, logprobs=fmt.logprobs(entries) if entries else None))
                    if not text.stopped:
                        continue
                    reason, failure = "stop", None
                else:
                    reason, failure = ev[1], ev[2]
                    if failure is not None and not text.stopped:
                        service.count("errors")
                        yield _sse({"error": {"message": failure.message, "type": failure.type, "param": None,
                                              "code": failure.status}})
                        yield _DONE
                        return
                    rest = text.finish()
                    if rest:
                        yield _sse(fmt.chunk(rest))
                yield _sse(fmt.chunk(None, finish_reason="stop" if text.stopped else reason))
                if req.include_usage:
                    usage = fmt.usage(len(job.seq.prompt_ids), text.completion_tokens)
                    yield _sse(fmt.usage_chunk(usage, _extra(req, job, profile, text)))
                yield _DONE
                return
        finally:
            job.cancel()  # a no-op once finished; else the client went away: free its slot

    async def _whole(request: Request, req, job: Job, events: asyncio.Queue, fmt: Formatter, text: TextAssembler,
                     profile: Optional[str]) -> Response:
        entries = []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if ev[0] == "tokens":
                    if text.stopped:
                        continue
                    entries += _take(req, job, text, ev[1], ev[2])[1]
                    if not text.stopped:
                        continue
                    reason = "stop"
                else:
                    reason, failure = ev[1], ev[2]
                    if failure is not None and not text.stopped:
                        service.count("errors")
                        return _failure_response(failure)
                usage = fmt.usage(len(job.seq.prompt_ids), text.completion_tokens)
                lp = fmt.logprobs(entries) if req.logprobs is not None else None
                body = fmt.response(text.full(), "stop" if text.stopped else reason, usage, lp,
                                    _extra(req, job, profile, text))
                return JSONResponse(body)
        finally:
            job.cancel()

    async def chat(request: Request) -> Response:
        return await generate(request, "chat")

    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    async def models(request: Request) -> Response:
        if not authorized(request):
            return error(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
        try:
            return JSONResponse(await anyio.to_thread.run_sync(service.upstream_models))
        except Exception as e:
            return _failure_response(failure_of(e))

    async def health(request: Request) -> Response:
        ok = service.scheduler.alive
        return JSONResponse({"status": "ok" if ok else "scheduler stopped"}, 200 if ok else 503)

    async def stats(request: Request) -> Response:
        if not authorized(request):
            return error(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
        return JSONResponse(service.stats())

    async def profiles(request: Request) -> Response:
        if not authorized(request):
            return error(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
        return JSONResponse({"profiles": service.profiles.names(), "default": service.profiles.choose(None, None)})

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(service.stop)

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/costeer/profiles", profiles, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/stats", stats, methods=["GET"]),
              Route("/", page, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan)
