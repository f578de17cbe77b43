"""Rendering: the table as markdown, CSV and a W&B table."""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ddpm.ablation.runs import RunRecord, _finite, _select
from ddpm.ablation.stats import LEVEL, Interval
from ddpm.ablation.table import (
    DIVERGED,
    MISSING,
    Table,
    TableRow,
    _schedule_rank,
    sampler_keys,
    sampler_ranking,
)

__all__ = [
    "csv_rows",
    "delta_text",
    "display_row",
    "headers",
    "log_wandb",
    "plot_tradeoff",
    "render_markdown",
    "sampler_csv_rows",
    "write_table",
]


def _render_sampler_ranking(table: Table) -> list[str]:
    keys = sampler_keys(table)
    if len(keys) < 2:
        return []
    ranking = sampler_ranking(table)
    lines = [
        "",
        "## Does the ranking depend on the sampler?",
        "",
        "Each column group is one sampler: the Fréchet distance (mean ± 95% CI over seeds) and, "
        "after `#`, the row's rank of the means within its schedule (1 = best; a rank is not a "
        "resolved difference). The first group is the runs' "
        "own evaluation; the others are re-evaluations of the same checkpoints "
        "(`python -m ddpm.sweep_eval`). `–` rows were unstable in their own evaluation.",
        "",
        "| Objective | Schedule | " + " | ".join(f"`{k}`" for k in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for i, row in enumerate(table.rows):
        cells = []
        for key in keys:
            cell, rank = ranking[key][i]
            cells.append(cell.text + (f" #{rank}" if rank is not None else ""))
        lines.append(f"| {_md_escape(row.label)} | {row.schedule} | " + " | ".join(cells) + " |")
    lines.append("")
    for schedule in sorted({row.schedule for row in table.rows}, key=_schedule_rank):
        orders = []
        for key in keys:
            ranked = [(r, i) for i, (_, r) in ranking[key].items() if r is not None]
            ranked = [i for r, i in sorted(ranked) if table.rows[i].schedule == schedule]
            orders.append(ranked)
        if not orders[0]:
            continue
        same = all(order == orders[0] for order in orders[1:])
        lines.append(
            f"- {schedule}: the order of the rows is "
            + ("the same under every sampler." if same else "**not** the same under every sampler.")
        )
    return lines


def sampler_csv_rows(table: Table) -> tuple[list[str], list[list[Any]]]:
    """One row per table row: label, schedule, then mean, std, n and rank for every fd key."""
    keys = sampler_keys(table)
    ranking = sampler_ranking(table)
    header = ["objective", "experiment", "schedule"]
    for key in keys:
        header += [f"{key}_mean", f"{key}_std", f"{key}_n", f"{key}_rank"]
    rows = []
    for i, row in enumerate(table.rows):
        values: list[Any] = [row.label, row.experiment, row.schedule]
        for key in keys:
            cell, rank = ranking[key][i]
            values += [
                "" if cell.mean is None else repr(cell.mean),
                "" if cell.std is None else repr(cell.std),
                cell.n,
                "" if rank is None else rank,
            ]
        rows.append(values)
    return header, rows


# ---------------------------------------------------------------------------- output
def headers(table: Table) -> list[str]:
    fd = table.fd_key or "FID"
    fd_header = f"FID ({fd})" if fd.startswith("fid") else fd
    is_header = f"IS ({table.is_key})" if table.is_key else "IS"
    return [
        "Objective",
        "Experiment",
        "Schedule",
        "Seeds",
        is_header,
        f"{fd_header} ↓",
        "NLL test (bits/dim) ↓" if table.nll_key == "nll_bpd" else f"NLL test ({table.nll_key}) ↓",
        f"Δ {fd} vs baseline [95% CI]",
        "Δ NLL vs baseline [95% CI]",
        "Out of range",
        "Paper IS",
        "Paper FID",
        "Paper NLL",
        "Status",
    ]


#: Marks a difference whose interval excludes zero.
RESOLVED = "✓"


def delta_text(delta: Interval | None, digits: int, is_baseline: bool = False) -> str:
    """``+1.23 [0.40, 2.06] ✓ (n=5)`` (✓: resolved, the interval excludes zero); ``baseline``
    for the baseline row, ``n/a`` without shared seeds, the difference alone for one seed."""
    if is_baseline:
        return "baseline"
    if delta is None:
        return MISSING
    mean = f"{delta.mean:+.{digits}f}"
    if delta.n < 2:
        return f"{mean} (n=1)"
    mark = f" {RESOLVED}" if delta.resolved else ""
    return f"{mean} [{delta.low:+.{digits}f}, {delta.high:+.{digits}f}]{mark} (n={delta.n})"


def display_row(row: TableRow) -> list[str]:
    finished = [r for r in row.runs if r.metrics is not None]
    return [
        row.label,
        row.experiment,
        row.schedule,
        f"{len(finished)}/{len(row.runs)}"
        if len(finished) != len(row.runs)
        else str(len(finished)),
        row.cells["is"].text,
        row.cells["fd"].text,
        row.cells["nll"].text,
        delta_text(row.delta.get("fd"), 2, row.is_baseline),
        delta_text(row.delta.get("nll"), 3, row.is_baseline),
        row.cells["range"].text,
        row.paper["is"],
        row.paper["fd"],
        row.paper["nll"],
        row.status,
    ]


_RAW_COLUMNS = [
    "parameterization",
    "variance",
    "loss",
    "seeds_run",
    "n_ok",
    "n_unstable",
    "n_crashed",
    "is_mean",
    "is_std",
    "is_n",
    "fd_key",
    "fd_mean",
    "fd_std",
    "fd_n",
    "nll_bpd_mean",
    "nll_bpd_std",
    "nll_bpd_n",
    "out_of_range_pct_mean",
    "out_of_range_pct_std",
    "out_of_range_n",
    "variant",
    "weighting",
    "fd_baseline",
    "fd_ci_low",
    "fd_ci_high",
    "nll_bpd_ci_low",
    "nll_bpd_ci_high",
    "delta_fd_mean",
    "delta_fd_ci_low",
    "delta_fd_ci_high",
    "delta_fd_n",
    "delta_fd_resolved",
    "delta_nll_bpd_mean",
    "delta_nll_bpd_ci_low",
    "delta_nll_bpd_ci_high",
    "delta_nll_bpd_n",
    "delta_nll_bpd_resolved",
]


def _raw_row(row: TableRow, table: Table) -> list[Any]:
    def num(value: float | None) -> Any:
        return "" if value is None else repr(float(value))

    statuses = [r.status for r in row.runs]
    cells = row.cells
    values: list[Any] = [
        row.parameterization,
        row.variance,
        row.loss,
        " ".join(str(s) for s in row.seeds),
        statuses.count("ok"),
        statuses.count("unstable"),
        statuses.count("crashed"),
        num(cells["is"].mean),
        num(cells["is"].std),
        cells["is"].n,
        table.fd_key or "",
        num(cells["fd"].mean),
        num(cells["fd"].std),
        cells["fd"].n,
        num(cells["nll"].mean),
        num(cells["nll"].std),
        cells["nll"].n,
        num(cells["range"].mean),
        num(cells["range"].std),
        cells["range"].n,
        row.variant,
        row.weighting,
        num(table.baseline),
    ]
    for name in ("fd", "nll"):
        interval = cells[name].interval
        values += [num(None if interval is None else interval.low)]
        values += [num(None if interval is None else interval.high)]
    for name in ("fd", "nll"):
        delta = row.delta.get(name)
        if delta is None:
            values += ["", "", "", "", ""]
        else:
            values += [num(delta.mean), num(delta.low), num(delta.high), delta.n, delta.resolved]
    return values


def csv_rows(table: Table) -> tuple[list[str], list[list[Any]]]:
    """CSV header and rows: the markdown cells, then the raw numbers."""
    header = headers(table) + _RAW_COLUMNS
    return header, [display_row(r) + _raw_row(r, table) for r in table.rows]


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _nll_protocol(runs: Sequence[RunRecord]) -> str:
    described = set()
    for run in runs:
        n = _select(run.config, "callbacks.nll.num_images")
        split = _select(run.config, "callbacks.nll.split") or "test"
        if n is not None:
            described.add(f"first {n} images of the {split} split (capped at its size)")
    return "; ".join(sorted(described)) or "see each run's config"


def _commands(sweep_dir: Path) -> list[str]:
    commands = []
    for file in sorted(sweep_dir.rglob("multirun.yaml")):
        try:
            task = OmegaConf.select(OmegaConf.load(file), "hydra.overrides.task")
        except Exception:
            continue
        if task is not None:
            commands.append("python src/train.py -m " + " ".join(str(t) for t in task))
    return commands


_UNSTABLE_KEYS = (
    "FID column",
    "reason",
    "NLL column",
    "samples_out_of_range_fraction",
    "final_train_loss",
    "diverged_at_step",
)


def _column_key(key: str, table: Table) -> str:
    """The metric behind a placeholder of :data:`_UNSTABLE_KEYS`."""
    return {"FID column": table.fd_key or "FID", "NLL column": table.nll_key}.get(key, key)


def _raw_value(metrics: Mapping[str, Any], key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _baseline_sentence(table: Table) -> str:
    if table.baseline is None:
        why = f" ({table.baseline_note})" if table.baseline_note else ""
        return f"No baseline was computed{why}, so only training and finiteness decide here."
    note = f", {table.baseline_note}" if table.baseline_note else ""
    return f"Baseline: `{table.fd_key}` = {table.baseline:.2f}{note}."


def render_markdown(table: Table, sweep_dir: str | Path | None = None) -> str:
    """The table and its notes as a markdown document."""
    columns = headers(table)
    lines = ["# Table 2 ablation: parameterisation × objective", ""]
    if sweep_dir is not None:
        lines += [f"Sweep: `{sweep_dir}`", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table.rows:
        lines.append("| " + " | ".join(_md_escape(c) for c in display_row(row)) + " |")
    lines += [
        "",
        f"- Cells are mean ± the half-width of the {LEVEL:.0%} confidence interval of the mean "
        "(Student's t over the n seeds that finished stably and have the metric; `(n=1)`: one "
        "value, no interval). `Seeds` counts finished runs (`finished/launched` when some "
        "crashed).",
        f"- Δ vs baseline: the row minus the ε prediction + L_simple row of the same schedule, "
        f"seed by seed over the seeds both have (paired: with one seed the two runs share the "
        f"initial weights where shapes allow, the data order and the evaluation's x_T), mean "
        f"and paired-t {LEVEL:.0%} interval. `{RESOLVED}`: resolved, the interval excludes "
        "zero; without the mark the difference is not resolved at this number of seeds. "
        "Negative is better for both. A continuous-time row (VDM) whose schedule is part of "
        "its objective and has no baseline of its own is compared with the linear schedule's.",
        f"- `{DIVERGED}`: every finished run of the row was unstable, the paper's \"unstable "
        'training and poor samples with out-of-range scores" stated from scores and training: '
        "a non-finite training loss (`diverged`), non-finite samples or bound, or a Fréchet "
        "distance worse than the data-Gaussian baseline (a Gaussian fitted to the data's pixel "
        "mean and covariance, sampled and scored with the same protocol: a model that learned "
        "nothing more). " + _baseline_sentence(table),
        "- Out of range: share of the pixels of samples from the full ancestral sampler beyond "
        "±(1 + 2/255) before quantisation (`samples_out_of_range_fraction`), mean over every "
        "finished run, stable or not; it is reported, it does not decide `–`.",
        f"- `{MISSING}`: the metric was not computed (or the run crashed before writing "
        "`metrics.json`); it is not a divergence.",
        "- Paper columns: Ho et al. (2020), CIFAR-10, linear schedule, T = 1000: IS and FID "
        "from Table 2 (50k samples), NLL (test-set bound) from Table 1; shown on the linear "
        "rows only. The `fd_digits_*` proxy and digits bits/dim are not comparable with them in "
        "value, only in ordering.",
        f"- NLL (`{table.nll_key}`): the full variational bound (all T terms + prior"
        + (
            ", x̂₀ clipped to [-1, 1] inside every term as the paper evaluates it"
            if table.nll_key == "nll_bpd"
            else ", x̂₀ unclipped: not the paper's protocol, which clips it"
        )
        + f"), {_nll_protocol(table.runs)}.",
        "- Fixed isotropic Σ is `variance=fixed_large` (σₜ² = βₜ, the official CIFAR-10 "
        "setting); other variances appear as rows of their own (docs/ablation.md).",
    ]
    if any("continuous" in row.variant.split("+") for row in table.rows):
        lines.append(
            "- Continuous-time rows (variant `continuous`, VDM): their NLL is VDM's continuous "
            "bound, prior + decoder + the diffusion loss L_∞ from T stratified times per image "
            "(as many network evaluations as the discrete bound), x̂₀ clipped likewise; their "
            "samplers run on the schedule's T-step tables (docs/objectives.md)."
        )
    if table.fd_key and table.fd_key.startswith("fd_digits"):
        lines.append(
            f"- `{table.fd_key}`: Fréchet distance in the features of a small digits classifier "
            "(docs/evaluation.md); the name gives the number of samples and the sampler."
        )
    commits = sorted({str(r.metrics.get("git_commit")) for r in table.runs if r.metrics})
    if commits:
        lines.append("- Code: " + ", ".join(f"`{c}`" for c in commits))
    wall = [r.metrics.get("wall_time_s") for r in table.runs if r.metrics]
    wall = [w for w in wall if _finite(w)]
    if wall:
        lines.append(
            f"- Run time: {sum(wall) / 60:.1f} min summed over {len(wall)} runs "
            f"(longest {max(wall) / 60:.1f} min)."
        )
    if sweep_dir is not None:
        clock = Path(sweep_dir) / "wall_clock_s"
        if clock.is_file():
            try:
                seconds = float(clock.read_text().strip())
                lines.append(f"- Sweep wall-clock time: {seconds / 60:.1f} min.")
            except ValueError:
                pass
        commands = _commands(Path(sweep_dir))
        if commands:
            lines += ["", "Commands:", "", "```", *commands, "```"]
    unstable = [r for r in table.runs if r.status == "unstable" and r.metrics]
    if unstable:
        lines += [
            "",
            "Measured values of the unstable runs (shown as `–` above):",
            "",
            "| Run | Seed | " + " | ".join(_column_key(k, table) for k in _UNSTABLE_KEYS) + " |",
            "|" + "---|" * (len(_UNSTABLE_KEYS) + 2),
        ]
        for run in sorted(unstable, key=lambda r: str(r.path)):
            values = [
                _md_escape(run.reason)
                if key == "reason"
                else _raw_value(run.metrics, _column_key(key, table))
                for key in _UNSTABLE_KEYS
            ]
            name = run.metrics.get("run_name") or run.path.name
            lines.append(f"| {name} | {run.seed} | " + " | ".join(values) + " |")
    if table.unclassified:
        lines += ["", "Runs that could not be assigned to a row (no objective or schedule):", ""]
        lines += [f"- `{r.path}`: {r.status} {r.reason}".rstrip() for r in table.unclassified]
    lines += _render_sampler_ranking(table)
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def write_table(table: Table, out_dir: str | Path, sweep_dir: str | Path | None = None) -> Path:
    """Write ``ablation.md`` and ``ablation.csv`` (and ``ablation_samplers.csv`` when runs were
    re-evaluated under other samplers) into ``out_dir``; return the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / "ablation.md"
    plot_tradeoff(table, out / "ablation_tradeoff.png")
    tmp = md_path.with_name(".ablation.md.tmp")
    tmp.write_text(render_markdown(table, sweep_dir))
    os.replace(tmp, md_path)
    _write_csv(out / "ablation.csv", *csv_rows(table))
    if len(sampler_keys(table)) > 1:
        _write_csv(out / "ablation_samplers.csv", *sampler_csv_rows(table))
    return md_path


def plot_tradeoff(table: Table, path: str | Path) -> Path | None:
    """The samples-against-likelihood trade-off: per row, mean Fréchet distance against mean
    bits/dim with their 95% intervals as error bars (one panel per schedule; a row is drawn in
    the panel of the baseline it is compared with, ``TableRow.compared_with``, its schedule named
    when it is another); "–" rows and rows without both metrics are left out. Returns the PNG's
    path, or None with nothing to plot."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is

    def plotted(row: TableRow) -> bool:
        return row.cells["fd"].interval is not None and row.cells["nll"].interval is not None

    def panel(row: TableRow) -> str:
        return row.compared_with or row.schedule

    schedules = sorted({panel(r) for r in table.rows if plotted(r)}, key=_schedule_rank)
    if not schedules:
        return None
    fig = Figure(figsize=(6.5 * len(schedules), 5.0))
    axes = fig.subplots(1, len(schedules), squeeze=False)
    for ax, schedule in zip(axes[0], schedules, strict=True):
        rows = [r for r in table.rows if panel(r) == schedule and plotted(r)]
        for i, row in enumerate(rows):
            fd, nll = row.cells["fd"].interval, row.cells["nll"].interval
            assert fd is not None and nll is not None

            def err(iv: Interval) -> float:
                return 0.0 if iv.n < 2 else iv.half_width

            ax.errorbar(
                nll.mean, fd.mean, xerr=err(nll), yerr=err(fd), fmt="o", capsize=3,
                color=f"C{i % 10}", label=f"{row.experiment or row.label}"
                + (f", {row.schedule} schedule" if row.schedule != schedule else "")
                + f" (n={fd.n})",
                markeredgecolor="black" if row.is_baseline else None,
            )  # fmt: skip
        ax.set_xlabel(f"{table.nll_key} (bits/dim) ↓")
        ax.set_ylabel(f"{table.fd_key} ↓")
        ax.set_title(f"{schedule}: mean ± {LEVEL:.0%} CI over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    return out


def log_wandb(table: Table, sweep_dir: str | Path, project: str = "ddpm-lab") -> bool:
    """Log the CSV rows as a W&B table (offline without credentials); False if W&B is off."""
    if os.environ.get("WANDB_MODE") == "disabled":
        return False
    try:
        import wandb
    except ImportError:
        print("W&B is not installed; skipping --wandb", file=sys.stderr)
        return False
    from ddpm.wandb_utils import wandb_has_credentials

    mode = os.environ.get("WANDB_MODE") or ("online" if wandb_has_credentials() else "offline")
    header, rows = csv_rows(table)
    run = wandb.init(
        project=project,
        job_type="ablation",
        name=f"ablation-{Path(sweep_dir).resolve().name}",
        mode=mode,
        dir=str(sweep_dir),
        config={"sweep_dir": str(sweep_dir), "fd_key": table.fd_key},
    )
    run.log({"ablation": wandb.Table(columns=header, data=[[str(c) for c in r] for r in rows])})
    run.finish()
    if mode == "offline":
        print(f"W&B (offline): upload with: wandb sync {Path(run.dir).parent}")
    return True
