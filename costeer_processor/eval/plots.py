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
    for fn in (_strength_plot, _length_plot, _throughput_plot):
        p = fn(summary, Path(out), name)
        if p is not None:
            paths.append(p)
    return paths


def _target(summary, task):
    info = summary["tasks"][task]
    if info["kind"] == "preference":
        return info["target"][0], info["target"][1]
    return "rougeL", "higher"


def _strength_plot(summary, out, name):
    results = summary["results"]
    tasks = [t for t in summary["tasks"] if any(r["task"] == t and r["gain"] is not None for r in results)]
    swept = set(summary.get("sweep", {}).values())
    if not tasks:
        return None
    plt = _plt()
    cols = min(3, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        metric, better = _target(summary, task)
        pts = sorted((r["gain"], r["metrics"].get(metric)) for r in results
                     if r["task"] == task and r["gain"] is not None and r["metrics"].get(metric) is not None
                     and (r["system"] in swept or not swept) and not summary["systems"][r["system"]].get("gate_threshold"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="large steered by small (g)")
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
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Metric vs steering strength ({summary['name']})")
    fig.tight_layout()
    path = out / f"eval_{name}_strength.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
