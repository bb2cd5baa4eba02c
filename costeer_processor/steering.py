"""The steering step: large logits in, steered logits out, for every adapter (HF, vLLM V1/V2, split).

:class:`Steerer` is the one place that decides, per step, what happens to each steered row:

1. rows whose request failed are **ended** (only end-of-sequence stays possible: fail closed);
2. AdaCoSteer gating updates each row's confidence streak and switches rows off for good;
3. the small model runs ONCE for every row still steered (both branches, one batched forward);
   if that batched step raises, each row is retried alone, so only the failing request is ended;
   a row whose small-model logits are non-finite is ended with a logged reason, never served as
   the large model alone;
4. the update (:func:`~costeer_processor.core.steer`, or its variants: delta clipping, the
   plausibility constraint of :mod:`~costeer_processor.core.style`), the context n-gram guard
   (:class:`~costeer_processor.core.ngram.NgramGuard`) and the EOS guard, batched.

Per-request state lives in per-slot tensors (gain, gate threshold, patience, streak, EOS-guard
threshold, plausibility, clip, active, counters), grown when full, as vLLM's built-in processors
keep theirs; a request is admitted once (:meth:`Steerer.admit` with a :class:`SteerRequest`) and
released once (:meth:`Steerer.release`). Adapters only map their batch rows to slots.

A steerer may be shared by threads (split-mode clients): every method holds its lock; the
small-model runner has its own.

Example (a tiny random pair; the HF processor and the vLLM engine do the same per step)::

    >>> import torch
    >>> from costeer_processor import SmallModelRunner
    >>> from costeer_processor.testing import build_tiny_model, build_tiny_tokenizer
    >>> tok = build_tiny_tokenizer()
    >>> steerer = Steerer(SmallModelRunner(build_tiny_model(tok), tok), tok, [tok.eos_token_id])
    >>> prompt = tok.apply_chat_template([{"role": "user", "content": "suggest a dinner"}],
    ...                                  add_generation_prompt=True)["input_ids"]
    >>> slot = steerer.admit(steerer.request(prompt, "I am vegan.", gain=1.78))
    >>> logits = torch.randn(1, len(tok))
    >>> steered = steerer.step(logits.clone(), [0], [slot], [[]])
    >>> bool(torch.equal(steered, logits)), steerer.stats()["steered_steps"]
    (False, 1)
    >>> steerer.release(slot)
    >>> len(steerer.runner), steerer.stats()["slots"]
    (0, 0)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Hashable, Iterator, Optional, Sequence

import torch

from .core import NEG_INF, Variants, check_ngram, force_eos, steer, top_probability
from .core import ngram, style
from .prompts import PromptBridge
from .small_model import SmallModelRunner
from .vocab import VocabularyMap

logger = logging.getLogger(__name__)

__all__ = ["SteerRequest", "Steerer", "STEP_ERRORS", "torch_threads"]

# What a failing small-model step can raise: torch reports device, shape and memory errors as
# RuntimeError; TypeError / AttributeError come from a transformers or vLLM change (version drift).
# Caught so that one bad request is ended instead of every user's request with it.
STEP_ERRORS = (RuntimeError, ValueError, KeyError, IndexError, TypeError, AttributeError)

_KEYS = itertools.count()  # runner keys unique in the process, whatever steerer made them


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Runs the block with ``n`` torch threads (vLLM's CPU worker stubs out torch.set_num_threads)."""
    if not n or torch.get_num_threads() == n:
        yield
        return
    setter = getattr(torch._C, "_set_num_threads", torch.set_num_threads)
    old = torch.get_num_threads()
    setter(n)
    try:
        yield
    finally:
        setter(old)


@dataclass(frozen=True, eq=False)
class SteerRequest:
    """What the steering step needs of one request, fixed at admission (build it with :meth:`Steerer.request`).

    Attributes:
        branches: the small model's ids with and without the context.
        gain: the closed-form gain ``g`` of the update.
        variants: gating, the EOS guard, the style options and the n-gram guard.
        salt: keys the runner's context cache (requests with other salts never share entries).
        context_ids / public_ids: the context (its surface forms, :func:`~costeer_processor.core.ngram.surface_forms`)
            and the public prompt in the LARGE model's ids
            (read by the n-gram guard only).
    """

    branches: tuple[Sequence[int], Sequence[int]]
    gain: float
    variants: Variants = Variants()
    salt: Optional[Hashable] = None
    context_ids: Sequence[int] = ()
    public_ids: Sequence[int] = ()


