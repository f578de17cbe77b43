"""Sweep directory → Table 2 of Ho et al. (2020): ``python -m ddpm.ablation <sweep_dir>``.

Reads every run below ``sweep_dir`` (any depth; a run is a directory holding ``metrics.json``
and/or Hydra's ``.hydra/config.yaml``, e.g. ``<sweep>/<num>-<run_name>/`` of a multirun), groups
the runs by objective (parameterisation × variance × loss × weighting, plus a timestep density or
zero terminal SNR when they differ from the default) and schedule, and writes

- ``ablation.md``: the paper's layout — objective rows; IS, FID (or the offline ``fd_digits``
  proxy) and NLL (bits/dim) columns as mean ± std over seeds; the paper's numbers side by side;
- ``ablation.csv``: the same cells plus the raw means, standard deviations and counts;
- with ``--wandb``, the CSV rows as a W&B table (offline when no credentials are configured).

The rows, their order, labels and the paper's numbers come from the experiment configs
(``conf/experiment/*.yaml``, their ``table_row`` block: :func:`objectives`).

Cells: ``–`` when every finished run of the row was unstable, the paper's "unstable training and
poor samples with out-of-range scores" stated from scores and training: a non-finite training
loss (``diverged: true`` in metrics.json), non-finite samples or bound, or a Fréchet distance
worse than that of a Gaussian fitted to the data's pixel mean and covariance (the *data-Gaussian
baseline*, :mod:`ddpm.metrics.baseline`: the score of a model that learned nothing more). The
share of sample pixels beyond ±(1 + 2/255) is a column of its own. ``n/a`` when the metric was
not computed; runs without ``metrics.json`` are listed as ``crashed`` and never stop the table
from being built.

Re-evaluations of a run under other samplers (``python -m ddpm.sweep_eval``, written to
``<run>/evaluations/<sampler>/metrics.json``) add a second table to ``ablation.md`` and
``ablation_samplers.csv``: the Fréchet distance and the rank of every row under each sampler.
Stability ("–") is always decided by the run's own evaluation, never by a re-evaluation.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "EVALUATIONS_DIR",
    "Cell",
    "Objective",
    "RunRecord",
    "Table",
    "TableRow",
    "build_table",
    "classify_run",
    "compute_baseline",
    "csv_rows",
    "find_runs",
    "log_wandb",
    "main",
    "objective_variant",
    "objectives",
    "protocol_num_samples",
    "render_markdown",
    "sampler_csv_rows",
    "sampler_keys",
    "sampler_ranking",
    "write_table",
]

DIVERGED = "–"
MISSING = "n/a"
_SCHEDULE_ORDER = ("linear", "cosine")
#: Sub-directory of a run holding its re-evaluations, one per sampler (``python -m ddpm.sweep_eval``).
EVALUATIONS_DIR = "evaluations"
_NOT_RUNS = {"wandb", "checkpoints", "samples", "nll", "csv", "tensorboard", EVALUATIONS_DIR}
_SAMPLE_QUALITY_PREFIXES = ("fid_", "fd_digits_", "is_")


#: (parameterisation, variance, loss, weighting, variant): what makes two runs the same objective;
#: the variant names a non-uniform timestep density and zero terminal SNR (:func:`objective_variant`).
ObjectiveKey = tuple[str, str, str, str, str]


@dataclass(frozen=True)
class Objective:
    """One objective row: the experiment config, its groups, its label and the paper's numbers.

    Paper numbers (CIFAR-10, linear schedule, T = 1000) are display strings: IS and FID from
    Table 2 of Ho et al. (2020), the test-set NLL bound from their Table 1; None where the paper
    has no number.
    """

    experiment: str
    parameterization: str
    variance: str
    loss: str
    label: str
    paper_is: str | None = None
    paper_fid: str | None = None
    paper_nll: str | None = None
    weighting: str = "none"
    variant: str = ""

    @property
    def key(self) -> ObjectiveKey:
        return (self.parameterization, self.variance, self.loss, self.weighting, self.variant)


def objective_variant(cfg: DictConfig | None) -> str:
    """What besides the four groups sets a run's objective: ``t~<sampler>`` for a timestep
    sampler other than uniform and ``zero_terminal_snr``, joined by ``+`` (``""`` for neither)."""
    parts = []
    sampler = _select(cfg, "module.timestep_sampler")
    if sampler not in (None, "uniform"):
        parts.append(f"t~{sampler}")
    if _select(cfg, "schedule.zero_terminal_snr"):
        parts.append("zero_terminal_snr")
    return "+".join(parts)


@functools.lru_cache(maxsize=1)
def objectives() -> tuple[Objective, ...]:
    """The table's rows, from every ``conf/experiment/*.yaml`` with a ``table_row`` block, in
    their ``table_row.order``: each experiment is composed like ``src/train.py`` would, so the
    key is what the experiment really trains."""
    from ddpm.configs import compose_config, conf_dir

    found = []
    for file in sorted((conf_dir() / "experiment").glob("*.yaml")):
        row = OmegaConf.load(file).get("table_row")
        if row is None:
            continue
        cfg = compose_config([f"experiment={file.stem}"])
        paper = row.get("paper") or {}
        objective = Objective(
            experiment=file.stem,
            parameterization=str(cfg.parameterization.name),
            variance=str(cfg.variance.name),
            loss=str(cfg.loss.name),
            label=str(row.label),
            paper_is=paper.get("is"),
            paper_fid=paper.get("fid"),
            paper_nll=paper.get("nll"),
            weighting=str(_select(cfg, "weighting.name") or "none"),
            variant=objective_variant(cfg),
        )
        found.append((float(row.order), file.stem, objective))
    return tuple(objective for _, _, objective in sorted(found))


#: The schedule the paper's numbers were measured with.
PAPER_SCHEDULE = "linear"


# ---------------------------------------------------------------------------- runs
@dataclass
class RunRecord:
    """One run directory of a sweep.

    ``status`` is ``"ok"``, ``"unstable"`` (diverged, non-finite, or, once :func:`build_table`
    compares it with the data-Gaussian baseline, a worse Fréchet distance: a "–"), or ``"crashed"`` (no ``metrics.json``: the job died, or is still running);
    ``reason`` says why it is not ``"ok"``. ``evaluations`` holds the sample-quality metrics of
    its re-evaluations under other samplers (``<run>/evaluations/*/metrics.json``).
    """

    path: Path
    parameterization: str | None
    variance: str | None
    loss: str | None
    schedule: str | None
    seed: int | None
    metrics: dict[str, Any] | None
    config: DictConfig | None
    status: str = "ok"
    reason: str = ""
    evaluations: dict[str, float] = field(default_factory=dict)
    weighting: str = "none"
    variant: str = ""

    @property
    def objective_key(self) -> ObjectiveKey | None:
        if None in (self.parameterization, self.variance, self.loss):
            return None
        return (self.parameterization, self.variance, self.loss, self.weighting, self.variant)  # type: ignore[return-value]


def _is_run_dir(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / ".hydra" / "config.yaml").is_file()


def find_runs(sweep_dir: str | Path) -> list[Path]:
    """Every run directory below ``sweep_dir`` (itself included), sorted; hidden and W&B dirs skipped.

    A run directory holds ``metrics.json`` or ``.hydra/config.yaml``; the search does not descend
    into a run directory (checkpoints, W&B files).
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {str(root)!r} does not exist")
    runs: list[Path] = []
    seen: set[str] = set()  # symlinked directories are followed, each real directory once
    for current, dirs, _files in os.walk(root, followlinks=True):
        path = Path(current)
        real = os.path.realpath(path)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        if _is_run_dir(path):
            runs.append(path)
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _NOT_RUNS)
    return sorted(runs)


def _select(cfg: DictConfig | None, key: str) -> Any:
    if cfg is None:
        return None
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    except Exception:  # an interpolation that needs a running Hydra app
        return None


def _load_config(path: Path) -> DictConfig | None:
    file = path / ".hydra" / "config.yaml"
    if not file.is_file():
        return None
    try:
        cfg = OmegaConf.load(file)
    except Exception:  # a truncated file of a killed job
        return None
    return cfg if isinstance(cfg, DictConfig) else None


def _load_metrics(path: Path) -> tuple[dict[str, Any] | None, str]:
    file = path / "metrics.json"
    if not file.is_file():
        return None, "no metrics.json (crashed, killed or still running)"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        return None, f"unreadable metrics.json ({err})"
    if not isinstance(data, dict):
        return None, "metrics.json is not a JSON object"
    return data, ""


def classify_run(path: str | Path) -> RunRecord:
    """Read one run directory: its objective, schedule, seed, metrics and stability status.

    The objective comes from ``metrics.json`` (``diffusion`` = ``"<param>-<variance>-<loss>"``,
    what actually ran) or, for a crashed run, from ``.hydra/config.yaml``.
    """
    path = Path(path)
    cfg = _load_config(path)
    metrics, problem = _load_metrics(path)
    parts: list[str | None] = [None, None, None]
    if metrics and isinstance(metrics.get("diffusion"), str):
        split = metrics["diffusion"].split("-")
        if len(split) == 3:
            parts = list(split)
    for i, group in enumerate(("parameterization", "variance", "loss")):
        if parts[i] is None:
            parts[i] = _select(cfg, f"{group}.name")
    weighting = (metrics or {}).get("weighting") or _select(cfg, "weighting.name") or "none"
    schedule = (metrics or {}).get("schedule") or _select(cfg, "schedule.name")
    seed = (metrics or {}).get("seed")
    if seed is None:
        seed = _select(cfg, "seed")
    record = RunRecord(
        path=path,
        parameterization=parts[0],
        variance=parts[1],
        loss=parts[2],
        schedule=str(schedule) if schedule is not None else None,
        seed=int(seed) if isinstance(seed, (int, float)) else None,
        metrics=metrics,
        config=cfg,
        weighting=str(weighting),
        variant=objective_variant(cfg),
    )
    if metrics is None:
        record.status, record.reason = "crashed", problem
        return record
    record.evaluations = _load_evaluations(path)
    reason = _instability(metrics)
    if reason:
        record.status, record.reason = "unstable", reason
    return record


def _load_evaluations(path: Path) -> dict[str, float]:
    """Sample-quality metrics of ``<run>/evaluations/*/metrics.json`` (unreadable files skipped)."""
    found: dict[str, float] = {}
    for file in sorted((path / EVALUATIONS_DIR).glob("*/metrics.json")):
        data, _ = _load_metrics(file.parent)
        for key, value in (data or {}).items():
            if key.startswith(_SAMPLE_QUALITY_PREFIXES) and _finite(value):
                found.setdefault(key, float(value))
    return found


def _instability(metrics: Mapping[str, Any]) -> str:
    """Why a finished run counts as unstable from its training and finiteness, or ``""``
    (the comparison with the data-Gaussian baseline is :func:`build_table`'s)."""
    if metrics.get("diverged"):
        step = metrics.get("diverged_at_step")
        return "diverged (non-finite loss" + (f" at step {step})" if step is not None else ")")
    if metrics.get("samples_finite") is False:
        return "non-finite samples"
    for key, value in metrics.items():
        if key.startswith("nonfinite_frac") and _finite(value) and value > 0:
            return f"non-finite samples ({value:.1%} in {key})"
    nll = metrics.get("nll_bpd")
    if isinstance(nll, (int, float)) and not isinstance(nll, bool) and not math.isfinite(nll):
        return "non-finite bound (nll_bpd)"
    return ""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------- metric choice
def _sample_quality_keys(runs: Iterable[RunRecord]) -> tuple[str | None, str | None]:
    """The FID-like column (``fid_50k`` if any run has it, else the most common ``fid_*`` /
    ``fd_digits_*`` key) and the matching IS key (``is_<same protocol>``), or None."""
    counts: dict[str, int] = {}
    for run in runs:
        for key, value in (run.metrics or {}).items():
            if key.startswith(("fid_", "fd_digits_")) and _finite(value):
                counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None, None
    if "fid_50k" in counts:
        fd_key = "fid_50k"
    else:
        # Inception FID before the digits proxy, then the most runs, then the name.
        fd_key = min(counts, key=lambda k: (not k.startswith("fid_"), -counts[k], k))
    is_key = "is_" + fd_key.split("_", 1)[1] if fd_key.startswith("fid_") else None
    return fd_key, is_key


# ---------------------------------------------------------------------------- the table
@dataclass
class Cell:
    """A metric over the runs of one row: display text and raw mean/std/count."""

    text: str
    mean: float | None = None
    std: float | None = None
    n: int = 0


@dataclass
class TableRow:
    """One (objective, schedule) row of the table."""

    experiment: str
    label: str
    parameterization: str
    variance: str
    loss: str
    schedule: str
    runs: list[RunRecord] = field(default_factory=list)
    weighting: str = "none"
    variant: str = ""
    cells: dict[str, Cell] = field(default_factory=dict)
    paper: dict[str, str] = field(default_factory=dict)
    status: str = ""

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.runs if r.seed is not None})


