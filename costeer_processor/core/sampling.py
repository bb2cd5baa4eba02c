"""How the next token is picked from steered log-probabilities: greedy, or sampling with temperature / top-p.

One :class:`Sampling` for every mode: the HF pipeline turns it into ``generate`` arguments, split
mode picks tokens with :func:`choose` on the device.

Example::

    >>> import torch
    >>> scores = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0]]), -1)
    >>> choose(scores, Sampling()).tolist()  # greedy
    [1]
    >>> choose(scores, Sampling(temperature=0.7, top_p=0.5, seed=0)).tolist()  # only id 1 is in the top 50 %
    [1]
    >>> Sampling(temperature=-1)
    Traceback (most recent call last):
    ...
    ValueError: temperature must be in [0, inf], got -1.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .config import check_range, number
from .update import NEG_INF

__all__ = ["Sampling", "GREEDY", "choose"]


@dataclass(frozen=True)
class Sampling:
    """Greedy (``temperature=0``, the default and the paper's decoding) or sampling.

    ``seed`` makes sampling reproducible: :attr:`generator` is seeded with it once, so the draws of
    one generation continue one stream. Values are checked (booleans, strings, NaN refused).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    generator: Optional[torch.Generator] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "temperature", number("temperature", self.temperature))
        set_(self, "top_p", number("top_p", self.top_p))
        check_range("temperature", self.temperature, 0.0)
        check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if self.seed is not None:
            set_(self, "seed", number("seed", self.seed, integer=True))
            if self.generator is None:
                set_(self, "generator", torch.Generator().manual_seed(self.seed))

    @classmethod
    def make(cls, temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None) -> "Sampling":
        return cls(temperature, top_p, seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def generate_kwargs(self) -> dict:
        """The matching transformers ``generate`` arguments."""
        if not self.greedy:
            return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=None)
        return dict(do_sample=False, temperature=None, top_p=None, top_k=None)


GREEDY = Sampling()


def choose(scores: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """One id per row of ``scores``: the argmax, or a sample at ``temperature`` within ``top_p``."""
    if sampling.greedy:
        return scores.argmax(dim=-1)
    logits = scores / sampling.temperature
    if sampling.top_p < 1.0:
        sorted_p, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= sampling.top_p  # keeps at least one token
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), NEG_INF)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=sampling.generator).squeeze(-1)