class SlotTable:
    """Per-request steering state in preallocated tensors, one entry ("slot") per admitted request.

    As vLLM's built-in processors keep theirs: a step reads its rows' values with one index per
    tensor; the tables double when full (amortised) and a freed slot is reused by the next request.
    """

    FLOAT = {"gain": 0.0, "gate": float("inf"), "eos": float("inf"), "plaus": 0.0, "clip": float("inf")}
    LONG = {"patience": 1, "streak": 0, "ngram": 0, "steered": 0}
    BOOL = {"active": False, "in_runner": False, "used": False}

    def __init__(self) -> None:
        self.cap = 0
        self.keys: list = []  # the runner key of each slot
        self.requests: list[Optional[SteerRequest]] = []
        self.failed: list[Optional[str]] = []  # why a slot's request was ended
        self.grow(8)

    def grow(self, need: int) -> None:
        if need <= self.cap:
            return
        old, cap = self.cap, max(need, 2 * self.cap)
        for table, dtype in ((self.FLOAT, torch.float32), (self.LONG, torch.long), (self.BOOL, torch.bool)):
            for name, fill in table.items():
                t = torch.full((cap,), fill, dtype=dtype)
                if old:
                    t[:old] = getattr(self, name)
                setattr(self, name, t)
        for column in (self.keys, self.requests, self.failed):
            column += [None] * (cap - old)
        self.cap = cap

    def take(self, request: SteerRequest, key: Hashable) -> int:
        """A free slot filled with the request's settings (unset options take their "off" value)."""
        free = (~self.used).nonzero()
        if not free.numel():
            self.grow(self.cap + 1)
            free = (~self.used).nonzero()
        slot = int(free[0])
        v = request.variants
        values = {"gain": request.gain, "gate": v.gate_threshold, "eos": v.eos_guard, "plaus": v.plausibility,
                  "clip": v.delta_clip, "patience": v.gate_patience, "streak": 0, "ngram": v.ngram_guard,
                  "steered": 0, "active": True, "in_runner": False, "used": True}
        for name, value in values.items():
            getattr(self, name)[slot] = self._off(name) if value is None else value
        self.keys[slot], self.requests[slot], self.failed[slot] = key, request, None
        return slot

    def free(self, slot: int) -> None:
        self.used[slot] = False
        self.keys[slot] = self.requests[slot] = self.failed[slot] = None

    def _off(self, name: str):
        for table in (self.FLOAT, self.LONG, self.BOOL):
            if name in table:
                return table[name]
        raise KeyError(name)