def _format(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def _metric(run: RunRecord, key: str) -> Any:
    """``key`` from the run's own metrics, else from its re-evaluations."""
    value = (run.metrics or {}).get(key)
    return run.evaluations.get(key) if value is None else value


def _cell(runs: Sequence[RunRecord], key: str | None, digits: int) -> Cell:
    """Mean ± sample std (n ≥ 2) of ``key`` over the stable runs; "–" / "n/a" otherwise."""
    finished = [r for r in runs if r.metrics is not None]
    stable = [r for r in finished if r.status == "ok"]
    if finished and not stable:
        return Cell(DIVERGED)
    if key is None or not stable:
        return Cell(MISSING)
    values = [float(_metric(r, key)) for r in stable if _finite(_metric(r, key))]
    if not values:
        return Cell(MISSING)
    mean = statistics.fmean(values)
    if len(values) == 1:
        text, std = _format(mean, digits), None
    else:
        std = statistics.stdev(values)
        text = f"{_format(mean, digits)} ± {_format(std, digits)}"
    if len(values) < len(stable):  # the metric is missing in some seeds: say how many it covers
        text += f" (n={len(values)})"
    return Cell(text, mean, std, len(values))


def _status(runs: Sequence[RunRecord]) -> str:
    problems = [r for r in runs if r.status != "ok"]
    if not problems:
        return "ok"
    parts = []
    for run in sorted(problems, key=lambda r: (r.seed is None, r.seed or 0, str(r.path))):
        who = f"seed {run.seed}" if run.seed is not None else run.path.name
        parts.append(f"{who}: {run.status}, {run.reason}" if run.reason else f"{who}: {run.status}")
    ok = len(runs) - len(problems)
    if ok:
        parts.append(f"{ok} ok")
    return "; ".join(parts)


def _schedule_rank(schedule: str) -> tuple[int, str]:
    order = _SCHEDULE_ORDER.index(schedule) if schedule in _SCHEDULE_ORDER else len(_SCHEDULE_ORDER)
    return order, schedule


@dataclass
class Table:
    """The assembled table: rows plus what the column headers and notes need."""

    rows: list[TableRow]
    fd_key: str | None
    is_key: str | None
    unclassified: list[RunRecord]
    runs: list[RunRecord]
    #: The data-Gaussian baseline of ``fd_key`` (None: not computed, the rule then ignores scores).
    baseline: float | None = None
    #: Why there is no baseline, when there is none.
    baseline_note: str = ""


def _worse_than_baseline(run: RunRecord, fd_key: str | None, baseline: float | None) -> RunRecord:
    """``run``, marked unstable when its ``fd_key`` is worse than the data-Gaussian baseline."""
    if run.status != "ok" or fd_key is None or baseline is None:
        return run
    value = (run.metrics or {}).get(fd_key)
    if not _finite(value) or value <= baseline:
        return run
    reason = f"{fd_key} {value:.1f} worse than the data-Gaussian baseline {baseline:.1f}"
    return dataclasses.replace(run, status="unstable", reason=reason)


def build_table(
    runs: Sequence[RunRecord],
    fd_key: str | None = None,
    baseline: float | None = None,
    baseline_note: str = "",
) -> Table:
    """Group runs by (objective, schedule) and compute every cell.

    Args:
        runs: from :func:`classify_run`.
        fd_key: the sample-quality metric (e.g. ``fid_50k``, ``fd_digits_400``); None chooses it
            from the runs (``fid_50k`` if present, else the most common key).
        baseline: the data-Gaussian baseline of ``fd_key`` (:func:`compute_baseline`); a run
            scoring worse is unstable ("–"). None: only training and finiteness decide.
        baseline_note: why ``baseline`` is None (quoted in the notes).
    """
    auto_fd, auto_is = _sample_quality_keys(runs)
    if fd_key is None:
        fd_key, is_key = auto_fd, auto_is
    else:
        is_key = "is_" + fd_key.split("_", 1)[1] if fd_key.startswith("fid_") else None
    runs = [_worse_than_baseline(run, fd_key, baseline) for run in runs]
    groups: dict[tuple[ObjectiveKey, str], list[RunRecord]] = {}
    unclassified = []
    for run in runs:
        if run.objective_key is None or run.schedule is None:
            unclassified.append(run)
            continue
        groups.setdefault((run.objective_key, run.schedule), []).append(run)

    by_key = {objective.key: objective for objective in objectives()}
    known = list(by_key)
    extra = sorted({key for key, _ in groups if key not in by_key})

    def order(item: tuple[ObjectiveKey, str]) -> tuple[int, tuple[int, str]]:
        key, schedule = item
        index = known.index(key) if key in by_key else len(known) + extra.index(key)
        return index, _schedule_rank(schedule)

    rows = []
    for key, schedule in sorted(groups, key=order):
        members = groups[(key, schedule)]
        objective = by_key.get(key)
        if objective is None:
            p, v, loss, w, variant = key
            label = f"{p} prediction, loss={loss}, variance={v}"
            if w != "none":
                label += f", weighting={w}"
            if variant:
                label += f", {variant}"
            objective = Objective("", p, v, loss, label, weighting=w, variant=variant)
        row = TableRow(
            experiment=objective.experiment,
            label=objective.label,
            parameterization=key[0],
            variance=key[1],
            loss=key[2],
            schedule=schedule,
            runs=members,
            weighting=key[3],
            variant=key[4],
        )
        row.cells = {
            "is": _cell(members, is_key, 2),
            "fd": _cell(members, fd_key, 2),
            "nll": _cell(members, "nll_bpd", 3),
            "range": _out_of_range_cell(members),
        }
        if schedule == PAPER_SCHEDULE:
            row.paper = {
                "is": objective.paper_is or "",
                "fd": objective.paper_fid or "",
                "nll": objective.paper_nll or "",
            }
        else:
            row.paper = {"is": "", "fd": "", "nll": ""}
        row.status = _status(members)
        rows.append(row)
    return Table(rows, fd_key, is_key, unclassified, list(runs), baseline, baseline_note)


def _out_of_range_cell(runs: Sequence[RunRecord]) -> Cell:
    """Mean ± std of the share of sample pixels beyond ±(1 + 2/255), in percent, over every
    finished run (stable or not: it describes the samples, it does not decide "–")."""
    values = [
        100.0 * float(r.metrics["samples_out_of_range_fraction"])
        for r in runs
        if r.metrics is not None and _finite(r.metrics.get("samples_out_of_range_fraction"))
    ]
    if not values:
        return Cell(MISSING)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    text = f"{mean:.1f}%" if std is None else f"{mean:.1f} ± {std:.1f}%"
    return Cell(text, mean, std, len(values))


_COUNT_TAG = re.compile(r"^(?:fid|fd_digits)_(\d+)(k?)(?:_|$)")


def protocol_num_samples(fd_key: str) -> int:
    """N of a sample-quality key: ``fd_digits_400`` → 400, ``fid_10k_ddim100`` → 10000."""
    match = _COUNT_TAG.match(fd_key)
    if match is None:
        raise ValueError(f"{fd_key!r} does not name its number of samples (e.g. fd_digits_400)")
    return int(match.group(1)) * (1000 if match.group(2) else 1)


def compute_baseline(
    runs: Sequence[RunRecord], fd_key: str | None, seed: int = 0
) -> tuple[float | None, str]:
    """The data-Gaussian baseline of ``fd_key`` for the runs' data set, and a note.

    The data set, feature network and N are those of the first run whose metrics hold
    ``fd_key`` (N from the key's name). Returns ``(None, why)`` when it cannot be computed,
    e.g. without the data or the Inception weights on this machine.
    """
    if fd_key is None:
        return None, "no sample-quality metric in the runs"
    run = next((r for r in runs if r.config is not None and fd_key in (r.metrics or {})), None)
    if run is None:
        return None, f"no run with {fd_key} has a saved config (.hydra/config.yaml)"
    try:
        from ddpm.builders import build_datamodule
        from ddpm.metrics.baseline import data_gaussian_baseline

        datamodule = build_datamodule(run.config)
        value = data_gaussian_baseline(
            datamodule,
            protocol_num_samples(fd_key),
            feature_extractor="inception" if fd_key.startswith("fid_") else "digits",
            seed=seed,
            inception_weights=_select(run.config, "metrics.inception_weights"),
            cache_dir=_select(run.config, "paths.cache_dir"),
            allow_download=False,
        )
    except Exception as err:  # no data or weights here: the table is still built
        return None, f"could not compute it here ({type(err).__name__}: {err})"
    return value, f"N = {protocol_num_samples(fd_key)} samples, seed {seed}"


# ---------------------------------------------------------------------------- by sampler
def sampler_keys(table: Table) -> list[str]:
    """The Fréchet-distance keys to compare: the table's own first, then those of the runs'
    re-evaluations (``evaluations/*/metrics.json``) by name. One key: nothing to compare."""
    keys = {k for r in table.runs for k in r.evaluations if k.startswith(("fid_", "fd_digits_"))}
    first = [table.fd_key] if table.fd_key else []
    return first + sorted(keys - set(first))


def sampler_ranking(table: Table) -> dict[str, dict[int, tuple[Cell, int | None]]]:
    """``{fd key: {row index: (cell, rank among the rows of its schedule, 1 = best)}}``.

    Rows with no number under a key (unstable: "–", or not evaluated) get no rank.
    """
    ranking: dict[str, dict[int, tuple[Cell, int | None]]] = {}
    for key in sampler_keys(table):
        cells = {i: _cell(row.runs, key, 2) for i, row in enumerate(table.rows)}
        ranks: dict[int, int] = {}
        for schedule in {row.schedule for row in table.rows}:
            scored = [
                (cells[i].mean, i)
                for i, row in enumerate(table.rows)
                if row.schedule == schedule and cells[i].mean is not None
            ]
            for rank, (_, i) in enumerate(sorted(scored), start=1):
                ranks[i] = rank
        ranking[key] = {i: (cells[i], ranks.get(i)) for i in cells}
    return ranking


def _render_sampler_ranking(table: Table) -> list[str]:
    keys = sampler_keys(table)
    if len(keys) < 2:
        return []
    ranking = sampler_ranking(table)
    lines = [
        "",
        "## Does the ranking depend on the sampler?",
        "",
        "Each column group is one sampler: the Fréchet distance (mean ± std over seeds) and, in "
        "brackets, the row's rank within its schedule (1 = best). The first group is the runs' "
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
            cells.append(cell.text + (f" ({rank})" if rank is not None else ""))
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
def _headers(table: Table) -> list[str]:
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
        "NLL test (bits/dim) ↓",
        "Out of range",
        "Paper IS",
        "Paper FID",
        "Paper NLL",
        "Status",
    ]


def _display_row(row: TableRow) -> list[str]:
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
]


