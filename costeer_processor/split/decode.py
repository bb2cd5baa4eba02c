"""The decoding loop of split mode: rounds of proposals, steering, look-ahead, hand-off, sampling.

One **round** is one completion request for every live generation: the server proposes up to
``m`` greedy tokens with their log-probs while the device runs the small model on the same
prefix (overlap). Position ``i + 1``'s log-probs are valid as long as the token chosen at ``i``
equals the server's guess, so the device accepts tokens until the first position where steering
picks something else (that token is still accepted: its log-probs came with the verified
prefix). A generation gated off (AdaCoSteer) frees its small-model rows and is finished by the
server alone in one streaming request (the **hand-off**), resumed from the accepted tokens if
the stream breaks.

The small-model runner is shared state: every runner call runs inside :meth:`RunnerGuard.hold`,
one lock per runner shared by every client on it, taken per round (never across a ``yield`` to
the caller, so an abandoned stream blocks nobody).

The per-position choice is the :class:`~costeer_processor.steering.Steerer`'s (gating, the update,
the guards, fail-closed ending), shared with every other adapter; tokens are picked by
:func:`~costeer_processor.core.sampling.choose`.
"""

from __future__ import annotations

import concurrent.futures
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from ..core import Variants
from ..core.sampling import Sampling, choose
from ..prompts import ContextSplicer, PromptLike
from ..small_model import SmallModelRunner
from ..steering import Steerer
from ..vocab import VocabularyMap
from .certify import Certifier
from .protocol import Server
from .transport import SplitModeError

__all__ = ["Counters", "SplitResult", "Sampling", "choose", "RunnerGuard", "Decoder"]



@dataclass(kw_only=True)
class Counters:
    """What one generation cost (the only counters structure: a :class:`SplitResult` is one).

    Attributes:
        round_trips: completion requests made for this generation (a batched request counts
            once for every generation in it).
        steered_tokens: tokens chosen with steering on (the rest came from the large model alone).
        handoff_at: index in ``token_ids`` from which the server generated alone (gating), or None.
        retries: requests repeated after a transient failure.
        escalations: extra log-prob requests (top-k mode) made to certify a choice.
        uncertified: top-k steps chosen without a certificate (certification off, failed or not
            applicable: sampling).
    """

    round_trips: int = 0
    steered_tokens: int = 0
    handoff_at: Optional[int] = None
    retries: int = 0
    escalations: int = 0
    uncertified: int = 0


