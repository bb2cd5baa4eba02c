"""One generation pipeline for the ``costeer`` command and the evaluation harness.

render -> ``generate`` -> trim at EOS -> decode, with timing and per-row token counts, for
CoSteer and each of its baselines:

==================  =======  ===========================================  ==========================
run                 model    what the model reads                         steering
==================  =======  ===========================================  ==========================
large alone         large    the conversation                             --
small alone         small    the conversation                             --
large + context     large    the conversation, context spliced in         -- (privacy-breaking bound)
small + context     small    the conversation, context spliced in         --
CoSteer             large    the conversation                             the small model, gain g
==================  =======  ===========================================  ==========================

*The conversation* is the user's prompt with the paper's system prompt
(:data:`~costeer_processor.prompts.DEFAULT_SYSTEM_PROMPT`) as an ordinary first message
(:func:`~costeer_processor.prompts.with_system_prompt`), rendered with each model's own chat
template. CoSteer never adds anything itself: the HF processor reads the small model's prompt
from the large model's ``input_ids`` (:mod:`costeer_processor.prompts`); the "with context"
baselines splice the context into the rendered conversation with
:meth:`~costeer_processor.prompts.ContextSplicer.splice`, the same rule the small model's
with-context branch uses.

Example (a tiny random pair; the text is gibberish)::

    >>> from costeer_processor import CoSteerConfig
    >>> from costeer_processor.pipeline import Pair
    >>> from costeer_processor.testing import build_tiny_model, build_tiny_tokenizer
    >>> tok = build_tiny_tokenizer()
    >>> pair = Pair(build_tiny_model(tok, hidden_size=96, seed=1), tok, build_tiny_model(tok, seed=2), tok)
    >>> out = pair.run("large", ["Suggest a dinner."], ["I am vegan."], config=CoSteerConfig(), max_new_tokens=4)
    >>> out.n_tokens, out.steered_steps
    ([4], [4])
    >>> alone = pair.run("large", ["Suggest a dinner."], max_new_tokens=4)
    >>> alone.steered_steps is None, len(alone.texts)
    (True, 1)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .core import CoSteerConfig, Variants
from .core.sampling import GREEDY, Sampling
from .loading import check_causal_lm, eos_token_ids, load_model, load_tokenizer
from .prompts import DEFAULT_SYSTEM_PROMPT, ContextBudget, ContextSplicer, PromptLike, with_system_prompt
from .small_model import SmallModelRunner
from .vocab import VocabularyMap

__all__ = ["Sampling", "GREEDY", "Generation", "render", "trim_at_eos", "generate", "Pair"]

ROLES = ("large", "small")




@dataclass
class Generation:
    """One batch's outputs.

    Attributes:
        texts: decoded answers (special tokens dropped, stripped).
        n_tokens: tokens generated per row, the end-of-sequence token included.
        ended: whether each row emitted an end-of-sequence token (else it hit the cap).
        seconds: wall time of the ``generate`` call (prefill included).
        steered_steps / live_steps / small_forwards: CoSteer runs only (see
            :class:`~costeer_processor.hf.CoSteerLogitsProcessor`); ``None`` otherwise.
    """

    texts: list[str]
    n_tokens: list[int]
    ended: list[bool]
    seconds: float
    steered_steps: Optional[list[int]] = None
    live_steps: Optional[list[int]] = None
    small_forwards: Optional[int] = None

    @property
    def tokens(self) -> int:
        return sum(self.n_tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def render(splicer: ContextSplicer, prompts: Sequence[PromptLike], contexts: Optional[Sequence[str]] = None,
           system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT) -> list[str]:
    """Each prompt as the templated conversation (``system_prompt`` first unless it has one), with
    its context spliced into the last user turn when ``contexts`` is given."""
    texts = [splicer.render(with_system_prompt(p, system_prompt)) for p in prompts]
    if contexts is not None:
        texts = [splicer.splice(t, c) for t, c in zip(texts, contexts)]
    return texts


def trim_at_eos(generated: torch.Tensor, eos_ids: Sequence[int]) -> tuple[list[int], list[bool]]:
    """Per row of ``[rows, new_tokens]`` ids: tokens up to and including the first EOS, and whether it ended."""
    if not eos_ids or generated.shape[1] == 0:
        return [generated.shape[1]] * generated.shape[0], [False] * generated.shape[0]
    is_eos = torch.isin(generated, torch.tensor(list(eos_ids), device=generated.device))
    ended = is_eos.any(dim=1)
    n = torch.where(ended, is_eos.int().argmax(dim=1) + 1, torch.full_like(ended, generated.shape[1], dtype=torch.long))
    return n.tolist(), ended.tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model, tokenizer, texts: Sequence[str], *, eos_ids: Sequence[int], max_new_tokens: int,
             processors: Sequence = (), sampling: Sampling = GREEDY, min_new_tokens: Optional[int] = None,
             streamer=None) -> Generation:
    """Batched ``generate`` over already-rendered ``texts`` (left padding, nothing added to the text)."""
    from transformers import LogitsProcessorList

    enc = tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False).to(model.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids), pad_token_id=pad_id,
                  logits_processor=LogitsProcessorList(processors), **sampling.generate_kwargs())
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if streamer is not None:
        kwargs["streamer"] = streamer
    if sampling.temperature > 0:
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
    _sync(model.device)
    start = time.perf_counter()
    out = model.generate(**enc, **kwargs)
    _sync(model.device)
    seconds = time.perf_counter() - start
    gen = out[:, enc["input_ids"].shape[1]:].cpu()
    n_tokens, ended = trim_at_eos(gen, eos_ids)
    texts = [t.strip() for t in tokenizer.batch_decode([row[:n] for row, n in zip(gen.tolist(), n_tokens)],
                                                       skip_special_tokens=True)]
    return Generation(texts, n_tokens, ended, seconds)


class Pair:
    """A large and a small model (either may be left out) that run CoSteer and its baselines.

    Args:
        large_model, large_tokenizer, small_model, small_tokenizer: transformers models and their
            tokenizers; a model may be ``None`` when no run needs it (its tokenizer is still needed).
        system_prompt: put first into every conversation of both models (``None``: nothing added).
        small_config: the small model's config when the model itself is not loaded (for
            :meth:`check_contexts`).

    Two tokenizer families are supported: CoSteer then steers on the tokens both vocabularies
    share (:class:`~costeer_processor.vocab.VocabularyMap`).
    """

    def __init__(self, large_model, large_tokenizer, small_model, small_tokenizer, *,
                 system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT, small_config=None):
        self.models = {"large": large_model, "small": small_model}
        self.tokenizers = {"large": large_tokenizer, "small": small_tokenizer}
        self.system_prompt = system_prompt
        self.small_config = small_config if small_model is None else small_model.config
        self.vocab_map = VocabularyMap.if_needed(large_tokenizer, small_tokenizer)
        self._splicers: dict[tuple, ContextSplicer] = {}
        self._runners: dict[tuple, SmallModelRunner] = {}
        self._eos: dict[str, list[int]] = {}
        self.dirs: dict[str, Path] = {}
        self.dtype: Optional[str] = None
        self.device: Optional[str] = None

    # the roles by name (what models.load_pair's callers read)
    large_model = property(lambda self: self.models["large"])
    small_model = property(lambda self: self.models["small"])
    large_tokenizer = property(lambda self: self.tokenizers["large"])
    small_tokenizer = property(lambda self: self.tokenizers["small"])
    large_dir = property(lambda self: self.dirs.get("large"))
    small_dir = property(lambda self: self.dirs.get("small"))

    @classmethod
    def load(cls, large_dir: Path, small_dir: Path, dtype: str, *, device: Optional[str] = None,
             load_large: bool = True, load_small: bool = True,
             system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT) -> "Pair":
        """Both tokenizers, and the models asked for (the other one later with :meth:`load_model`)."""
        small = load_model(small_dir, dtype, device=device) if load_small else None
        pair = cls(None, load_tokenizer(large_dir), small, load_tokenizer(small_dir), system_prompt=system_prompt,
                   small_config=None if load_small else check_causal_lm(small_dir))
        pair.dirs, pair.dtype, pair.device = {"large": Path(large_dir), "small": Path(small_dir)}, dtype, device
        if load_large:
            pair.load_model("large")
        return pair

    def load_model(self, role: str):
        """The ``role`` model, loaded from its folder on first use (pairs made by :meth:`load`)."""
        if self.models[role] is None:
            if role not in self.dirs:
                raise ValueError(f"this pair has no {role} model")
            self.models[role] = load_model(self.dirs[role], self.dtype, device=self.device)
            self._eos.pop(role, None)
        return self.models[role]

    def eos_ids(self, role: str) -> list[int]:
        """:func:`~costeer_processor.loading.eos_token_ids` of the ``role`` model."""
        if role not in self._eos:
            model = self.models[role]
            self._eos[role] = eos_token_ids(self.tokenizers[role], getattr(model, "generation_config", None))
        return self._eos[role]

    def splicer(self, role: str, position: Optional[str] = None, separator: Optional[str] = None) -> ContextSplicer:
        """The ``role`` model's :class:`ContextSplicer` (``None`` keeps ContextSplicer's defaults)."""
        key = (role, position, separator)
        if key not in self._splicers:
            kw = {k: v for k, v in (("position", position), ("separator", separator)) if v is not None}
            self._splicers[key] = ContextSplicer(self.tokenizers[role], **kw)
        return self._splicers[key]

    def runner(self, position: Optional[str] = None, separator: Optional[str] = None) -> SmallModelRunner:
        """The small model's runner for one splicing rule (kept: it holds the model and its cache)."""
        key = (position, separator)
        if key not in self._runners:
            s = self.splicer("small", position, separator)
            self._runners[key] = SmallModelRunner(self.load_model("small"), self.tokenizers["small"],
                                                  context_position=s.position, context_separator=s.separator)
        return self._runners[key]

    def render(self, role: str, prompts: Sequence[PromptLike], contexts: Optional[Sequence[str]] = None, *,
               position: Optional[str] = None, separator: Optional[str] = None) -> list[str]:
        """What the ``role`` model reads (see :func:`render`)."""
        return render(self.splicer(role, position, separator), prompts, contexts, self.system_prompt)

    def check_contexts(self, prompts: Sequence[PromptLike], contexts: Sequence[str], *,
                       position: Optional[str] = None, separator: Optional[str] = None) -> None:
        """Every context fits the small model (:class:`~costeer_processor.prompts.ContextBudget` over its
        tokenizer and window); raises :class:`~costeer_processor.prompts.ContextTooLongError` naming the row."""
        tok = self.tokenizers["small"]
        budget = ContextBudget.for_model(tok, self.small_config)
        texts = self.render("small", prompts, contexts, position=position, separator=separator)
        for i, text in enumerate(texts):
            what = f"context + prompt of row {i + 1}" if len(texts) > 1 else "context + prompt"
            budget.check_text(text, what)
            budget.check_tokens(len(tok(text, add_special_tokens=False)["input_ids"]), what)

    def run(self, role: str, prompts: Sequence[PromptLike], contexts: Optional[Sequence[str]] = None, *,
            with_context: bool = False, config: Optional[CoSteerConfig] = None, variants: Variants = Variants(),
            max_new_tokens: int, position: Optional[str] = None, separator: Optional[str] = None,
            sampling: Sampling = GREEDY, min_new_tokens: Optional[int] = None, stream: bool = False) -> Generation:
        """One batch through the ``role`` model.

        Args:
            with_context: splice each row's context into the model's own prompt (a baseline).
            config: steer the large model with the small one (CoSteer); ``None``: no steering.
            variants: AdaCoSteer gating and the EOS guard of a steered run.
            stream: print the answer as it is generated (one row only).
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if config is not None and role != "large":
            raise ValueError("CoSteer steers the large model: run it with role='large'")
        if (config is not None or with_context) and contexts is None:
            raise ValueError("this run reads the contexts: pass one context per prompt")
        model, tok = self.load_model(role), self.tokenizers[role]
        texts = self.render(role, prompts, contexts if with_context else None, position=position, separator=separator)
        streamer = None
        if stream and len(texts) == 1:
            from transformers import TextStreamer

            streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        common = dict(eos_ids=self.eos_ids(role), max_new_tokens=max_new_tokens, sampling=sampling,
                      min_new_tokens=min_new_tokens, streamer=streamer)
        if config is None:
            return generate(model, tok, texts, **common)
        from .hf import CoSteerLogitsProcessor

        runner = self.runner(position, separator)
        before = runner.forward_count
        proc = CoSteerLogitsProcessor(runner, list(contexts), config, eos_token_id=self.eos_ids("large"),
                                      variants=variants, vocab_map=self.vocab_map, large_tokenizer=tok)
        try:
            out = generate(model, tok, texts, processors=[proc], **common)
        finally:
            proc.release()  # free the small-model cache rows now, not at garbage collection
        out.steered_steps = proc.steered_steps.tolist()
        out.live_steps = proc.live_steps.tolist()
        out.small_forwards = runner.forward_count - before
        return out
