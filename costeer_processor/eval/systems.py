"""The systems compared, each one run of :class:`costeer_processor.pipeline.Pair` (batched greedy ``generate``).

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

Every model reads the conversation with the paper's system prompt as its first message; the
"with context" systems splice the context into it with the same rule as the small model's
with-context branch (:mod:`costeer_processor.pipeline`). The two models may come from different
tokenizer families: CoSteer then steers on the tokens both vocabularies share.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from ..core import CoSteerConfig, Variants
from ..pipeline import Generation, Pair

__all__ = ["System", "BASE_SYSTEMS", "make_systems", "sweep_system", "Models", "Generation", "generate",
           "DEFAULT_GAIN", "RELEASE_GATE_THRESHOLD"]

DEFAULT_GAIN = CoSteerConfig().gain
RELEASE_GATE_THRESHOLD = 0.1  # the release's AdaCoSteer threshold (gating is off by default elsewhere)


@dataclass(frozen=True)
class System:
    name: str
    model: str  # "small" or "large"
    with_context: bool = False  # context in the prompt of `model` itself
    gain: Optional[float] = None  # None: no steering
    gate_threshold: Optional[float] = None
    gate_patience: int = Variants.gate_patience
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

    @property
    def config(self) -> Optional[CoSteerConfig]:
        return CoSteerConfig(strength=self.gain) if self.steered else None

    @property
    def variants(self) -> Variants:
        return Variants(self.gate_threshold, self.gate_patience, self.eos_guard)

    def describe(self) -> dict:
        d = asdict(self)
        d.pop("name")
        return d


BASE_SYSTEMS = ("small", "small_ctx", "large", "large_ctx", "proxy", "costeer", "costeer_gate")


def make_systems(names: Sequence[str], *, gate_threshold: float = RELEASE_GATE_THRESHOLD,
                 gate_patience: int = Variants.gate_patience, eos_guard: Optional[float] = None) -> list[System]:
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


class Models(Pair):
    """The pair under evaluation, decoding plain greedy (the tokenizers may differ)."""

    def __init__(self, large, small, tokenizer, small_tokenizer, large_name: str = "large",
                 small_name: str = "small"):
        for m in (large, small):
            m.eval()
            gc = m.generation_config
            # Plain greedy, nothing else: the paper decodes by argmax of the (steered) policy,
            # and a repetition penalty from a model's defaults would change `ref`.
            gc.do_sample = False
            for attr in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
                if hasattr(gc, attr):
                    setattr(gc, attr, None)
            gc.repetition_penalty = 1.0
        super().__init__(large, tokenizer, small, small_tokenizer)
        self.large_name = large_name
        self.small_name = small_name


def generate(system: System, models: Models, inputs: Sequence[str], contexts: Sequence[str], *,
             position: str, separator: str, max_new_tokens: int,
             min_new_tokens: Optional[int] = None) -> Generation:
    """One batch of greedy generations for ``system`` (all rows in one ``generate`` call)."""
    return models.run(system.model, list(inputs), list(contexts), with_context=system.with_context,
                      config=system.config, variants=system.variants, max_new_tokens=max_new_tokens,
                      position=position, separator=separator, min_new_tokens=min_new_tokens)
