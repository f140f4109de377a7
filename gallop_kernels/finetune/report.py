"""Reports: Markdown tables of finetune and compare runs, and the ID-vs-OOD (Pareto) plot."""

from __future__ import annotations

from pathlib import Path

from .metrics import collapse_rate


def pct(x: float | None) -> str:
    """An accuracy or ratio as a percentage with one decimal, '-' for None."""
    return "-" if x is None else f"{100 * x:.1f}"


def finetune_table(summary: dict, method: str) -> str:
    """Vanilla and tuned rows: ID acc, each OOD acc, mean OOD, Forget Ratio, Collapse Rate (in %)."""
    ood = list(summary["ood_acc"])
    head = ["model", f"ID {summary['id_task']}", *ood, "mean OOD", "Forget Ratio", "Collapse Rate"]
    van_collapse = None
    if summary["collapse_rate"] is not None:
        van_collapse = collapse_rate(list(summary["vanilla_ood_acc"].values()))
    rows = [
        ["vanilla", pct(summary["vanilla_id_acc"]), *(pct(summary["vanilla_ood_acc"][t]) for t in ood),
         pct(summary["vanilla_mean_ood"]), "-", pct(van_collapse)],
        [method, pct(summary["id_acc"]), *(pct(summary["ood_acc"][t]) for t in ood), pct(summary["mean_ood"]),
         pct(summary["forget_ratio"]), pct(summary["collapse_rate"])],
    ]
    return _markdown(head, rows)


def compare_table(runs: list[dict], mode: str) -> str:
    """The vanilla model per task, then one row per (method, task) and a mean row per method with several tasks:
    ID acc, mean OOD, Forget Ratio, Collapse Rate (%)."""
    head = ["method", "task", "trainable", "ID acc", "mean OOD", "Forget Ratio", "Collapse Rate", "train s"]
    rows = []
    for task in dict.fromkeys(r["task"] for r in runs):  # the untuned model, for reference
        s = next(r["summary"][mode] for r in runs if r["task"] == task)
        van_cr = collapse_rate(list(s["vanilla_ood_acc"].values())) if s["collapse_rate"] is not None else None
        rows.append(["vanilla", task, "0", pct(s["vanilla_id_acc"]), pct(s["vanilla_mean_ood"]), "-", pct(van_cr), ""])
    methods = list(dict.fromkeys(r["method"] for r in runs))
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        for r in mine:
            s = r["summary"][mode]
            rows.append([m, r["task"], f"{r['trainable']:,}", pct(s["id_acc"]), pct(s["mean_ood"]),
                         pct(s["forget_ratio"]), pct(s["collapse_rate"]), f"{r['train_seconds']:.0f}"])
        if len(mine) > 1:
            avg = method_means(runs, mode)[m]
            rows.append([m, "**mean**", "", pct(avg["id_acc"]), pct(avg["mean_ood"]), pct(avg["forget_ratio"]),
                         pct(avg["collapse_rate"]), ""])
    return _markdown(head, rows)


def method_means(runs: list[dict], mode: str) -> dict[str, dict[str, float | None]]:
    """{method: mean over its tasks of id_acc, mean_ood, forget_ratio, collapse_rate}."""
    out = {}
    for m in dict.fromkeys(r["method"] for r in runs):
        sums = [r["summary"][mode] for r in runs if r["method"] == m]
        out[m] = {}
        for key in ("id_acc", "mean_ood", "forget_ratio", "collapse_rate"):
            vals = [s[key] for s in sums if s[key] is not None]
            out[m][key] = sum(vals) / len(vals) if vals else None
    return out


def vanilla_point(runs: list[dict], mode: str) -> tuple[float, float]:
    """(mean OOD, ID) accuracy of the vanilla model, averaged over the runs' tasks."""
    sums = [r["summary"][mode] for r in runs]
    return (sum(s["vanilla_mean_ood"] for s in sums) / len(sums), sum(s["vanilla_id_acc"] for s in sums) / len(sums))


def pareto_plot(runs: list[dict], mode: str, path: str | Path) -> None:
    """PNG of ID accuracy against mean OOD accuracy, one point per method (mean over tasks) and the vanilla model."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for m, avg in method_means(runs, mode).items():
        ax.scatter(100 * avg["mean_ood"], 100 * avg["id_acc"], s=40)
        ax.annotate(m, (100 * avg["mean_ood"], 100 * avg["id_acc"]), textcoords="offset points", xytext=(4, 4))
    vx, vy = vanilla_point(runs, mode)
    ax.scatter(100 * vx, 100 * vy, marker="x", color="black")
    ax.annotate("vanilla", (100 * vx, 100 * vy), textcoords="offset points", xytext=(4, -10))
    ax.set_xlabel("mean OOD accuracy (%)")
    ax.set_ylabel("ID accuracy (%)")
    ax.set_title(f"ID vs OOD accuracy ({mode} mode)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