@dataclass
class SplitResult(Counters):
    """One finished generation, with its :class:`Counters`.

    Attributes:
        text: the generated text (special tokens skipped).
        token_ids: the generated ids (the stop token included when the answer ended with one).
        finish_reason: ``"stop"`` (an end-of-sequence token), ``"length"``, or ``"error"`` (the
            small model failed for this generation: it was ended there, never continued unsteered).
        prompt_tokens: length of the large model's prompt (ids sent to the server).
        error: why the generation was ended (``finish_reason == "error"``), else ``None``.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    error: Optional[str] = None


@dataclass(eq=False)
class _Seq:
    index: int
    slot: int  # in the decoder's Steerer
    prompt_ids: list[int]
    max_new_tokens: int
    lookahead: int  # proposals to ask for next round (adaptive)
    counters: Counters = field(default_factory=Counters)
    generated: list[int] = field(default_factory=list)
    steering: bool = True
    done: bool = False
    finish_reason: Optional[str] = None
    error: Optional[str] = None


class RunnerGuard:
    """The lock of one :class:`SmallModelRunner`, shared by every split client that uses it.

    :meth:`release` never blocks: slots freed while another section runs (or while this very
    thread runs one: a stream generator finalised by the garbage collector mid-round) are queued
    and released by whoever holds the lock, as it leaves; never in the middle of a runner call.
    """

    _guards: "weakref.WeakKeyDictionary[SmallModelRunner, RunnerGuard]" = weakref.WeakKeyDictionary()
    _registry_lock = threading.Lock()

    def __init__(self, runner: SmallModelRunner):
        self.runner = runner
        self._lock = threading.Lock()
        self._pending: list[tuple[Steerer, int]] = []

    @classmethod
    def of(cls, runner: SmallModelRunner) -> "RunnerGuard":
        with cls._registry_lock:
            guard = cls._guards.get(runner)
            if guard is None:
                guard = cls._guards[runner] = cls(runner)
            return guard

    @contextmanager
    def hold(self) -> Iterator[SmallModelRunner]:
        try:
            with self._lock:
                self._flush()
                yield self.runner
        finally:
            self._flush_if_free()  # what was queued while this section ran

    def release(self, steerer: Steerer, slots: Sequence[int]) -> None:
        """Frees these slots (and their rows): now if the runner is free, else when its current section ends."""
        self._pending.extend((steerer, slot) for slot in slots)
        self._flush_if_free()

    def _flush_if_free(self) -> None:
        # queue first, then try the lock: a holder that made this attempt fail checks the queue
        # after letting go, so nothing queued is ever left behind
        while self._pending and self._lock.acquire(blocking=False):
            try:
                self._flush()
            finally:
                self._lock.release()

    def _flush(self) -> None:
        while self._pending:
            steerer, slot = self._pending.pop()
            steerer.release(slot)


class Decoder:
    """Drives generations against a :class:`~.protocol.Server` with a small-model runner.

    Holds no per-generation state: each call works on its own sequences, so generations of one
    client (or of several clients sharing a runner) may interleave round by round.
    """

    def __init__(self, runner: SmallModelRunner, server: Server, *, gain: float, variants: Variants,
                 eos_token_ids: Sequence[int], served_tokenizer, vocab_map: Optional[VocabularyMap],
                 certifier: Optional[Certifier], lookahead: int, adaptive_lookahead: bool, overlap: bool):
        self.runner, self.guard, self.server = runner, RunnerGuard.of(runner), server
        self.gain, self.variants, self.eos_token_ids = gain, variants, list(eos_token_ids)
        self.tokenizer, self.vocab_map, self.certifier = served_tokenizer, vocab_map, certifier
        self.lookahead, self.adaptive, self.overlap = lookahead, adaptive_lookahead, overlap
        self.large_splicer = ContextSplicer(served_tokenizer) if vocab_map is not None else runner.splicer
        # the per-position steering step shared with every adapter (gating, update, guards, fail closed)
        self.steerer = Steerer(runner, served_tokenizer, eos_token_ids, vocab_map=vocab_map)
        self._handoff_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="costeer-split-handoff")

    def close(self) -> None:
        self._handoff_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ generations
    def large_prompt_ids(self, prompt: PromptLike) -> list[int]:
        """The ids the server reads: the chat template applied to the prompt, nothing added."""
        return self.tokenizer(self.large_splicer.render(prompt), add_special_tokens=False)["input_ids"]

    def start(self, prompts: Sequence[PromptLike], contexts: Sequence[str], max_new_tokens: int) -> list[_Seq]:
        """Encodes both branches of every row (the with-context ids never leave this device) and
        gives each a steering slot (its small-model rows are prefilled at its first round)."""
        large_ids = [self.large_prompt_ids(p) for p in prompts]
        # the salt also keys the local context cache
        requests = [self.steerer.request(ids, c, gain=self.gain, variants=self.variants, salt=self.server.cache_salt)
                    for ids, c in zip(large_ids, contexts)]
        self.server.connect()
        limit = self.server.max_model_len
        for i, ids in enumerate(large_ids):
            if limit is not None and len(ids) >= limit:
                raise SplitModeError(f"prompt {i} is {len(ids)} tokens; the server's max_model_len is {limit}")
        first = min(2, self.lookahead) if self.adaptive else self.lookahead
        return [_Seq(i, self.steerer.admit(r), ids, max_new_tokens, first)
                for i, (ids, r) in enumerate(zip(large_ids, requests))]

    def release(self, seqs: Sequence[_Seq]) -> None:
        self.guard.release(self.steerer, [s.slot for s in seqs])

    def result(self, s: _Seq) -> SplitResult:
        return SplitResult(text=self.tokenizer.decode(s.generated, skip_special_tokens=True),
                           token_ids=list(s.generated), finish_reason=s.finish_reason or "length",
                           prompt_tokens=len(s.prompt_ids), error=s.error, **asdict(s.counters))

    def room(self, s: _Seq) -> int:
        room = s.max_new_tokens - len(s.generated)
        if self.server.max_model_len is not None:
            room = min(room, self.server.max_model_len - len(s.prompt_ids) - len(s.generated))
        return room

    def _accept(self, s: _Seq, token: int) -> None:
        s.generated.append(int(token))
        if token in self.eos_token_ids:
            s.done, s.finish_reason = True, "stop"
        elif self.room(s) <= 0:
            s.done, s.finish_reason = True, "length"

    def run(self, seqs: list[_Seq], sampling: Sampling, stream_handoff: bool) -> Iterator[tuple[int, int]]:
        """Drives the generations; yields ``(seq index, token id)`` for every accepted token.

        The runner's lock is taken per round and released before the round's tokens are yielded.
        """
        handoffs = []
        for s in seqs:
            if self.room(s) <= 0:
                s.done, s.finish_reason = True, "length"
        while True:
            live = [s for s in seqs if not s.done and s.steering]
            if not live:
                break
            with self.guard.hold():
                accepted = self._round(live, sampling)
            yield from accepted
            for s in live:
                if not s.done and not s.steering:  # gated in this round: the server finishes it alone
                    s.counters.handoff_at = len(s.generated)
                    if stream_handoff:
                        yield from ((s.index, tok) for tok in self.handoff(s, sampling))
                    else:
                        handoffs.append((s, self._handoff_pool.submit(lambda s=s: list(self.handoff(s, sampling)))))
        for s, fut in handoffs:
            yield from ((s.index, tok) for tok in fut.result())

    # ------------------------------------------------------------------ one round trip
    def _round(self, live: list[_Seq], sampling: Sampling) -> list[tuple[int, int]]:
        """Up to ``lookahead`` tokens for every live sequence; the caller holds the runner's lock."""
        m = max(1, min([max(s.lookahead for s in live)] + [self.room(s) for s in live]))
        for s in live:
            s.counters.round_trips += 1
        future = self.server.propose_async([s.prompt_ids + s.generated for s in live], m, _retried(live))
        if not self.overlap:
            concurrent.futures.wait([future])
        try:  # overlap: the small model's step for the same prefix runs while the server works
            z_with, z_without, verifying = self._small(live, list(range(len(live))))
        except BaseException:
            future.cancel()
            raise
        proposals = future.result()
        accepted: list[tuple[int, int]] = []
        matched = [0] * len(live)
        z_rows = {j: r for r, j in enumerate(verifying)}
        for i in range(m):
            rows = [j for j in verifying if i < len(proposals[j]) and not live[j].done]
            if i > 0 and rows:
                z_with, z_without, rows = self._small(live, rows)
                z_rows = {j: r for r, j in enumerate(rows)}
            if not rows:
                break
            sel = torch.tensor([z_rows[j] for j in rows])
            seqs = [live[j] for j in rows]
            chosen, gated = self._choose_step(seqs, [proposals[j][i][1] for j in rows],
                                              z_with.index_select(0, sel).float(),
                                              z_without.index_select(0, sel).float(), sampling)
            verifying = []
            for r, j in enumerate(rows):
                s, tok = live[j], int(chosen[r])
                if bool(gated[r]):
                    s.steering = False  # the steerer switched it off and freed its small-model rows
                self._accept(s, tok)
                accepted.append((s.index, tok))
                if s.done:
                    continue
                matches = tok == proposals[j][i][0]
                if not s.steering:
                    # Greedy: the server's remaining proposals ARE the large model's continuation.
                    if matches and sampling.greedy:
                        for guess, _ in proposals[j][i + 1:]:
                            if s.done:
                                break
                            self._accept(s, guess)
                            accepted.append((s.index, guess))
                    continue
                if matches:
                    matched[j] += 1
                    verifying.append(j)
        if self.adaptive:  # double while every proposal is taken, else just past the last match
            for j, s in enumerate(live):
                s.lookahead = min(self.lookahead, 2 * s.lookahead if matched[j] >= m else matched[j] + 1)
        return accepted

    def _small(self, live: list[_Seq], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Both branches' logits for ``live[j]``, ``j`` in ``rows``, in one batched step; returns them
        with the rows they are for. A sequence the small model failed for is ended (``"error"``)."""
        seqs = [live[j] for j in rows]
        z_with, z_without, ok = self.steerer.small(torch.tensor([s.slot for s in seqs]), [s.generated for s in seqs])
        for s, fine in zip(seqs, ok.tolist()):
            if not fine:
                s.done, s.finish_reason, s.error = True, "error", self.steerer.failure(s.slot)
        return z_with, z_without, [j for j, fine in zip(rows, ok.tolist()) if fine]

    def _choose_step(self, seqs: list[_Seq], dicts: list[dict], zw: torch.Tensor, zo: torch.Tensor,
                     sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
        """One position for these rows: gating, the certificate, the steering step, the choice."""
        large = self.server.vocab.rows(dicts)  # [n, W] (+ remainder column)
        slots = torch.tensor([s.slot for s in seqs])
        gated = ~self.steerer.gate(slots, large)
        certify = self.certifier is not None and sampling.greedy
        if certify:
            need = self.certifier.uncertain(large, zw, zo, gated)
            if need:
                dicts = self.certifier.escalate(need, dicts, zw, zo, gated, self._fetch(seqs),
                                                [s.counters for s in seqs])
                large = self.server.vocab.rows(dicts)
        scores = large[:, :-1].clone()
        steered = (~gated).nonzero().flatten()
        if steered.numel():  # with two tokenizers: on the common tokens; the others are impossible
            scores[steered] = self.steerer.combine(scores[steered], slots[steered], zw[steered], zo[steered],
                                                   [seqs[r].generated for r in steered.tolist()],
                                                   eos_logits=large[steered])
        chosen = choose(scores, sampling)
        topk_only = self.server.top_logprobs is not None and not certify
        for s, g in zip(seqs, gated.tolist()):
            if not g:
                s.counters.steered_tokens += 1
                s.counters.uncertified += int(topk_only)
        return chosen, gated

    def _fetch(self, seqs: list[_Seq]):
        def fetch(rows: list[int], level: int) -> list[dict]:
            chosen = [seqs[r] for r in rows]
            return self.server.more_logprobs([s.prompt_ids + s.generated for s in chosen], level, _retried(chosen))
        return fetch

    # ------------------------------------------------------------------ hand-off
    def handoff(self, s: _Seq, sampling: Sampling) -> Iterator[int]:
        """The rest of a gated generation, streamed by the server alone (resumed after failures)."""
        def attempt() -> Iterator[int]:
            s.counters.round_trips += 1
            seed = None if sampling.seed is None else sampling.seed + len(s.generated)
            finish = None
            for ids, reason in self.server.stream(s.prompt_ids + s.generated, self.room(s), sampling.temperature,
                                                  sampling.top_p, seed):
                for tok in ids:
                    if s.done:
                        break
                    self._accept(s, tok)
                    yield tok
                finish = reason or finish
            if not s.done:  # the server stopped on its own (its EOS or its context window)
                s.done, s.finish_reason = True, "stop" if finish == "stop" else "length"

        return self.server.retry.iterate("POST /v1/completions (stream)", attempt, where=self.server.base_url,
                                         on_retry=_retried([s]))


def _retried(seqs: Sequence[_Seq]):
    def count() -> None:
        for s in seqs:
            s.counters.retries += 1
    return count
