"""Split-mode decoding for many HTTP requests at once: :class:`ProxyDecoder`, a split-mode ``Decoder``.

The proxy drives the split decoder itself, round by round, over the live sequences of every
request (see :mod:`.scheduler`). What a request may set differently from its neighbours is
handled here, without changing how a round works:

* **its own gain and variants**: given to the steering slot at admission (:meth:`ProxyDecoder.admit`);
  the top-k certificate, whose bound uses the gain, is run per gain (rows grouped by gain);
* **its own sampling** (temperature, top-p, seed): rows are chosen per sampling group, so a seeded
  request draws from its own generator exactly as it would alone;
* **log-probs** when asked: the steered distribution each token was chosen from (recorded by
  :class:`CapturingSteerer`);
* **raw completions prompts** (text or token ids, no chat template) next to chat messages.

The expensive parts stay batched: one completion request and one small-model step per round
for every live sequence, whatever their settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch

from ..core import SPLIT_NGRAM_GUARD, Variants
from ..core.sampling import GREEDY, Sampling
from ..split.certify import Certifier
from ..split.decode import Decoder, _Seq
from ..steering import Steerer

__all__ = ["ProxyDecoder", "ProxySeq", "CapturingSteerer", "LogprobEntry"]

# A token's log-prob entry: (id, log p(id), [(id, log p), ... the top k]).
LogprobEntry = tuple[int, float, list[tuple[int, float]]]
_MIXED = Sampling(temperature=1.0)  # a round with sampled rows: only its `.greedy` is read by the round
_MAX_CERTIFIERS = 64


class CapturingSteerer(Steerer):
    """A :class:`~costeer_processor.steering.Steerer` that can keep the steered rows it computes.

    While ``capture`` is a dict, :meth:`combine` stores each row's steered scores under its slot
    (the proxy's log-probs); ``None`` (the default) records nothing.
    """

    capture: Optional[dict] = None

    def combine(self, large, slots, z_with, z_without, histories, eos_logits=None):
        out = super().combine(large, slots, z_with, z_without, histories, eos_logits=eos_logits)
        if self.capture is not None:
            for slot, row in zip(slots.tolist(), out):
                self.capture[int(slot)] = row
        return out


@dataclass(eq=False)
class ProxySeq(_Seq):
    """One request's generation: a split-mode sequence with its own settings."""

    sampling: Sampling = GREEDY
    gain: float = 0.0
    logprobs: Optional[int] = None  # None: not asked; k: top-k alternatives
    logprob_log: list = field(default_factory=list)  # one LogprobEntry per token chosen with steering


def _entry_from_scores(scores: torch.Tensor, tok: int, k: int) -> LogprobEntry:
    lp = torch.log_softmax(scores.float(), -1)
    top = torch.topk(lp, k) if k else None
    alts = [] if top is None else [(int(i), float(v)) for v, i in zip(top.values, top.indices)]
    return tok, float(lp[tok]), alts


def _entry_from_dict(d: dict, tok: int, k: int) -> LogprobEntry:
    alts = sorted(d.items(), key=lambda kv: -kv[1])[:k]
    return tok, float(d.get(tok, float("-inf"))), [(int(i), float(v)) for i, v in alts]


class ProxyDecoder(Decoder):
    """The split decoder with per-request settings (see the module docstring).

    Build it with :meth:`from_client` from a configured :class:`~costeer_processor.split.SplitCoSteerClient`,
    so the server, tokenizer checks, vocabulary map, EOS ids and certificate settings are exactly
    the client's (the proxy equals the client token for token).
    """

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.steerer = CapturingSteerer(self.runner, self.tokenizer, self.eos_token_ids, vocab_map=self.vocab_map,
                                        ngram_default=SPLIT_NGRAM_GUARD)
        self._base_certifier = self.certifier
        self._certifiers: dict[float, Certifier] = {}

    @classmethod
    def from_client(cls, client) -> "ProxyDecoder":
        """A decoder over ``client``'s server and settings (the client's own decoder is closed)."""
        base: Decoder = client._decoder
        base.close()
        return cls(client.runner, client._server, gain=base.gain, variants=base.variants,
                   eos_token_ids=base.eos_token_ids, served_tokenizer=base.tokenizer, vocab_map=base.vocab_map,
                   certifier=base.certifier, lookahead=base.lookahead, adaptive_lookahead=base.adaptive,
                   overlap=base.overlap)

    # ------------------------------------------------------------------ admission
    def prompt_ids(self, prompt: Union[list, str]) -> list[int]:
        """The ids the server reads: chat messages through the chat template, raw text as is, ids as given."""
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"]
        if prompt and all(isinstance(t, int) for t in prompt):
            bad = [t for t in prompt if t >= self.server.vocab.n_tokens]
            if bad:
                raise ValueError(f"prompt: token id {bad[0]} is not in the served tokenizer "
                                 f"({self.server.vocab.n_tokens} tokens)")
            return list(prompt)
        return self.large_prompt_ids(prompt)

    def first_lookahead(self) -> int:
        return min(2, self.lookahead) if self.adaptive else self.lookahead

    def request(self, prompt_ids: Sequence[int], context: str, gain: float, variants: Variants):
        """Encodes both small-model branches (raises ``ValueError`` for an unusable context); admits nothing."""
        return self.steerer.request(prompt_ids, context, gain=gain, variants=variants, salt=self.server.cache_salt)

    def admit(self, index: int, request, max_new_tokens: int, sampling: Sampling,
              logprobs: Optional[int]) -> ProxySeq:
        """A steered sequence with a steering slot (its small-model rows are prefilled at its first round)."""
        return ProxySeq(index, self.steerer.admit(request), list(request.public_ids), max_new_tokens,
                        self.first_lookahead(), sampling=sampling, gain=request.gain, logprobs=logprobs)

    def plain(self, index: int, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Sampling) -> ProxySeq:
        """A sequence the large model writes alone (asked for explicitly: ``costeer_plain``)."""
        return ProxySeq(index, -1, list(prompt_ids), max_new_tokens, 1, steering=False, sampling=sampling)

    def release(self, seqs: Sequence[_Seq]) -> None:
        super().release([s for s in seqs if s.slot >= 0])

    # ------------------------------------------------------------------ rounds
    def step(self, live: Sequence[ProxySeq]) -> None:
        """One round trip for these sequences (one completion request, one batched small step)."""
        sampling = GREEDY if all(s.sampling.greedy for s in live) else _MIXED
        for s in live:
            if self.room(s) <= 0:
                s.done, s.finish_reason = True, "length"
        live = [s for s in live if not s.done]
        if live:
            with self.guard.hold():
                self._round(list(live), sampling)

    def finish_alone(self, s: ProxySeq) -> Iterator[int]:
        """The rest of a gated (or plain) sequence, streamed by the server alone with its own sampling."""
        if self.room(s) <= 0:
            s.done, s.finish_reason = True, "length"
            return iter(())
        return self.handoff(s, s.sampling)

    def _certifier(self, gain: float) -> Certifier:
        base = self._base_certifier
        if gain == base.gain:
            return base
        cert = self._certifiers.get(gain)
        if cert is None:
            if len(self._certifiers) >= _MAX_CERTIFIERS:
                self._certifiers.clear()
            cert = self._certifiers[gain] = Certifier(gain, base.vocab, base.top_k, base.levels, base.vocab_map)
        return cert

    def _choose_step(self, seqs: list[ProxySeq], dicts: list[dict], zw: torch.Tensor, zo: torch.Tensor,
                     sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
        """The base step, run per (sampling, gain) group; records log-probs for rows that asked."""
        groups: dict[tuple[int, float], list[int]] = {}
        for r, s in enumerate(seqs):
            groups.setdefault((id(s.sampling), s.gain), []).append(r)
        chosen = torch.empty(len(seqs), dtype=torch.long)
        gated = torch.zeros(len(seqs), dtype=torch.bool)
        for rows in groups.values():
            group = [seqs[r] for r in rows]
            sel = torch.tensor(rows)
            if self._base_certifier is not None:
                self.certifier = self._certifier(group[0].gain)
            want = any(s.logprobs is not None for s in group)
            self.steerer.capture = {} if want else None
            try:
                c, g = super()._choose_step(group, [dicts[r] for r in rows], zw.index_select(0, sel),
                                            zo.index_select(0, sel), group[0].sampling)
                captured = self.steerer.capture
            finally:
                self.steerer.capture = None
            chosen[sel], gated[sel] = c.long(), g.bool()
            if want:
                for r, s, tok in zip(rows, group, c.tolist()):
                    if s.logprobs is None:
                        continue
                    row = captured.get(s.slot)
                    s.logprob_log.append(_entry_from_scores(row, tok, s.logprobs) if row is not None
                                         else _entry_from_dict(dicts[r], tok, s.logprobs))
        return chosen, gated
