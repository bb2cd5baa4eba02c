"""The systems compared, and batched greedy generation for each (HF ``generate``, left padding).

=================  =======  ==============================  ============================
system             model    prompt                          steering
=================  =======  ==============================  ============================
``small``          small    input                           --
``small_ctx``      small    context + input (task's order)  --
``large``          large    input                           -- (same as gain 0)
``large_ctx``      large    context + input                 -- (privacy-breaking bound)
``proxy``          large    input                           small model, g = 1
``costeer``        large    input                           small model, g = 1.783257
``costeer_gate``   large    input                           as costeer + AdaCoSteer gating
``costeer_g<g>``   large    input                           small model, g = <g> (sweep)
=================  =======  ==============================  ============================
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from transformers import LogitsProcessorList

from ..core import CoSteerConfig, costeer_gain
from ..hf import CoSteerLogitsProcessor
from ..small_model import DEFAULT_SYSTEM_PROMPT, ContextSplicer, SmallModelRunner

__all__ = ["System", "BASE_SYSTEMS", "make_systems", "sweep_system", "Models", "GenerationResult",
           "generate", "DEFAULT_GAIN"]

DEFAULT_GAIN = costeer_gain(CoSteerConfig())


@dataclass(frozen=True)
class System:
    name: str
    model: str  # "small" or "large"
    with_context: bool = False  # context in the prompt of `model` itself
    gain: Optional[float] = None  # None: no steering
    gate_threshold: Optional[float] = None
    gate_patience: int = 3
    eos_guard: Optional[float] = None

    @property
    def steered(self) -> bool:
        return self.gain is not None

    @property
    def uses_context(self) -> bool:
        """Whether its output depends on the private context at all."""
        return self.with_context or self.steered

    @property
    def effective_gain(self) -> Optional[float]:
        """The steering gain this system amounts to (large alone = 0); None for the others."""
        if self.steered:
            return self.gain
        if self.model == "large" and not self.with_context:
            return 0.0
        return None

    def describe(self) -> dict:
        d = asdict(self)
        d.pop("name")
        return d


BASE_SYSTEMS = ("small", "small_ctx", "large", "large_ctx", "proxy", "costeer", "costeer_gate")


def make_systems(names: Sequence[str], *, gate_threshold: float = 0.1, gate_patience: int = 3,
                 eos_guard: Optional[float] = None) -> list[System]:
    table = {
        "small": System("small", "small"),
        "small_ctx": System("small_ctx", "small", with_context=True),
        "large": System("large", "large"),
        "large_ctx": System("large_ctx", "large", with_context=True),
        "proxy": System("proxy", "large", gain=1.0, eos_guard=eos_guard),
        "costeer": System("costeer", "large", gain=DEFAULT_GAIN, eos_guard=eos_guard),
        "costeer_gate": System("costeer_gate", "large", gain=DEFAULT_GAIN, gate_threshold=gate_threshold,
                               gate_patience=gate_patience, eos_guard=eos_guard),
    }
    out = []
    for n in names:
        if n in table:
            out.append(table[n])
        elif n.startswith("costeer_g"):
            out.append(sweep_system(float(n[len("costeer_g"):]), eos_guard=eos_guard))
        else:
            raise ValueError(f"unknown system {n!r}; choose from {', '.join(BASE_SYSTEMS)} or costeer_g<gain>")
    return out


def _fmt_gain(g: float) -> str:
    return f"{g:g}"


def sweep_system(gain: float, eos_guard: Optional[float] = None) -> System:
    return System(f"costeer_g{_fmt_gain(gain)}", "large", gain=float(gain), eos_guard=eos_guard)


@dataclass
class Models:
    """The pair under evaluation (one tokenizer: CoSteer's same-vocabulary path)."""

    large: torch.nn.Module
    small: torch.nn.Module
    tokenizer: object  # the large model's tokenizer (decodes every output)
    small_tokenizer: object
    large_name: str = "large"
    small_name: str = "small"

    def __post_init__(self):
        if self.tokenizer.get_vocab() != self.small_tokenizer.get_vocab():
            raise ValueError("the large and small tokenizers differ; this harness needs one shared vocabulary")
        for m in (self.large, self.small):
            m.eval()
            gc = m.generation_config
            # Plain greedy, nothing else: the paper decodes by argmax of the (steered) policy,
            # and a repetition penalty from a model's defaults would change `ref`.
            gc.do_sample = False
            for attr in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
                if hasattr(gc, attr):
                    setattr(gc, attr, None)
            gc.repetition_penalty = 1.0
        self.eos_ids = _eos_ids(self.large, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]

    def model(self, which: str):
        return self.large if which == "large" else self.small

    def tok(self, which: str):
        return self.tokenizer if which == "large" else self.small_tokenizer


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    gen = model.generation_config.eos_token_id
    for x in ([gen] if isinstance(gen, int) else list(gen or [])):
        ids.append(int(x))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        ids.append(int(im_end))
    return sorted(set(ids))


@dataclass
class GenerationResult:
    texts: list[str]
    n_tokens: list[int]
    seconds: float
    ended: Optional[list[bool]] = None  # True where the row emitted an end-of-sequence token
    steered_steps: Optional[list[int]] = None
    live_steps: Optional[list[int]] = None
    small_forwards: Optional[int] = None


def render_prompts(tokenizer, inputs: Sequence[str], contexts: Optional[Sequence[str]], position: str,
                   separator: str, system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT) -> list[str]:
    """Chat-templated prompt texts, with each context spliced in exactly as the small model's runner does."""
    splicer = ContextSplicer(tokenizer, position, separator, system_prompt)
    texts = [splicer.render(x) for x in inputs]
    if contexts is not None:
        texts = [splicer.splice(t, c) for t, c in zip(texts, contexts)]
    return texts


@torch.inference_mode()
def _hf_generate(model, tokenizer, texts, *, max_new_tokens, eos_ids, pad_id, processors=None,
                 min_new_tokens=None) -> tuple[torch.Tensor, float]:
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids, pad_token_id=pad_id)
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    t0 = time.perf_counter()
    out = model.generate(**enc, logits_processor=LogitsProcessorList(processors or []), **kwargs)
    seconds = time.perf_counter() - t0
    return out[:, enc["input_ids"].shape[1]:].cpu(), seconds


