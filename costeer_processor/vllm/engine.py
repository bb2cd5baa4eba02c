"""The per-step work shared by both vLLM adapters: the small model, the handles, the steering step.

:class:`SteeringEngine` owns the :class:`~costeer_processor.SmallModelRunner` and applies
:func:`~costeer_processor.core.steer` (with AdaCoSteer gating and the EOS guard) to the steered
rows of a logits tensor in one batched small-model forward. The adapters in
:mod:`~costeer_processor.vllm.v1` and :mod:`~costeer_processor.vllm.v2` only translate vLLM's
batch bookkeeping (row indices, request slots) into :meth:`SteeringEngine.open`,
:meth:`SteeringEngine.close` and :meth:`SteeringEngine.apply`.

A request that leaves the batch is either gone for good (finished, aborted) or will come back
(preempted, not scheduled this step); vLLM tells the processor neither. Its :class:`Handle` is
kept (:class:`Parking`) only while vLLM still holds the request's SamplingParams and the request
has not certainly finished by vLLM's own stop rule, and only when it carries state worth keeping
(an AdaCoSteer streak, or gating already switched it off).

Example (tiny models built on the spot; inside vLLM, :meth:`SteeringEngine.from_vllm_config`
builds the same from the engine's settings)::

    >>> import torch
    >>> from vllm import SamplingParams
    >>> from costeer_processor import SmallModelRunner
    >>> from costeer_processor.testing import build_tiny_model, build_tiny_tokenizer
    >>> from costeer_processor.vllm.settings import EngineSettings
    >>> tok = build_tiny_tokenizer()
    >>> engine = SteeringEngine(EngineSettings(), tok, SmallModelRunner(build_tiny_model(tok), tok), [tok.eos_token_id])
    >>> prompt = tok.apply_chat_template([{"role": "user", "content": "suggest a dinner"}],
    ...                                  add_generation_prompt=True)["input_ids"]
    >>> handle = engine.open(SamplingParams(extra_args={"costeer_context": "I am vegan."}), prompt)
    >>> logits = torch.randn(1, len(tok))
    >>> steered = engine.apply(logits.clone(), [0], [handle], [[]])
    >>> bool(torch.equal(steered, logits)), engine.steps
    (False, 1)
    >>> engine.close(handle, outputs=[])  # left the batch with nothing worth keeping: forgotten
    >>> len(engine.runner), len(engine.parking)
    (0, 0)
"""

from __future__ import annotations

import json
import logging
import os
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from ..loading import CoSteerModelError, check_same_tokenizer, eos_token_ids, load_model, load_tokenizer
from ..small_model import SmallModelRunner
from ..steering import Steerer, torch_threads
from ..vocab import VocabularyMap
from .settings import SALT_ARG, EngineSettings, RequestArgs, costeer_items, parse_request_args, resolve_small_model, \
    settings_from_vllm_config

try:  # vLLM's logger tree, so messages show up formatted like the engine's own
    from vllm.logger import init_logger

    logger = init_logger("vllm.costeer")
except ImportError:  # pragma: no cover - vLLM missing
    logger = logging.getLogger("costeer_processor.vllm")

__all__ = ["Handle", "Parking", "SteeringEngine", "certainly_finished"]

def _ref(obj: Any) -> Callable[[], Any]:
    """A weak reference to ``obj`` where possible (SamplingParams allow it), else a strong one."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


@dataclass(eq=False)
class Handle:
    """One steered request as the processor sees it (the adapters map rows / slots to handles).

    Its steering state (gain, variants, AdaCoSteer streak, active, failure) lives in the engine's
    :class:`~costeer_processor.steering.Steerer`, in ``slot`` (admitted once the prompt is known).
    ``params_ref`` reaches the request's SamplingParams without keeping them alive (their identity
    survives preemption inside the worker); ``seen`` is the number of output ids at the last step
    the request was steered (``-1``: none yet).
    """

    args: Optional[RequestArgs]  # None only for a request whose arguments the engine refused (failed)
    params_ref: Callable[[], Any]
    steerer: Optional[Steerer] = None
    slot: Optional[int] = None
    seen: int = -1
    refused: Optional[str] = None  # why the request failed before it had a slot
    salt: Optional[str] = None  # the request's vLLM cache_salt (keys its context-cache entries)

    @property
    def params(self) -> Any:
        """The request's SamplingParams, or ``None`` once vLLM has dropped the request."""
        return self.params_ref()

    def belongs_to(self, params: Any) -> bool:
        return self.params_ref() is params

    @property
    def key(self):
        """The request's key in the small-model runner (``None`` before admission)."""
        return None if self.slot is None else self.steerer.key(self.slot)

    @property
    def failed(self) -> Optional[str]:
        """Why the request cannot be steered (it is ended at its next step), or ``None``."""
        return self.refused if self.slot is None else self.steerer.failure(self.slot)

    @property
    def active(self) -> bool:
        return self.failed is None and (self.slot is None or self.steerer.is_active(self.slot))

    @property
    def streak(self) -> int:
        return 0 if self.slot is None else self.steerer.streak(self.slot)

    @property
    def branches(self) -> Optional[tuple]:
        return None if self.slot is None else tuple(self.steerer.request_of(self.slot).branches)

    @property
    def needs_prompt(self) -> bool:
        return self.slot is None and self.refused is None

    @property
    def fresh(self) -> bool:
        """Nothing worth keeping across preemption: still steering and no confident streak."""
        return self.active and self.streak == 0


