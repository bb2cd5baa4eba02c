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
from typing import Optional, Sequence

import torch

from .core import GainLike, NEG_INF, steer
from .prompts import _TEMPLATE_ERRORS

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

        >>> from costeer_processor.testing import build_other_tokenizer, build_tiny_tokenizer
        >>> large_tokenizer, small_tokenizer = build_tiny_tokenizer(), build_other_tokenizer()
        >>> vmap = VocabularyMap.for_pair(large_tokenizer, small_tokenizer)
        >>> 0 < vmap.size < len(large_tokenizer)
        True
        >>> large_id = large_tokenizer.convert_tokens_to_ids("<|im_end|>")  # EOS maps to EOS
        >>> small_tokenizer.convert_ids_to_tokens(vmap.to_small([large_id]))
        ['<|eot_id|>']

    Pass it to the HF processor with the large tokenizer:
    ``CoSteerLogitsProcessor(runner, contexts, vocab_map=vmap, large_tokenizer=large_tokenizer)``.
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

    @classmethod
    def if_needed(cls, large_tokenizer, small_tokenizer) -> Optional["VocabularyMap"]:
        """The cached map when the two vocabularies differ, ``None`` when they are one (the plain path).

        One tokenizer costs a vocabulary comparison only: no fingerprints, no map.
        """
        if large_tokenizer.get_vocab() == small_tokenizer.get_vocab():
            return None
        return cls.for_pair(large_tokenizer, small_tokenizer)

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

    def lift(self, small_logits: torch.Tensor, width: int) -> torch.Tensor:
        """Small-model logits ``[n, V_small]`` placed on the large ids ``[n, width]`` (``-inf`` off the map).

        ``steer(large.masked_fill(~on_map, -inf), lift(z_with), lift(z_without), g)`` equals
        :meth:`steer` (the softmaxes of the lifted rows run over the common tokens only).
        """
        large_ids, small_ids = self._aligned(small_logits.device, width)
        out = torch.full((small_logits.shape[0], width), NEG_INF, dtype=small_logits.dtype,
                         device=small_logits.device)
        out[:, large_ids] = small_logits.index_select(1, small_ids)
        return out

    def on_map(self, width: int, device=None) -> torch.Tensor:
        """``[width]`` bool: large ids that have a counterpart in the small vocabulary."""
        mask = torch.zeros(width, dtype=torch.bool, device=device)
        mask[self._aligned(device, width)[0]] = True
        return mask

    def _aligned(self, device, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        large_ids, small_ids = self.large_ids.to(device), self.small_ids.to(device)
        keep = large_ids < width  # large ids are sorted: this is a prefix
        return large_ids[keep], small_ids[keep]

    def steer(self, llm_logits: torch.Tensor, small_with: torch.Tensor, small_without: torch.Tensor,
              gain: GainLike, fn=steer) -> torch.Tensor:
        """:func:`~costeer_processor.steer` (or ``fn``, an update of the same signature) on the common
        tokens; other large ids get ``-inf``."""
        dev = llm_logits.device
        large_ids, small_ids = self._aligned(dev, llm_logits.shape[1])
        sub = fn(llm_logits.index_select(1, large_ids), small_with.index_select(1, small_ids),
                    small_without.index_select(1, small_ids), gain)
        out = torch.full((llm_logits.shape[0], llm_logits.shape[1]), NEG_INF, dtype=sub.dtype, device=dev)
        out[:, large_ids] = sub
        return out


class ChatTemplateInverter:
    """Recovers the messages behind a prompt that a tokenizer's chat template rendered.

    The vLLM processor sees only the large model's prompt ids. A small model of another family
    must read the same conversation in *its* template, so the prompt text is parsed back into
    messages (optional system, then user / assistant turns ending with a user turn and the
    generation prompt) and rendered again by the small tokenizer. The layout is learned once by
    rendering sentinel messages; a parse is accepted only if rendering the recovered messages
    gives back exactly the same text, so a prompt the template did not produce returns ``None``.

    Example::

        >>> from costeer_processor.testing import build_tiny_tokenizer
        >>> tok = build_tiny_tokenizer()
        >>> msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
        >>> ChatTemplateInverter(tok).parse(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)) == msgs
        True
        >>> ChatTemplateInverter(tok).parse("plain text, no template") is None
        True
    """

    _S, _U1, _A1, _U2 = "QxSYSTEMqz", "QxUSERONEqz", "QxASSISTANTqz", "QxUSERTWOqz"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.layouts: list[tuple[str, Optional[str]]] = []  # (prefix, system -> first user separator)
        self.user_to_assistant = self.assistant_to_user = self.end = None
        try:
            full = self._render([("system", self._S), ("user", self._U1), ("assistant", self._A1),
                                 ("user", self._U2)])
            pre, rest = full.split(self._S)
            sys_user, rest = rest.split(self._U1)
            self.user_to_assistant, rest = rest.split(self._A1)
            self.assistant_to_user, self.end = rest.split(self._U2)
            self.layouts.append((pre, sys_user))
            bare_pre, bare_end = self._render([("user", self._U1)]).split(self._U1)
            if bare_end == self.end and bare_pre != pre:
                self.layouts.append((bare_pre, None))
        except (*_TEMPLATE_ERRORS, AttributeError):  # no template, or one that drops / reorders turns
            self.layouts = []
        if not (self.user_to_assistant and self.assistant_to_user):
            self.layouts = []

    @property
    def usable(self) -> bool:
        return bool(self.layouts)

    def _render(self, turns) -> str:
        return self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False,
                                                  add_generation_prompt=True)

    def parse(self, text: str) -> Optional[list[dict]]:
        """The messages that render to ``text``, or ``None``."""
        for pre, sys_user in self.layouts:
            if not (text.startswith(pre) and text.endswith(self.end)) or len(text) < len(pre) + len(self.end):
                continue
            body = text[len(pre): len(text) - len(self.end)]
            messages = []
            if sys_user is not None:
                system, sep, body = body.partition(sys_user)
                if not sep:
                    continue
                messages.append({"role": "system", "content": system})
            role = "user"
            while True:
                sep = self.user_to_assistant if role == "user" else self.assistant_to_user
                head, found, body = body.partition(sep)
                messages.append({"role": role, "content": head})
                if not found:
                    break
                role = "assistant" if role == "user" else "user"
            if messages[-1]["role"] != "user":
                continue
            try:
                if self._render([(m["role"], m["content"]) for m in messages]) == text:
                    return messages
            except _TEMPLATE_ERRORS:
                continue
        return None


def _fingerprint(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\x00{token}\x01".encode("utf-8", "surrogatepass"))
    h.update(str(tokenizer.eos_token_id).encode())
    return h.hexdigest()


_MAPS: dict[tuple[str, str], VocabularyMap] = {}
