"""CoSteer's settings inside vLLM: engine-wide (:class:`EngineSettings`) and per request (:class:`RequestArgs`).

Engine-wide settings come from ``additional_config["costeer"]``, with ``COSTEER_<KEY>`` environment
variables as fallback; per-request arguments come flat from ``SamplingParams.extra_args``
(``vllm_xargs`` on the OpenAI server) under the ``costeer_`` prefix. Every default and range is
the core's (:class:`~costeer_processor.core.CoSteerConfig`, :class:`~costeer_processor.core.Variants`):
this module only reads the two sources, names the offending key and applies the serving limit
on the gain (:meth:`~costeer_processor.core.CoSteerConfig.served_gain`).

Example::

    >>> from costeer_processor.vllm.settings import EngineSettings, parse_request_args
    >>> settings = EngineSettings.from_sources({"costeer": {"gate_threshold": 0.1}}, environ={})
    >>> args = parse_request_args({"costeer_context": "I am vegan.", "costeer_gate_patience": 2}, settings)
    >>> round(args.gain, 6), args.gate_threshold, args.gate_patience
    (1.783257, 0.1, 2)
    >>> parse_request_args({"costeer_context": "I am vegan.", "costeer_T": True}, settings)
    Traceback (most recent call last):
    ...
    ValueError: costeer_T must be an integer, got bool True
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..core import CoSteerConfig, Variants, check_range, number
from ..core.config import OPTION_FIELDS
from ..loading import CoSteerModelError, normalize_dtype
from ..prompts import ContextSplicer

__all__ = [
    "ARG_PREFIX",
    "CONFIG_KEY",
    "ENV_PREFIX",
    "REQUEST_ARGS",
    "ENGINE_KEYS",
    "EngineSettings",
    "RequestArgs",
    "check_argument_names",
    "costeer_items",
    "near_miss_keys",
    "parse_request_args",
    "settings_from_vllm_config",
    "resolve_small_model",
]

ARG_PREFIX = "costeer_"
CONFIG_KEY = "costeer"
ENV_PREFIX = "COSTEER_"
_WHERE = "CoSteer engine settings"
_SPLICE = inspect.signature(ContextSplicer).parameters  # the splicer's own defaults (position, separator)

# Where the frontend hands a steered request's vLLM ``cache_salt`` to the engine (not a costeer_* argument:
# the frontend owns it and overwrites whatever a client put there; it keys the small model's context cache).
SALT_ARG = "_costeer_cache_salt"

# Per-request arguments (flat, in SamplingParams.extra_args / vllm_xargs) -> kind.
REQUEST_ARGS: dict[str, str] = {
    "costeer_context": "str",
    "costeer_strength": "float",
    "costeer_T": "int",
    "costeer_alpha": "float",
    "costeer_beta": "float",
    "costeer_lam": "float",
    "costeer_eta": "float",
    "costeer_gate_threshold": "float",
    "costeer_gate_patience": "int",
    "costeer_eos_guard": "float",
    # the options of the steering step (core.config.Variants; off by default)
    "costeer_plausibility": "float",
    "costeer_plausibility_mode": "str",
    "costeer_delta_clip": "float",
    "costeer_placebo": "bool",
    "costeer_ngram_guard": "int",
}
_HYPER = ("T", "alpha", "beta", "lam", "eta")


def _renamed(prefix: str, e: ValueError) -> ValueError:
    """The core names the field first ("T must be ..."): the same message with the caller's name for it."""
    return ValueError(f"{prefix}{e}")


