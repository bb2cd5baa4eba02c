"""Steering across two different tokenizers (the release's "map" variant).

When the large and the small model come from different families, CoSteer runs on the
intersection of the two vocabularies: the token strings present in both, in a deterministic
order (the large model's id order). Steering happens on that common set, tokens outside it
become impossible while a row is steered, and each chosen id is mapped back to the small
model's vocabulary to advance its branches.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Sequence

import torch

from .core import GainLike, NEG_INF, steer

logger = logging.getLogger(__name__)


class VocabularyMap:
    """Id maps between a large and a small tokenizer, built once per pair.

    Args:
        large_tokenizer, small_tokenizer: transformers tokenizers.

    Attributes:
        large_ids / small_ids: ``[V_I]`` aligned ids of the common tokens (large-id order).
        size: ``V_I``, the number of common tokens.
        identical: both vocabularies are the same mapping (the plain path applies).

    Example::

        >>> vmap = VocabularyMap.for_pair(large_tokenizer, small_tokenizer)  # doctest: +SKIP
        >>> proc = CoSteerLogitsProcessor(runner, prompts, contexts, vocab_map=vmap)  # doctest: +SKIP
    """

    def __init__(self, large_tokenizer, small_tokenizer):
        large_vocab = large_tokenizer.get_vocab()
        small_vocab = small_tokenizer.get_vocab()
        self.identical = large_vocab == small_vocab
        common = sorted(set(large_vocab) & set(small_vocab), key=large_vocab.__getitem__)
        pairs = {large_vocab[t]: small_vocab[t] for t in common}
        # End-of-sequence means the same thing whatever its spelling in each vocabulary.
        l_eos, s_eos = large_tokenizer.eos_token_id, small_tokenizer.eos_token_id
        if l_eos is not None and s_eos is not None and l_eos not in pairs:
            pairs[l_eos] = s_eos
        ordered = sorted(pairs.items())
        self.large_ids = torch.tensor([l for l, _ in ordered], dtype=torch.long)
        self.small_ids = torch.tensor([s for _, s in ordered], dtype=torch.long)
        self.size = len(ordered)
        self.large_vocab_size = max(large_vocab.values()) + 1
        self._to_small = torch.full((self.large_vocab_size,), -1, dtype=torch.long)
        self._to_small[self.large_ids] = self.small_ids
        self.large_eos_token_id = l_eos
        if self.size == 0:
            raise ValueError("the two tokenizers share no token: CoSteer cannot steer across them")
        logger.info("CoSteer vocabulary map: %d common tokens (large %d, small %d)%s", self.size,
                    len(large_vocab), len(small_vocab), " (identical)" if self.identical else "")

    @classmethod
    def for_pair(cls, large_tokenizer, small_tokenizer) -> "VocabularyMap":
        """Cached per pair of vocabularies (building the map for a 150k vocabulary takes ~0.1 s)."""
        key = (_fingerprint(large_tokenizer), _fingerprint(small_tokenizer))
        if key not in _MAPS:
            _MAPS[key] = cls(large_tokenizer, small_tokenizer)
        return _MAPS[key]

    def to_small(self, large_ids: Sequence[int]) -> list[int]:
        """Maps generated large-model ids to small-model ids (every steered choice is mappable)."""
        ids = torch.as_tensor(list(large_ids), dtype=torch.long)
        if ids.numel() == 0:
            return []
        if (ids < 0).any() or (ids >= self.large_vocab_size).any():
            raise ValueError("token id outside the large model's vocabulary")
        mapped = self._to_small[ids]
        if (mapped < 0).any():
            bad = ids[mapped < 0].tolist()
            raise ValueError(f"large-model token ids {bad[:5]} have no counterpart in the small model's vocabulary")
        return mapped.tolist()

    def steer(self, llm_logits: torch.Tensor, small_with: torch.Tensor, small_without: torch.Tensor,
              gain: GainLike) -> torch.Tensor:
        """:func:`~costeer_processor.steer` on the common tokens; other large ids get ``-inf``."""
        dev = llm_logits.device
        large_ids, small_ids = self.large_ids.to(dev), self.small_ids.to(dev)
        large_ids = large_ids[large_ids < llm_logits.shape[1]]
        small_ids = small_ids[: large_ids.numel()]
        sub = steer(llm_logits.index_select(1, large_ids), small_with.index_select(1, small_ids),
                    small_without.index_select(1, small_ids), gain)
        out = torch.full((llm_logits.shape[0], llm_logits.shape[1]), NEG_INF, dtype=sub.dtype, device=dev)
        out[:, large_ids] = sub
        return out


def _fingerprint(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\x00{token}\x01".encode("utf-8", "surrogatepass"))
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()


_MAPS: dict[tuple[str, str], VocabularyMap] = {}
