"""The evaluation's results: generation files -> metrics per task x system -> the markdown report.

Every metric is recomputed from the JSONL generation files (``<task>__<system>.jsonl``), so a
resumed run reports over all of its rows.
"""

from __future__ import annotations

import json
from pathlib import Path

from .metrics import distinct_n, meteor, meteor_available, rouge_scores, sentiment, summary_stats, word_count
from .systems import System
from .tasks import PREFERENCE_TARGETS, Task

__all__ = ["file_key", "read_jsonl", "summarize", "markdown"]


# --------------------------------------------------------------------------- files
def file_key(task: Task, system: System) -> str:
    key = task.shared if (task.shared and not system.uses_context) else task.name
    return key.replace("/", "_")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run: it is regenerated
    return rows


# --------------------------------------------------------------------------- metrics
def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(tasks, systems, gen_dir: Path) -> list[dict]:
    results = []
    use_meteor = meteor_available()
    for task in tasks:
        ids = [e.id for e in task.examples]
        refs = {e.id: e.reference for e in task.examples}
        outputs = {}
        for system in systems:
            recs = {str(r["id"]): r for r in read_jsonl(gen_dir / f"{file_key(task, system)}__{system.name}.jsonl")}
            outputs[system.name] = [recs[i] for i in ids if i in recs]
        upper = {str(r["id"]): r["output"] for r in outputs.get("large_ctx", [])}
        large_speed = _speed(outputs.get("large", []))
        for system in systems:
            recs = outputs[system.name]
            if not recs:
                continue
            texts = [r["output"] for r in recs]
            lengths = [word_count(t) for t in texts]
            m: dict = {"words": summary_stats(lengths), "words_mean": _mean(lengths),
                       "tokens_mean": _mean([r["n_tokens"] for r in recs]),
                       "cut_at_max_tokens": sum(1 for r in recs if not r["ended"]) / len(recs)}
            if task.kind == "preference":
                m["sentiment_mean"] = _mean([sentiment(t) for t in texts])
                m["distinct_1"] = distinct_n(texts, 1)
                m["distinct_2"] = distinct_n(texts, 2)
                if upper and system.name != "large_ctx":
                    m["rougeL_vs_large_ctx"] = _mean([rouge_scores(r["output"], upper[str(r["id"])])["rougeL"]
                                                      for r in recs if str(r["id"]) in upper])
                target, direction = PREFERENCE_TARGETS[task.preference]
                m["target"] = {"metric": target, "better": direction, "value": m[target]}
            else:
                scored = [(r["output"], refs[str(r["id"])]) for r in recs if refs.get(str(r["id"]))]
                rs = [rouge_scores(p, ref) for p, ref in scored]
                m["rouge1"] = _mean([x["rouge1"] for x in rs])
                m["rougeL"] = _mean([x["rougeL"] for x in rs])
                m["meteor"] = _mean([meteor(p, ref) for p, ref in scored]) if use_meteor else None
                m["target"] = {"metric": "rougeL", "better": "higher", "value": m["rougeL"]}
            speed = _speed(recs)
            if speed["ms_per_token"] and large_speed["ms_per_token"]:
                speed["overhead_vs_large"] = speed["ms_per_token"] / large_speed["ms_per_token"]
            row = {"task": task.name, "system": system.name, "n": len(recs), "n_expected": len(ids),
                   "gain": system.effective_gain, "metrics": m, "speed": speed, "lengths": lengths}
            if system.steered:
                steered = sum(r.get("steered_steps", 0) for r in recs)
                live = sum(r.get("live_steps", 0) for r in recs)
                row["steering"] = {
                    "steered_row_steps": steered, "live_row_steps": live,
                    "steered_fraction": steered / live if live else None,
                    "small_row_steps_saved": 1 - steered / live if live else None,
                    "small_forwards": round(sum(r.get("small_forwards_share", 0.0) for r in recs)),
                }
            results.append(row)
    return results


def _speed(recs) -> dict:
    tokens = sum(r["n_tokens"] for r in recs)
    seconds = sum(r["time_share_s"] for r in recs)
    return {"tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "ms_per_token": 1000 * seconds / tokens if tokens else None,
            "overhead_vs_large": None}