# ---------------------------------------------------------------------------------------------
# Engine-wide settings
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineSettings:
    """Engine-wide CoSteer settings (``additional_config["costeer"]``, fallback ``COSTEER_<KEY>`` env vars).

    Attributes:
        small_model: local folder of the small model, or a preset name understood by
            :func:`costeer_processor.models.resolve_model`.
        dtype: small-model dtype (``float32``, ``bfloat16``, ``float16``); default float32 when the
            large model runs float32, else bfloat16.
        device: small-model device; default: the engine's device.
        threads: torch threads for the small model's forward inside the engine process
            (vLLM's CPU backend binds its own OpenMP threads; the multiprocess engine runs torch
            with 1 thread unless told otherwise). Default: leave as is.
        T, alpha, beta, lam, eta, strength: default hyper-parameters (see
            :class:`~costeer_processor.core.CoSteerConfig`, whose defaults these are).
        max_context_tokens: longest small-model prompt *with* the context (tokens); default the
            small model's window (:class:`~costeer_processor.prompts.ContextBudget`).
        context_position: ``"before"`` or ``"after"`` the user's text in the last user turn.
        context_separator: text between context and user text.
        context_cache_mb: memory cap of the small model's reusable context-prefix cache
            (:class:`~costeer_processor.kv_cache.ContextCache`), default 256; ``0`` switches it off.
        gate_threshold, gate_patience, eos_guard: AdaCoSteer gating and the EOS guard (see
            :class:`~costeer_processor.core.Variants`; ``0`` switches gating / the guard off).
        vocab_map: ``"auto"`` (default): when the small model's tokenizer differs from the large
            model's, steer on the intersection of the two vocabularies and give the small model
            the conversation in its own chat template; ``"off"``: refuse different tokenizers at
            startup; ``"on"``: always take the mapped path (for tests: it must equal the plain one
            on one tokenizer).

    Every numeric value refuses booleans, strings, NaN and infinities, naming the key.
    """

    small_model: Optional[str] = None
    dtype: Optional[str] = None
    device: Optional[str] = None
    threads: Optional[int] = None
    T: int = CoSteerConfig.T
    alpha: float = CoSteerConfig.alpha
    beta: float = CoSteerConfig.beta
    lam: float = CoSteerConfig.lam
    eta: float = CoSteerConfig.eta
    strength: Optional[float] = CoSteerConfig.strength
    max_context_tokens: Optional[int] = None
    context_position: str = _SPLICE["position"].default
    context_separator: str = _SPLICE["separator"].default
    context_cache_mb: float = 256
    gate_threshold: Optional[float] = Variants.gate_threshold
    gate_patience: int = Variants.gate_patience
    eos_guard: Optional[float] = Variants.eos_guard
    vocab_map: str = "auto"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.small_model is not None:
            if not isinstance(self.small_model, (str, os.PathLike)) or not str(self.small_model).strip():
                raise ValueError(f"{_WHERE}: small_model must be a non-empty path or name, got {self.small_model!r}")
            set_(self, "small_model", str(self.small_model))
        if self.dtype is not None:
            try:
                set_(self, "dtype", normalize_dtype(self.dtype))
            except CoSteerModelError as e:
                raise ValueError(f"{_WHERE}: dtype: {e}") from None
        try:
            for name in ("threads", "max_context_tokens"):
                value = getattr(self, name)
                if value is not None:
                    set_(self, name, number(name, value, integer=True))
                    check_range(name, getattr(self, name), 1)
            set_(self, "context_cache_mb", number("context_cache_mb", self.context_cache_mb))
            check_range("context_cache_mb", self.context_cache_mb, 0)
            config = CoSteerConfig(**{k: getattr(self, k) for k in (*_HYPER, "strength")})
            variants = Variants.parse(self.gate_threshold, self.gate_patience, self.eos_guard)
        except ValueError as e:
            raise ValueError(f"{_WHERE}: {e}") from None
        for name in (*_HYPER, "strength"):
            set_(self, name, getattr(config, name))
        for f in fields(Variants):
            set_(self, f.name, getattr(variants, f.name))
        config.served_gain(_WHERE)  # a gain no server should apply is refused at startup
        if self.context_position not in ("before", "after"):
            raise ValueError(f"{_WHERE}: context_position must be 'before' or 'after', got {self.context_position!r}")
        if not isinstance(self.context_separator, str):
            raise ValueError(f"{_WHERE}: context_separator must be a string, got {self.context_separator!r}")
        mode = self.vocab_map
        if isinstance(mode, bool):  # JSON true / false
            mode = "on" if mode else "off"
        elif isinstance(mode, str):
            mode = mode.strip().lower()
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"{_WHERE}: vocab_map must be 'auto', 'on' or 'off', got {self.vocab_map!r}")
        set_(self, "vocab_map", mode)

    @property
    def config(self) -> CoSteerConfig:
        """The default hyper-parameters as the core's config."""
        return CoSteerConfig(**{k: getattr(self, k) for k in (*_HYPER, "strength")})

    @property
    def variants(self) -> Variants:
        return Variants(self.gate_threshold, self.gate_patience, self.eos_guard)

    @cached_property
    def default_gain(self) -> float:
        """The gain of a request that sets no hyper-parameter of its own."""
        return self.config.served_gain(_WHERE)

    def wants_vocab_map(self, large_tokenizer, small_tokenizer) -> bool:
        """Whether steering takes the mapped path: ``on``, or ``auto`` with two different vocabularies."""
        return self.vocab_map == "on" or (self.vocab_map == "auto"
                                          and large_tokenizer.get_vocab() != small_tokenizer.get_vocab())

    @classmethod
    def from_sources(cls, additional_config: Optional[Mapping[str, Any]] = None,
                     environ: Optional[Mapping[str, str]] = None) -> "EngineSettings":
        """``additional_config["costeer"]`` first, then ``COSTEER_<KEY>`` variables, then defaults."""
        environ = os.environ if environ is None else environ
        block: Mapping[str, Any] = {}
        if additional_config:
            block = additional_config.get(CONFIG_KEY) or {}
            if not isinstance(block, Mapping):
                raise ValueError(f'additional_config["{CONFIG_KEY}"] must be a JSON object, got {block!r}')
        unknown = [k for k in block if k not in ENGINE_KEYS]
        if unknown:
            raise ValueError(f'unknown key(s) in additional_config["{CONFIG_KEY}"]: '
                             + ", ".join(_with_suggestion(k, ENGINE_KEYS) for k in unknown)
                             + f"; known keys: {', '.join(ENGINE_KEYS)}")
        values: dict[str, Any] = {}
        for key in ENGINE_KEYS:
            if key in block and block[key] is not None:
                values[key] = block[key]
                continue
            raw = environ.get(ENV_PREFIX + key.upper())
            if raw is not None and raw.strip() != "":
                values[key] = _from_env(key, raw)
        return cls(**values)


