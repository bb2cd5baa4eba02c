"""The evaluation command: tasks x systems -> JSONL generations -> metrics, tables, plots.

Run ``python benchmarks/eval.py --help`` (or ``python -m costeer_processor.eval``). Every
generation is appended to ``<out>/eval_<name>_generations/<task>__<system>.jsonl`` as soon as
its batch finishes; running the same command again skips ids already there (resume), then
recomputes every metric from the files (:mod:`.report`) and rewrites ``eval_<name>.json``,
``eval_<name>.md`` and the plots.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ..core import Variants
from .metrics import install_wordnet_from_deb, meteor_available
from .report import file_key, markdown, persona_overview, read_jsonl, summarize
from .systems import BASE_SYSTEMS, DEFAULT_GAIN, RELEASE_GATE_THRESHOLD, System, make_systems, sweep_system
from .tasks import PERSONA_N, Task, longlamp_task, persona_tasks, preference_tasks, sotu_task

SCHEMA = "costeer_eval/1"
DEFAULT_OUT = Path("benchmarks") / "results"  # under the current folder (benchmarks/eval.py passes its own)
DEFAULT_SWEEP = "0,0.5,1,default,3"
# Settings that change generations: a resumed run must use the same ones.
_GEN_KEYS = ("large", "small", "dtype", "max_new_tokens", "eos_guard", "gate_threshold", "gate_patience", "seed",
             "sotu_record_words", "sotu_ref_min_words", "sotu_ref_max_words", "quick", "prompts", "personas")
TASKS = ("preference", "sotu", "persona", "longlamp")


# --------------------------------------------------------------------------- arguments
def build_parser(default_out: Path = DEFAULT_OUT) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/eval.py",
        description="Evaluate CoSteer against its baselines on preference alignment and LaMP-style "
                    "personalized generation (JSONL in/out, resumable; JSON + markdown + PNG results).")
    p.add_argument("--quick", action="store_true",
                   help="tiny random models built on the spot, 3 examples, 8 new tokens (CI smoke run)")
    p.add_argument("--large", default="qwen2.5-coder-1.5b-instruct", help="large model: preset or folder")
    p.add_argument("--small", default="qwen2.5-coder-0.5b-instruct", help="small model: preset or folder")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--tasks", default="preference,sotu",
                   help="comma list of: preference, sotu, persona, longlamp (longlamp needs --longlamp FILE)")
    p.add_argument("--prefs", default="concise,verbose,uplifting,creative", help="preferences to run")
    p.add_argument("--prompts", default=None,
                   help="preference prompts JSONL (id, input); default: the 200 Personal Preference Eval prompts "
                        "shipped in the package")
    p.add_argument("--personas", default=None, metavar="FILE",
                   help="personas JSONL (persona, context, implied, leak_terms) for --tasks persona; default: the "
                        "development set shipped in the package")
    p.add_argument("--persona-n", type=int, default=None,
                   help=f"preference prompts per persona (default {PERSONA_N}; --quick: --n)")
    p.add_argument("--longlamp", action="append", default=[], metavar="FILE",
                   help="a LongLaMP-format JSONL (input, output, top_5 or profile); repeatable")
    p.add_argument("--longlamp-kind", default="auto", choices=("auto", "abstract", "review", "writing"))
    p.add_argument("--n", type=int, default=None, help="examples per task (default 8; --quick: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sotu example builder")
    p.add_argument("--sotu-record-words", type=int, default=None, help="words per profile record (default 120)")
    p.add_argument("--sotu-ref-min-words", type=int, default=60)
    p.add_argument("--sotu-ref-max-words", type=int, default=150)
    p.add_argument("--systems", default=",".join(BASE_SYSTEMS),
                   help=f"comma list of {', '.join(BASE_SYSTEMS)}, costeer_g<gain>; a steered one may carry style "
                        "options: costeer+plausible0.1, costeer+plausible0.1-large, costeer+clip1, costeer+placebo, "
                        "costeer+ngram4 (combine with more '+')")
    p.add_argument("--sweep", default=DEFAULT_SWEEP,
                   help="steering gains for the strength sweep ('default' = 1.783257; 0 reuses large, 1 proxy, "
                        "default costeer); empty to skip")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (--quick: 8)")
    p.add_argument("--gate-threshold", type=float, default=RELEASE_GATE_THRESHOLD,
                   help="AdaCoSteer threshold of costeer_gate (default %(default)s, the release's)")
    p.add_argument("--gate-patience", type=int, default=Variants.gate_patience, help="default %(default)s")
    p.add_argument("--eos-guard", type=float, default=None, help="stop when the large model's P(EOS) exceeds this")
    p.add_argument("--throughput-batch-sizes", default=None,
                   help="batch sizes for the throughput plot (default 1,2,4,8; --quick: 1,2); empty to skip")
    p.add_argument("--throughput-tokens", type=int, default=None, help="tokens per row there (default 32)")
    p.add_argument("--throughput-systems", default="large,costeer")
    p.add_argument("--out", default=str(default_out), help="results folder (default %(default)s)")
    p.add_argument("--name", default=None, help="run name: files are eval_<name>.* (default: quick / default)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: min(2, cores))")
    p.add_argument("--overwrite", action="store_true", help="discard this run name's earlier generations")
    p.add_argument("--wordnet-deb", default=None,
                   help="unpack Debian's wordnet-base .deb for METEOR (offline) before running")
    p.add_argument("--no-progress", action="store_true")
    return p


def _resolve_defaults(args) -> None:
    q = args.quick
    if args.n is None:
        args.n = 3 if q else 8
    if args.persona_n is None:
        args.persona_n = args.n if q else PERSONA_N
    if args.max_new_tokens is None:
        args.max_new_tokens = 8 if q else 128
    if args.throughput_batch_sizes is None:
        args.throughput_batch_sizes = "1,2" if q else "1,2,4,8"
    if args.throughput_tokens is None:
        args.throughput_tokens = 4 if q else 32
    if args.sotu_record_words is None:
        args.sotu_record_words = 30 if q else 120
    if q:
        args.sotu_ref_min_words, args.sotu_ref_max_words = min(args.sotu_ref_min_words, 30), min(
            args.sotu_ref_max_words, 60)
    if args.name is None:
        args.name = "quick" if q else "default"
    if args.threads is None:
        # Tiny models run faster on one thread (and do not fight the other jobs on the box).
        args.threads = 1 if q else max(1, min(2, os.cpu_count() or 1))


def _csv(text: str) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


# --------------------------------------------------------------------------- building
def build_tasks(args) -> list[Task]:
    tasks: list[Task] = []
    names = _csv(args.tasks)
    for t in names:
        if t not in TASKS:
            raise SystemExit(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    if "preference" in names:
        tasks += preference_tasks(args.prompts and Path(args.prompts), _csv(args.prefs), args.n)
    if "persona" in names:
        tasks += persona_tasks(args.personas and Path(args.personas), args.prompts and Path(args.prompts), args.persona_n)
    if "sotu" in names:
        tasks.append(sotu_task(args.n, seed=args.seed, record_words=args.sotu_record_words,
                               ref_min_words=args.sotu_ref_min_words, ref_max_words=args.sotu_ref_max_words))
    if "longlamp" in names and not args.longlamp:
        raise SystemExit("--tasks longlamp needs --longlamp FILE")
    for f in args.longlamp:
        tasks.append(longlamp_task(Path(f), args.n, kind=args.longlamp_kind))
    return tasks


def _parse_gain(text: str) -> float:
    return DEFAULT_GAIN if text.strip().lower() in ("default", "costeer") else float(text)


def build_systems(args) -> tuple[list[System], dict[float, str]]:
    """Systems to run, plus ``gain -> system name`` for the sweep (0 = large, 1 = proxy, ...)."""
    names = _csv(args.systems)
    systems = make_systems(names, gate_threshold=args.gate_threshold, gate_patience=args.gate_patience,
                           eos_guard=args.eos_guard)
    by_name = {s.name: s for s in systems}
    sweep: dict[float, str] = {}
    for text in _csv(args.sweep):
        g = _parse_gain(text)
        alias = {0.0: "large", 1.0: "proxy"}.get(g)
        if abs(g - DEFAULT_GAIN) < 1e-3:
            alias = "costeer"
        # Gain 0 is large alone only without an EOS guard (the guard acts even at gain 0).
        if alias == "large" and args.eos_guard is not None:
            alias = None
        name = alias or sweep_system(g).name
        if name not in by_name:
            extra = make_systems([name], gate_threshold=args.gate_threshold, gate_patience=args.gate_patience,
                                 eos_guard=args.eos_guard)[0]
            systems.append(extra)
            by_name[name] = extra
        sweep[g] = name
    return systems, sweep


def load_models(args):
    from .systems import Models

    if args.quick:
        from ..testing import build_tiny_model, build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        large = build_tiny_model(tok, hidden_size=128, seed=1, max_position_embeddings=4096)
        small = build_tiny_model(tok, hidden_size=64, seed=2, max_position_embeddings=4096)
        return Models(large, small, tok, tok, "tiny-large (random)", "tiny-small (random)")
    from ..loading import load_model, load_tokenizer
    from ..models import resolve_model

    large_dir, small_dir = resolve_model(args.large, args.dtype), resolve_model(args.small, args.dtype)
    return Models(load_model(large_dir, args.dtype), load_model(small_dir, args.dtype), load_tokenizer(large_dir),
                  load_tokenizer(small_dir), f"{args.large} ({large_dir})", f"{args.small} ({small_dir})")


# --------------------------------------------------------------------------- generation
def done_ids(path: Path) -> set[str]:
    """Ids already generated in a JSONL output file (what a resumed run skips)."""
    return {str(r["id"]) for r in read_jsonl(path) if "id" in r}


def _terminate_last_line(path: Path) -> None:
    """After an interrupted write, start appending on a fresh line (the cut line is skipped)."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            last = fh.read(1)
        if last != b"\n":
            with open(path, "a", encoding="utf-8") as fh:
                fh.write("\n")


