"""The evaluation's results: generation files -> metrics per task x system -> the markdown report.

Every metric is recomputed from the JSONL generation files (``<task>__<system>.jsonl``), so a
resumed run reports over all of its rows.
"""

from __future__ import annotations

import json
from pathlib import Path

from collections import Counter

from .metrics import (collapsed, copied_run, distinct_n, leak_terms_in, meteor, meteor_available, rouge_scores,
                      sentiment, summary_stats, word_count)
from .systems import System
from .tasks import PREFERENCE_TARGETS, Task

__all__ = ["file_key", "read_jsonl", "summarize", "persona_overview", "markdown"]


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
        examples = {e.id: e for e in task.examples}
        outputs = {}
        for system in systems:
            recs = {str(r["id"]): r for r in read_jsonl(gen_dir / f"{file_key(task, system)}__{system.name}.jsonl")}
            outputs[system.name] = [recs[i] for i in ids if i in recs]
        upper = {str(r["id"]): r["output"] for r in outputs.get("large_ctx", [])}
        large_speed = _speed(outputs.get("large", []))
        first = len(results)
        for system in systems:
            recs = outputs[system.name]
            if not recs:
                continue
            texts = [r["output"] for r in recs]
            lengths = [word_count(t) for t in texts]
            m: dict = {"words": summary_stats(lengths), "words_mean": _mean(lengths),
                       "tokens_mean": _mean([r["n_tokens"] for r in recs]),
                       "cut_at_max_tokens": sum(1 for r in recs if not r["ended"]) / len(recs),
                       "collapsed": sum(collapsed(t) for t in texts)}
            m["collapsed_rate"] = m["collapsed"] / len(recs)
            if task.kind in ("preference", "persona"):
                m["sentiment_mean"] = _mean([sentiment(t) for t in texts])
                m["distinct_1"] = distinct_n(texts, 1)
                m["distinct_2"] = distinct_n(texts, 2)
                if upper and system.name != "large_ctx":
                    m["rougeL_vs_large_ctx"] = _mean([rouge_scores(r["output"], upper[str(r["id"])])["rougeL"]
                                                      for r in recs if str(r["id"]) in upper])
                target, direction = PREFERENCE_TARGETS[task.preference]
                m["target"] = {"metric": target, "better": direction, "value": m[target]}
                if task.kind == "persona":
                    m.update(_drift([(r["output"], examples[str(r["id"])]) for r in recs]))
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
        if task.kind in ("preference", "persona"):
            _gap_closed(results[first:])
    return results


def _drift(pairs) -> dict:
    """Leak terms and copied context runs of (answer, example) pairs (the persona task)."""
    leaks = [leak_terms_in(out, ex.meta.get("leak_terms", []), ex.input) for out, ex in pairs]
    copies = [copied_run(out, ex.context, ex.input) for out, ex in pairs]
    n = len(pairs)
    return {"leaks": sum(1 for x in leaks if x), "leak_rate": sum(1 for x in leaks if x) / n,
            "leak_terms": dict(Counter(t for x in leaks for t in x).most_common()),
            "copied_runs": sum(1 for c in copies if c), "copied_run_rate": sum(1 for c in copies if c) / n,
            "copied_examples": [c for c in copies if c][:5]}


def _gap_closed(rows: list[dict]) -> None:
    """``(v - v_large) / (v_large_ctx - v_large)`` of the target metric, per row of one task (None
    where a value is missing or the two baselines agree): 0 = large alone, 1 = large told the context."""
    by_name = {r["system"]: r["metrics"]["target"]["value"] for r in rows}
    low, high = by_name.get("large"), by_name.get("large_ctx")
    for r in rows:
        v = r["metrics"]["target"]["value"]
        ok = None not in (v, low, high) and high != low
        r["metrics"]["gap_closed"] = (v - low) / (high - low) + 0.0 if ok else None  # + 0.0: no -0.0