ENGINE_KEYS: tuple[str, ...] = tuple(f.name for f in fields(EngineSettings))
_ENV_KINDS = {"threads": int, "T": int, "alpha": float, "beta": float, "lam": float, "eta": float,
              "strength": float, "max_context_tokens": int, "gate_threshold": float, "gate_patience": int,
              "eos_guard": float, "context_cache_mb": float}


def _from_env(key: str, raw: str) -> Any:
    kind = _ENV_KINDS.get(key)
    if kind is None:
        return raw
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable {ENV_PREFIX}{key.upper()}={raw!r} is not a valid "
                         f"{kind.__name__}") from None
    return int(value) if kind is int and value.is_integer() else value  # the settings check the rest


def _folded(key: str) -> str:
    """A key without case, spaces, ``_`` and ``-``: ``"Costeer-Context "`` -> ``"costeercontext"``."""
    return re.sub(r"[\s_\-]+", "", key).lower()


def _with_suggestion(key: str, known: Sequence[str]) -> str:
    """``repr(key)``, with ``(did you mean 'known_key'?)`` when one of ``known`` is close to it."""
    folded = {_folded(k): k for k in known}  # case, spaces, '-' for '_', camelCase do not count
    close = difflib.get_close_matches(_folded(key), list(folded), n=1, cutoff=0.6)
    return f"{key!r} (did you mean {folded[close[0]]!r}?)" if close else repr(key)


_FOLDED_PREFIX = _folded(ARG_PREFIX)
_FOLDED_ARGS = [_folded(k) for k in REQUEST_ARGS]


def near_miss_keys(extra_args: Optional[Mapping[str, Any]]) -> list[str]:
    """Keys of ``extra_args`` that are meant as CoSteer arguments but are not spelt ``costeer_*``.

    ``"Costeer_context"``, ``"costeer-context"``, ``"costeerContext"``, ``"COSTEER_CONTEXT"``,
    ``" costeer_strength"``: every key whose case-, space-, ``_``- and ``-``-folded form starts with
    ``costeer`` or is within one or two letters of an argument (``"coster_context"``). Other keys
    (other processors' arguments) are not near a CoSteer argument and are left alone.

        >>> near_miss_keys({"costeerContext": "x", "costeer_context": "y", "top_k_hint": 1})
        ['costeerContext']
    """
    if not extra_args:
        return []
    out = []
    for key in extra_args:
        if not isinstance(key, str) or key.startswith(ARG_PREFIX) or key == SALT_ARG:
            continue
        folded = _folded(key)
        if folded.startswith(_FOLDED_PREFIX) or (folded.startswith(_FOLDED_PREFIX[:2])
                                                 and difflib.get_close_matches(folded, _FOLDED_ARGS, n=1, cutoff=0.85)):
            out.append(key)
    return out


def check_argument_names(extra_args: Optional[Mapping[str, Any]]) -> None:
    """Raises ``ValueError`` with a did-you-mean for :func:`near_miss_keys` (a request meant to be
    steered would otherwise run unsteered)."""
    near = near_miss_keys(extra_args)
    if near:
        raise ValueError("unknown CoSteer argument(s) " + ", ".join(_with_suggestion(k, REQUEST_ARGS) for k in near)
                         + f"; CoSteer arguments are spelt exactly, lower case with underscores: "
                         f"{', '.join(REQUEST_ARGS)}")


