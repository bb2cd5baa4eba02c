"""What the small model reads: one rule for every adapter.

**The rule.** The small model reads exactly the conversation the large model reads: the large
model's prompt (its chat template's own defaults included, e.g. Qwen's injected system prompt)
with the personal context spliced into the last user turn for the with-context branch. CoSteer
never adds a message of its own. The HF processor reads each row's prompt from the ``input_ids``
of its first call, the vLLM processors from the request's prompt ids, split mode from the
prompt it renders for the server; all three go through :class:`PromptBridge` and
:class:`ContextSplicer`, so they feed the small model identical ids by construction. (The
paper's system prompt "You are a helpful assistant." is :data:`DEFAULT_SYSTEM_PROMPT`; the CLI
and the evaluation harness put it into the conversation of BOTH models as an ordinary system
message.)

**Does the context fit.** :class:`ContextBudget` holds the one rule: the with-context prompt may
hold at most ``limit`` small-model tokens (default: the small model's window). An oversize
context is refused before it is tokenised when even its byte length proves it cannot fit.

Example::

    >>> from costeer_processor.testing import build_tiny_tokenizer
    >>> tok = build_tiny_tokenizer()
    >>> splicer = ContextSplicer(tok, position="after", separator=" ")
    >>> text = splicer.render("plan my weekend")
    >>> splicer.splice(text, "I love hiking").endswith("plan my weekend I love hiking<|im_end|>\\n<|im_start|>assistant\\n")
    True
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

from jinja2 import TemplateError

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "ContextSplicer",
    "ContextBudget",
    "ContextTooLongError",
    "PromptBridge",
    "prompt_text",
    "strip_left_padding",
    "with_system_prompt",
    "Messages",
    "PromptLike",
]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
_SENTINEL = "\u2063COSTEER_USER_TURN\u2063"

_TEMPLATE_ERRORS = (TemplateError, ValueError, TypeError, KeyError, IndexError)

Messages = list[dict]
PromptLike = Union[str, Messages]


class ContextTooLongError(ValueError):
    """A personal context (or prompt) does not fit the small model's window."""