def certainly_finished(params: Any, n_outputs: int, last_token: Optional[int]) -> bool:
    """vLLM's own stop rule where it can be applied: ``max_tokens`` reached, or EOS / a stop token
    after ``min_tokens`` (stop strings and aborts are not visible here)."""
    max_tokens = getattr(params, "max_tokens", None)
    if isinstance(max_tokens, int) and n_outputs >= max_tokens:
        return True
    if last_token is None or n_outputs < (getattr(params, "min_tokens", 0) or 0):
        return False
    return last_token == getattr(params, "eos_token_id", None) or last_token in (
        getattr(params, "stop_token_ids", None) or ())


class Parking:
    """Handles of requests that left the batch but may come back, held only while vLLM holds the request.

    Keyed by the identity of the request's SamplingParams (weakly referenced: when vLLM drops a
    finished or aborted request, its entry goes too). Several handles may share one params object
    (``n > 1`` children without a seed); :meth:`take` gives a resumed request the one that saw the
    longest output shorter than the resumed one. ``LIMIT`` params objects at most (oldest first out).
    """

    LIMIT = 4096

    def __init__(self, on_drop: Callable[[Handle], None] = lambda handle: None) -> None:
        self.on_drop = on_drop  # called for every handle the parking lets go of without handing it back
        self._entries: OrderedDict[int, tuple[weakref.ref, list[Handle]]] = OrderedDict()
        self._dead: list[int] = []  # filled by weakref callbacks (any time, even mid-iteration); purged here

    def __len__(self) -> int:
        self._purge()
        return sum(len(handles) for _, handles in self._entries.values())

    def _purge(self) -> None:
        while self._dead:
            key = self._dead.pop()
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is None:
                del self._entries[key]
                for handle in entry[1]:
                    self.on_drop(handle)

    def put(self, handle: Handle) -> bool:
        """Parks ``handle``; ``False`` when its request is gone or cannot be recognised when it comes back."""
        self._purge()
        params = handle.params
        if params is None or not isinstance(handle.params_ref, weakref.ref):
            return False  # dropped by vLLM, or params that cannot be held weakly (test doubles): not kept
        key = id(params)
        entry = self._entries.get(key)
        if entry is None or entry[0]() is not params:
            entry = self._entries[key] = (weakref.ref(params, lambda _, k=key, dead=self._dead: dead.append(k)), [])
        entry[1].append(handle)
        self._entries.move_to_end(key)
        while len(self._entries) > self.LIMIT:
            for old in self._entries.popitem(last=False)[1][1]:
                self.on_drop(old)
        return True

    def take(self, params: Any, generated: int, candidates: Iterable[Handle] = ()) -> Optional[Handle]:
        """The handle of a request resumed with ``generated`` output ids: among the parked handles of
        ``params`` and ``candidates`` (the adapter's own, ties go to parked ones), the one that saw the
        longest output shorter than ``generated``; removed from the parking. ``None``: start afresh."""
        self._purge()
        key = id(params)
        entry = self._entries.get(key)
        parked = entry[1] if entry is not None and entry[0]() is params else []
        pool = parked + [h for h in candidates if h.belongs_to(params)]
        best = max((h for h in pool if 0 <= h.seen < generated), key=lambda h: h.seen, default=None)
        if best is not None and any(h is best for h in parked):
            parked.remove(best)
            if not parked:
                del self._entries[key]
        return best


