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
``<steered>+<o>``  large    input                           as ``<steered>`` + style options
=================  =======  ==============================  ============================

Style options (``costeer+plausible0.1``, ``costeer_g3+clip1+placebo``; :func:`parse_options`) set
the :class:`~costeer_processor.core.Variants` fields of the same name: ``plausible<a>`` =
``plausibility=a`` (``plausible<a>-large``: ``plausibility_mode="large"``), ``clip<c>`` =
``delta_clip=c``, ``placebo`` = ``placebo=True``, ``ngram<n>`` = ``ngram_guard=n``.

Every model reads the conversation with the paper's system prompt as its first message; the
"with context" systems splice the context into it with the same rule as the small model's
with-context branch (:mod:`costeer_processor.pipeline`). The two models may come from different
tokenizer families: CoSteer then steers on the tokens both vocabularies share.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, Sequence

from ..core import CoSteerConfig, Variants
from ..pipeline import Generation, Pair

__all__ = ["System", "BASE_SYSTEMS", "make_systems", "sweep_system", "parse_options", "Models", "Generation",
           "generate", "DEFAULT_GAIN", "RELEASE_GATE_THRESHOLD"]

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
    options: tuple = ()  # ((Variants field, value), ...): style options beyond gating and the guard

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
        return Variants(self.gate_threshold, self.gate_patience, self.eos_guard, **dict(self.options))

    def describe(self) -> dict:
        d = asdict(self)
        d.pop("name")
        d["options"] = dict(self.options)
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
    for full in names:
        n, *opts = full.split("+")
        if n in table:
            system = table[n]
        elif n.startswith("costeer_g"):
            system = sweep_system(float(n[len("costeer_g"):]), eos_guard=eos_guard)
        else:
            raise ValueError(f"unknown system {n!r}; choose from {', '.join(BASE_SYSTEMS)} or costeer_g<gain>, "
                             "optionally followed by +<option>")
        if opts:
            if not system.steered:
                raise ValueError(f"system {full!r}: style options need a steered system, not {n!r}")
            system = replace(system, name=full, options=parse_options(opts))
            _check_options(system)
        out.append(system)
    return out


_OPTION = re.compile(r"^(?:plausible(?P<alpha>[0-9.eE+-]+?)(?P<large>-large)?|clip(?P<clip>[0-9.eE+-]+)"
                     r"|(?P<placebo>placebo)|ngram(?P<ngram>[0-9]+))$")


def parse_options(parts: Sequence[str]) -> tuple:
    """``["plausible0.1-large", "clip2"]`` -> ``(("plausibility", 0.1), ("plausibility_mode", "large"),
    ("delta_clip", 2.0))``: the :class:`Variants` fields a system name's ``+`` suffixes set."""
    out: dict = {}
    for part in parts:
        m = _OPTION.match(part)
        try:
            if m is None:
                raise ValueError
            if m["alpha"] is not None:
                out["plausibility"] = float(m["alpha"])
                out["plausibility_mode"] = "large" if m["large"] else "mask"
            elif m["clip"] is not None:
                out["delta_clip"] = float(m["clip"])
            elif m["placebo"]:
                out["placebo"] = True
            else:
                out["ngram_guard"] = int(m["ngram"])
        except ValueError:
            raise ValueError(f"unknown style option {part!r}; use plausible<alpha>, plausible<alpha>-large, "
                             "clip<c>, placebo or ngram<n>") from None
    return tuple(out.items())


def _check_options(system: System) -> None:
    """Builds the system's :class:`Variants` once, so a bad value or an older core fails before any generation."""
    missing = sorted({k for k, _ in system.options} - {f.name for f in fields(Variants)})
    if missing:
        raise ValueError(f"system {system.name!r} needs the Variants field(s) {', '.join(missing)}, which this "
                         "version of costeer_processor.core.config.Variants does not have")
    try:
        system.variants
    except ValueError as e:
        raise ValueError(f"system {system.name!r}: {e}") from None


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
