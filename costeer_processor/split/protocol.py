"""What split mode says to the server and how it reads the answers (vLLM's OpenAI-compatible API).

* request bodies: proposals with log-probs (:func:`proposal_body`), more log-probs by rank for
  the certificate (:func:`rank_body`), the server-alone rest of a gated generation
  (:func:`stream_body`); every id-bearing field names token ids, never text;
* answers: ``token_id:<n>`` fields (:func:`token_id`), proposals (:func:`parse_proposals`),
  stream events (:func:`stream_token_ids`), log-prob rows (:class:`Vocab`);
* :func:`explain`: a refused request, with the server flag that fixes it;
* :class:`Server`: the requests themselves, under the :class:`~.transport.RetryPolicy`, with
  the probe (served model + tokenizer) run on every new connection.

Example (an answer as vLLM writes it, read back)::

    >>> vocab = Vocab(n_tokens=8, width=8)
    >>> answer = {"choices": [{"index": 0, "logprobs": {"tokens": ["token_id:3"],
    ...           "top_logprobs": [{"token_id:3": -0.1, "token_id:5": -2.4}]}}]}
    >>> parse_proposals(answer, 1, vocab, full=False)
    [[(3, {3: -0.1, 5: -2.4})]]
    >>> token_id("dog")
    Traceback (most recent call last):
    ...
    costeer_processor.split.transport.SplitModeError: the server returned tokens as text ('dog') instead of ids; split mode needs vLLM's `return_tokens_as_token_ids` extension (an OpenAI-compatible vLLM server)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from ..core import NEG_INF

from .transport import HTTPError, RetryPolicy, SplitModeError, Transport

__all__ = ["PROBE_TEXT", "Vocab", "Server", "token_id", "proposal_body", "rank_body", "stream_body",
           "parse_proposals", "stream_token_ids", "explain"]

TOKEN_ID_PREFIX = "token_id:"
#: Public text sent to ``/tokenize`` (inside the chat template) to check both sides share a tokenizer.
PROBE_TEXT = "Tokenizer probe: The quick brown fox, 1234 + 5678 = 6912; naïve café ☕ — done.\n\tEnd."
Proposals = list[list[tuple[int, dict]]]  # per prompt: [(server's token id, {id: logprob}), ...] per position


# ---------------------------------------------------------------------------------- request bodies
def _completion(model: Optional[str], prompts: Sequence[list[int]], cache_salt: Optional[str], **fields) -> dict:
    body: dict[str, Any] = {"model": model, "prompt": prompts[0] if len(prompts) == 1 else list(prompts), **fields}
    if cache_salt:
        body["cache_salt"] = cache_salt
    return body


def proposal_body(model, prompts, max_tokens: int, logprobs: int, stop_token_ids, cache_salt=None) -> dict:
    """The server proposes ``max_tokens`` greedy tokens per prompt with ``logprobs`` log-probs at each."""
    return _completion(model, prompts, cache_salt, max_tokens=max_tokens,
                       temperature=0.0,  # the server only proposes (greedy); the device decides
                       logprobs=logprobs, return_tokens_as_token_ids=True, ignore_eos=False,
                       stop_token_ids=list(stop_token_ids), skip_special_tokens=False)


def rank_body(model, prompts, level: int, cache_salt=None) -> dict:
    """The top ``level`` log-probs (``-1``: all) of the next position: by rank, never by id."""
    return _completion(model, prompts, cache_salt, max_tokens=1, temperature=0.0, logprobs=level,
                       return_tokens_as_token_ids=True, skip_special_tokens=False)


def stream_body(model, prompt: list[int], max_tokens: int, temperature: float, top_p: float,
                seed: Optional[int], stop_token_ids, cache_salt=None) -> dict:
    """The server generates alone (after gating), streaming token ids."""
    body = _completion(model, [prompt], cache_salt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                       stream=True, return_token_ids=True, stop_token_ids=list(stop_token_ids),
                       skip_special_tokens=False)
    if seed is not None:
        body["seed"] = seed
    return body


# ---------------------------------------------------------------------------------- answers
def token_id(token: Any) -> int:
    """The id in a ``token_id:<n>`` field (vLLM's ``return_tokens_as_token_ids``)."""
    if not isinstance(token, str) or not token.startswith(TOKEN_ID_PREFIX):
        raise SplitModeError(
            f"the server returned tokens as text ({token!r}) instead of ids; split mode needs vLLM's "
            "`return_tokens_as_token_ids` extension (an OpenAI-compatible vLLM server)")
    try:
        return int(token[len(TOKEN_ID_PREFIX):])
    except ValueError:
        raise SplitModeError(f"unreadable token id {token!r} from the server") from None


@dataclass(frozen=True)
class Vocab:
    """The served tokenizer's ids as this device sees them.

    Args:
        n_tokens: tokens of the served tokenizer (ids at or above it are not tokens).
        width: columns of a log-prob row (the widest of the tokenizer and the models' logits).
    """

    n_tokens: int
    width: int

    def check(self, tok: int, entries: dict, full: bool) -> None:
        if not 0 <= tok < self.n_tokens:
            raise SplitModeError(
                f"the server chose token id {tok}, which the small model's tokenizer does not have "
                f"({self.n_tokens} tokens): the server runs another tokenizer")
        if not full and any(i >= self.width for i in entries):
            raise SplitModeError(
                f"the server returned token ids up to {max(entries)}, beyond the small model's vocabulary "
                f"({self.width}): the server runs another tokenizer")
        if full and len(entries) < self.n_tokens:
            raise SplitModeError(
                f"full-vocabulary mode got only {len(entries)} log-probs per position for a {self.n_tokens}-token "
                "tokenizer; start the server with `--max-logprobs -1` or pass top_logprobs=k")

    def rows(self, dicts: Sequence[dict]) -> torch.Tensor:
        """``[n, W + 1]``: the log-probs (missing ids -inf) and a last column with the leftover mass.

        With top-k answers the leftover column keeps probabilities true (not renormalised over the
        candidates) for gating and the EOS guard; :func:`~costeer_processor.core.steer`
        renormalises over the candidates.
        """
        W = self.width
        out = torch.full((len(dicts), W + 1), NEG_INF, dtype=torch.float32)
        rows = [r for r, d in enumerate(dicts) for i in d if i < W]
        cols = [i for d in dicts for i in d if i < W]
        vals = [v for d in dicts for i, v in d.items() if i < W]
        if rows:
            out[rows, cols] = torch.tensor(vals, dtype=torch.float32)
        mass = torch.exp(out[:, :W].double()).sum(-1)
        out[:, W] = torch.where(mass < 1.0 - 1e-6, torch.log((1.0 - mass).clamp(min=1e-300)), NEG_INF).float()
        return out


def parse_proposals(answer: Any, n: int, vocab: Vocab, full: bool) -> Proposals:
    """Per prompt: ``[(server's token id, {id: logprob}), ...]`` for each proposed position."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or len(choices) != n:
        raise SplitModeError(f"expected {n} completion choice(s) from the server, got: {str(answer)[:300]}")
    out: Proposals = [[] for _ in range(n)]
    for c in choices:
        lp = c.get("logprobs")
        if not lp or lp.get("top_logprobs") is None or lp.get("tokens") is None:
            raise SplitModeError(
                "the server returned no log-probs; split mode needs the large model's next-token log-probs "
                "(OpenAI completions `logprobs`). Serve it with vLLM (`--max-logprobs -1` for exact CoSteer)")
        positions = []
        for token, top in zip(lp["tokens"], lp["top_logprobs"]):
            tok = token_id(token)
            if top is None:
                raise SplitModeError("the server returned a position without log-probs")
            entries = {token_id(k): float(v) for k, v in top.items()}
            vocab.check(tok, entries, full)
            positions.append((tok, entries))
        if not positions:
            raise SplitModeError("the server proposed no token (empty completion)")
        out[int(c.get("index", 0))] = positions
    return out


def stream_token_ids(event: dict, n_tokens: int) -> Iterator[tuple[list[int], Optional[str]]]:
    """``(token ids, finish reason)`` of each choice in one stream event (vLLM's ``return_token_ids``)."""
    for c in event.get("choices") or []:
        ids = c.get("token_ids")
        if ids is None:
            raise SplitModeError("the server's stream carries no token ids (vLLM's `return_token_ids` extension "
                                 "is needed)")
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < n_tokens]
        if bad:
            raise SplitModeError(f"the server streamed token id {bad[0]}, which the small model's tokenizer "
                                 "does not have")
        yield ids, c.get("finish_reason")


def explain(e: HTTPError, top_logprobs: Optional[int]) -> SplitModeError:
    """A refused request, with the hint that fixes the usual cause (too many log-probs asked for)."""
    if "logprob" not in e.message.lower():
        return e
    if top_logprobs is None:
        hint = ("full-vocabulary mode asks for logprobs=-1: start the server with `--max-logprobs -1`, "
                "or pass top_logprobs=k (k <= the server's --max-logprobs, default 20)")
    else:
        hint = f"start the server with `--max-logprobs {top_logprobs}` (or more) or lower top_logprobs"
    return SplitModeError(f"{e}. {hint}")


# ---------------------------------------------------------------------------------- the server
class Server:
    """The large model behind ``/v1/completions``: every request this package makes, and the probe.

    The probe runs on EVERY new connection (the first one and each reconnect): the server must
    still list the model (the first one it listed when ``model`` is None) and, with
    ``probe=(text, local ids)``, ``/tokenize`` the public probe text to the same ids. A server
    restarted with another model or tokenizer is refused with :class:`SplitModeError` instead of
    silently steering another model. Non-streaming requests go through one worker thread (one
    connection, one probe); :meth:`propose_async` lets the caller run the small model meanwhile.
    """

    def __init__(self, base_url: str, *, model: Optional[str], vocab: Vocab, top_logprobs: Optional[int],
                 stop_token_ids: Sequence[int], retry: RetryPolicy, timeout: float, headers: dict,
                 probe: Optional[tuple[str, list[int]]], mapped: bool, cache_salt: Optional[str] = None):
        self.http = Transport(base_url, timeout, headers, on_connect=self._probe)
        self.base_url = self.http.base_url
        self.model, self.vocab, self.top_logprobs = model, vocab, top_logprobs
        self.stop_token_ids = list(stop_token_ids)
        self.retry, self.probe, self.mapped, self.cache_salt = retry, probe, mapped, cache_salt
        self.max_model_len: Optional[int] = None
        self.probes = 0  # connections checked
        self._confirmed = False  # a probe succeeded: the model name is fixed
        self.requests_made = 0  # completion requests sent (all generations), for benchmarks
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="costeer-split-http")

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        self.http.reset()

    # -------------------------------------------------------------- the probe
    def connect(self) -> None:
        """Opens and checks the worker's connection (a no-op while it stays open)."""
        self._worker.submit(self.retry.call, "GET /v1/models", self.http.connect, where=self.base_url).result()

    def _probe(self, http: Transport) -> None:
        self.probes += 1
        listing = http.json("GET", "/v1/models")
        data = listing.get("data") if isinstance(listing, dict) else None
        if not data:
            raise SplitModeError(f"{self.base_url}/v1/models lists no model; is this an OpenAI-compatible server?")
        entry = data[0] if self.model is None else next((m for m in data if m.get("id") == self.model), None)
        if entry is None:
            again = " any more (it was restarted or replaced)" if self._confirmed else ""
            raise SplitModeError(f"the server does not serve model {self.model!r}{again}; it serves "
                                 f"{[m.get('id') for m in data]}")
        self.model = entry.get("id")
        if entry.get("max_model_len"):
            self.max_model_len = int(entry["max_model_len"])
        if self.probe is not None:
            self._check_tokenizer(http, *self.probe)
        self._confirmed = True

    def _check_tokenizer(self, http: Transport, text: str, local: list[int]) -> None:
        try:
            answer = http.json("POST", "/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})
        except HTTPError as e:
            raise SplitModeError(
                f"cannot verify the server's tokenizer: {e}. Split mode needs the served model and the small "
                "model to share one tokenizer; if you are sure they do, pass verify_tokenizer=False") from None
        remote = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(remote, list):
            raise SplitModeError(f"{self.base_url}/tokenize answered without 'tokens': {str(answer)[:200]}")
        if remote != local:
            first = next((i for i, (a, b) in enumerate(zip(local, remote)) if a != b), min(len(local), len(remote)))
            raise SplitModeError(
                f"the server's tokenizer differs from the small model's: the probe text is {len(remote)} server "
                f"tokens vs {len(local)} local ones, first difference at token {first} "
                f"(server {remote[first:first + 4]}, local {local[first:first + 4]}). "
                + ("The large_tokenizer given is not the served model's" if self.mapped else
                   "Pass the served model's tokenizer as large_tokenizer (different families are steered on "
                   "the intersection of the vocabularies)"))
        if answer.get("max_model_len"):
            self.max_model_len = int(answer["max_model_len"])

    # -------------------------------------------------------------- requests
    def _post(self, what: str, body: dict, on_retry: Callable[[], None]) -> Any:
        self.requests_made += 1
        return self.retry.call(what, lambda: self.http.json("POST", "/v1/completions", body), where=self.base_url,
                               on_retry=on_retry)

    def propose_async(self, prompts: Sequence[list[int]], max_tokens: int, on_retry: Callable[[], None]):
        """A future of :data:`Proposals`: up to ``max_tokens`` greedy tokens per prompt, with log-probs."""
        full = self.top_logprobs is None
        body = proposal_body(self.model, prompts, max_tokens, -1 if full else self.top_logprobs,
                             self.stop_token_ids, self.cache_salt)

        def run() -> Proposals:
            try:
                answer = self._post("POST /v1/completions", body, on_retry)
            except HTTPError as e:
                raise explain(e, self.top_logprobs) from None
            return parse_proposals(answer, len(prompts), self.vocab, full)

        return self._worker.submit(run)

    def more_logprobs(self, prompts: Sequence[list[int]], level: int, on_retry: Callable[[], None]) -> list[dict]:
        """The top ``level`` log-probs (``-1``: all) of each prompt's next position. Raises
        :class:`HTTPError` when the server refuses that many (above its ``--max-logprobs``)."""
        body = rank_body(self.model, prompts, level, self.cache_salt)
        answer = self._worker.submit(self._post, "POST /v1/completions (certify)", body, on_retry).result()
        return [positions[0][1] for positions in parse_proposals(answer, len(prompts), self.vocab, level == -1)]

    def stream(self, prompt: list[int], max_tokens: int, temperature: float, top_p: float,
               seed: Optional[int]) -> Iterator[tuple[list[int], Optional[str]]]:
        """One streaming request (no retry here: the caller resumes from its own state)."""
        body = stream_body(self.model, prompt, max_tokens, temperature, top_p, seed, self.stop_token_ids,
                           self.cache_salt)
        self.requests_made += 1
        try:
            for event in self.http.events("/v1/completions", body):
                yield from stream_token_ids(event, self.vocab.n_tokens)
        except HTTPError as e:
            raise explain(e, self.top_logprobs) from None