def persona_overview(results: list[dict], kinds: dict) -> list[dict]:
    """Per system, over every persona task: answers pooled for the rates, personas averaged for the gap."""
    out = []
    rows = [r for r in results if kinds.get(r["task"]) == "persona"]
    for sysname in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == sysname]
        n = sum(r["n"] for r in mine)
        gaps = [r["metrics"]["gap_closed"] for r in mine if r["metrics"].get("gap_closed") is not None]
        out.append({"system": sysname, "personas": len(mine), "n": n, "gain": mine[0]["gain"],
                    "gap_closed_mean": _mean(gaps), "gap_closed_personas": len(gaps),
                    "leak_rate": sum(r["metrics"]["leaks"] for r in mine) / n if n else None,
                    "copied_run_rate": sum(r["metrics"]["copied_runs"] for r in mine) / n if n else None,
                    "collapsed_rate": sum(r["metrics"]["collapsed"] for r in mine) / n if n else None,
                    "words_mean": _mean([r["metrics"]["words_mean"] for r in mine])})
    return out


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
    lines += _persona_section(summary)
    for task in summary["tasks"]:
        rows = [r for r in results if r["task"] == task]
        if not rows:
            continue
        info = summary["tasks"][task]
        lines.append(f"## {task} (n={info['n']})")
        lines.append("")
        if info["kind"] == "persona":
            t, b = info["target"], info["build"]
            lines.append(f"Persona: \"{b['context']}\" Implied: {b['implied']}, target {t[0]} ({t[1]} is better). "
                         f"Leak terms: {', '.join(b['leak_terms'])}.")
            lines.append("")
            cols = ["system", "g", "n", t[0], "gap closed", "leak", "copied", "collapsed", "words",
                    "R-L vs L+ctx", "cut", "tok/s", "steered"]
        elif info["kind"] == "preference":
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
            if info["kind"] == "persona":
                vals = [r["system"], g, str(r["n"]), _f(m["target"]["value"], 1 if m["target"]["metric"] == "words_mean"
                                                       else 3), _f(m.get("gap_closed"), 2),
                        _f(m["leak_rate"], 2), _f(m["copied_run_rate"], 2), _f(m["collapsed_rate"], 2),
                        _f(m["words_mean"], 1), _f(m.get("rougeL_vs_large_ctx")), common_tail[0], common_tail[1],
                        common_tail[3]]
            elif info["kind"] == "preference":
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
              "steered = share of live row-steps the small model ran for (AdaCoSteer gating lowers it)."
              + (" Persona tables: the implied preference's metric; gap closed = (system - large) / (large told "
                 "the persona - large) on it; leak = share of answers with a leak term the question lacks; "
                 "copied = share repeating 4+ consecutive words of the persona the question lacks; collapsed = "
                 "share of empty or looping answers (own distinct-2 < 0.5)." if summary.get("persona") else ""), ""]
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
    tasks = [t for t in summary["tasks"] if summary["tasks"][t]["kind"] != "persona"
             and any(r["task"] == t for r in results)]
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


def _persona_section(summary) -> list[str]:
    """The persona task over all personas: one row per system."""
    rows = summary.get("persona") or []
    if not rows:
        return []
    n_personas = sum(1 for t in summary["tasks"].values() if t["kind"] == "persona")
    out = [f"## Persona: style, not topic ({n_personas} personas)", "",
           "Gap closed: the implied preference's metric, (system - large) / (large told the persona - large), "
           "averaged over personas (1 = as good as telling the large model the persona). Rates pool all answers.",
           "", "| system | g | n | gap closed (mean) | leak | copied run | collapsed | words |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = _f(r["gain"], 2) if r["gain"] is not None else "–"
        out.append(f"| {r['system']} | {g} | {r['n']} | {_f(r['gap_closed_mean'], 2)} | {_f(r['leak_rate'], 2)} | "
                   f"{_f(r['copied_run_rate'], 2)} | {_f(r['collapsed_rate'], 2)} | {_f(r['words_mean'], 1)} |")
    return out + [""]