def _split_outputs(gen: torch.Tensor, tokenizer, eos_ids) -> tuple[list[str], list[int], list[bool]]:
    """Per row: text (special tokens dropped), tokens generated (EOS included), whether it ended."""
    texts, counts, ended = [], [], []
    eos = set(eos_ids)
    for row in gen.tolist():
        n, stop = len(row), False
        for i, t in enumerate(row):
            if t in eos:
                n, stop = i + 1, True
                break
        counts.append(n)
        ended.append(stop)
        texts.append(tokenizer.decode(row[:n], skip_special_tokens=True).strip())
    return texts, counts, ended


def generate(system: System, models: Models, inputs: Sequence[str], contexts: Sequence[str], *,
             position: str, separator: str, max_new_tokens: int, runner: Optional[SmallModelRunner] = None,
             min_new_tokens: Optional[int] = None) -> GenerationResult:
    """One batch of greedy generations for ``system`` (all rows in one ``generate`` call)."""
    tok = models.tok(system.model)
    model = models.model(system.model)
    texts = render_prompts(tok, inputs, contexts if system.with_context else None, position, separator)
    if not system.steered:
        gen, seconds = _hf_generate(model, tok, texts, max_new_tokens=max_new_tokens, eos_ids=models.eos_ids,
                                    pad_id=models.pad_id, min_new_tokens=min_new_tokens)
        out_texts, counts, ended = _split_outputs(gen, models.tokenizer, models.eos_ids)
        return GenerationResult(out_texts, counts, seconds, ended)
    if runner is None:
        runner = SmallModelRunner(models.small, models.small_tokenizer, context_position=position,
                                  context_separator=separator)
    before = runner.forward_count
    proc = CoSteerLogitsProcessor(runner, list(inputs), list(contexts), CoSteerConfig(strength=system.gain),
                                  eos_token_id=models.eos_ids, gate_threshold=system.gate_threshold,
                                  gate_patience=system.gate_patience, eos_guard=system.eos_guard)
    try:
        gen, seconds = _hf_generate(model, tok, texts, max_new_tokens=max_new_tokens, eos_ids=models.eos_ids,
                                    pad_id=models.pad_id, processors=[proc], min_new_tokens=min_new_tokens)
    finally:
        proc.release()  # free the small-model cache rows now, not at garbage collection
    out_texts, counts, ended = _split_outputs(gen, models.tokenizer, models.eos_ids)
    return GenerationResult(out_texts, counts, seconds, ended, steered_steps=proc.steered_steps.tolist(),
                            live_steps=proc.live_steps.tolist(), small_forwards=runner.forward_count - before)
