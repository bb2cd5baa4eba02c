"""HTTP to the server: keep-alive JSON and server-sent events, and ONE retry policy.

* :class:`Transport`: one kept-alive ``http.client`` connection per thread. Every time a new
  TCP connection is about to carry a request, ``on_connect`` runs first over it (split mode
  checks there that the server still serves the same model and tokenizer: a restarted or
  replaced server is always met on a new connection).
* :class:`RetryPolicy`: retries with exponential back-off and jitter on connection errors,
  timeouts and HTTP 408/425/429/5xx, for single requests (:meth:`~RetryPolicy.call`) and for
  streams resumed from where they broke (:meth:`~RetryPolicy.iterate`).

Example (a policy; the network parts are exercised by ``tests/test_split.py``)::

    >>> policy = RetryPolicy(max_retries=2, backoff=0.0)
    >>> failures = iter([Transient("connection refused")])
    >>> def flaky():
    ...     for error in failures:
    ...         raise error
    ...     return "ok"
    >>> policy.call("GET /v1/models", flaky, where="http://127.0.0.1:8000")
    'ok'
    >>> RetryPolicy(max_retries=-1)
    Traceback (most recent call last):
    ...
    ValueError: max_retries must be in [0, inf], got -1
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, TypeVar
from urllib.parse import urlsplit

from ..core.config import check_range, number

__all__ = ["SplitModeError", "ServerUnavailableError", "Transient", "HTTPError", "RetryPolicy", "Transport",
           "RETRY_STATUS", "error_message"]

logger = logging.getLogger("costeer_processor.split")

#: HTTP statuses worth retrying (the server is busy, restarting or overloaded).
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
T = TypeVar("T")


class SplitModeError(RuntimeError):
    """The server cannot serve split mode (no log-probs, another tokenizer, a rejected request...)."""


class ServerUnavailableError(SplitModeError):
    """The server stayed unreachable (or kept failing) through every retry."""


class Transient(Exception):
    """A failure worth retrying (connection lost, timeout, HTTP 5xx/429)."""


class HTTPError(SplitModeError):
    """The server answered a request with an HTTP error that retrying will not fix."""

    def __init__(self, status: int, message: str, path: str):
        super().__init__(f"the server rejected {path} (HTTP {status}): {message}")
        self.status = status
        self.message = message


def error_message(payload: bytes) -> str:
    """The message of an error body (OpenAI ``{"error": {"message": ...}}``, FastAPI ``detail``, or text)."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return payload[:300].decode("utf-8", "replace")
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)
        return str(err)
    return str(obj)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off with jitter: ``min(backoff_max, backoff * 2**attempt) * U(0.75, 1.25)`` seconds.

    Args:
        max_retries: retries after transient failures before giving up with
            :class:`ServerUnavailableError`; the budget restarts whenever progress is made.
        backoff, backoff_max: the first delay and its cap, in seconds.
    """

    max_retries: int = 8
    backoff: float = 0.5
    backoff_max: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_retries", number("max_retries", self.max_retries, integer=True))
        check_range("max_retries", self.max_retries, 0)
        for name in ("backoff", "backoff_max"):
            object.__setattr__(self, name, number(name, getattr(self, name)))
            check_range(name, getattr(self, name), 0.0)

    def delay(self, attempt: int) -> float:
        return min(self.backoff_max, self.backoff * (2 ** attempt)) * (0.75 + 0.5 * random.random())

    def _wait(self, what: str, error: Transient, attempt: int, where: str,
              on_retry: Optional[Callable[[], None]]) -> None:
        """Gives up (``attempt`` = retries already made) or sleeps before the next try."""
        if attempt >= self.max_retries:
            raise ServerUnavailableError(
                f"{what} failed {attempt + 1} times in a row against {where}; last error: {error}") from error
        delay = self.delay(attempt)
        logger.warning("split mode: %s failed (%s); retry %d/%d in %.1fs", what, error, attempt + 1,
                       self.max_retries, delay)
        if on_retry is not None:
            on_retry()
        time.sleep(delay)

    def call(self, what: str, fn: Callable[[], T], *, where: str,
             on_retry: Optional[Callable[[], None]] = None) -> T:
        """``fn()``, tried again after each :class:`Transient` failure (``on_retry`` runs before each retry)."""
        attempt = 0
        while True:
            try:
                return fn()
            except Transient as e:
                self._wait(what, e, attempt, where, on_retry)
                attempt += 1

    def iterate(self, what: str, start: Callable[[], Iterator[T]], *, where: str,
                on_retry: Optional[Callable[[], None]] = None) -> Iterator[T]:
        """Yields from ``start()``; after a :class:`Transient` failure calls ``start()`` again (it resumes
        from the caller's state). An attempt that yielded anything restarts the retry budget."""
        attempt = 0
        while True:
            progressed = False
            try:
                for item in start():
                    progressed = True
                    yield item
                return
            except Transient as e:
                if progressed:
                    attempt = 0
                self._wait(what, e, attempt, where, on_retry)
                attempt += 1


class Transport:
    """Minimal keep-alive JSON / server-sent-events client over ``http.client`` (one connection per thread).

    Args:
        base_url: ``http(s)://host:port[/prefix]`` (a trailing ``/v1`` is dropped).
        timeout: seconds per socket operation.
        headers: extra request headers (e.g. ``Authorization``).
        on_connect: called with this transport before the first request over each new TCP
            connection; its own requests go over that connection. It may raise (the connection is
            then dropped): :class:`Transient` to have the request retried, anything else to fail it.
    """

    def __init__(self, base_url: str, timeout: float, headers: Optional[dict] = None,
                 on_connect: Optional[Callable[["Transport"], None]] = None):
        url = base_url.strip().rstrip("/")
        if url.endswith("/v1"):
            url = url[:-3]
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must look like http://host:port, got {base_url!r}")
        timeout = number("timeout", timeout)
        check_range("timeout", timeout, 0.0, None, low_open=True)
        self.base_url = f"{parts.scheme}://{parts.netloc}{parts.path}"
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
        self.on_connect = on_connect
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = cls(self.host, self.port, timeout=self.timeout)
        return conn

    def connect(self) -> None:
        """Opens (and checks, through ``on_connect``) this thread's connection unless it is open."""
        conn = self._connection()
        if conn.sock is None:
            self._check_new_connection()

    def _check_new_connection(self) -> None:
        if self.on_connect is None or getattr(self._local, "checking", False):
            return
        self._local.checking = True
        try:
            self.on_connect(self)
        except BaseException:
            self.reset()
            raise
        finally:
            self._local.checking = False

    def reset(self) -> None:
        """Drops this thread's connection (the next request opens, and checks, a new one)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()  # http.client's close() does not raise on a broken socket

    def _send(self, method: str, path: str, body: Optional[dict]) -> http.client.HTTPResponse:
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        for fresh in (False, True):
            if self._connection().sock is None:  # a new TCP connection: check the server behind it first
                self._check_new_connection()
            conn = self._connection()
            reused = conn.sock is not None
            try:
                conn.request(method, self.prefix + path, body=data, headers=self.headers)
                resp = conn.getresponse()
                break
            except (OSError, http.client.HTTPException) as e:
                self.reset()
                # A kept-alive connection the server already closed: try once more on a new one.
                if reused and not fresh and isinstance(e, (ConnectionError, http.client.RemoteDisconnected,
                                                           http.client.BadStatusLine)):
                    continue
                raise Transient(f"{method} {path}: {type(e).__name__}: {e}") from e
        if resp.status >= 400:
            try:
                payload = resp.read()
            except (OSError, http.client.HTTPException):
                payload = b""
            if resp.status in RETRY_STATUS:
                self.reset()
                raise Transient(f"{method} {path}: HTTP {resp.status} {error_message(payload)}")
            raise HTTPError(resp.status, error_message(payload), path)
        return resp

    def json(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        """One request; the decoded JSON answer."""
        resp = self._send(method, path, body)
        try:
            payload = resp.read()
        except (OSError, http.client.HTTPException) as e:
            self.reset()
            raise Transient(f"{method} {path}: reading the response failed: {e}") from e
        try:
            return json.loads(payload)
        except ValueError as e:
            raise SplitModeError(f"{self.base_url}{path} answered with something that is not JSON: "
                                 f"{payload[:200]!r}") from e

    def events(self, path: str, body: dict) -> Iterator[dict]:
        """POSTs ``body`` and yields each server-sent event's JSON until ``[DONE]``."""
        resp = self._send("POST", path, body)
        try:
            while True:
                line = resp.readline()
                if not line:
                    raise Transient(f"POST {path}: stream ended without [DONE]")
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    resp.read()
                    return
                try:
                    yield json.loads(data)
                except ValueError as e:
                    raise SplitModeError(f"unreadable stream event from {self.base_url}{path}: {data[:200]!r}") from e
        except (OSError, http.client.HTTPException) as e:
            self.reset()
            raise Transient(f"POST {path}: stream broken: {type(e).__name__}: {e}") from e
        except BaseException:
            # Abandoned or failed mid-stream: the connection holds unread data, do not reuse it.
            self.reset()
            raise
