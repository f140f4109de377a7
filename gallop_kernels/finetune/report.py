"""Reports: Markdown tables of finetune and compare runs, and the ID-vs-OOD (Pareto) plot.

A compare sweep repeats every (task, method, rho) over several seeds: the tables give the mean
± the sample standard deviation over seeds, and the binomial standard error of an accuracy on
that many questions, the noise a single score carries whatever the seed.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..markdown import table
from .metrics import binomial_se, collapse_rate, mean_se

SCORES = ("id_acc", "mean_ood", "forget_ratio", "collapse_rate")


def pct(x: float | None, sd: float | None = None) -> str:
    """An accuracy or ratio in percent with one decimal, '± sd' when given, '-' for None."""
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if sd is None else f"{100 * x:.1f} ± {100 * sd:.1f}"


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of the values that are not None; sd is None below 2 values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


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
    return table(head, rows)


def noise_note(summary: dict) -> str:
    """One line: the largest binomial standard error of one accuracy, on the fewest questions of the run."""
    n = min(summary["questions"].values())
    return (f"One accuracy on {n} questions has a binomial standard error of up to {pct(binomial_se(0.5, n))} points "
            f"(one question is {100 / n:.1f}); differences smaller than that are noise.")


def _rho_text(rho: float | None) -> str:
    return "-" if rho is None else f"{rho:g}"


def aggregate(runs: list[dict], mode: str) -> list[dict]:
    """One row per (task, method, rho): mean and sd over seeds of each score, and binomial standard errors.

    ``id_se`` is the standard error of the ID accuracy (at its mean, on the ID task's questions),
    ``ood_se`` that of the mean OOD accuracy (the OOD tasks taken as independent).
    """
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["method"], r["rho"]), []).append(r)
    rows = []
    for (task, method, rho), mine in groups.items():
        sums = [r["summary"][mode] for r in mine]
        row = {"task": task, "method": method, "rho": rho, "seeds": [r["seed"] for r in mine],
               "trainable": mine[0]["trainable"], "train_seconds": statistics.fmean(r["train_seconds"] for r in mine)}
        for key in SCORES:
            row[key], row[f"{key}_sd"] = mean_sd([s[key] for s in sums])
        questions = sums[0]["questions"]
        row["id_se"] = binomial_se(row["id_acc"], questions[task])
        ood = list(sums[0]["ood_acc"])
        ood_means = [statistics.fmean(s["ood_acc"][t] for s in sums) for t in ood]
        row["ood_se"] = mean_se(ood_means, [questions[t] for t in ood]) if ood else None
        rows.append(row)
    return rows


def compare_table(runs: list[dict], mode: str) -> str:
    """The vanilla model per task, then one row per (method, rho, task): mean ± sd over seeds (%)."""
    head = ["method", "rho", "task", "trainable", "seeds", "ID acc", "ID SE", "mean OOD", "OOD SE", "Forget Ratio",
            "Collapse Rate", "train s"]
    rows = []
    for task in dict.fromkeys(r["task"] for r in runs):  # the untuned model, for reference
        s = next(r["summary"][mode] for r in runs if r["task"] == task)
        van_cr = collapse_rate(list(s["vanilla_ood_acc"].values())) if s["collapse_rate"] is not None else None
        ood = list(s["vanilla_ood_acc"])
        ood_se = mean_se(list(s["vanilla_ood_acc"].values()), [s["questions"][t] for t in ood]) if ood else None
        rows.append(["vanilla", "-", task, "0", "-", pct(s["vanilla_id_acc"]),
                     pct(binomial_se(s["vanilla_id_acc"], s["questions"][task])), pct(s["vanilla_mean_ood"]),
                     pct(ood_se), "-", pct(van_cr), ""])
    for a in aggregate(runs, mode):
        rows.append([a["method"], _rho_text(a["rho"]), a["task"], f"{a['trainable']:,}", str(len(a["seeds"])),
                     pct(a["id_acc"], a["id_acc_sd"]), pct(a["id_se"]), pct(a["mean_ood"], a["mean_ood_sd"]),
                     pct(a["ood_se"]), pct(a["forget_ratio"], a["forget_ratio_sd"]),
                     pct(a["collapse_rate"], a["collapse_rate_sd"]), f"{a['train_seconds']:.0f}"])
    return table(head, rows)


def pareto_points(runs: list[dict], mode: str) -> list[dict]:
    """Per (method, rho): mean and sd over seeds of (mean OOD, ID) accuracy, each first averaged over tasks."""
    per_seed: dict[tuple, dict[int, list[dict]]] = {}
    for r in runs:
        per_seed.setdefault((r["method"], r["rho"]), {}).setdefault(r["seed"], []).append(r["summary"][mode])
    points = []
    for (method, rho), seeds in per_seed.items():
        ood = [statistics.fmean(s["mean_ood"] for s in sums) for sums in seeds.values()]
        idv = [statistics.fmean(s["id_acc"] for s in sums) for sums in seeds.values()]
        (x, x_sd), (y, y_sd) = mean_sd(ood), mean_sd(idv)
        points.append({"method": method, "rho": rho, "ood": x, "ood_sd": x_sd, "id": y, "id_sd": y_sd})
    return points


def vanilla_point(runs: list[dict], mode: str) -> tuple[float, float]:
    """(mean OOD, ID) accuracy of the vanilla model, averaged over the runs' tasks."""
    first = {r["task"]: r["summary"][mode] for r in reversed(runs)}  # one summary per task
    return (statistics.fmean(s["vanilla_mean_ood"] for s in first.values()),
            statistics.fmean(s["vanilla_id_acc"] for s in first.values()))


def _bars(sds: list[float | None]) -> list[float] | None:
    """Error bar half-lengths in percent; None (no bars) when no point has a standard deviation (one seed)."""
    return None if all(sd is None for sd in sds) else [100 * (sd or 0.0) for sd in sds]


def pareto_plot(runs: list[dict], mode: str, path: str | Path) -> None:
    """PNG of ID against mean OOD accuracy (%): a line across rho per sparse method, a point per dense method.

    Error bars are one standard deviation over seeds; the marker shape says rho. Every label is in
    a legend beside the axes, so none overlaps a point or another label, or is clipped.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    points = pareto_points(runs, mode)
    rhos = sorted({p["rho"] for p in points if p["rho"] is not None})
    shapes = dict(zip(rhos, "o^sDvP<>hp"))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, method in enumerate(dict.fromkeys(p["method"] for p in points)):
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["rho"] or 0)
        color = colors[i % len(colors)]
        sparse = mine[0]["rho"] is not None
        ax.errorbar([100 * p["ood"] for p in mine], [100 * p["id"] for p in mine], capsize=3, color=color,
                    xerr=_bars([p["ood_sd"] for p in mine]), yerr=_bars([p["id_sd"] for p in mine]),
                    fmt="-" if sparse else "*", markersize=12, label=method)
        for p in mine if sparse else []:
            ax.plot(100 * p["ood"], 100 * p["id"], marker=shapes[p["rho"]], color=color, linestyle="none")
    vx, vy = vanilla_point(runs, mode)
    ax.plot(100 * vx, 100 * vy, "kx", markersize=9, linestyle="none", label="vanilla")
    for rho in rhos:
        ax.plot([], [], marker=shapes[rho], color="gray", linestyle="none", label=f"rho = {rho:g}")
    ax.set_xlabel("mean OOD accuracy (%)")
    ax.set_ylabel("ID accuracy (%)")
    ax.set_title(f"ID vs OOD accuracy ({mode} mode; bars: 1 sd over seeds)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i] == "vanilla" or labels[i].startswith("rho"))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper left", bbox_to_anchor=(1.02, 1),
              borderaxespad=0, fontsize="small")  # methods first, then vanilla and the rho markers
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend outside the axes is part of the image
    plt.close(fig)
