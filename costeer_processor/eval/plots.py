"""PNG plots of an evaluation summary (matplotlib, Agg backend; no display needed)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["make_plots"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def make_plots(summary: dict, out: Path, name: str) -> list[Path]:
    """Writes the plots the data allows; returns their paths."""
    paths = []
    for fn in (_strength_plot, _length_plot, _throughput_plot, _persona_plot):
        p = fn(summary, Path(out), name)
        if p is not None:
            paths.append(p)
    return paths


def _target(summary, task):
    info = summary["tasks"][task]
    if info.get("target"):
        return info["target"][0], info["target"][1]
    return "rougeL", "higher"


def _gain_panels(summary, tasks, title, path, extra=None):
    """One panel per task: its target metric vs the steering gain, large / small + context as lines;
    systems with style options as labelled markers at their gain. ``extra(ax)`` draws one more panel."""
    results = summary["results"]
    swept = set(summary.get("sweep", {}).values())
    plt = _plt()
    n = len(tasks) + (extra is not None)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        metric, better = _target(summary, task)
        mine = [r for r in results if r["task"] == task and r["gain"] is not None and r["metrics"].get(metric) is not None]
        plain = [r for r in mine if not summary["systems"][r["system"]].get("options")]
        pts = sorted((r["gain"], r["metrics"][metric]) for r in plain
                     if (r["system"] in swept or not swept) and not summary["systems"][r["system"]].get("gate_threshold"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="large steered by small (g)")
        for i, r in enumerate(r for r in mine if summary["systems"][r["system"]].get("options")):
            ax.plot([r["gain"]], [r["metrics"][metric]], "s^vD*P"[i % 6], label=r["system"])
        for sysname, style in (("large_ctx", "--"), ("small_ctx", ":")):
            row = next((r for r in results if r["task"] == task and r["system"] == sysname), None)
            if row is not None and row["metrics"].get(metric) is not None:
                ax.axhline(row["metrics"][metric], linestyle=style, color="gray" if sysname == "large_ctx" else "tab:red",
                           label=sysname.replace("_ctx", " + context"))
        ax.axvline(summary["default_gain"], color="tab:green", alpha=0.3, label="CoSteer default g")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("steering gain g (0 = large alone, 1 = proxy)")
        ax.set_ylabel(f"{metric} ({better} is better)", fontsize=8)
        ax.grid(alpha=0.3)
    if extra is not None:
        extra(list(axes.flat)[len(tasks)])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _strength_plot(summary, out, name):
    results = summary["results"]
    tasks = [t for t in summary["tasks"] if summary["tasks"][t]["kind"] != "persona"
             and any(r["task"] == t and r["gain"] is not None for r in results)]
    if not tasks:
        return None
    return _gain_panels(summary, tasks, f"Metric vs steering strength ({summary['name']})",
                        out / f"eval_{name}_strength.png")


def _persona_plot(summary, out, name):
    """Per persona: the implied preference's metric vs g; last panel: leak / copied / collapsed rates per system."""
    rows = summary.get("persona") or []
    if not rows:
        return None
    tasks = [t for t in summary["tasks"] if summary["tasks"][t]["kind"] == "persona"
             and any(r["task"] == t for r in summary["results"])]

    def rates(ax):
        import numpy as np

        x = np.arange(len(rows))
        for k, (key, label) in enumerate((("leak_rate", "leak"), ("copied_run_rate", "copied run"),
                                          ("collapsed_rate", "collapsed"))):
            ax.bar(x + (k - 1) * 0.27, [r[key] or 0.0 for r in rows], 0.27, label=label)
        ax.set_xticks(x, [r["system"] for r in rows], rotation=35, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of answers (all personas)", fontsize=8)
        ax.set_title("topic drift per system", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)

    return _gain_panels(summary, tasks, f"Persona: implied preference vs steering strength ({summary['name']})",
                        out / f"eval_{name}_persona.png", extra=rates)


def _length_plot(summary, out, name):
    tasks = [t for t in ("preference/concise", "preference/verbose") if t in summary["tasks"]]
    rows = summary["results"]
    if not any(r["task"] in tasks for r in rows):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        mine = [r for r in rows if r["task"] == task and r.get("lengths")]
        if mine:
            ax.boxplot([r["lengths"] for r in mine], showmeans=True)
            ax.set_xticks(range(1, len(mine) + 1), [r["system"] for r in mine], rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{task}: response length (triangle = mean)", fontsize=10)
        ax.set_ylabel("words")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = out / f"eval_{name}_lengths.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _throughput_plot(summary, out, name):
    rows = summary.get("throughput") or []
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for sysname in dict.fromkeys(r["system"] for r in rows):
        pts = sorted((r["batch_size"], r["tokens_per_s"]) for r in rows if r["system"] == sysname)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=sysname)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (rows per generate call)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"Throughput vs batch size ({summary['name']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"eval_{name}_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
