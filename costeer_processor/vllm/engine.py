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

import contextlib
import itertools
import json
import logging
import os
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from ..core import force_eos, steer, top_probability
from ..loading import CoSteerModelError, check_same_tokenizer, eos_token_ids, load_model, load_tokenizer
from ..prompts import PromptBridge
from ..small_model import SmallModelRunner
from ..vocab import VocabularyMap
from .settings import SALT_ARG, EngineSettings, RequestArgs, costeer_items, parse_request_args, resolve_small_model, \
    settings_from_vllm_config

try:  # vLLM's logger tree, so messages show up formatted like the engine's own
    from vllm.logger import init_logger

    logger = init_logger("vllm.costeer")
except ImportError:  # pragma: no cover - vLLM missing
    logger = logging.getLogger("costeer_processor.vllm")

__all__ = ["Handle", "Parking", "SteeringEngine", "certainly_finished", "torch_threads"]

_keys = itertools.count()


def _ref(obj: Any) -> Callable[[], Any]:
    """A weak reference to ``obj`` where possible (SamplingParams allow it), else a strong one."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


@dataclass(eq=False)
class Handle:
    """One steered request as the processor sees it (the adapters map rows / slots to handles).

    ``params_ref`` reaches the request's SamplingParams without keeping them alive (their identity
    survives preemption inside the worker); ``seen`` is the number of output ids at the last step
    the request was steered (``-1``: none yet).
    """

    args: Optional[RequestArgs]  # None only for a request whose arguments the engine refused (failed)
    params_ref: Callable[[], Any]
    key: int = field(default_factory=lambda: next(_keys))
    branches: Optional[tuple[list[int], list[int]]] = None
    active: bool = True
    streak: int = 0
    in_runner: bool = False
    seen: int = -1
    failed: Optional[str] = None  # why the request cannot be steered: it is ended at its next step
    salt: Optional[str] = None  # the request's vLLM cache_salt (keys its context-cache entries)

    @property
    def params(self) -> Any:
        """The request's SamplingParams, or ``None`` once vLLM has dropped the request."""
        return self.params_ref()

    def belongs_to(self, params: Any) -> bool:
        return self.params_ref() is params

    @property
    def needs_prompt(self) -> bool:
        return self.active and self.branches is None and self.failed is None

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

    def __init__(self) -> None:
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
            self._entries.popitem(last=False)
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


