"""Reading an OpenAI request body into one :class:`GenRequest`, every value checked, errors naming the field.

OpenAI fields (``max_tokens`` / ``max_completion_tokens``, ``stop``, ``temperature``, ``top_p``,
``seed``, ``n``, ``logprobs`` / ``top_logprobs``, ``stream`` / ``stream_options``, ``user``) and
the CoSteer fields (``costeer_context``, ``costeer_strength``, ``costeer_T`` ... the same names as
``costeer serve``'s ``vllm_xargs``, accepted at the top level of the body or inside ``vllm_xargs``)
are checked with the core's validators (:mod:`costeer_processor.core.config`): a bad value is a
:class:`RequestError` (HTTP 400) whose message starts with the field's name. Settings the proxy
cannot honour (``n > 1``, penalties, ``logit_bias``, ``echo``, tools...) are refused, never ignored.

Example::

    >>> req = parse_request("chat", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
    ...                              "temperature": 0, "costeer_strength": 1.5})
    >>> req.max_tokens, req.sampling.greedy, req.gain
    (8, True, 1.5)
    >>> parse_request("chat", {"messages": [{"role": "user", "content": "Hi"}], "n": 2})
    Traceback (most recent call last):
    ...
    costeer_processor.proxy.settings.RequestError: n must be 1 (the proxy returns one choice per request), got 2
    >>> parse_request("chat", {"messages": [{"role": "user", "content": "Hi"}], "costeer_T": 0})
    Traceback (most recent call last):
    ...
    costeer_processor.proxy.settings.RequestError: costeer_T must be in [1, 100000], got 0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from ..core.config import CoSteerConfig, Variants, check_range, number
from ..core.sampling import GREEDY, Sampling

__all__ = ["RequestError", "GenRequest", "Defaults", "parse_request", "COSTEER_FIELDS", "MAX_TOP_LOGPROBS"]

PREFIX = "costeer_"
_HYPER = ("T", "alpha", "beta", "lam", "eta")
_VARIANT_OPTIONS = ("plausibility", "plausibility_mode", "delta_clip", "placebo", "ngram_guard")
COSTEER_FIELDS = ("costeer_context", "costeer_plain", "costeer_strength", *(PREFIX + h for h in _HYPER),
                  "costeer_gate_threshold", "costeer_gate_patience", "costeer_eos_guard",
                  *(PREFIX + o for o in _VARIANT_OPTIONS))
MAX_TOP_LOGPROBS = 20
MAX_STOP = 16
# Fields whose non-default values the proxy cannot honour: refused with a 400 naming them.
_UNSUPPORTED = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "best_of": 1, "echo": False,
                "suffix": None, "tools": None, "functions": None, "tool_choice": None, "function_call": None,
                "prediction": None, "audio": None}


class RequestError(ValueError):
    """A request the proxy refuses: ``status`` (400, 404, 413...) and the field at fault (``param``)."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass(frozen=True)
class Defaults:
    """The proxy's defaults for what a request leaves out (from the command line)."""

    config: CoSteerConfig = CoSteerConfig()
    variants: Variants = Variants()
    max_tokens: int = 1024
    temperature: float = 1.0  # OpenAI's default; send 0 for greedy (exact, certified) decoding


@dataclass(frozen=True)
class GenRequest:
    kind: str  # "chat" or "completion"
    prompt: Union[list, str, list[int]]  # chat messages, raw text, or token ids
    model: Optional[str]
    stream: bool
    include_usage: bool
    max_tokens: Optional[int]  # None: the proxy's default
    stop: tuple[str, ...]
    sampling: Sampling
    logprobs: Optional[int]  # None: not asked; k: the chosen token's log-prob and the top k
    gain: float
    variants: Variants
    context: Optional[str]  # inline costeer_context (stays on this device)
    plain: bool  # costeer_plain: the large model alone, asked for explicitly (the page's comparison)
    user: Optional[str]
    return_token_ids: bool = False  # vLLM's extension: the answer's token ids in the `costeer` object


def _costeer_items(body: dict) -> dict:
    items = {k: v for k, v in body.items() if isinstance(k, str) and k.lower().startswith(PREFIX)}
    xargs = body.get("vllm_xargs")
    if xargs is not None:
        if not isinstance(xargs, dict):
            raise RequestError("vllm_xargs must be an object", param="vllm_xargs")
        for k, v in xargs.items():
            if isinstance(k, str) and k.lower().startswith(PREFIX):
                if k in items and items[k] != v:
                    raise RequestError(f"{k} is given twice (top level and vllm_xargs) with different values", param=k)
                items[k] = v
    unknown = sorted(k for k in items if k not in COSTEER_FIELDS)
    if unknown:
        raise RequestError(f"unknown CoSteer field(s) {', '.join(unknown)}; known: {', '.join(COSTEER_FIELDS)}",
                           param=unknown[0])
    return {k: v for k, v in items.items() if v is not None}


def _checked(fn, *args, **kw):
    """Runs a core validator; its ValueError (which starts with the field's name) becomes a 400."""
    try:
        return fn(*args, **kw)
    except (ValueError, TypeError) as e:
        message = str(e)
        raise RequestError(message, param=message.split(" ", 1)[0]) from None