def _check_run_config(gen_dir: Path, args, overwrite: bool) -> None:
    cfg = {k: getattr(args, k) for k in _GEN_KEYS}
    path = gen_dir / "run_config.json"
    if overwrite and gen_dir.exists():
        for f in gen_dir.glob("*.jsonl"):
            f.unlink()
        for f in gen_dir.glob("*.json"):
            f.unlink()
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), cfg[k]) for k in cfg if old.get(k) != cfg[k]}
        if diff:
            raise SystemExit(f"{gen_dir} holds generations made with other settings {diff}; "
                             "use another --name or --overwrite")
    gen_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))


def run_generations(tasks, systems, get_models, args, gen_dir: Path) -> None:
    from tqdm.auto import tqdm

    from .systems import generate

    plan = []
    planned: dict[Path, tuple] = {}
    for task in tasks:
        for system in systems:
            path = gen_dir / f"{file_key(task, system)}__{system.name}.jsonl"
            if path in planned:
                # shared file (a context-free system over the preference and persona tasks): the same
                # id is the same input, so only ids no earlier task asked for are added
                _, _, _, todo, known = planned[path]
                for e in task.examples:
                    if e.id not in known:
                        known.add(e.id)
                        todo.append(e)
                continue
            done = done_ids(path)
            todo = [e for e in task.examples if e.id not in done]
            planned[path] = (task, system, path, todo, done | {e.id for e in todo})
            plan.append(planned[path])
    plan = [(task, system, path, todo) for task, system, path, todo, _ in plan if todo]
    total = sum(len(t) for *_, t in plan)
    if not plan:
        return
    models = get_models()
    # One-off costs (first-call allocations, weights paged in) stay out of the first system's timing.
    e = plan[0][3][0]
    needed = {s.model for _, s, _, _ in plan} | ({"small"} if any(s.steered for _, s, _, _ in plan) else set())
    for which in sorted(needed):
        generate(System("warmup", which), models, [e.input], [e.context], position="before", separator="\n",
                 max_new_tokens=2)
    bar = tqdm(total=total, desc="generating", unit="ex", disable=args.no_progress or total == 0)
    for task, system, path, todo in plan:
        bar.set_postfix_str(f"{task.name} / {system.name}")
        _terminate_last_line(path)
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            res = generate(system, models, [e.input for e in batch], [e.context for e in batch],
                           position=task.context_position, separator=task.context_separator,
                           max_new_tokens=args.max_new_tokens)
            with open(path, "a", encoding="utf-8") as fh:
                for i, e in enumerate(batch):
                    rec = {
                        "id": e.id, "task": file_key(task, system), "system": system.name,
                        "input": e.input, "context": e.context if system.uses_context else None,
                        "output": res.texts[i], "n_tokens": res.n_tokens[i],
                        "ended": res.ended[i],
                        "time_share_s": res.seconds / len(batch), "batch_size": len(batch),
                        "batch_seconds": res.seconds, "loadavg_1m": (_loadavg() or [None])[0],
                    }
                    if res.steered_steps is not None:
                        rec["steered_steps"] = res.steered_steps[i]
                        rec["live_steps"] = res.live_steps[i]
                        rec["small_forwards_share"] = res.small_forwards / len(batch)
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            bar.update(len(batch))
    bar.close()


