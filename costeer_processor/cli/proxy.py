"""``costeer proxy``: a local OpenAI-compatible server that steers every request in split mode.

    costeer proxy --upstream http://10.0.0.5:8000 --small qwen2.5-coder-0.5b-instruct --profiles ~/.costeer/profiles

The small model and the profiles stay on this machine; the upstream is a plain ``vllm serve`` of
the large model (``costeer serve --large L --split``). See ``docs/proxy.md``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..core.config import MAX_NGRAM, SPLIT_NGRAM_GUARD, CoSteerConfig, Variants
from ..loading import DTYPES
from .common import PROG, UsageError
from .parser import config_field, numeric, variant_field

API_KEY_ENV = "COSTEER_PROXY_API_KEY"
UPSTREAM_KEY_ENV = "COSTEER_UPSTREAM_API_KEY"


def add_parser(sub) -> None:
    p = sub.add_parser("proxy", help="a local OpenAI-compatible server: split-mode CoSteer against a plain vLLM server",
                       description="Serves /v1/chat/completions, /v1/completions, /v1/models, /health, /stats and a "
                                   "page at / on this device. Each request is steered by a personal context that "
                                   "stays here (a profile file or an inline costeer_context); the large model runs "
                                   "on --upstream, an unmodified vLLM server, which sees token ids only.")
    p.add_argument("--upstream", required=True, metavar="URL",
                   help="the plain vLLM server holding the large model (started with --max-logprobs, e.g. "
                        "'costeer serve --large L --split')")
    p.add_argument("--small", required=True, help="the small (on-device) model: a preset, a local folder or a hub id")
    p.add_argument("--profiles", type=Path, metavar="DIR", help="one <name>.txt per profile (read at each request)")
    p.add_argument("--default-profile", metavar="NAME",
                   help="the profile for requests that name none (default: 'default' if DIR/default.txt exists)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other needs an API key)")
    p.add_argument("--port", type=numeric(integer=True, low=1, high=65535), default=8100)
    p.add_argument("--api-key", default=None,
                   help=f"required as 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}); needed for --host other "
                        "than loopback")
    p.add_argument("--upstream-api-key", default=None, help=f"sent to the upstream (default: ${UPSTREAM_KEY_ENV})")
    p.add_argument("--model", help="the upstream's served model name (default: its first)")
    p.add_argument("--large", metavar="DIR", help="a folder with the served model's tokenizer, when its family differs "
                                                  "from the small model's (tokenizers are public)")
    p.add_argument("--dtype", default="auto", choices=DTYPES + ("auto",),
                   help="small-model weights dtype (default auto: bfloat16 on a GPU or a CPU with native bf16, "
                        "else float32)")
    p.add_argument("--device", default="cpu", help="small-model device (cpu, cuda, ...; default cpu)")
    p.add_argument("--context-position", choices=("before", "after"), default="before",
                   help="where the small model reads the context in the user turn (default before)")
    p.add_argument("--top-logprobs", type=numeric(integer=True, low=0), default=20,
                   help="log-probs per position asked of the upstream (default 20, with the certificate: exact for "
                        "greedy requests); 0 asks for the full vocabulary (needs the upstream's --max-logprobs -1)")
    p.add_argument("--lookahead", type=numeric(integer=True, low=1), default=4,
                   help="most tokens the upstream proposes per round trip (default 4)")
    p.add_argument("--retries", type=numeric(integer=True, low=0), default=3,
                   help="retries of a failed upstream request, with back-off, before the request fails (default 3)")
    p.add_argument("--timeout", type=numeric(low=0.0, low_open=True), default=60.0,
                   help="seconds per upstream request (default 60)")
    p.add_argument("--cache-salt", default=None, help="vLLM cache_salt: keeps this device's prefix-cache entries "
                                                      "apart from other tenants'")
    p.add_argument("--max-tokens", type=numeric(integer=True, low=1), default=1024,
                   help="new tokens when a request sets no max_tokens (default 1024; the upstream's window caps it)")
    p.add_argument("--temperature", type=numeric(low=0.0, high=2.0), default=1.0,
                   help="temperature when a request sets none (default 1.0, OpenAI's; 0 = greedy)")
    p.add_argument("--max-body", type=numeric(integer=True, low=1024), default=4 << 20,
                   help="largest request body in bytes (default 4 MiB)")
    p.add_argument("--max-concurrency", type=numeric(integer=True, low=1), default=64,
                   help="requests decoded together at most; later ones wait between rounds (default 64)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    g = p.add_argument_group("CoSteer defaults (a request may set costeer_strength, costeer_T, ... itself)")
    for name in ("T", "alpha", "beta", "lam", "eta", "strength"):
        g.add_argument(f"--{name}", type=config_field(name), default=getattr(CoSteerConfig, name))
    for name in ("gate_threshold", "gate_patience", "eos_guard"):
        g.add_argument("--" + name.replace("_", "-"), type=variant_field(name), default=getattr(Variants, name))
    g.add_argument("--ngram-guard", type=numeric(integer=True, low=0, high=MAX_NGRAM), default=None,
                   help=f"the context n-gram guard's n: no run of n context tokens absent from the prompt is "
                        f"generated (default {SPLIT_NGRAM_GUARD}; 0 = off; a request may set costeer_ngram_guard)")


def run(args) -> int:
    from ..proxy import Defaults, ProfileStore, ProxyService, is_loopback, serve

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and not api_key:
        raise UsageError(f"--host {args.host} accepts connections from other machines: set an API key "
                         f"(--api-key or ${API_KEY_ENV})")
    try:
        profiles = ProfileStore(args.profiles, args.default_profile)
        config = CoSteerConfig(args.T, args.alpha, args.beta, args.lam, args.eta, args.strength)
        config.served_gain("the CoSteer flags")
        variants = Variants.parse(args.gate_threshold, args.gate_patience, args.eos_guard, ngram_guard=args.ngram_guard)
    except ValueError as e:
        raise UsageError(str(e)) from None
    from ..loading import load_model, load_tokenizer
    from ..models import resolve_model
    from ..small_model import SmallModelRunner
    from ..split import SplitModeError

    print(f"[{PROG}] loading the small model {args.small} ({args.dtype}, {args.device})", file=sys.stderr, flush=True)
    small_dir = resolve_model(args.small, dtype=args.dtype)
    runner = SmallModelRunner(load_model(small_dir, args.dtype, device=args.device), load_tokenizer(small_dir),
                              context_position=args.context_position)
    defaults = Defaults(config=config, variants=variants, max_tokens=args.max_tokens, temperature=args.temperature)
    try:
        service = ProxyService.create(
            args.upstream, runner, profiles=profiles, defaults=defaults, api_key=api_key, max_body=args.max_body,
            max_live=args.max_concurrency, top_logprobs=args.top_logprobs or None, model=args.model,
            lookahead=args.lookahead, max_retries=args.retries, timeout=args.timeout, cache_salt=args.cache_salt,
            upstream_api_key=args.upstream_api_key or os.environ.get(UPSTREAM_KEY_ENV) or None,
            large_tokenizer=args.large)
    except (ValueError, SplitModeError) as e:
        raise UsageError(str(e)) from None
    print(f"[{PROG}] proxy on http://{args.host}:{args.port} (OpenAI base_url http://{args.host}:{args.port}/v1), "
          f"upstream {args.upstream}, profiles {args.profiles or 'none (inline contexts only)'}",
          file=sys.stderr, flush=True)
    serve(service, args.host, args.port, log_level=args.log_level)
    return 0