def as_messages(prompt: PromptLike) -> Messages:
    """A user string or a message list, as a message list (a copy)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(m, dict) for m in prompt):
        raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    return [dict(m) for m in prompt]


def with_system_prompt(prompt: PromptLike, system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT) -> Messages:
    """``prompt`` as messages, with ``system_prompt`` first unless the prompt has a system message."""
    messages = as_messages(prompt)
    if system_prompt is not None and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _common_suffix(texts: Sequence[str]) -> str:
    first = texts[0]
    n = 0
    while n < len(first) and all(len(t) > n and t[-1 - n] == first[-1 - n] for t in texts):
        n += 1
    return first[len(first) - n:]


class ContextSplicer:
    """Renders prompts with the chat template and puts a personal context into the last user turn.

    ``position="before"`` gives ``{context}{separator}{user text}`` (LongLaMP style);
    ``"after"`` gives ``{user text}{separator}{context}`` (the paper's preference prompts,
    ``"\\nYour answer should be as concise as possible"``). A prompt without a recognisable
    user turn (raw text) gets the context at its very start / end.

    The user-turn header is learned once: it is the longest text that the template writes right
    before the user's words in every probe conversation (alone, after a system message, after an
    earlier exchange).
    """

    def __init__(self, tokenizer, position: str = "before", separator: str = "\n\n"):
        if position not in ("before", "after"):
            raise ValueError(f"context position must be 'before' or 'after', got {position!r}")
        if not isinstance(separator, str):
            raise ValueError(f"context separator must be a string, got {separator!r}")
        self.position = position
        self.separator = separator
        self.tokenizer = tokenizer
        self.user_header, self.user_footer = self._probe_user_turn()

    @property
    def has_template(self) -> bool:
        return getattr(self.tokenizer, "chat_template", None) is not None

    def _probe_user_turn(self) -> tuple[Optional[str], Optional[str]]:
        if not self.has_template:
            return None, None
        user = {"role": "user", "content": _SENTINEL}
        probes = ([user], [{"role": "system", "content": "\u2063S\u2063"}, user],
                  [{"role": "user", "content": "\u2063U\u2063"}, {"role": "assistant", "content": "\u2063A\u2063"}, user])
        befores, footer = [], None
        for messages in probes:
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except _TEMPLATE_ERRORS:  # a template that refuses this turn layout (e.g. no system role)
                continue
            if text.count(_SENTINEL) != 1:
                continue
            before, after = text.split(_SENTINEL)
            befores.append(before)
            footer = after if footer is None else footer
        if not befores:
            return None, None
        return _common_suffix(befores) or None, footer

    def render(self, prompt: PromptLike) -> str:
        """The chat template applied to a user string or a message list (generation prompt added).

        Nothing is added: a conversation without a system message is rendered without one (the
        template's own default, if it has one, applies, as for the large model).
        """
        messages = as_messages(prompt)
        if not self.has_template:
            return "\n".join(str(m.get("content", "")) for m in messages)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def splice(self, prompt_text: str, context: str) -> str:
        """``prompt_text`` (already templated) with ``context`` inside its last user turn."""
        return "".join(self.splice_parts(prompt_text, context))

    def splice_parts(self, prompt_text: str, context: str) -> tuple[str, str]:
        """:meth:`splice` as ``(shared, rest)``: ``shared`` is the part every request with this context
        and this conversation start has in common (everything up to the end of the context with
        ``position="before"``; empty with ``"after"``, where the context comes last)."""
        if self.position == "before":
            if self.user_header and self.user_header in prompt_text:
                i = prompt_text.rindex(self.user_header) + len(self.user_header)
            else:
                i = 0
            return prompt_text[:i] + context + self.separator, prompt_text[i:]
        if self.user_footer and prompt_text.endswith(self.user_footer):
            i = len(prompt_text) - len(self.user_footer)
        else:
            i = len(prompt_text)
        return "", prompt_text[:i] + self.separator + context + prompt_text[i:]


class ContextBudget:
    """The one "does it fit" rule: a with-context prompt holds at most ``limit`` small-model tokens.

    Args:
        tokenizer: the small model's tokenizer.
        limit: the most tokens a with-context prompt may have (the small model's window unless set
            lower); generated tokens are not counted here, they are bounded by the request's
            ``max_tokens``.

    :meth:`check_text` refuses, without tokenising, a text that cannot fit even if every token
    were as long as the longest token of the vocabulary (a 20 MB context is refused in
    microseconds); :meth:`check_tokens` applies the exact rule to a token count.
    """

    def __init__(self, tokenizer, limit: int):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"the context limit must be an integer >= 1, got {limit!r}")
        self.limit = limit
        vocab = tokenizer.get_vocab()
        self.max_token_bytes = max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=1) or 1

    @classmethod
    def for_model(cls, tokenizer, model_config, limit: Optional[int] = None) -> "ContextBudget":
        """``limit`` if given, else the window of ``model_config`` (``max_position_embeddings``)."""
        window = context_window(model_config)
        return cls(tokenizer, int(limit) if limit else window)

    def check_text(self, text: str, what: str = "context + prompt") -> None:
        """Cheap bound: refuses text whose byte length proves it is over the limit."""
        lower_bound = math.ceil(len(text.encode("utf-8", "surrogatepass")) / self.max_token_bytes)
        if lower_bound > self.limit:
            raise ContextTooLongError(
                f"{what} is {len(text):,} characters, at least {lower_bound:,} small-model tokens, over the "
                f"limit of {self.limit:,}; shorten the context")

    def check_tokens(self, n_tokens: int, what: str = "context + prompt") -> None:
        if n_tokens > self.limit:
            raise ContextTooLongError(
                f"{what} is {n_tokens:,} small-model tokens, over the limit of {self.limit:,}; shorten the context")


def context_window(model_config) -> int:
    """The small model's window: ``max_position_embeddings`` (unbounded when the config has none)."""
    return int(getattr(model_config, "max_position_embeddings", None) or (1 << 30))


def strip_left_padding(ids: Sequence[int], pad_id: Optional[int]) -> list[int]:
    """``ids`` without leading ``pad_id`` (left-padded batch rows of ``generate``)."""
    ids = list(ids)
    if pad_id is None:
        return ids
    start = 0
    while start < len(ids) and ids[start] == pad_id:
        start += 1
    return ids[start:]


def prompt_text(tokenizer, prompt_ids: Sequence[int]) -> str:
    """The large model's prompt ids back to text (special tokens kept)."""
    return tokenizer.decode(list(prompt_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


class PromptBridge:
    """The large model's prompt ids -> the text the small model reads (see the rule above).

    One tokenizer: the decoded text as it is. Different families: the conversation is recovered
    from the large model's chat template (:class:`~costeer_processor.vocab.ChatTemplateInverter`)
    and rendered with the small model's own template; a prompt that no template produced (raw
    completion text) goes over as text.
    """

    def __init__(self, large_tokenizer, small_splicer: ContextSplicer, translate: bool):
        from .vocab import ChatTemplateInverter

        self.large_tokenizer = large_tokenizer
        self.small_splicer = small_splicer
        self.inverter = ChatTemplateInverter(large_tokenizer) if translate else None

    def __call__(self, prompt_ids: Sequence[int]) -> str:
        text = prompt_text(self.large_tokenizer, prompt_ids)
        if self.inverter is None or not self.inverter.usable:
            return text
        messages = self.inverter.parse(text)
        if messages is None or not self.small_splicer.has_template:
            return text
        # exactly the recovered messages (no default system prompt added: the large model had none)
        return self.small_splicer.render(messages)