def run_throughput(get_models, tasks, args, gen_dir: Path) -> list[dict]:
    """tokens/s vs batch size with a fixed output length (min_new_tokens = max_new_tokens)."""
    from .systems import generate

    sizes = [int(x) for x in _csv(args.throughput_batch_sizes)]
    if not sizes or not tasks:
        return []
    cache = gen_dir / "throughput.json"
    settings = {"sizes": sizes, "tokens": args.throughput_tokens, "systems": args.throughput_systems,
                "threads": args.threads}
    if cache.exists():
        old = json.loads(cache.read_text())
        if old.get("settings") == settings:
            return old["rows"]
    models = get_models()
    task = next((t for t in tasks if t.kind == "preference" and t.preference == "concise"),
                next((t for t in tasks if t.preference == "concise"), tasks[0]))
    pool = task.examples
    systems = make_systems(_csv(args.throughput_systems), gate_threshold=args.gate_threshold,
                           gate_patience=args.gate_patience, eos_guard=None)
    rows = []
    warm = pool[:1]
    for system in systems:  # warm-up: first calls pay one-off costs
        generate(system, models, [e.input for e in warm], [e.context for e in warm], position=task.context_position,
                 separator=task.context_separator, max_new_tokens=2, min_new_tokens=2)
    for system in systems:
        for bs in sizes:
            batch = [pool[i % len(pool)] for i in range(bs)]
            res = generate(system, models, [e.input for e in batch], [e.context for e in batch],
                           position=task.context_position, separator=task.context_separator,
                           max_new_tokens=args.throughput_tokens, min_new_tokens=args.throughput_tokens)
            tokens = sum(res.n_tokens)
            rows.append({"system": system.name, "batch_size": bs, "tokens": tokens, "seconds": res.seconds,
                         "tokens_per_s": tokens / res.seconds if res.seconds > 0 else None, "task": task.name})
    cache.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    return rows


