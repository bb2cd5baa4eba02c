"""``costeer generate``: one prompt (streamed to stdout) or a JSONL file, on three backends.

* ``hf`` (default): transformers ``generate`` through :mod:`costeer_processor.pipeline`.
* ``vllm``: an offline ``vllm.LLM`` with the CoSteer logits processor.
* split mode (``--server URL``): the large model is a plain vLLM server; the small model and the
  context stay here (:mod:`costeer_processor.split`).

Every backend gives both models the same conversation: the prompt with the paper's system prompt
as an ordinary first message (:func:`costeer_processor.prompts.with_system_prompt`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from .common import (MODES, UsageError, config_from_args, device, dtype_label, note_tokenizers, quiet_transformers, read_context,
                     read_rows, resolve, say, variants_from_args, vllm_processor)


def run(args) -> int:
    missing = [flag for flag, value in (("--large", args.large), ("--small", args.small))
               if not value and not (flag == "--large" and args.server)]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)} (see 'costeer generate --help')")
    config = config_from_args(args)
    context = read_context(args)
    mode = MODES[args.mode]
    if args.input is None:
        if args.output is not None:
            raise UsageError("--output needs --input (batch mode); for one prompt the answer goes to stdout")
        if not args.prompt or not args.prompt.strip():
            raise UsageError("give --prompt TEXT (or --input FILE.jsonl for batch mode)")
        if mode.uses_context and context is None:
            raise UsageError("give the personal context with --context TEXT or --context-file FILE")
        rows = [{"prompt": args.prompt, "context": context, "fields": {}}]
    else:
        if args.prompt:
            raise UsageError("--prompt and --input cannot be used together")
        if args.output is None:
            raise UsageError("--input needs --output FILE.jsonl")
        rows = read_rows(args.input, context, mode.uses_context)
    if args.server:
        return _generate_split(args, rows, config)
    if args.backend == "vllm":
        return _generate_vllm(args, rows, config)
    return _generate_hf(args, rows, config)


@contextmanager
def _jsonl_writer(args, rows: list[dict], desc: str) -> Iterator:
    """Yields ``write(chunk_rows, texts)``; one JSONL line per row (its input fields + ``output``)."""
    from tqdm.auto import tqdm

    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as out, \
            tqdm(total=len(rows), desc=desc, unit="row", disable=args.quiet, file=sys.stderr) as bar:
        def write(chunk: list[dict], texts: list[str]) -> None:
            for r, text in zip(chunk, texts):
                out.write(json.dumps({**r["fields"], "output": text}, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(chunk))
        yield write


def _chunks(args, rows: list[dict]):
    for i in range(0, len(rows), args.batch_size):
        chunk = rows[i:i + args.batch_size]
        yield chunk, [r["prompt"] for r in chunk], [r["context"] for r in chunk]


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.2f} tok/s"


# --------------------------------------------------------------------------- hf
def _generate_hf(args, rows: list[dict], config) -> int:
    from ..pipeline import Pair, Sampling

    quiet_transformers()
    mode = MODES[args.mode]
    large_dir, small_dir = resolve(args, args.large), resolve(args, args.small)
    t0 = time.perf_counter()
    pair = Pair.load(large_dir, small_dir, args.dtype, device=device(args), load_large=False,
                     load_small=mode.needs_small)
    note_tokenizers(args, pair.tokenizers["large"], pair.tokenizers["small"])
    if mode.uses_context:  # before the large model is loaded: a context too long fails fast
        pair.check_contexts([r["prompt"] for r in rows], [r["context"] for r in rows], position=args.context_position)
    pair.load_model(mode.role)
    say(args, f"models loaded in {time.perf_counter() - t0:.1f} s (large {large_dir}, small {small_dir}, {dtype_label(args)})")
    run_kw = dict(with_context=mode.with_context, config=config if mode.steered else None,
                  variants=variants_from_args(args), max_new_tokens=args.max_new_tokens,
                  position=args.context_position, sampling=Sampling(args.temperature, args.top_p, args.seed))
    if args.input is None:
        res = pair.run(mode.role, [rows[0]["prompt"]], [rows[0]["context"]], stream=True, **run_kw)
        sys.stdout.write("\n")
        sys.stdout.flush()
        say(args, f"{_rate(res.tokens, res.seconds)}, {args.mode}, hf backend)")
        return 0
    tokens, seconds = 0, 0.0
    with _jsonl_writer(args, rows, "generate") as write:
        for chunk, prompts, contexts in _chunks(args, rows):
            res = pair.run(mode.role, prompts, contexts, **run_kw)
            write(chunk, res.texts)
            tokens, seconds = tokens + res.tokens, seconds + res.seconds
    say(args, f"wrote {len(rows)} rows to {args.output}: {_rate(tokens, seconds)})")
    return 0


# --------------------------------------------------------------------------- vllm
def _cpu_vllm_env(quiet: bool = False) -> None:
    from ..vllm_server import server_env

    for k, v in server_env().items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the answer
    if quiet:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _request_args(context: str, gain: float, variants) -> dict:
    """The per-request ``extra_args`` of a steered row (:mod:`costeer_processor.vllm`)."""
    extra = {"costeer_context": context, "costeer_strength": gain}
    if variants.eos_guard is not None:
        extra["costeer_eos_guard"] = variants.eos_guard
    if variants.gate_threshold is not None:
        extra.update(costeer_gate_threshold=variants.gate_threshold, costeer_gate_patience=variants.gate_patience)
    return extra


def _generate_vllm(args, rows: list[dict], config) -> int:
    from ..pipeline import Pair

    mode = MODES[args.mode]
    if mode.role == "small":
        raise UsageError(f"--mode {args.mode} runs the small model alone: use --backend hf")
    quiet_transformers()
    large_dir, small_dir = resolve(args, args.large), resolve(args, args.small)
    pair = Pair.load(large_dir, small_dir, args.dtype, load_large=False, load_small=False)  # tokenizers only
    note_tokenizers(args, pair.tokenizers["large"], pair.tokenizers["small"])
    prompts, contexts = [r["prompt"] for r in rows], [r["context"] for r in rows]
    if mode.uses_context:  # the one "does it fit" rule, before the engine starts
        pair.check_contexts(prompts, contexts, position=args.context_position)
    _cpu_vllm_env(args.quiet)
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise UsageError("--backend vllm needs vLLM: pip install 'costeer_processor[vllm]'") from None
    texts = pair.render("large", prompts, contexts if mode.with_context else None, position=args.context_position)
    variants = variants_from_args(args)
    params = [SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             seed=args.seed if args.temperature > 0 else None,
                             extra_args=_request_args(c, config.gain, variants) if mode.steered else None)
              for c in contexts]
    kwargs = dict(model=str(large_dir), dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
                  enforce_eager=args.enforce_eager)
    if mode.steered:
        costeer_cfg = {"small_model": str(small_dir), "dtype": args.dtype, "context_position": args.context_position}
        kwargs.update(logits_processors=[vllm_processor()], additional_config={"costeer": costeer_cfg})
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    say(args, f"vLLM engine ready in {time.perf_counter() - t0:.1f} s ({dtype_label(args)})")
    start = time.perf_counter()
    outputs = llm.generate(texts, params, use_tqdm=not args.quiet)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    answers = [o.outputs[0].text.strip() for o in outputs]
    if args.input is None:
        print(answers[0], flush=True)
    else:
        with _jsonl_writer(args, rows, "write") as write:
            write(rows, answers)
    say(args, f"{_rate(tokens, seconds)}, {args.mode}, vllm backend)")
    return 0


# --------------------------------------------------------------------------- split mode
def _generate_split(args, rows: list[dict], config) -> int:
    """Split mode: the large model is a plain vLLM server at --server; the context stays here."""
    from .. import split
    from ..loading import load_model, load_tokenizer
    from ..prompts import with_system_prompt
    from ..small_model import SmallModelRunner

    if args.mode != "costeer":
        raise UsageError("--server runs CoSteer only; drop --mode")
    if args.backend != "hf":
        raise UsageError("--server and --backend vllm cannot be combined (the server is the vLLM side)")
    quiet_transformers()
    small_dir = resolve(args, args.small)
    t0 = time.perf_counter()
    runner = SmallModelRunner(load_model(small_dir, args.dtype), load_tokenizer(small_dir),
                              context_position=args.context_position)
    # the served model's tokenizer, for a pair of different families
    large_tokenizer = load_tokenizer(resolve(args, args.large)) if args.large else None
    say(args, f"small model loaded in {time.perf_counter() - t0:.1f} s ({small_dir}, {dtype_label(args)}); "
              f"large model: {args.server}")
    variants = variants_from_args(args)
    client_kw = dict(top_logprobs=args.top_logprobs, variants=variants, large_tokenizer=large_tokenizer)
    client_kw.update({k: v for k, v in (("lookahead", args.lookahead), ("max_retries", args.retries)) if v is not None})
    sampling = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed if args.temperature > 0 else None)
    conversations = [with_system_prompt(r["prompt"]) for r in rows]  # what both models read
    try:
        with split.SplitCoSteerClient(args.server, runner, config=config, **client_kw) as client:
            if args.input is None:
                start = time.perf_counter()
                for piece in client.stream(conversations[0], rows[0]["context"], args.max_new_tokens, **sampling):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                sys.stdout.write("\n")
                res = client.last_result
                n = len(res.token_ids) if res is not None else 0
                trips = res.round_trips if res is not None else 0
                say(args, f"{_rate(n, time.perf_counter() - start)}, split mode, {trips} round trips)")
                return 0
            tokens, start = 0, time.perf_counter()
            with _jsonl_writer(args, rows, "generate (split)") as write:
                for i, (chunk, _, contexts) in enumerate(_chunks(args, rows)):
                    first = i * args.batch_size
                    results = client.generate_batch(conversations[first:first + len(chunk)], contexts,
                                                    args.max_new_tokens, **sampling)
                    write(chunk, [res.text for res in results])
                    tokens += sum(len(res.token_ids) for res in results)
            say(args, f"wrote {len(rows)} rows to {args.output}: {_rate(tokens, time.perf_counter() - start)}, "
                      "split mode)")
            return 0
    except split.SplitModeError as e:
        raise UsageError(f"split mode: {e}") from None