class SteeringEngine:
    """The small model, the large tokenizer and the steering step; one per vLLM processor instance.

    Args:
        settings: engine-wide settings.
        large_tokenizer: the large model's tokenizer (decodes prompt ids).
        runner: a :class:`~costeer_processor.SmallModelRunner` over the small model.
        eos_token_ids: ids that end a sequence (for the EOS guard).
        vocab_map: the id map when the two tokenizers differ (``None``: one shared tokenizer).
    """

    def __init__(self, settings: EngineSettings, large_tokenizer, runner: SmallModelRunner,
                 eos_token_ids: Sequence[int], vocab_map: Optional[VocabularyMap] = None):
        self.settings = settings
        self.large_tokenizer = large_tokenizer
        self.runner = runner
        self.vocab_map = vocab_map
        self.steerer = Steerer(runner, large_tokenizer, eos_token_ids, vocab_map=vocab_map, threads=settings.threads)
        self.bridge = self.steerer.bridge
        self.eos_token_ids = self.steerer.eos_token_ids
        self.threads = settings.threads
        self.parking = Parking(on_drop=self._forget)
        # COSTEER_STATS_FILE: the runner's stats as JSON, rewritten at most once a second and whenever the
        # runner becomes empty (the soak benchmark and the server tests read it from outside the engine).
        self.stats_file = os.environ.get("COSTEER_STATS_FILE") or None
        self._stats_written = (0.0, -1)

    @property
    def steps(self) -> int:
        """Batched small-model steps run (tests / benchmarks)."""
        return self.steerer.small_steps

    def stats(self) -> dict:
        """The runner's stats plus the engine's own (steps, parked handles)."""
        return {**self.runner.stats(), "steps": self.steps, "parked": len(self.parking),
                "steering": self.steerer.stats()}

    def report(self) -> None:
        """Writes :meth:`stats` to ``COSTEER_STATS_FILE`` when due (no-op without that variable)."""
        if self.stats_file is None:
            return
        now, requests = time.monotonic(), len(self.runner)
        last, last_requests = self._stats_written
        if now - last < 1.0 and not (requests == 0 and last_requests != 0):
            return
        self._stats_written = (now, requests)
        tmp = self.stats_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.stats(), f)
        os.replace(tmp, self.stats_file)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_vllm_config(cls, vllm_config: Any, device: Any) -> "SteeringEngine":
        """Loads the small model named by the settings; clear ``ValueError``s when it is missing or mismatched."""
        settings = settings_from_vllm_config(vllm_config)
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("CoSteer cannot run with speculative decoding (every drafted position would need "
                             "its own small-model step); start the engine without a speculative config")
        mc = vllm_config.model_config
        path = resolve_small_model(settings)
        tok_kwargs = {"trust_remote_code": bool(getattr(mc, "trust_remote_code", False))}
        if getattr(mc, "tokenizer_revision", None):
            tok_kwargs["revision"] = mc.tokenizer_revision
        large_fp32 = str(getattr(mc, "dtype", "")).replace("torch.", "") in ("float32", "float")
        dtype = settings.dtype or ("float32" if large_fp32 else "bfloat16")
        dev = torch.device(settings.device) if settings.device else torch.device(device)
        try:
            large_tok = load_tokenizer(mc.tokenizer, **tok_kwargs)
            small_tok = load_tokenizer(path)
            vmap = (VocabularyMap.for_pair(large_tok, small_tok) if settings.vocab_map == "on" else
                    VocabularyMap.if_needed(large_tok, small_tok) if settings.vocab_map == "auto" else None)
            if vmap is None:
                check_same_tokenizer(large_tok, small_tok, hint="vocab_map is 'off'; set it to 'auto' to steer on "
                                     "the tokens both vocabularies share")
            with torch_threads(settings.threads):
                model = load_model(path, dtype, device=None if dev.type == "cpu" else str(dev))
        except CoSteerModelError as e:
            raise ValueError(f"CoSteer: {e}") from None
        small_vocab = int(model.get_output_embeddings().weight.shape[0])
        if small_vocab < len(small_tok):
            raise ValueError(f"CoSteer: the small model has {small_vocab} output rows for a tokenizer of "
                             f"{len(small_tok)} tokens")
        runner = SmallModelRunner(model, small_tok, context_position=settings.context_position,
                                  context_separator=settings.context_separator,
                                  max_context_tokens=settings.max_context_tokens,
                                  context_cache_mb=settings.context_cache_mb)
        eos = eos_token_ids(large_tok, mc.try_get_generation_config())
        logger.info("CoSteer: small model %s (%s, %s, %d params), default gain %.6g, context %s, "
                    "max %d context tokens", path, dtype, dev, sum(p.numel() for p in model.parameters()),
                    settings.default_gain, settings.context_position, runner.max_context_tokens)
        engine = cls(settings, large_tok, runner, eos, vmap)
        if vmap is not None:
            logger.info("CoSteer: different tokenizers (large %d tokens, small %d): steering on the %d tokens "
                        "they share; the small model reads prompts in %s", len(large_tok), len(small_tok),
                        vmap.size, "its own chat template" if engine.bridge.inverter.usable
                        else "the large model's template (it could not be inverted)")
        return engine

    # ------------------------------------------------------------------ requests
    def open(self, params: Any, prompt_ids: Optional[Sequence[int]] = None, generated: int = 0,
             candidates: Iterable[Handle] = ()) -> Optional[Handle]:
        """A handle for a request entering the batch, or ``None`` when it is not steered.

        ``generated``: output ids the request already has (``> 0``: resumed after preemption; its
        parked handle, or one of the adapter's ``candidates``, comes back with its AdaCoSteer state).
        Never raises. Fails closed: a steered request that fails here (it passed the frontend but
        not the engine) gets a handle marked ``failed`` and is ended at its first step (see
        :meth:`apply`), never continued unsteered; the reason is logged.
        """
        extra = getattr(params, "extra_args", None)
        if not costeer_items(extra):
            return None
        if generated > 0:
            handle = self.parking.take(params, generated, candidates)
            if handle is not None:
                return handle
        try:
            args = parse_request_args(extra, self.settings)
        except ValueError as e:
            handle = Handle(args=None, params_ref=_ref(params), steerer=self.steerer)
            self.fail(handle, f"its CoSteer arguments were refused by the engine: {e}")
            return handle
        salt = extra.get(SALT_ARG)
        handle = Handle(args=args, params_ref=_ref(params), steerer=self.steerer,
                        salt=salt if isinstance(salt, str) else None)
        if prompt_ids is not None:
            self.set_prompt(handle, prompt_ids)
        return handle

    def set_prompt(self, handle: Handle, prompt_ids: Sequence[int]) -> None:
        """Admits the request into the steerer (the branch encoder validates it once, here)."""
        if not handle.needs_prompt:
            return
        args = handle.args
        try:
            request = self.steerer.request(prompt_ids, args.context, gain=args.gain, variants=args.variants,
                                           salt=handle.salt)
        except ValueError as e:
            self.fail(handle, str(e))
            return
        handle.slot = self.steerer.admit(request)

    def fail(self, handle: Handle, reason: str) -> None:
        """Marks a request that cannot be steered: :meth:`apply` ends it (only EOS allowed)."""
        if handle.slot is not None:
            self.steerer.fail(handle.slot, reason)
        elif handle.refused is None:
            logger.warning("CoSteer: a steered request cannot be steered and is ended now: %s", reason)
            handle.refused = reason
            self.steerer.ended += 1

    def close(self, handle: Handle, outputs: Optional[Sequence[int]] = None) -> None:
        """The request left the batch: its small-model rows are freed, its handle kept only if it may return.

        ``outputs``: its output ids as vLLM holds them (V1); without them, the count at its last step.
        """
        self.suspend(handle)
        self.report()
        params = handle.params
        if outputs is not None:
            n, last = len(outputs), (outputs[-1] if outputs else None)
        else:  # the token sampled at its last step is not visible (V2)
            n, last = handle.seen + 1, None
        if (handle.fresh or params is None or certainly_finished(params, n, last)
                or not self.parking.put(handle)):
            self._forget(handle)

    def _forget(self, handle: Handle) -> None:
        """The request is gone for good: its steering slot is freed."""
        if handle.slot is not None:
            self.steerer.release(handle.slot)
            handle.slot, handle.refused = None, handle.failed or "released"

    def suspend(self, handle: Handle) -> None:
        """Frees the small-model rows but keeps the handle (it re-prefills if it comes back)."""
        if handle.slot is not None:
            self.steerer.suspend(handle.slot)

    def warn_once(self, reason: str, msg: str, *args) -> None:
        """Logs ``msg`` the first time ``reason`` occurs (the steerer's bounded set of reasons)."""
        self.steerer.warn_once(reason, msg, *args)

    @property
    def _warned(self) -> set[str]:
        return self.steerer.warned

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def apply(self, logits: torch.Tensor, rows: Sequence[int], handles: Sequence[Handle],
              outputs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Steers ``logits[rows[i]]`` for ``handles[i]`` whose generated ids so far are ``outputs[i]``.

        One :meth:`Steerer.step <costeer_processor.steering.Steerer.step>` for all rows: failed requests
        are ended, gated ones left to the large model, the rest steered in one batched small-model step.
        """
        refused = [r for r, h in zip(rows, handles) if h.slot is None and h.refused is not None]
        picked = [(r, h, o) for r, h, o in zip(rows, handles, outputs) if h.slot is not None]
        for _, h, out in picked:
            h.seen = len(out)
        if refused:
            self.steerer.end(logits, refused)
        if picked:
            self.steerer.step(logits, [r for r, _, _ in picked], [h.slot for _, h, _ in picked],
                              [o for _, _, o in picked])
        self.report()
        return logits
