"""CoSteer as a Hugging Face ``transformers`` logits processor."""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
from transformers import LogitsProcessor

from .core import CoSteerConfig, Variants, force_eos, steer, update_confidence_streak
from .loading import eos_token_ids
from .prompts import PromptBridge, PromptLike, strip_left_padding
from .small_model import SmallModelRunner, check_rows
from .vocab import VocabularyMap


class CoSteerLogitsProcessor(LogitsProcessor):
    r"""Steers a large model's ``generate`` with a small model that holds each row's personal context.

    Each step, every unfinished row's small-model branches (with / without its context) advance
    by the token the large model just emitted, in one batched forward, and the row's scores
    become CoSteer's log-probabilities ``log_softmax(ref + g * delta)``. Sampling warpers
    (temperature, top-p, ...) run after this processor, as in the paper.

    Args:
        runner: the :class:`~costeer_processor.SmallModelRunner` (holds the small model; reuse it).
        contexts: one personal context per batch row (non-empty strings).
        config: :class:`~costeer_processor.CoSteerConfig` (official defaults).
        prompts: optional. By default each row's prompt is read from the ``input_ids`` of the
            first call, exactly as the large model reads it (left padding removed), so the small
            model sees the same conversation (see :mod:`costeer_processor.prompts`). Give the
            prompts (strings or chat messages) only to build the small model's input from them
            instead; they are rendered with its chat template, nothing added.
        eos_token_id: id(s) that end a row; finished rows stop costing small-model compute.
            Default: :func:`costeer_processor.loading.eos_token_ids` of the large tokenizer.
        gate_threshold, gate_patience: AdaCoSteer confidence gating (see
            :class:`~costeer_processor.core.Variants`). When set, a row whose large model had
            ``1 - max p < gate_threshold`` for ``gate_patience`` consecutive steps is left
            unsteered for the rest of the call and its small-model rows are freed.
        eos_guard: if set (e.g. 0.5), a row stops as soon as the large model's EOS probability
            exceeds it, so steering cannot stretch answers.
        vocab_map: a :class:`~costeer_processor.vocab.VocabularyMap` when the large and small
            tokenizers differ: steering runs on their common tokens and generated ids are mapped
            to the small vocabulary. ``None`` (default) requires one shared tokenizer.
        large_tokenizer: the large model's tokenizer; needed with ``vocab_map`` (to read the
            prompts from ``input_ids``); default: the runner's tokenizer.

    Example (a tiny random pair; real models work the same)::

        >>> import torch
        >>> from transformers import LogitsProcessorList
        >>> from costeer_processor import SmallModelRunner
        >>> from costeer_processor.hf import CoSteerLogitsProcessor
        >>> from costeer_processor.testing import build_tiny_model, build_tiny_tokenizer
        >>> tok = build_tiny_tokenizer()
        >>> tok.padding_side = "left"  # batched generation with a decoder-only model
        >>> large, small = build_tiny_model(tok, hidden_size=96, seed=1), build_tiny_model(tok, seed=2)
        >>> runner = SmallModelRunner(small, tok)
        >>> chats = [[{"role": "user", "content": "suggest a dinner"}], [{"role": "user", "content": "plan my weekend"}]]
        >>> inputs = tok.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
        ...                                  return_dict=True)
        >>> proc = CoSteerLogitsProcessor(runner, ["I am vegan.", "I love hiking."])
        >>> out = large.generate(**inputs, logits_processor=LogitsProcessorList([proc]), do_sample=False,
        ...                      max_new_tokens=4, pad_token_id=tok.pad_token_id)
        >>> out.shape[0], proc.steered_steps.tolist()
        (2, [4, 4])

    After a call, ``live_steps`` / ``steered_steps`` hold, per row, the steps the row was still
    generating and the steps it was steered (they differ under gating); :meth:`release` frees the
    small-model rows at once.

    Reuse: the processor may be passed to several ``generate`` calls; a new call is detected from
    ``input_ids`` and the small-model state starts over. For other contexts make a new processor
    (cheap: the model lives in the runner) or call :meth:`reset`. Not supported (clear errors):
    beam search / ``num_return_sequences > 1`` (the batch no longer matches the contexts),
    assisted or speculative decoding, and continuous batching (``generate_batch``).
    """

    supports_continuous_batching = False

    def __init__(
        self,
        runner: SmallModelRunner,
        contexts: Sequence[str],
        config: CoSteerConfig = CoSteerConfig(),
        *,
        prompts: Optional[Sequence[PromptLike]] = None,
        eos_token_id: Optional[int | Sequence[int]] = None,
        gate_threshold: Optional[float] = None,
        gate_patience: int = Variants.gate_patience,
        eos_guard: Optional[float] = None,
        vocab_map: Optional[VocabularyMap] = None,
        large_tokenizer=None,
    ):
        if not isinstance(runner, SmallModelRunner):
            raise TypeError(f"runner must be a SmallModelRunner, got {type(runner).__name__}")
        if not isinstance(config, CoSteerConfig):
            hint = (" (the signature is (runner, contexts, config, *, prompts=None, ...): pass prompts by keyword"
                    " or leave them out)" if isinstance(config, (list, tuple)) else "")
            raise TypeError(f"config must be a CoSteerConfig, got {type(config).__name__}{hint}")
        self.variants = Variants(gate_threshold, gate_patience, eos_guard)
        if vocab_map is not None and not isinstance(vocab_map, VocabularyMap):
            raise TypeError(f"vocab_map must be a VocabularyMap, got {type(vocab_map).__name__}")
        if vocab_map is not None and large_tokenizer is None and prompts is None:
            raise ValueError("with a vocab_map, pass large_tokenizer= so the prompts can be read from input_ids")
        self.runner = runner
        self.config = config
        self.gain = config.gain
        self.vocab_map = vocab_map
        self.large_tokenizer = large_tokenizer if large_tokenizer is not None else runner.tokenizer
        self.bridge = PromptBridge(self.large_tokenizer, runner.splicer, translate=vocab_map is not None)
        if eos_token_id is None:
            eos_token_id = eos_token_ids(self.large_tokenizer)
        self.eos_token_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        self._keys: list[tuple[int, int]] = []
        self.reset(contexts, prompts)
        weakref.finalize(self, _forget, runner, self._keys)

    @property
    def gate_threshold(self) -> Optional[float]:
        return self.variants.gate_threshold

    @property
    def gate_patience(self) -> int:
        return self.variants.gate_patience

    @property
    def eos_guard(self) -> Optional[float]:
        return self.variants.eos_guard

    def reset(self, contexts: Sequence[str], prompts: Optional[Sequence[PromptLike]] = None) -> None:
        """Sets new contexts (and optionally prompts), one per row, and drops any small-model state."""
        check_rows(contexts if prompts is None else prompts, contexts)
        for c in contexts:  # empty / certainly too long: refused now, before generate runs
            self.runner.check_context(c)
        self._contexts = list(contexts)
        # With prompts given, encoding validates every row now; otherwise at the first call.
        self._branches = (None if prompts is None else
                          [self.runner.encode_branches(p, c) for p, c in zip(prompts, contexts)])
        _forget(self.runner, self._keys)
        self._keys[:] = [(id(self), i) for i in range(len(contexts))]
        self._prompt_ids: Optional[torch.Tensor] = None
        self._last_length = -1

    def _branches_from_ids(self, input_ids: torch.Tensor) -> list[tuple[list[int], list[int]]]:
        pad = self.large_tokenizer.pad_token_id
        return [self.runner.branch_ids_from_text(self.bridge(strip_left_padding(row, pad)), c)
                for row, c in zip(input_ids.tolist(), self._contexts)]

    def _start(self, input_ids: torch.Tensor) -> None:
        branches = self._branches if self._branches is not None else self._branches_from_ids(input_ids)
        _forget(self.runner, self._keys)
        for key, (with_ids, without_ids) in zip(self._keys, branches):
            self.runner.add(key, with_ids, without_ids)
        self._prompt_ids = input_ids.clone()
        rows = input_ids.shape[0]
        self._active = torch.ones(rows, dtype=torch.bool)
        self._finished = torch.zeros(rows, dtype=torch.bool)
        self._streak = torch.zeros(rows, dtype=torch.long)
        self.live_steps = torch.zeros(rows, dtype=torch.long)
        self.steered_steps = torch.zeros(rows, dtype=torch.long)

    def _is_new_call(self, input_ids: torch.Tensor) -> bool:
        p = self._prompt_ids
        return (p is None or input_ids.shape[1] <= p.shape[1]
                or not torch.equal(input_ids[:, : p.shape[1]], p.to(input_ids.device)))

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch = input_ids.shape[0]
        if batch != len(self._keys):
            raise ValueError(
                f"CoSteerLogitsProcessor got {batch} rows but has {len(self._keys)} contexts. Beam search, "
                "num_return_sequences > 1 and a batch that does not match the contexts are not supported; "
                "use greedy or sampling with one context per prompt")
        if self._is_new_call(input_ids):
            self._start(input_ids)
        elif input_ids.shape[1] != self._last_length + 1:
            raise RuntimeError(
                "CoSteerLogitsProcessor must see every decoding step exactly once (input went from "
                f"{self._last_length} to {input_ids.shape[1]} tokens); assisted/speculative decoding is not supported")
        self._last_length = input_ids.shape[1]
        generated = input_ids[:, self._prompt_ids.shape[1]:]

        if generated.shape[1] and self.eos_token_ids:
            self._finished |= torch.isin(generated[:, -1].cpu(), torch.tensor(self.eos_token_ids))
            self._switch_off(self._finished)
        if self.gate_threshold is not None:
            self._streak = update_confidence_streak(self._streak, scores.cpu(), self.gate_threshold)
            self._switch_off(self._streak >= self.gate_patience)
        self.live_steps += (~self._finished).long()
        self.steered_steps += self._active.long()

        rows = self._active.nonzero().flatten().tolist()
        if not rows:
            return scores
        gen = generated.tolist()
        vmap = self.vocab_map
        z_with, z_without = self.runner.step(
            [(self._keys[r], vmap.to_small(gen[r]) if vmap else gen[r]) for r in rows])
        dev = scores.device
        index = torch.tensor(rows, device=dev)
        large = scores.index_select(0, index)
        steer_fn = vmap.steer if vmap else steer
        steered = steer_fn(large, z_with.to(dev), z_without.to(dev), self.gain)
        if self.eos_guard is not None:
            steered = force_eos(steered, large, self.eos_token_ids, self.eos_guard)
        out = scores.clone()
        out[index] = steered.to(scores.dtype)
        return out

    def release(self) -> None:
        """Frees this processor's small-model rows now (otherwise at garbage collection)."""
        _forget(self.runner, self._keys)
        self._prompt_ids = None

    def _switch_off(self, rows: torch.Tensor) -> None:
        """Stops steering these rows for the rest of the call and frees their small-model rows."""
        newly = rows & self._active
        for r in newly.nonzero().flatten().tolist():
            self.runner.remove(self._keys[r])
        self._active &= ~rows


def _forget(runner: SmallModelRunner, keys: list) -> None:
    for key in keys:
        runner.remove(key)