# What a failing small-model step can raise (torch reports device and shape errors, out of memory
# included, as RuntimeError). Caught so that one bad step leaves its requests unsteered instead of
# taking down the engine and every other user's request with it.
_STEP_ERRORS = (RuntimeError, ValueError, KeyError, IndexError)


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
        self.bridge = PromptBridge(large_tokenizer, runner.splicer, translate=vocab_map is not None)
        self.eos_token_ids = sorted({int(t) for t in eos_token_ids if t is not None})
        self.threads = settings.threads
        self.parking = Parking()
        self._warned: set[str] = set()  # fixed reasons only: bounded
        self.steps = 0  # apply calls that ran the small model (tests / benchmarks)
        # COSTEER_STATS_FILE: the runner's stats as JSON, rewritten at most once a second and whenever the
        # runner becomes empty (the soak benchmark and the server tests read it from outside the engine).
        self.stats_file = os.environ.get("COSTEER_STATS_FILE") or None
        self._stats_written = (0.0, -1)

    def stats(self) -> dict:
        """The runner's stats plus the engine's own (steps, parked handles)."""
        return {**self.runner.stats(), "steps": self.steps, "parked": len(self.parking)}

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
            handle = Handle(args=None, params_ref=_ref(params))
            self.fail(handle, f"its CoSteer arguments were refused by the engine: {e}")
            return handle
        salt = extra.get(SALT_ARG)
        handle = Handle(args=args, params_ref=_ref(params), salt=salt if isinstance(salt, str) else None)
        if prompt_ids is not None:
            self.set_prompt(handle, prompt_ids)
        return handle

    def set_prompt(self, handle: Handle, prompt_ids: Sequence[int]) -> None:
        if handle.failed is not None:
            return
        try:
            handle.branches = self.runner.branch_ids_from_text(self.bridge(prompt_ids), handle.args.context)
        except ValueError as e:
            self.fail(handle, str(e))

    def fail(self, handle: Handle, reason: str) -> None:
        """Marks a request that cannot be steered: :meth:`apply` ends it (only EOS allowed)."""
        logger.warning("CoSteer: a steered request cannot be steered and is ended now: %s", reason)
        handle.failed = reason
        self._switch_off(handle)

    def close(self, handle: Handle, outputs: Optional[Sequence[int]] = None) -> None:
        """The request left the batch: its small-model rows are freed, its handle kept only if it may return.

        ``outputs``: its output ids as vLLM holds them (V1); without them, the count at its last step.
        """
        self.suspend(handle)
        self.report()
        if handle.fresh:
            return
        params = handle.params
        if outputs is not None:
            n, last = len(outputs), (outputs[-1] if outputs else None)
        else:  # the token sampled at its last step is not visible (V2)
            n, last = handle.seen + 1, None
        if params is not None and not certainly_finished(params, n, last):
            self.parking.put(handle)

    def suspend(self, handle: Handle) -> None:
        """Frees the small-model rows but keeps the handle (it re-prefills if it comes back)."""
        if handle.in_runner:
            self.runner.remove(handle.key)
            handle.in_runner = False

    def _switch_off(self, handle: Handle) -> None:
        handle.active = False
        self.suspend(handle)

    def warn_once(self, reason: str, msg: str, *args) -> None:
        """Logs ``msg`` the first time ``reason`` occurs; reasons are fixed names (never per request): bounded."""
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning(msg, *args)

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def apply(self, logits: torch.Tensor, rows: Sequence[int], handles: Sequence[Handle],
              outputs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Steers ``logits[rows[i]]`` for ``handles[i]`` whose generated ids so far are ``outputs[i]``.

        One batched small-model forward for all rows. Rows whose large logits hold NaN/+inf, whose
        output list still holds -1 placeholders, or whose request was gated off are left as they are.
        """
        failed = [r for r, h in zip(rows, handles) if h.failed is not None]
        if failed:
            self._end(logits, failed)
        live = [(r, h, o) for r, h, o in zip(rows, handles, outputs) if h.active and h.branches is not None]
        if not live:
            return logits
        dev = logits.device
        index = torch.tensor([r for r, _, _ in live], device=dev, dtype=torch.long)
        large = logits.index_select(0, index)
        for _, h, out in live:
            h.seen = len(out)

        # AdaCoSteer: u = 1 - max p; `patience` confident steps in a row switch a request off for good
        # (checked before steering this step, as in the HF processor).
        gated = [j for j, (_, h, _) in enumerate(live) if h.args.gate_threshold is not None]
        if gated:
            thr = torch.tensor([live[j][1].args.gate_threshold for j in gated], dtype=torch.float32, device=dev)
            streak = torch.tensor([live[j][1].streak for j in gated], dtype=torch.long, device=dev)
            confident = (1.0 - top_probability(large[gated])) < thr
            for j, s in zip(gated, torch.where(confident, streak + 1, torch.zeros_like(streak)).tolist()):
                h = live[j][1]
                h.streak = s
                if s >= h.args.gate_patience:
                    self._switch_off(h)

        bad_rows = (torch.isnan(large) | torch.isposinf(large)).any(dim=-1).tolist()
        keep, small_outputs = [], []
        for j, (r, h, out) in enumerate(live):
            if not h.active:
                continue
            if bad_rows[j]:
                self.warn_once("nonfinite", "CoSteer: large-model logits with NaN/+inf in a steered row; "
                                "that row is left unsteered for the step (logged once)")
                continue
            if out and min(out) < 0:
                self.warn_once("placeholder", "CoSteer: output ids still hold -1 placeholders (async "
                                "scheduling); the row is left unsteered for that step (logged once)")
                continue
            if self.vocab_map is not None:
                try:
                    out = self.vocab_map.to_small(out)
                except ValueError as e:  # an unsteered step chose a token the small model lacks
                    self.warn_once("unmapped", "CoSteer: a request is switched off: %s (logged once)", e)
                    self._switch_off(h)
                    continue
            keep.append(j)
            small_outputs.append(out)
        if not keep:
            return logits
        for j in list(keep):  # admission, one request at a time: one failure ends that request only
            h = live[j][1]
            if not h.in_runner:
                try:
                    self.runner.add(h.key, *h.branches, salt=h.salt)
                    h.in_runner = True
                except _STEP_ERRORS as e:
                    self.fail(h, f"the small model could not admit it: {e}")
                    self._end(logits, [live[j][0]])
                    small_outputs.pop(keep.index(j))
                    keep.remove(j)
        if not keep:
            return logits
        chosen = [live[j][1] for j in keep]
        try:
            with torch_threads(self.threads):
                z_with, z_without = self.runner.step([(h.key, out) for h, out in zip(chosen, small_outputs)])
        except _STEP_ERRORS as e:
            # The runner rolled its cache back; these requests cannot be steered now: end them.
            logger.exception("CoSteer: the small model failed; the %d request(s) of this step are ended",
                             len(chosen))
            for h in chosen:
                self.fail(h, f"the small model failed: {e}")
            self._end(logits, [live[j][0] for j in keep])
            return logits
        self.steps += 1
        sub_index = torch.tensor(keep, device=dev, dtype=torch.long)
        large_kept = large.index_select(0, sub_index) if len(keep) != len(live) else large
        gains = torch.tensor([h.args.gain for h in chosen], dtype=torch.float32, device=dev)
        steer_fn = self.vocab_map.steer if self.vocab_map is not None else steer
        steered = steer_fn(large_kept, z_with.to(dev), z_without.to(dev), gains)
        steered = self._guard(steered, large_kept, [h.args.eos_guard for h in chosen])
        logits.index_copy_(0, index.index_select(0, sub_index), steered.to(logits.dtype))
        self.report()
        return logits

    def _end(self, logits: torch.Tensor, rows: Sequence[int]) -> None:
        """Only end-of-sequence stays possible in ``rows``: the request finishes now (fail closed)."""
        end_id = self.large_tokenizer.eos_token_id
        if end_id is None:
            if not self.eos_token_ids:
                return
            end_id = self.eos_token_ids[0]
        index = torch.tensor(list(rows), device=logits.device, dtype=torch.long)
        ended = torch.full((len(rows), logits.shape[1]), float("-inf"), dtype=logits.dtype, device=logits.device)
        ended[:, end_id] = 0.0
        logits.index_copy_(0, index, ended)

    def _guard(self, steered: torch.Tensor, large: torch.Tensor, thresholds: list[Optional[float]]) -> torch.Tensor:
        """The EOS guard, per row threshold (rows without one are left as they are)."""
        if all(t is None for t in thresholds):
            return steered
        thr = torch.tensor([float("inf") if t is None else t for t in thresholds], dtype=torch.float32,
                           device=steered.device)
        return force_eos(steered, large, self.eos_token_ids, thr)
