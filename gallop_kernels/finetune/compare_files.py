"""The files of ``gallop compare``: its tables, saved after every run, and the runs ``--resume`` reads back."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import GallopError
from .pipeline import report_key, run_key
from .report import aggregate, compare_table, pareto_plot
from .settings import check_same_options, plain


def tables(reports: list[dict], job, how: dict[str, str], seeds: list[int]) -> list[str]:
    """compare.md's tables, one per evaluation mode."""
    return [f"### {mode} mode ({how[mode]}), accuracy % (mean ± sd over seeds {', '.join(map(str, seeds))}; "
            f"SE: binomial standard error)\n\n" + compare_table(reports, mode) for mode in job.modes]


def save(out, reports: list[dict], planned: int, texts: list[str]) -> None:
    """Write the Pareto plots, compare.md and, last (what --resume reads), compare.json for the runs so far."""
    modes = list(reports[0]["summary"])
    for mode in modes:
        with out.writing(f"pareto-{mode}.png") as png:
            pareto_plot(reports, mode, png)
    status = "" if len(reports) == planned else (f"{len(reports)} of {planned} runs finished; `gallop compare` with "
                                                 f"the same options and --resume runs the rest.\n\n")
    out.write_text("compare.md", status + "\n\n".join(texts) + "\n")
    summary = {mode: aggregate(reports, mode) for mode in modes}
    out.write_text("compare.json", json.dumps({"runs": reports, "summary": summary, "planned_runs": planned}, indent=1))


def finished_runs(folder: Path, runs: list, job) -> list[dict]:
    """The reports in ``folder``/compare.json, after checking that this command would have made each of them.

    GallopError when the file is missing or unreadable, or a saved run differs from the planned
    one in any option (:func:`check_same_options`): resuming must not mix two experiments in one table.
    """
    path = folder / "compare.json"
    try:
        saved = json.loads(path.read_text())["runs"]
        options = [(report_key(r), dict(r["train_config"]), dict(r["job_config"])) for r in saved]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GallopError(f"--resume: cannot read the runs in {path} ({type(e).__name__}: {e})") from None
    planned = {run_key(r.task, r.method, r.rho, r.train_cfg.seed): r for r in runs}
    for (task, method, rho, seed), train_config, job_config in options:
        run = planned.get((task, method, rho, seed))
        if run is None:
            raise GallopError(f"--resume: {folder} holds a run this command would not make ({method} rho={rho} "
                              f"seed {seed} on {task}); give its options")
        check_same_options(folder, {**train_config, **job_config}, {**plain(run.train_cfg), **plain(job)})
    return saved