def _raw_row(row: TableRow, table: Table) -> list[Any]:
    def num(value: float | None) -> Any:
        return "" if value is None else repr(float(value))

    statuses = [r.status for r in row.runs]
    cells = row.cells
    return [
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


def csv_rows(table: Table) -> tuple[list[str], list[list[Any]]]:
    """CSV header and rows: the markdown cells, then the raw numbers."""
    header = _headers(table) + _RAW_COLUMNS
    return header, [_display_row(r) + _raw_row(r, table) for r in table.rows]


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
    "nll_bpd",
    "samples_out_of_range_fraction",
    "final_train_loss",
    "diverged_at_step",
)


def _raw_value(metrics: Mapping[str, Any], key: str, fd_key: str | None) -> str:
    if key == "FID column":
        key = fd_key or ""
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
    headers = _headers(table)
    lines = ["# Table 2 ablation: parameterisation × objective", ""]
    if sweep_dir is not None:
        lines += [f"Sweep: `{sweep_dir}`", ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in table.rows:
        lines.append("| " + " | ".join(_md_escape(c) for c in _display_row(row)) + " |")
    lines += [
        "",
        "- Cells are mean ± sample standard deviation over the seeds that finished stably "
        "(one seed: the value alone; `(n=k)` when a metric exists for only k of them). "
        "`Seeds` counts finished runs (`finished/launched` when some crashed).",
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
        f"- NLL: the full variational bound (all T terms + prior), {_nll_protocol(table.runs)}.",
        "- Fixed isotropic Σ is `variance=fixed_large` (σₜ² = βₜ, the official CIFAR-10 "
        "setting); other variances appear as rows of their own (docs/ablation.md).",
    ]
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
            "| Run | Seed | "
            + " | ".join(table.fd_key or "FID" if k == "FID column" else k for k in _UNSTABLE_KEYS)
            + " |",
            "|" + "---|" * (len(_UNSTABLE_KEYS) + 2),
        ]
        for run in sorted(unstable, key=lambda r: str(r.path)):
            values = [
                _md_escape(run.reason)
                if key == "reason"
                else _raw_value(run.metrics, key, table.fd_key)
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
    tmp = md_path.with_name(".ablation.md.tmp")
    tmp.write_text(render_markdown(table, sweep_dir))
    os.replace(tmp, md_path)
    _write_csv(out / "ablation.csv", *csv_rows(table))
    if len(sampler_keys(table)) > 1:
        _write_csv(out / "ablation_samplers.csv", *sampler_csv_rows(table))
    return md_path


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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ddpm.ablation <sweep_dir> [--out DIR] [--wandb]``."""
    parser = argparse.ArgumentParser(
        prog="python -m ddpm.ablation",
        description="Build Table 2 (ablation.md, ablation.csv) from a sweep directory.",
    )
    parser.add_argument("sweep_dir", type=Path, help="multirun directory (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: sweep)")
    parser.add_argument("--wandb", action="store_true", help="also log the table to W&B")
    parser.add_argument(
        "--fd-key",
        default=None,
        help="sample-quality metric for the FID column (default: fid_50k if present, else the "
        "most common fid_*/fd_digits_* key)",
    )
    parser.add_argument(
        "--baseline",
        default="auto",
        help="data-Gaussian baseline of the FID column: 'auto' (computed from the runs' data "
        "set and protocol, default), a number, or 'none' (then only training and finiteness "
        "decide '–')",
    )
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: sweep directory {str(args.sweep_dir)!r} does not exist", file=sys.stderr)
        return 1
    runs = [classify_run(p) for p in find_runs(args.sweep_dir)]
    if not runs:
        print(
            f"error: no runs (metrics.json or .hydra/config.yaml) below {str(args.sweep_dir)!r}",
            file=sys.stderr,
        )
        return 1
    fd_key = args.fd_key or _sample_quality_keys(runs)[0]
    if args.baseline == "auto":
        baseline, note = compute_baseline(runs, fd_key)
    elif args.baseline == "none":
        baseline, note = None, "--baseline none"
    else:
        try:
            baseline, note = float(args.baseline), "given with --baseline"
        except ValueError:
            print(
                f"error: --baseline {args.baseline!r}: give 'auto', 'none' or a number",
                file=sys.stderr,
            )
            return 2
    table = build_table(runs, fd_key=fd_key, baseline=baseline, baseline_note=note)
    md_path = write_table(table, args.out or args.sweep_dir, args.sweep_dir)
    print(md_path.read_text())
    print(f"wrote {md_path} and {md_path.with_suffix('.csv')}")
    if args.wandb:
        log_wandb(table, args.sweep_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
