"""``costeer serve``: the OpenAI-compatible vLLM server with the CoSteer processor (or plain, for split mode).

With the processor it also installs :data:`~costeer_processor.vllm_server.COSTEER_MIDDLEWARE`, which
refuses CoSteer arguments vLLM's request parsing would alter (a JSON ``true`` read as ``1``) and turns
a streamed request's argument error into an HTTP 400 (:mod:`costeer_processor.vllm.middleware`).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from ..models import PRESETS, is_installed, preset_model_dir, resolve_model
from .common import PROG, UsageError, dtype_label, note_tokenizers, vllm_processor


def serve_command(args) -> tuple[list[str], dict]:
    """The server's command line and the environment variables it needs (CPU defaults off a GPU)."""
    from ..vllm_server import COSTEER_MIDDLEWARE, CPU_DEFAULTS, server_command

    def where(name: str) -> Path:
        if args.dry_run and name.strip().lower() in PRESETS:
            return preset_model_dir(name, args.dtype)  # a dry run installs nothing
        return resolve_model(name, args.dtype, progress=not args.dry_run)

    if args.split and args.small:
        raise UsageError("--split serves the large model alone: drop --small (the small model runs on the client)")
    if not args.split and not args.small:
        raise UsageError("give --small MODEL (the CoSteer processor runs it inside the server), or use --split")
    large_dir = where(args.large)
    extra = list(args.extra or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    common = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
    if args.split:
        cmd = server_command(str(large_dir), [*common, "--max-logprobs", "-1", "--enable-prefix-caching", *extra],
                             host=args.host, port=args.port)
    else:
        small_dir = where(args.small)
        if not args.dry_run:
            from ..loading import load_tokenizer

            note_tokenizers(args, load_tokenizer(large_dir), load_tokenizer(small_dir))
        costeer = {"small_model": str(small_dir), "dtype": args.dtype}
        cmd = server_command(str(large_dir), [*common, "--logits-processors", vllm_processor(),
                                              "--additional-config", json.dumps({"costeer": costeer}),
                                              "--middleware", COSTEER_MIDDLEWARE, *extra],
                             host=args.host, port=args.port)
    import torch

    env = {} if torch.cuda.is_available() else {k: os.environ.get(k, v) for k, v in CPU_DEFAULTS.items()}
    return cmd, env


def run(args) -> int:
    cmd, env = serve_command(args)
    if args.dry_run:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        print((prefix + " " if prefix else "") + shlex.join(cmd))
        print(f"# dtype {dtype_label(args)}", file=sys.stderr)
        for name in (args.large, args.small):
            if name and name.strip().lower() in PRESETS and not is_installed(name, args.dtype):
                print(f"# {name} is not installed yet: run 'costeer models install {name} --dtype {args.dtype}'",
                      file=sys.stderr)
        return 0
    from ..vllm_server import server_env

    print(f"[{PROG}] dtype {dtype_label(args)}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
        os.execve(cmd[0], cmd, server_env(env))
    except OSError as e:
        raise UsageError(f"cannot start the vLLM server: {e}") from None
    return 0  # not reached
