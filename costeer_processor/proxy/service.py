"""What the proxy holds: the split client's setup, the decoder, the scheduler, the profiles, the counters.

:class:`ProxyService` is built from a configured :class:`~costeer_processor.split.SplitCoSteerClient`
(same server checks, tokenizer, certificate, look-ahead: the proxy's tokens equal the client's)
and does the per-request work the HTTP layer needs off the event loop: choosing the context
(inline, or a profile), encoding the prompt and both small-model branches, checking the
upstream, admitting the sequence (:meth:`ProxyService.prepare`).
"""

from __future__ import annotations

import threading
import time
from typing import Optional, Union

from ..split import SplitCoSteerClient
from .decoder import ProxyDecoder, ProxySeq
from .profiles import ProfileStore
from .scheduler import Scheduler
from .settings import Defaults, GenRequest, RequestError

__all__ = ["ProxyService", "DEFAULT_MAX_BODY"]

DEFAULT_MAX_BODY = 4 << 20  # bytes; a request body (messages + inline context) above this is a 413


class ProxyService:
    """The proxy's state, shared by every request.

    Args:
        client: the split client whose server and settings the proxy uses (it takes over the
            client's decoder; close the service, not the client).
        profiles: the profile store (:class:`~.profiles.ProfileStore`).
        defaults: what requests leave out (:class:`~.settings.Defaults`); use the client's
            ``config`` for ``defaults.config``.
        api_key: required as ``Authorization: Bearer KEY`` on every route but ``/health`` and ``/``.
        max_body: the largest request body accepted, in bytes.
        max_live: sequences decoded together at most (later ones wait between rounds).
    """

    def __init__(self, client: SplitCoSteerClient, profiles: Optional[ProfileStore] = None,
                 defaults: Defaults = Defaults(), *, api_key: Optional[str] = None,
                 max_body: int = DEFAULT_MAX_BODY, max_live: int = 64):
        self.client, self.profiles, self.defaults = client, profiles or ProfileStore(None), defaults
        self.api_key, self.max_body = api_key or None, int(max_body)
        self.decoder = ProxyDecoder.from_client(client)
        self.tokenizer = self.decoder.tokenizer
        self.scheduler = Scheduler(self.decoder, max_live=max_live)
        self.started = time.time()
        self._counts = {"requests": 0, "errors": 0, "rejected": 0}
        self._lock = threading.Lock()

    @classmethod
    def create(cls, upstream: str, runner, *, profiles: Union[None, str, ProfileStore] = None,
               default_profile: Optional[str] = None, defaults: Defaults = Defaults(), api_key: Optional[str] = None,
               max_body: int = DEFAULT_MAX_BODY, max_live: int = 64, top_logprobs: Optional[int] = 20,
               upstream_api_key: Optional[str] = None, **client_kw) -> "ProxyService":
        """A service over ``upstream`` (a plain ``vllm serve``) with ``runner`` (the small model).

        ``client_kw`` go to :class:`~costeer_processor.split.SplitCoSteerClient` (``lookahead``,
        ``max_retries``, ``timeout``, ``cache_salt``, ``model``, ``large_tokenizer``...);
        ``upstream_api_key`` is the upstream's key (``api_key`` is this proxy's own).
        """
        store = profiles if isinstance(profiles, ProfileStore) else ProfileStore(profiles, default_profile)
        client = SplitCoSteerClient(upstream, runner, config=defaults.config, variants=defaults.variants,
                                    top_logprobs=top_logprobs, api_key=upstream_api_key, **client_kw)
        return cls(client, store, defaults, api_key=api_key, max_body=max_body, max_live=max_live)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        self.decoder.close()
        self.decoder.server.close()

    def count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    # ------------------------------------------------------------------ per request
    def context_for(self, req: GenRequest, header: Optional[str]) -> tuple[Optional[str], Optional[str]]:
        """``(profile name, context)``: inline ``costeer_context`` first, else the named or default profile."""
        if req.plain:
            return None, None
        if req.context is not None:
            return None, req.context
        name, text = self.profiles.context(header, req.user)
        if text is None:
            raise RequestError("no personal context for this request: name a profile (the X-CoSteer-Profile header "
                               "or the user field), pass costeer_context, or give the proxy a default profile "
                               "(--default-profile, or default.txt in --profiles)", param="user")
        return name, text

    def prepare(self, req: GenRequest, context: Optional[str]) -> tuple[ProxySeq, str]:
        """Encodes the request, checks the upstream, admits the sequence; returns it and the served model name.

        Raises ``ValueError`` / :class:`~.settings.RequestError` (HTTP 4xx) before anything is
        admitted, and the split errors (HTTP 502 / 503) when the upstream cannot be used.
        """
        dec = self.decoder
        ids = dec.prompt_ids(req.prompt)
        request = None if req.plain else dec.request(ids, context, req.gain, req.variants)
        dec.server.connect()  # the upstream is there and still serves the same model and tokenizer
        model = dec.server.model
        if req.model is not None and req.model != model:
            raise RequestError(f"model {req.model!r} does not exist here; the upstream serves {model!r}", 404, "model")
        limit = dec.server.max_model_len
        if limit is not None and len(ids) >= limit:
            raise RequestError(f"the prompt is {len(ids)} tokens; the upstream's max_model_len is {limit}",
                               param="messages" if req.kind == "chat" else "prompt")
        max_new = req.max_tokens or self.defaults.max_tokens
        index = self.scheduler.next_index()
        if req.plain:
            return dec.plain(index, ids, max_new, req.sampling), model
        return dec.admit(index, request, max_new, req.sampling, req.logprobs), model

    def upstream_models(self) -> dict:
        """The upstream's ``GET /v1/models`` answer (under the retry policy)."""
        server = self.decoder.server
        return server.retry.call("GET /v1/models", lambda: server.http.json("GET", "/v1/models"),
                                 where=server.base_url)

    def stats(self) -> dict:
        """Requests, tokens, round trips per token, rounds, and the small model's KV memory."""
        sched, server = self.scheduler, self.decoder.server
        with sched._lock:
            c = dict(sched.counts)
        with self._lock:
            counts = dict(self._counts)
        tokens = c["tokens"]
        runner = self.decoder.runner.stats()
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "requests": {"total": counts["requests"], "open": sched.open_requests(), "decoding": sched.live(),
                         "finished": c["finished"], "failed": c["failed"], "cancelled": c["cancelled"],
                         "errors_returned": counts["errors"], "rejected": counts["rejected"]},
            "tokens": {"generated": tokens, "steered": c["steered_tokens"]},
            "round_trips_per_token": round(c["round_trips"] / tokens, 4) if tokens else None,
            "upstream_requests": server.requests_made,
            "upstream_requests_per_token": round(server.requests_made / tokens, 4) if tokens else None,
            "rounds": c["rounds"],
            "mean_sequences_per_round": round(c["rows"] / c["rounds"], 3) if c["rounds"] else None,
            "retries": c["retries"], "escalations": c["escalations"],
            "small_model": {"kv_bytes": runner["kv_bytes"], "kv_bytes_needed": runner["kv_bytes_needed"],
                            "kv_tokens": runner["kv_tokens"], "requests": runner["requests"],
                            "cached_rows": runner["cached_rows"], "forwards": runner["forwards"],
                            "batched_steps": self.decoder.steerer.small_steps},
            "upstream": {"url": server.base_url, "model": server.model, "max_model_len": server.max_model_len},
            "ngram_guard": {"default_n": self.decoder.steerer.ngram_default,
                            "by_n": {str(n): g for n, g in self.decoder.steerer.stats()["guard"].items()}},
        }
