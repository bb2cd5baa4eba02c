"""The proxy's scheduler: one thread that owns the live sequences of every request and runs the rounds.

Requests join between rounds (:meth:`Scheduler.submit`); every round is ONE completion request to
the upstream and ONE batched small-model step for all live sequences (:meth:`ProxyDecoder.step`),
whatever their settings. Each request's tokens go to its own ``emit`` callback as they are
accepted. A sequence gated off by AdaCoSteer, or a plain one (``costeer_plain``), is finished by
the upstream alone in a stream on a worker thread, outside the rounds.

Faults stay with the requests they hit: a round that fails for several sequences is retried one
sequence at a time (except when the upstream is unreachable: then every sequence of the round
gets the error), a failed sequence is ended with an error event (never continued unsteered), and
its steering slot and small-model rows are released on every path: finished, failed, cancelled
by its client (:meth:`Job.cancel`), or at shutdown.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

from ..split.transport import HTTPError, ServerUnavailableError, SplitModeError
from .decoder import ProxyDecoder, ProxySeq

__all__ = ["Job", "Failure", "Scheduler", "failure_of"]

logger = logging.getLogger("costeer_processor.proxy")


@dataclass(frozen=True)
class Failure:
    """Why a request ended without an answer: HTTP ``status``, OpenAI error ``type`` and a message."""

    status: int
    type: str
    message: str


def failure_of(e: BaseException) -> Failure:
    """The HTTP status and message for an exception raised while decoding."""
    if isinstance(e, ServerUnavailableError):
        return Failure(503, "upstream_unavailable", f"the upstream large-model server is unavailable: {e}")
    if isinstance(e, HTTPError):
        return Failure(502, "upstream_error", f"the upstream large-model server failed the request: {e}")
    if isinstance(e, SplitModeError):
        return Failure(502, "upstream_error", f"the upstream large-model server cannot serve split mode: {e}")
    return Failure(500, "internal_error", f"the proxy failed: {type(e).__name__}: {e}")


class Job:
    """One request in the scheduler: its sequence and where its tokens go.

    ``emit`` receives ``("tokens", ids, logprob_entries)`` as tokens are accepted, then exactly one
    ``("done", finish_reason, failure)`` (``failure`` is a :class:`Failure` or ``None``). It is
    called from scheduler threads and must not block.
    """

    def __init__(self, seq: ProxySeq, emit: Callable[[tuple], None]):
        self.seq, self.emit = seq, emit
        self.sent = 0  # tokens already emitted
        self.cancelled = False
        self.finished = False
        self.failure: Optional[Failure] = None
        self.completed = False  # ended by a stop string (counted as finished, not cancelled)
        self._lock = threading.Lock()

    def cancel(self, finished: bool = False) -> None:
        """End it at the next round boundary: the client went away, or (``finished``) a stop string matched."""
        self.completed = self.completed or (finished and not self.cancelled)
        self.cancelled = True

    def send(self, event: tuple) -> None:
        try:
            self.emit(event)
        except Exception:  # a closed event loop at shutdown: nothing left to tell
            logger.debug("proxy: an event could not be delivered", exc_info=True)


class Scheduler:
    """Runs the rounds of every request over one :class:`ProxyDecoder` (one small-model runner).

    Args:
        decoder: the decoder (its runner, its upstream).
        max_live: sequences decoded together at most; later requests wait between rounds.
        max_waiting: requests waiting at most (beyond: :meth:`submit` refuses, HTTP 503).
    """

    def __init__(self, decoder: ProxyDecoder, max_live: int = 64, max_waiting: int = 1024):
        self.decoder, self.max_live, self.max_waiting = decoder, max_live, max_waiting
        self._inbox: "queue.Queue[Job]" = queue.Queue()
        self._live: list[Job] = []
        self._handoffs = ThreadPoolExecutor(max_workers=16, thread_name_prefix="costeer-proxy-handoff")
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._active: set[Job] = set()
        self.counts = {"rounds": 0, "rows": 0, "finished": 0, "failed": 0, "cancelled": 0, "tokens": 0,
                       "steered_tokens": 0, "round_trips": 0, "retries": 0, "escalations": 0}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="costeer-proxy-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stops the rounds; every request still open gets an error event and is released."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            still_open = list(self._active)
        for job in still_open:
            job.cancel()
            self._finish(job, None, Failure(503, "shutting_down", "the proxy is shutting down"))
        self._handoffs.shutdown(wait=False, cancel_futures=True)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def next_index(self) -> int:
        return next(self._ids)

    def submit(self, job: Job) -> None:
        """Queues a request; it joins the next round. Raises ``RuntimeError`` when the proxy is full or stopping."""
        if self._stop.is_set() or not self.alive:
            raise RuntimeError("the proxy is shutting down")
        with self._lock:
            if len(self._active) >= self.max_live + self.max_waiting:
                raise RuntimeError(f"the proxy is full ({len(self._active)} requests open)")
            self._active.add(job)
        if not job.seq.steering:  # plain: the upstream writes it alone
            self._handoffs.submit(self._finish_alone, job)
        else:
            self._inbox.put(job)

    def open_requests(self) -> int:
        with self._lock:
            return len(self._active)

    def live(self) -> int:
        return len(self._live)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._take_new(block=not self._live)
                self._drop_cancelled()
                live = [j for j in self._live if not j.seq.done and j.seq.steering]
                if live:
                    self._round(live)
                    self._after_round(live)
            except Exception:  # the loop itself must survive anything (one bad request ends alone)
                logger.exception("proxy: scheduler error")
                time.sleep(0.05)

    def _take_new(self, block: bool) -> None:
        room = self.max_live - len(self._live)
        while room > 0:
            try:
                job = self._inbox.get(timeout=0.2) if block else self._inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if job.cancelled:
                self._finish(job, None, None)
                continue
            self._live.append(job)
            room -= 1

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._live if j.cancelled]:
            self._live.remove(job)
            self._finish(job, None, None)

    def _round(self, live: list[Job]) -> None:
        seqs = [j.seq for j in live]
        self.counts["rounds"] += 1
        self.counts["rows"] += len(seqs)
        try:
            self.decoder.step(seqs)
            return
        except ServerUnavailableError as e:  # nothing to isolate: the upstream is gone for everyone
            self._fail(live, e)
            return
        except Exception as e:
            if len(live) == 1:
                self._fail(live, e)
                return
            logger.warning("proxy: a round over %d requests failed (%s); running them one at a time", len(live), e)
        for job in live:  # isolate the request at fault
            try:
                self.decoder.step([job.seq])
            except Exception as e:
                self._fail([job], e)

    def _fail(self, jobs: list[Job], e: BaseException) -> None:
        failure = failure_of(e)
        if failure.status == 500:
            logger.error("proxy: decoding failed", exc_info=e)
        for job in jobs:
            job.seq.done = True
            job.failure = failure

    def _after_round(self, live: list[Job]) -> None:
        for job in live:
            self._emit_new(job)
            seq = job.seq
            failure = job.failure
            if failure is not None or seq.done:
                self._live.remove(job)
                if failure is None and seq.finish_reason == "error":
                    failure = Failure(500, "small_model_error", f"the small model failed: {seq.error}")
                self._finish(job, seq.finish_reason, failure)
            elif not seq.steering:  # gated this round: the upstream finishes it alone
                self._live.remove(job)
                seq.counters.handoff_at = len(seq.generated)
                self._handoffs.submit(self._finish_alone, job)

    def _emit_new(self, job: Job) -> None:
        seq = job.seq
        new = seq.generated[job.sent:]
        if new and not job.cancelled:
            job.send(("tokens", list(new), list(seq.logprob_log[job.sent:job.sent + len(new)])))
        job.sent += len(new)

    def _finish_alone(self, job: Job) -> None:
        """A gated or plain sequence, streamed by the upstream alone (on a worker thread)."""
        failure = None
        try:
            for _ in self.decoder.finish_alone(job.seq):
                if job.cancelled or self._stop.is_set():
                    break
                self._emit_new(job)
            self._emit_new(job)
        except Exception as e:
            failure = failure_of(e)
        self._finish(job, job.seq.finish_reason, failure)

    def _finish(self, job: Job, reason: Optional[str], failure: Optional[Failure]) -> None:
        """Releases the job's slot and tells its client how it ended (exactly once)."""
        with job._lock:
            if job.finished:
                return
            job.finished = True
        self.decoder.release([job.seq])
        with self._lock:
            self._active.discard(job)
            c, s = self.counts, job.seq
            c["tokens"] += len(s.generated)
            c["steered_tokens"] += s.counters.steered_tokens
            c["round_trips"] += s.counters.round_trips
            c["retries"] += s.counters.retries
            c["escalations"] += s.counters.escalations
            c["failed" if failure else "cancelled" if job.cancelled and not job.completed else "finished"] += 1
        job.send(("done", reason or "length", None if job.cancelled and failure is None else failure))