# --------------------------------------------------------------------------- report
def _f(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown(summary: dict) -> str:
    lines = [f"# CoSteer evaluation `{summary['name']}`", "", f"Command: `{summary['command']}`", ""]
    mach = summary["machine"]
    lines.append(f"Large: {summary['models']['large']}; small: {summary['models']['small']}; "
                 f"dtype {summary['config']['dtype']}; greedy; max {summary['config']['max_new_tokens']} new tokens; "
                 f"batch {summary['config']['batch_size']}; {mach['torch_threads']} torch threads on "
                 f"{mach['processor'] or mach['machine']} ({mach['cpu_count']} cores); wall of this invocation "
                 f"{summary['wall_time_s']:.0f} s; generate time of all rows (over resumes) "
                 f"{summary.get('generation_seconds_total') or 0:.0f} s; "
                 + _load_text(mach))
    lines.append("")
    results = summary["results"]
    headline = _headline(summary)
    if headline:
        lines += ["## Headline", "", *headline, ""]
    for task in summary["tasks"]:
        rows = [r for r in results if r["task"] == task]
        if not rows:
            continue
        info = summary["tasks"][task]
        lines.append(f"## {task} (n={info['n']})")
        lines.append("")
        if info["kind"] == "preference":
            t = info["target"]
            lines.append(f"Target: {t[0]} ({t[1]} is better). R-L vs L+ctx: ROUGE-L F against the large model "
                         "told the preference (the privacy-breaking upper bound).")
            lines.append("")
            cols = ["system", "g", "n", "words", "sentiment", "distinct-2", "R-L vs L+ctx", "cut", "tok/s",
                    "overhead", "steered"]
        else:
            cols = ["system", "g", "n", "ROUGE-1", "ROUGE-L", "METEOR", "words", "cut", "tok/s", "overhead",
                    "steered"]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
        for r in rows:
            m, s = r["metrics"], r["speed"]
            st = r.get("steering", {}).get("steered_fraction")
            common_tail = [_f(m["cut_at_max_tokens"], 2), _f(s["tokens_per_s"], 2),
                           _f(s["overhead_vs_large"], 2), _f(st, 2)]
            g = _f(r["gain"], 2) if r["gain"] is not None else "–"
            if info["kind"] == "preference":
                vals = [r["system"], g, str(r["n"]), _f(m["words_mean"], 1), _f(m["sentiment_mean"]),
                        _f(m["distinct_2"]), _f(m.get("rougeL_vs_large_ctx"))] + common_tail
            else:
                vals = [r["system"], g, str(r["n"]), _f(m["rouge1"]), _f(m["rougeL"]), _f(m["meteor"]),
                        _f(m["words_mean"], 1)] + common_tail
            lines.append("| " + " | ".join(vals) + " |")
        lines.append("")
    if summary.get("throughput"):
        lines += ["## Throughput (tokens/s, fixed output length)", "",
                  "| system | " + " | ".join(f"batch {b}" for b in sorted({r['batch_size'] for r in summary['throughput']})) + " |"]
        sizes = sorted({r["batch_size"] for r in summary["throughput"]})
        lines.append("|---|" + "|".join("---" for _ in sizes) + "|")
        for sysname in dict.fromkeys(r["system"] for r in summary["throughput"]):
            vals = {r["batch_size"]: r["tokens_per_s"] for r in summary["throughput"] if r["system"] == sysname}
            lines.append(f"| {sysname} | " + " | ".join(_f(vals.get(b), 2) for b in sizes) + " |")
        lines.append("")
    if summary.get("plots"):
        lines += ["## Plots", ""] + [f"- `{p}`" for p in summary["plots"]] + [""]
    lines += ["Columns: g = steering gain (large alone = 0); words = mean response length in words; "
              "sentiment = mean VADER compound; distinct-2 = unique/all bigrams pooled over responses; "
              "cut = share of responses that hit the token cap; tok/s = generated tokens / generation wall time "
              "(batched, prefill included); overhead = ms per token / large alone's on the same task; "
              "steered = share of live row-steps the small model ran for (AdaCoSteer gating lowers it).", ""]
    if not summary["meteor_available"]:
        lines += ["METEOR: unavailable (no local WordNet; see `--wordnet-deb`).", ""]
    return "\n".join(lines)


def _load_text(mach: dict) -> str:
    gen = mach.get("generation_loadavg_1m")
    if gen:
        text = (f"1-min load average while generating: mean {gen['mean']:.1f}, max {gen['max']:.1f} "
                f"(over {gen['rows']} rows)")
    else:
        text = f"load average (1/5/15 min) {mach.get('loadavg_start')} at start, {mach.get('loadavg_end')} at the end"
    return text + f" on {mach['cpu_count']} cores (above the core count, other jobs slowed every timing)."


def _headline(summary) -> list[str]:
    """One row per system: the target metric of every task."""
    results = summary["results"]
    tasks = [t for t in summary["tasks"] if any(r["task"] == t for r in results)]
    if not tasks:
        return []
    cols = []
    for t in tasks:
        info = summary["tasks"][t]
        metric = info["target"][0] if info["kind"] == "preference" else "rougeL"
        cols.append((t, metric))
    header = ["system"] + [f"{t.split('/')[-1]}: {m}" for t, m in cols] + ["overhead (mean)"]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for sysname in summary["systems"]:
        vals = []
        overheads = []
        for t, metric in cols:
            row = next((r for r in results if r["task"] == t and r["system"] == sysname), None)
            if row is None:
                vals.append("–")
                continue
            v = row["metrics"].get(metric)
            vals.append(_f(v, 1 if metric == "words_mean" else 3))
            if row["speed"]["overhead_vs_large"] is not None:
                overheads.append(row["speed"]["overhead_vs_large"])
        out.append(f"| {sysname} | " + " | ".join(vals) + f" | {_f(_mean(overheads), 2)} |")
    return out