def settings_from_vllm_config(vllm_config: Any) -> EngineSettings:
    return EngineSettings.from_sources(getattr(vllm_config, "additional_config", None) or {})


def resolve_small_model(settings: EngineSettings) -> Path:
    """The small model's local folder (a preset is installed on first use); ``ValueError`` when unusable."""
    from ..models import resolve_model

    name = settings.small_model
    if not name:
        raise ValueError(
            "CoSteer needs a small model: pass additional_config={\"costeer\": {\"small_model\": \"/path\"}} "
            "(server: --additional-config '{\"costeer\": {\"small_model\": \"/path\"}}') or set COSTEER_SMALL_MODEL")
    try:
        return Path(resolve_model(name, **({"dtype": settings.dtype} if settings.dtype else {})))
    except CoSteerModelError as e:
        raise ValueError(f"CoSteer: cannot resolve the small model {name!r}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Per-request arguments
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestArgs:
    """One request's resolved CoSteer arguments (engine defaults filled in)."""

    context: str
    gain: float
    variants: Variants

    # the release's variants by name (the doctest above, older callers)
    gate_threshold = property(lambda self: self.variants.gate_threshold)
    gate_patience = property(lambda self: self.variants.gate_patience)
    eos_guard = property(lambda self: self.variants.eos_guard)


def costeer_items(extra_args: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``costeer_*`` entries of a request's ``extra_args`` (empty: the request is not steered)."""
    if not extra_args:
        return {}
    return {k: v for k, v in extra_args.items() if isinstance(k, str) and k.startswith(ARG_PREFIX)}


def parse_request_args(extra_args: Optional[Mapping[str, Any]],
                       defaults: EngineSettings = EngineSettings()) -> Optional[RequestArgs]:
    """Checks and resolves a request's ``costeer_*`` arguments; ``None`` when it is not steered.

    Raises ``ValueError`` naming the argument for unknown ``costeer_*`` keys and near misses
    (``"Costeer_context"``, ``"costeer-context"``: :func:`near_miss_keys`), wrong types
    (booleans included), non-finite or out-of-range values, a gain over the serving limit, and
    a missing or empty ``costeer_context`` next to other ``costeer_*`` keys. (Whether the context
    fits the small model is the frontend's check, :mod:`costeer_processor.vllm.frontend`.)
    """
    check_argument_names(extra_args)
    items = costeer_items(extra_args)
    if not items:
        return None
    unknown = [k for k in items if k not in REQUEST_ARGS]
    if unknown:
        raise ValueError("unknown CoSteer argument(s) " + ", ".join(_with_suggestion(k, REQUEST_ARGS)
                                                                 for k in unknown)
                         + f"; known: {', '.join(REQUEST_ARGS)}")
    if items.get("costeer_context") is None:
        raise ValueError("costeer_context is required when other costeer_* arguments are given "
                         f"(got {', '.join(sorted(items))})")
    context = items["costeer_context"]
    if not isinstance(context, str):
        raise ValueError(f"costeer_context must be a string, got {type(context).__name__}")
    if not context.strip():
        raise ValueError("costeer_context is empty; pass a non-empty personal context (or leave "
                         "costeer_context out to generate without steering)")

    given = {name: items[ARG_PREFIX + name] for name in (*_HYPER, "strength")
             if items.get(ARG_PREFIX + name) is not None}
    if "strength" in given:  # a direct gain wins over any hyper-parameter
        config, where = _request_config(strength=given["strength"]), "costeer_strength"
    elif given:  # explicit hyper-parameters win over an engine-wide default strength
        base = {k: getattr(defaults, k) for k in _HYPER}
        config, where = _request_config(**{**base, **given}), "costeer_T/alpha/beta/lam/eta"
    else:
        config, where = None, ""
    gain = defaults.default_gain if config is None else config.served_gain(where)
    options = {name: items.get(ARG_PREFIX + name) for name in OPTION_FIELDS}
    variants = Variants.parse(items.get("costeer_gate_threshold"), items.get("costeer_gate_patience"),
                              items.get("costeer_eos_guard"), prefix=ARG_PREFIX, defaults=defaults.variants, **options)
    return RequestArgs(context=context, gain=gain, variants=variants)


def _request_config(**values) -> CoSteerConfig:
    try:
        return CoSteerConfig(**values)
    except ValueError as e:  # only request values can be wrong here: the engine defaults were checked
        raise _renamed(ARG_PREFIX, e) from None