def _config(**values) -> CoSteerConfig:
    if "T" in values:
        values["T"] = _checked(number, PREFIX + "T", values["T"], integer=True)
    try:
        return CoSteerConfig(**values)
    except ValueError as e:  # the core names the field first ("T must be ..."): name the request's field
        raise RequestError(f"{PREFIX}{e}", param=PREFIX + str(e).split(" ", 1)[0]) from None


def _steering(items: dict, defaults: Defaults) -> tuple[float, Variants]:
    """The gain (``costeer_strength`` wins over the hyper-parameters) and the variants, like ``costeer serve``."""
    given = {h: items[PREFIX + h] for h in (*_HYPER, "strength") if PREFIX + h in items}
    if "strength" in given:
        config, where = _config(strength=given["strength"]), "costeer_strength"
    elif given:
        base = {h: getattr(defaults.config, h) for h in _HYPER}
        config, where = _config(**{**base, **given}), "costeer_T/alpha/beta/lam/eta"
    else:
        config, where = defaults.config, "the proxy's default settings"
    gain = _checked(config.served_gain, where)
    options = {o: items[PREFIX + o] for o in _VARIANT_OPTIONS if PREFIX + o in items}
    variants = _checked(Variants.parse, items.get("costeer_gate_threshold"), items.get("costeer_gate_patience"),
                        items.get("costeer_eos_guard"), prefix=PREFIX, defaults=defaults.variants, **options)
    return gain, variants


def _int(name: str, value: Any, low: Optional[int] = None, high: Optional[int] = None) -> int:
    v = _checked(number, name, value, integer=True)
    _checked(check_range, name, v, low, high)
    return v


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a role", param="messages")
        role, content = m["role"], m.get("content")
        if role not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"messages[{i}].role {role!r} is not supported (system, developer, user, assistant)",
                               param="messages")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"messages[{i}].content: only text parts are supported", param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", param="messages")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _completion_prompt(value: Any) -> Union[str, list[int]]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # one prompt given as a batch of one
    if isinstance(value, str):
        if not value:
            raise RequestError("prompt is empty", param="prompt")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                  for t in value):
        return list(value)
    raise RequestError("prompt must be one string or one list of token ids (one prompt per request)", param="prompt")


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings",
                           param="stop")
    return tuple(stops)


def _logprobs(kind: str, body: dict) -> Optional[int]:
    if kind == "chat":
        asked = body.get("logprobs")
        if asked not in (None, True, False):
            raise RequestError("logprobs must be true or false", param="logprobs")
        top = body.get("top_logprobs")
        if top is not None:
            top = _int("top_logprobs", top, 0, MAX_TOP_LOGPROBS)
            if not asked:
                raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        return (top or 0) if asked else None
    asked = body.get("logprobs")
    return None if asked is None else _int("logprobs", asked, 0, MAX_TOP_LOGPROBS)


def parse_request(kind: str, body: Any, defaults: Defaults = Defaults()) -> GenRequest:
    """Checks an OpenAI ``chat`` or ``completion`` body; raises :class:`RequestError` naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise RequestError(f"n must be 1 (the proxy returns one choice per request), got {n!r}", param="n")
    for name, neutral in _UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != neutral and value != {} and value != []:
            raise RequestError(f"{name} is not supported by the CoSteer proxy (got {value!r})", param=name)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise RequestError("response_format: only {\"type\": \"text\"} is supported", param="response_format")
    prompt = _messages(body.get("messages")) if kind == "chat" else _completion_prompt(body.get("prompt"))
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", param="model")
    stream = body.get("stream", False)
    if stream not in (True, False, None):
        raise RequestError("stream must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", param="stream_options")
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins
        if body.get(name) is not None:
            max_tokens = _int(name, body[name], 1)
    temperature = defaults.temperature if body.get("temperature") is None else body["temperature"]
    temperature = _checked(number, "temperature", temperature)
    _checked(check_range, "temperature", temperature, 0.0, 2.0)
    top_p = 1.0 if body.get("top_p") is None else body["top_p"]
    seed = None if body.get("seed") is None else _int("seed", body["seed"])
    sampling = _checked(Sampling, temperature, top_p, seed)
    if sampling.greedy:
        sampling = GREEDY  # one shared object: greedy requests are chosen together
    items = _costeer_items(body)
    gain, variants = _steering(items, defaults)
    context = items.get("costeer_context")
    if context is not None and (not isinstance(context, str) or not context.strip()):
        raise RequestError("costeer_context must be a non-empty string", param="costeer_context")
    plain = items.get("costeer_plain", False)
    if plain not in (True, False):
        raise RequestError("costeer_plain must be true or false", param="costeer_plain")
    logprobs = _logprobs(kind, body)
    if logprobs is not None and (plain or variants.gate_threshold is not None):
        raise RequestError("logprobs are not available with costeer_plain or gating (costeer_gate_threshold): "
                           "the large model writes those tokens alone, without log-probs", param="logprobs")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError("user must be a string", param="user")
    return GenRequest(kind=kind, prompt=prompt, model=model, stream=bool(stream),
                      include_usage=bool(options.get("include_usage")), max_tokens=max_tokens,
                      stop=_stop(body.get("stop")),
                      sampling=sampling, logprobs=logprobs, gain=gain, variants=variants, context=context,
                      plain=bool(plain), user=user, return_token_ids=body.get("return_token_ids") is True)

