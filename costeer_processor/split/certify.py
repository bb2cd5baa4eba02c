"""The top-k certificate: proving a choice made over the server's top ``k`` log-probs is the full-vocabulary one.

With ``top_logprobs=k`` the device knows the large model's log-probs of ``k`` ids only. Every
other id has ``log p <= cap = log min(p_k, 1 - sum of the known p)``, and its steered score is
at most ``cap + g * delta_id`` (``delta`` is known here for EVERY id: the small model runs on
the device). Where that bound stays below the best known candidate's score, greedy top-k
decoding provably picks the full-vocabulary argmax; elsewhere :meth:`Certifier.escalate` asks
for more candidates **by rank** (e.g. the top 1000, then all), never by id: the ids that could
win are exactly the ones the personal context boosts.

Example (three ids, the server returned two; id 2's bound cannot reach the best score)::

    >>> import torch

from ..core import NEG_INF
    >>> from costeer_processor.split.protocol import Vocab
    >>> vocab = Vocab(n_tokens=3, width=3)
    >>> cert = Certifier(gain=1.0, vocab=vocab, top_k=2, levels=(-1,))
    >>> large = vocab.rows([{0: -0.1, 1: -2.5}])
    >>> flat = torch.zeros(1, 3)
    >>> cert.uncertain(large, flat, flat, torch.zeros(1, dtype=torch.bool))
    {}
    >>> boost = torch.tensor([[0.0, 0.0, 9.0]])  # the context makes id 2 far likelier
    >>> cert.uncertain(large, boost, flat, torch.zeros(1, dtype=torch.bool))
    {0: [2]}
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

from ..core import NEG_INF
from ..vocab import VocabularyMap
from .protocol import Vocab
from .transport import HTTPError

__all__ = ["Certifier"]

logger = logging.getLogger("costeer_processor.split")


class Certifier:
    """Certifies greedy top-k choices and escalates by rank where the certificate fails.

    Args:
        gain: the CoSteer gain ``g``.
        vocab: the served tokenizer's ids (:class:`~.protocol.Vocab`).
        top_k: the ``k`` of the regular requests.
        levels: ranks to ask for, in order, where a row is not certified (``-1``: the full
            vocabulary; a level the server refuses is skipped).
        vocab_map: with two tokenizers, steering runs on their common ids only.
    """

    def __init__(self, gain: float, vocab: Vocab, top_k: int, levels: Sequence[int],
                 vocab_map: Optional[VocabularyMap] = None):
        self.gain, self.vocab, self.top_k, self.levels = float(gain), vocab, top_k, tuple(levels)
        self.vocab_map = vocab_map
        self.steerable = None if vocab_map is None else vocab_map.on_map(vocab.width)
        self._warned = False

    def uncertain(self, large: torch.Tensor, zw: torch.Tensor, zo: torch.Tensor,
                  gated: torch.Tensor) -> dict[int, list[int]]:
        """``{row: [ids that could still win]}`` for rows whose choice is not proven (empty: all proven).

        ``large`` is :meth:`Vocab.rows` of the known log-probs; ``zw`` / ``zo`` the small model's
        logits with / without the context; ``gated`` rows are not steered (nothing to prove).
        """
        lp = large[:, :-1]
        if self.vocab_map is not None:  # delta on the served model's ids (off the map: impossible)
            zw, zo = self.vocab_map.lift(zw, lp.shape[1]), self.vocab_map.lift(zo, lp.shape[1])
        width = min(lp.shape[1], zw.shape[1], self.vocab.n_tokens)
        delta = torch.log_softmax(zw[:, :width], -1) - torch.log_softmax(zo[:, :width], -1)
        delta = torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))
        steerable = torch.ones(width, dtype=torch.bool) if self.steerable is None else self.steerable[:width]
        returned_all = torch.isfinite(lp)
        returned = returned_all[:, :width]
        score = lp[:, :width] + self.gain * delta
        best = score.masked_fill(~(returned & steerable), NEG_INF).amax(-1)
        kth = lp.masked_fill(~returned_all, float("inf")).amin(-1).double()  # the k-th (smallest known) log-prob
        rest = 1.0 - torch.exp(lp[:, :width].double()).sum(-1)
        cap = torch.minimum(torch.exp(kth), rest)
        open_rows = ~gated & returned_all.any(-1) & (cap > 0.0)
        bound = torch.log(cap.clamp(min=1e-300)).float()[:, None] + self.gain * delta
        could_win = (bound >= best[:, None]) & ~returned & steerable & open_rows[:, None]
        rows = could_win.any(-1).nonzero().flatten().tolist()
        return {r: could_win[r].nonzero().flatten().tolist() for r in rows}

    def escalate(self, need: dict[int, list[int]], dicts: Sequence[dict], zw: torch.Tensor, zo: torch.Tensor,
                 gated: torch.Tensor, fetch: Callable[[list[int], int], list[dict]],
                 counters: Sequence) -> list[dict]:
        """Asks for more log-probs by rank, level by level, until every row in ``need`` is certified.

        ``fetch(rows, level)`` returns the top-``level`` log-probs of those rows' next positions
        (raising :class:`~.transport.HTTPError` when the server refuses); each row's ``counters``
        (a :class:`~.decode.Counters`) count the requests. Returns the merged log-prob dicts; a
        row no level could settle keeps its best known candidate and counts as ``uncertified``.
        """
        out = list(dicts)
        rows = sorted(need)
        current = self.top_k or 0
        for level in self.levels:
            if not rows:
                break
            if level >= self.vocab.n_tokens:
                level = -1  # servers refuse more log-probs than the vocabulary has; -1 is all of them
            if level != -1 and level <= current:
                continue
            for r in rows:
                counters[r].round_trips += 1
                counters[r].escalations += 1
            try:
                fresh = fetch(rows, level)
            except HTTPError as e:  # e.g. a level above the server's --max-logprobs: try the next one
                if not self._warned:
                    logger.warning("split mode: a top-%s log-prob request was refused (%s)", level, e)
                    self._warned = True
                continue
            current = level if level != -1 else 1 << 30
            for r, d in zip(rows, fresh):
                out[r] = {**out[r], **d}
            sel = torch.tensor(rows)
            still = self.uncertain(self.vocab.rows([out[r] for r in rows]), zw[sel], zo[sel], gated[sel])
            rows = [rows[i] for i in sorted(still)]
        for r in rows:
            counters[r].uncertified += 1
        return out
