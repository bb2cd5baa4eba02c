"""What the proxy answers: text assembled from token ids (stop strings, incomplete UTF-8) and the OpenAI JSON shapes.

:class:`TextAssembler` turns accepted token ids into the text a client may see so far: it holds
back an incomplete UTF-8 character and, with stop strings, the last ``len(stop) - 1``
characters (which could still start a stop string); a matched stop string ends the answer
before it (``finish_reason == "stop"``), as in OpenAI's API.

Log-probs are those of the distribution each token was chosen from: CoSteer's steered
distribution ``log_softmax(ref + g * delta)`` (before temperature / top-p; in top-k mode over the
candidates the upstream returned), see ``docs/proxy.md``.

Example::

    >>> from costeer_processor.testing import build_tiny_tokenizer
    >>> tok = build_tiny_tokenizer()
    >>> ids = tok("I love spicy food. Tell me more.", add_special_tokens=False)["input_ids"]
    >>> text = TextAssembler(tok, stop=("food",))
    >>> text.add(ids), text.stopped
    ('I love spicy ', True)
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence

__all__ = ["TextAssembler", "Formatter", "NEG_LOGPROB"]

NEG_LOGPROB = -9999.0  # what a -inf log-prob is written as (JSON has no infinities; vLLM does the same)


class TextAssembler:
    """Accepted ids in, visible text out (see the module docstring)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False  # a stop string matched
        self.tokens_at_stop: Optional[int] = None

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, ids: Sequence[int]) -> str:
        """Takes new ids; returns the text that may be shown now (may be empty)."""
        if self.stopped:
            return ""
        self.ids.extend(int(i) for i in ids)
        text = self._text().rstrip("\ufffd")  # an incomplete UTF-8 character waits for its next bytes
        if self.stop:
            start = max(0, len(self.shown) - self.hold)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped, self.tokens_at_stop = True, len(self.ids)
                return self._show(text[:min(hits)])
        return self._show(text[:len(text) - self.hold] if self.hold else text)

    def full(self) -> str:
        """The whole answer: up to the stop string, else every id decoded at once."""
        return self.shown if self.stopped else self._text()

    def finish(self) -> str:
        """The rest of the text once the generation ended."""
        return "" if self.stopped else self._show(self._text())

    def _show(self, visible: str) -> str:
        if not visible.startswith(self.shown) or len(visible) <= len(self.shown):
            return ""
        new, self.shown = visible[len(self.shown):], visible
        return new

    @property
    def completion_tokens(self) -> int:
        return self.tokens_at_stop if self.stopped else len(self.ids)


def _lp(x: float) -> float:
    return x if math.isfinite(x) else NEG_LOGPROB


class Formatter:
    """The OpenAI response and chunk shapes of one request (``kind``: ``"chat"`` or ``"completion"``)."""

    def __init__(self, kind: str, model: str, request_id: str, tokenizer):
        self.kind, self.model, self.id, self.tokenizer = kind, model, request_id, tokenizer
        self.created = int(time.time())
        self.offset = 0  # text offset of the next token (completions log-probs)

    def _token(self, tok: int) -> str:
        return self.tokenizer.decode([tok], skip_special_tokens=False)

    def logprobs(self, entries: Sequence) -> Optional[dict]:
        """Log-prob entries ``(id, log p, [(id, log p), ...])`` in this endpoint's shape."""
        if self.kind == "chat":
            def item(tok, lp):
                text = self._token(tok)
                return {"token": text, "logprob": _lp(lp), "bytes": list(text.encode("utf-8"))}
            return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in alts]}
                                for t, lp, alts in entries]}
        tokens = [self._token(t) for t, _, _ in entries]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": [_lp(lp) for _, lp, _ in entries],
                "top_logprobs": [{self._token(i): _lp(v) for i, v in alts} for _, _, alts in entries],
                "text_offset": offsets}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def response(self, text: str, finish_reason: str, usage: dict, logprobs: Optional[dict], extra: dict) -> dict:
        """The whole (non-streamed) answer."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage, "costeer": extra}

    def chunk(self, text: Optional[str], finish_reason: Optional[str] = None, logprobs: Optional[dict] = None,
              first: bool = False) -> dict:
        """One streamed chunk (``text=None``: an empty delta, e.g. the last chunk with the finish reason)."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": text or ""} if first else (
                {} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def usage_chunk(self, usage: dict, extra: dict) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [],
                "usage": usage, "costeer": extra}