def machine_info(threads: int) -> dict:
    import torch
    import transformers

    return {"platform": platform.platform(), "machine": platform.machine(), "processor": _cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "loadavg_end": _loadavg()}


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _rel(path: Path) -> str:
    """A path relative to the current folder when it is inside it (readable tables), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _model_names(args, models, gen_dir: Path) -> dict:
    """Names of the models that made the generations (kept next to them for resumed runs)."""
    path = gen_dir / "models.json"
    if models is not None:
        names = {"large": models.large_name, "small": models.small_name}
        path.write_text(json.dumps(names))
        return names
    if path.exists():
        return json.loads(path.read_text())
    return {"large": args.large, "small": args.small}


# --------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None, *, default_out: Path = DEFAULT_OUT) -> dict:
    """Runs the evaluation the arguments describe; returns the summary (also written as JSON)."""
    parser = build_parser(default_out)
    args = parser.parse_args(argv)
    try:
        Variants(args.gate_threshold, args.gate_patience, args.eos_guard)
    except ValueError as e:
        parser.error(str(e))
    _resolve_defaults(args)
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(previous_threads)


def _main(args, argv) -> dict:
    t_start = time.perf_counter()
    load_start = _loadavg()
    if args.wordnet_deb:
        install_wordnet_from_deb(args.wordnet_deb)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen_dir = out / f"eval_{args.name}_generations"
    tasks = build_tasks(args)
    systems, sweep = build_systems(args)
    _check_run_config(gen_dir, args, args.overwrite)
    for task in tasks:
        with open(gen_dir / f"examples_{task.name.replace('/', '_')}.jsonl", "w", encoding="utf-8") as fh:
            for e in task.examples:
                fh.write(json.dumps({"id": e.id, "input": e.input, "context": e.context, "reference": e.reference,
                                     "meta": e.meta}, ensure_ascii=False) + "\n")
    loaded = []

    def get_models():  # loaded only when something is left to generate
        if not loaded:
            loaded.append(load_models(args))
        return loaded[0]

    run_generations(tasks, systems, get_models, args, gen_dir)
    throughput = run_throughput(get_models, tasks, args, gen_dir)
    model_names = _model_names(args, loaded[0] if loaded else None, gen_dir)
    results = summarize(tasks, systems, gen_dir)
    summary = {
        "schema": SCHEMA,
        "name": args.name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/eval.py " + shlex.join(list(argv if argv is not None else sys.argv[1:])),
        "config": {k: v for k, v in vars(args).items()},
        "machine": {**machine_info(args.threads), "loadavg_start": load_start},
        "models": model_names,
        "default_gain": DEFAULT_GAIN,
        "meteor_available": meteor_available(),
        "tasks": {t.name: t.describe() for t in tasks},
        "systems": {s.name: s.describe() for s in systems},
        "sweep": {f"{g:g}": name for g, name in sorted(sweep.items())},
        "results": results,
        "persona": persona_overview(results, {t.name: t.kind for t in tasks}),
        "throughput": throughput,
        "generations_dir": _rel(gen_dir),
        "plots": [],
        "wall_time_s": None,
    }
    from .plots import make_plots

    summary["plots"] = [_rel(p) for p in make_plots(summary, out, args.name)]
    summary["wall_time_s"] = time.perf_counter() - t_start
    # A context-free system's shared file counts once, not once per preference task.
    seen, total = set(), 0.0
    for r in results:
        key = (file_key(next(t for t in tasks if t.name == r["task"]), next(s for s in systems if s.name == r["system"])),
               r["system"])
        if key not in seen:
            seen.add(key)
            total += r["speed"]["seconds"]
    summary["generation_seconds_total"] = total + sum(t["seconds"] for t in throughput)
    loads = [r.get("loadavg_1m") for t in tasks for s in systems
             for r in read_jsonl(gen_dir / f"{file_key(t, s)}__{s.name}.jsonl")]
    loads = [x for x in loads if x is not None]
    summary["machine"]["generation_loadavg_1m"] = (
        {"mean": sum(loads) / len(loads), "max": max(loads), "rows": len(loads)} if loads else None)
    (out / f"eval_{args.name}.json").write_text(json.dumps(summary, indent=1, default=str))
    md = markdown(summary)
    (out / f"eval_{args.name}.md").write_text(md)
    print(md)
    return summary


if __name__ == "__main__":  # pragma: no cover
    main()
