"""CoSteer as a Hugging Face ``transformers`` logits processor."""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
from transformers import LogitsProcessor

from .core import CoSteerConfig, Variants
from .loading import eos_token_ids
from .prompts import PromptLike, strip_left_padding
from .small_model import SmallModelRunner, check_rows
from .steering import Steerer
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
        variants: :class:`~costeer_processor.core.Variants`: AdaCoSteer gating (a row gated off is
            left unsteered for the rest of the call and its small-model rows are freed), the EOS
            guard, the style options and the context n-gram guard; all off by default.
        vocab_map: a :class:`~costeer_processor.vocab.VocabularyMap` when the large and small
            tokenizers differ: steering runs on their common tokens and generated ids are mapped
            to the small vocabulary. ``None`` (default) requires one shared tokenizer.
        large_tokenizer: the large model's tokenizer; needed with ``vocab_map`` (to read the
            prompts from ``input_ids``); default: the runner's tokenizer.
        cache_salt: keys this processor's entries in the runner's context cache: processors with
            other salts (other tenants) never share cached context KV, so cache timing cannot tell
            one tenant that another used the same context. ``None``: the unsalted pool.

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
    generating and the steps it was steered (they differ under gating); :meth:`failures` says which
    rows were ended because the small model failed for them (one row's failure ends that row only:
    it gets end-of-sequence, the others go on); :meth:`release` frees the small-model rows at once.
    The per-step work is :class:`~costeer_processor.steering.Steerer`'s, shared with every adapter.

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
        variants: Variants = Variants(),
        prompts: Optional[Sequence[PromptLike]] = None,
        eos_token_id: Optional[int | Sequence[int]] = None,
        vocab_map: Optional[VocabularyMap] = None,
        large_tokenizer=None,
        cache_salt: Optional[str] = None,
    ):
        if not isinstance(runner, SmallModelRunner):
            raise TypeError(f"runner must be a SmallModelRunner, got {type(runner).__name__}")
        if not isinstance(config, CoSteerConfig):
            hint = (" (the signature is (runner, contexts, config, *, prompts=None, ...): pass prompts by keyword"
                    " or leave them out)" if isinstance(config, (list, tuple)) else "")
            raise TypeError(f"config must be a CoSteerConfig, got {type(config).__name__}{hint}")
        if not isinstance(variants, Variants):
            raise TypeError(f"variants must be a Variants, got {type(variants).__name__}")
        if vocab_map is not None and not isinstance(vocab_map, VocabularyMap):
            raise TypeError(f"vocab_map must be a VocabularyMap, got {type(vocab_map).__name__}")
        if vocab_map is not None and large_tokenizer is None and prompts is None:
            raise ValueError("with a vocab_map, pass large_tokenizer= so the prompts can be read from input_ids")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise TypeError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
        self.runner, self.config, self.variants, self.cache_salt = runner, config, variants, cache_salt
        self.gain = config.gain
        self.vocab_map = vocab_map
        self.large_tokenizer = large_tokenizer if large_tokenizer is not None else runner.tokenizer
        if eos_token_id is None:
            eos_token_id = eos_token_ids(self.large_tokenizer)
        self.eos_token_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        self.steerer = Steerer(runner, self.large_tokenizer, self.eos_token_ids, vocab_map=vocab_map)
        self._slots: list[int] = []
        self.reset(contexts, prompts)
        weakref.finalize(self, _release, self.steerer, self._slots)

    def reset(self, contexts: Sequence[str], prompts: Optional[Sequence[PromptLike]] = None) -> None:
        """Sets new contexts (and optionally prompts), one per row, and drops any small-model state."""
        check_rows(contexts if prompts is None else prompts, contexts)
        for c in contexts:  # empty / certainly too long: refused now, before generate runs
            self.runner.check_context(c)
        self._contexts = list(contexts)
        # With prompts given, encoding validates every row now; otherwise at the first call.
        self._branches = (None if prompts is None else
                          [self.runner.encode_branches(p, c) for p, c in zip(prompts, contexts)])
        _release(self.steerer, self._slots)
        self._prompt_ids: Optional[torch.Tensor] = None
        self._last_length = -1
        self._steered = torch.zeros(0, dtype=torch.long)

    def _start(self, input_ids: torch.Tensor) -> None:
        _release(self.steerer, self._slots)
        pad = self.large_tokenizer.pad_token_id
        prompts = [strip_left_padding(row, pad) for row in input_ids.tolist()]
        branches = self._branches or [None] * len(prompts)
        requests = [self.steerer.request(ids, c, gain=self.gain, variants=self.variants, salt=self.cache_salt,
                                         branches=b) for ids, c, b in zip(prompts, self._contexts, branches)]
        self._slots[:] = [self.steerer.admit(r) for r in requests]
        self._prompt_ids = input_ids.clone()
        rows = input_ids.shape[0]
        self._finished = torch.zeros(rows, dtype=torch.bool)
        self.live_steps = torch.zeros(rows, dtype=torch.long)

    @property
    def steered_steps(self) -> torch.Tensor:
        """Per row: the steps it was steered (fewer than ``live_steps`` under gating); kept after :meth:`release`."""
        if self._slots:
            self._steered = torch.tensor([self.steerer.slot_stats(s)["steered_steps"] for s in self._slots],
                                         dtype=torch.long)
        return self._steered

    def failures(self) -> list[Optional[str]]:
        """Per row: why it was ended (the small model failed for it), or ``None``."""
        return [self.steerer.failure(s) for s in self._slots]

    def _is_new_call(self, input_ids: torch.Tensor) -> bool:
        p = self._prompt_ids
        return (p is None or input_ids.shape[1] <= p.shape[1]
                or not torch.equal(input_ids[:, : p.shape[1]], p.to(input_ids.device)))

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch = input_ids.shape[0]
        if batch != len(self._contexts):
            raise ValueError(
                f"CoSteerLogitsProcessor got {batch} rows but has {len(self._contexts)} contexts. Beam search, "
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
            ended = torch.isin(generated[:, -1].cpu(), torch.tensor(self.eos_token_ids)) & ~self._finished
            for r in ended.nonzero().flatten().tolist():  # finished rows stop costing small-model compute
                self.steerer.switch_off(self._slots[r])
            self._finished |= ended
        self.live_steps += (~self._finished).long()
        rows = (~self._finished).nonzero().flatten().tolist()
        if not rows:
            return scores
        gen = generated.tolist()
        return self.steerer.step(scores.clone(), rows, [self._slots[r] for r in rows], [gen[r] for r in rows])

    def release(self) -> None:
        """Frees this processor's small-model rows now (otherwise at garbage collection)."""
        self.steered_steps  # noqa: B018 (kept for reading after the release)
        _release(self.steerer, self._slots)
        self._prompt_ids = None


def _release(steerer: Steerer, slots: list) -> None:
    for slot in slots:
        steerer.release(slot)
    slots.clear()