class Steerer:
    """The single steering step over a :class:`~costeer_processor.SmallModelRunner`.

    Args:
        runner: the small model and its packed KV cache (may be shared with other steerers).
        large_tokenizer: the large model's tokenizer (prompt ids -> the small model's text; the
            context in large ids for the n-gram guard).
        eos_token_ids: ids that end a sequence (EOS guard; the first ends failed requests unless
            ``end_token_id`` is given).
        vocab_map: a :class:`~costeer_processor.VocabularyMap` when the two tokenizers differ.
        threads: torch threads for the small model's step (vLLM's CPU worker runs with 1).
        ngram_default: the context n-gram guard's ``n`` for requests whose ``variants.ngram_guard`` is
            ``None`` (0 = off; split mode passes :data:`~costeer_processor.core.SPLIT_NGRAM_GUARD`).
    """

    def __init__(self, runner: SmallModelRunner, large_tokenizer, eos_token_ids: Sequence[int], *,
                 vocab_map: Optional[VocabularyMap] = None, end_token_id: Optional[int] = None,
                 threads: Optional[int] = None, ngram_default: int = 0):
        if not isinstance(runner, SmallModelRunner):
            raise TypeError(f"runner must be a SmallModelRunner, got {type(runner).__name__}")
        self.runner, self.large_tokenizer, self.vocab_map, self.threads = runner, large_tokenizer, vocab_map, threads
        self.ngram_default = check_ngram("ngram_default", ngram_default)
        self.bridge = PromptBridge(large_tokenizer, runner.splicer, translate=vocab_map is not None)
        self.eos_token_ids = sorted({int(t) for t in eos_token_ids if t is not None})
        if end_token_id is None:
            end_token_id = getattr(large_tokenizer, "eos_token_id", None)
        self.end_token_id = end_token_id if end_token_id is not None else (
            self.eos_token_ids[0] if self.eos_token_ids else None)
        self._lock = threading.RLock()
        self._guards: dict[int, ngram.NgramGuard] = {}
        self.slots = SlotTable()
        self.warned: set[str] = set()  # fixed reasons only: bounded
        self.ended = 0  # requests ended by the fail-closed rule
        self.small_steps = 0  # batched small-model steps run

    def request(self, prompt_ids: Sequence[int], context: str, *, gain: float, variants: Variants = Variants(),
                salt: Optional[Hashable] = None,
                branches: Optional[tuple[Sequence[int], Sequence[int]]] = None) -> SteerRequest:
        """The one branch encoder: a request from the large model's prompt ids and a context.

        The small model reads the same conversation with the context spliced in
        (:class:`~costeer_processor.prompts.PromptBridge`, the runner's context-fits rule);
        ``branches`` skips that when the caller rendered them already. With ``variants.placebo``
        the without-context branch reads :func:`~costeer_processor.core.style.placebo_context`.
        Raises ``ValueError`` (empty or over-long context, ...) before anything is admitted.
        """
        variants = variants.with_ngram_default(self.ngram_default)
        if branches is None or variants.placebo:
            text = self.bridge(list(prompt_ids))
            with_ids, without_ids = branches or self.runner.branch_ids_from_text(text, context)
            if variants.placebo:
                without_ids = self.runner.branch_ids_from_text(text, style.placebo_context(context))[0]
            branches = (with_ids, without_ids)
        context_ids: Sequence[Sequence[int]] = ()
        if variants.ngram_guard:  # the context's surface forms, in the large model's ids (one batched call)
            context_ids = self.large_tokenizer(ngram.surface_forms(context, variants.ngram_guard),
                                               add_special_tokens=False)["input_ids"]
        return SteerRequest(branches, float(gain), variants, salt, context_ids, list(prompt_ids))

    def admit(self, request: SteerRequest) -> int:
        """Gives the request a slot (its small-model rows are prefilled at its first step)."""
        with self._lock:
            slot = self.slots.take(request, ("steer", next(_KEYS)))
            v = request.variants
            if v.ngram_guard:
                guard = self._guards.get(v.ngram_guard)
                if guard is None:
                    guard = self._guards[v.ngram_guard] = ngram.NgramGuard(v.ngram_guard)
                guard.add(slot, request.context_ids, request.public_ids)
            return slot

    def release(self, slot: int) -> None:
        """Frees the slot and its small-model rows (no-op for a free slot)."""
        with self._lock:
            if not self.slots.used[slot]:
                return
            self.switch_off(slot)
            n = int(self.slots.ngram[slot])
            if n:
                self._guards[n].remove(slot)
            self.slots.free(slot)

    def switch_off(self, slot: int) -> None:
        """Stops steering the slot for good (finished, gated) and frees its small-model rows."""
        with self._lock:
            self.slots.active[slot] = False
            self.suspend(slot)

    def suspend(self, slot: int) -> None:
        """Frees the slot's small-model rows but keeps its state (it re-prefills when it steps again)."""
        with self._lock:
            if self.slots.in_runner[slot]:
                self.runner.remove(self.slots.keys[slot])
                self.slots.in_runner[slot] = False

    def fail(self, slot: int, reason: str) -> None:
        """Marks a request that cannot be steered: its next step ends it (only EOS stays possible)."""
        with self._lock:
            if self.slots.failed[slot] is None:
                logger.warning("CoSteer: a steered request cannot be steered and is ended now: %s", reason)
                self.ended += 1
            self.slots.failed[slot] = reason
            self.switch_off(slot)

    def failure(self, slot: int) -> Optional[str]:
        """Why the request in ``slot`` was ended, or ``None``."""
        return self.slots.failed[slot]

    def warn_once(self, reason: str, msg: str, *args) -> None:
        """Logs ``msg`` the first time ``reason`` occurs; reasons are fixed names (never per request): bounded."""
        if reason not in self.warned:
            self.warned.add(reason)
            logger.warning(msg, *args)

    def key(self, slot: int) -> Hashable:
        """The slot's key in the runner."""
        return self.slots.keys[slot]

    def request_of(self, slot: int) -> SteerRequest:
        return self.slots.requests[slot]

    def is_active(self, slot: int) -> bool:
        return bool(self.slots.active[slot])

    def streak(self, slot: int) -> int:
        return int(self.slots.streak[slot])

    def slot_stats(self, slot: int) -> dict:
        """Per request: steps steered, the n-gram guard's firings, the confidence streak, failure."""
        guard = self._guards.get(int(self.slots.ngram[slot]))
        return {"steered_steps": int(self.slots.steered[slot]), "guard_fired": guard.fired(slot) if guard else 0,
                "streak": int(self.slots.streak[slot]), "active": bool(self.slots.active[slot]), "failed": self.slots.failed[slot]}

    def stats(self) -> dict:
        used = self.slots.used
        return {"slots": int(used.sum()), "active": int((self.slots.active & used).sum()),
                "steered_steps": int(self.slots.steered[used].sum()), "small_steps": self.small_steps,
                "ended": self.ended, "guard": {n: g.stats() for n, g in self._guards.items()}}

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self, logits: torch.Tensor, rows: Sequence[int], slots: Sequence[int],
             outputs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Steers ``logits[rows[i]]`` (in place) for the request in ``slots[i]``, whose generated ids
        (large vocabulary) are ``outputs[i]``; returns ``logits``.

        Failed requests are ended; gated ones are left to the large model from now on; rows whose
        large logits hold NaN/+inf, or whose output list still holds ``-1`` placeholders (vLLM's async
        scheduling), are left as they are for this step (logged once).
        """
        with self._lock:
            failed = [r for r, s in zip(rows, slots) if self.slots.failed[s] is not None]
            live = [j for j, s in enumerate(slots) if self.slots.active[s]]
            if not live:
                return self.end(logits, failed)
            index = torch.tensor([rows[j] for j in live], dtype=torch.long, device=logits.device)
            live_slots = torch.tensor([slots[j] for j in live])
            large = logits.index_select(0, index)
            keep = self.gate(live_slots, large)
            finite = ~(torch.isnan(large) | torch.isposinf(large)).any(dim=-1).cpu()
            if not bool(finite.all()):
                self.warn_once("nonfinite", "CoSteer: large-model logits with NaN/+inf in a steered row; that row "
                               "is left as it is for the step (logged once)")
            # vLLM's async scheduling leaves -1 where the newest id is not written yet (older ids are real)
            placed = torch.tensor([not outputs[j] or outputs[j][-1] >= 0 for j in live], dtype=torch.bool)
            if not bool(placed.all()):
                self.warn_once("placeholder", "CoSteer: output ids still hold -1 placeholders (async scheduling); "
                               "the row is left as it is for that step (logged once)")
            keep &= finite & placed
            picked = keep.nonzero().flatten()
            if not picked.numel():
                return self.end(logits, failed)
            sel_slots = live_slots[picked]
            sel_outputs = [outputs[live[j]] for j in picked.tolist()]
            z_with, z_without, ok = self.small(sel_slots, sel_outputs)
            failed += [rows[live[j]] for j in picked[~ok].tolist()]
            picked, sel_slots = picked[ok], sel_slots[ok]
            if picked.numel():
                sub = picked.to(logits.device)
                steered = self.combine(large.index_select(0, sub), sel_slots, z_with, z_without,
                                       [sel_outputs[j] for j in ok.nonzero().flatten().tolist()])
                logits.index_copy_(0, index.index_select(0, sub), steered.to(logits.dtype))
            return self.end(logits, failed)

    def gate(self, slots: torch.Tensor, large: torch.Tensor) -> torch.Tensor:
        """AdaCoSteer for these rows: updates their streaks and switches off the rows that reach their
        patience now; returns ``[n]`` bool, True for the rows still steered this step."""
        with self._lock:
            threshold = self.slots.gate[slots]
            on = torch.isfinite(threshold)
            if bool(on.any()):
                confident = on & ((1.0 - top_probability(large).cpu()) < threshold)
                streak = torch.where(confident, self.slots.streak[slots] + 1, torch.zeros_like(slots))
                self.slots.streak[slots] = streak
                for slot in slots[on & (streak >= self.slots.patience[slots])].tolist():
                    self.switch_off(slot)
            return self.slots.active[slots].clone()

    def small(self, slots: torch.Tensor, outputs: Sequence[Sequence[int]]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both branches' next-token logits for these rows in one batched small-model step.

        Returns ``(z_with, z_without, ok)``: logits for the ``ok`` rows only (in order); the other
        rows' requests were failed with a logged reason (could not be admitted, their step raised
        even alone, non-finite logits, a token the small vocabulary lacks).
        """
        with self._lock:
            ok = torch.zeros(slots.numel(), dtype=torch.bool)
            batch, where = [], []
            for j, (slot, out) in enumerate(zip(slots.tolist(), outputs)):
                try:
                    if self.vocab_map is not None:
                        out = self.vocab_map.to_small(out)
                    if not self.slots.in_runner[slot]:  # admission, one request at a time
                        request = self.slots.requests[slot]
                        self.runner.add(self.slots.keys[slot], *request.branches, salt=request.salt)
                        self.slots.in_runner[slot] = True
                except STEP_ERRORS as e:
                    self.fail(slot, f"the small model could not take it: {e}")
                    continue
                batch.append((self.slots.keys[slot], out))
                where.append(j)
            z_with, z_without, stepped = self._run(batch, [int(slots[j]) for j in where])
            usable = _usable(z_with) & _usable(z_without)
            for j, fine in zip([w for w, s in zip(where, stepped) if s], usable.tolist()):
                if fine:
                    ok[j] = True
                else:
                    self.fail(int(slots[j]), "the small model's logits are not finite (NaN or +inf)")
            self.small_steps += 1
            return z_with[usable], z_without[usable], ok

    def _run(self, batch: list, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
        """The runner's step; if the batch raises, each row alone, so only the failing ones are ended.

        Returns the logits of the rows that stepped and, per row of ``batch``, whether it did.
        """
        if not batch:
            empty = torch.empty(0, self.runner.vocab_size)
            return empty, empty, []
        parts, stepped = [], []
        with torch_threads(self.threads):
            try:
                z_with, z_without = self.runner.step(batch)
                return z_with, z_without, [True] * len(batch)
            except STEP_ERRORS as e:
                logger.warning("CoSteer: a small-model step over %d rows failed (%s); retrying each row alone",
                               len(batch), e)
            for item, slot in zip(batch, slots):  # the runner's step leaves nothing half-done: safe to retry
                try:
                    parts.append(self.runner.step([item]))
                    stepped.append(True)
                except STEP_ERRORS as e:
                    logger.exception("CoSteer: the small model's step failed for one request")
                    self.fail(slot, f"the small model failed: {e}")
                    stepped.append(False)
        if not parts:
            empty = torch.empty(0, self.runner.vocab_size)
            return empty, empty, stepped
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), stepped

    def combine(self, large: torch.Tensor, slots: torch.Tensor, z_with: torch.Tensor, z_without: torch.Tensor,
                histories: Sequence[Sequence[int]], eos_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The update and its options for rows that were stepped: per-row gain, delta clipping, the
        plausibility constraint, the n-gram guard (on ``histories``: each row's generated large ids),
        the EOS guard (on ``eos_logits``, default ``large``). Returns ``[n, V_large]`` float32."""
        with self._lock:
            dev = large.device
            z_with, z_without = z_with.to(dev), z_without.to(dev)
            gains, clip = self.slots.gain[slots].to(dev), self.slots.clip[slots]
            update = self.vocab_map.steer if self.vocab_map is not None else _update
            clipped = torch.isfinite(clip)
            if bool(clipped.any()):
                steered = torch.empty(large.shape, dtype=torch.float32, device=dev)
                for rows, fn in ((~clipped, steer), (clipped, _clipped_update(clip[clipped].to(dev)))):
                    at = rows.nonzero().flatten().to(dev)
                    if at.numel():
                        steered[at] = update(large[at], z_with[at], z_without[at], gains[at], fn=fn)
            else:
                steered = update(large, z_with, z_without, gains, fn=steer)
            alpha = self.slots.plaus[slots]
            if bool((alpha > 0).any()):
                steered = self._plausible(steered, large, slots, alpha.to(dev))
            self.slots.steered[slots] += 1
            steered = self._ngram_guard(steered, slots, histories)
            eos = self.slots.eos[slots]
            if bool(torch.isfinite(eos).any()):
                steered = force_eos(steered, large if eos_logits is None else eos_logits, self.eos_token_ids,
                                    eos.to(dev))
            return steered

    def _plausible(self, steered, large, slots, alpha):
        for mode in ("mask", "large"):
            rows = torch.tensor([a > 0 and self.slots.requests[s].variants.plausibility_mode == mode
                                 for s, a in zip(slots.tolist(), alpha.tolist())], dtype=torch.bool)
            if bool(rows.any()):
                at = rows.nonzero().flatten().to(steered.device)
                steered[at] = style.constrain_to_plausible(steered[at], large[at], alpha[at], mode=mode)
        return steered

    def _ngram_guard(self, steered: torch.Tensor, slots: torch.Tensor, histories) -> torch.Tensor:
        if not self._guards:
            return steered
        ns = self.slots.ngram[slots]
        for n, guard in self._guards.items():
            rows = (ns == n).nonzero().flatten()
            if not rows.numel():
                continue
            tails = torch.full((rows.numel(), n - 1), -1, dtype=torch.long)
            for i, j in enumerate(rows.tolist()):  # the last n-1 ids of prompt + output (O(n) per row)
                generated = list(histories[j][max(0, len(histories[j]) - (n - 1)):])
                short = n - 1 - len(generated)
                public = self.slots.requests[int(slots[j])].public_ids
                tail = list(public[max(0, len(public) - short):]) + generated if short > 0 else generated
                if tail:
                    tails[i, n - 1 - len(tail):] = torch.tensor(tail)
            at = rows.to(steered.device)
            steered[at] = guard.apply(steered[at], slots[rows], tails.to(steered.device))
        return steered

    def end(self, logits: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """Only end-of-sequence stays possible in ``rows``: the request finishes now (fail closed)."""
        if rows and self.end_token_id is not None:
            index = torch.tensor(list(rows), device=logits.device, dtype=torch.long)
            ended = torch.full((len(rows), logits.shape[1]), NEG_INF, dtype=logits.dtype, device=logits.device)
            ended[:, self.end_token_id] = 0.0
            logits.index_copy_(0, index, ended)
        return logits


def _usable(z: torch.Tensor) -> torch.Tensor:
    """``[n]`` True where a row of small-model logits is a distribution: no NaN / +inf, one finite entry.

    One cheap reduction decides the common case (every entry finite)."""
    total = z.float().sum(dim=-1)
    fine = torch.isfinite(total)
    if bool(fine.all()):
        return fine.cpu()
    bad = (~fine).nonzero().flatten()
    rows = z.index_select(0, bad)
    fine[bad] = ~(torch.isnan(rows).any(-1) | torch.isposinf(rows).any(-1)) & torch.isfinite(rows).any(-1)
    return fine.cpu()


def _update(large, z_with, z_without, gains, fn=steer):
    return fn(large, z_with, z_without, gains)


def _clipped_update(clip: torch.Tensor):
    def fn(large, z_with, z_without, gains):
        return style.steer_clipped(large, z_with, z_without, gains, clip)
    return fn
