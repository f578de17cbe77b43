"""Aggregation: runs grouped into (objective, schedule) rows, their cells, the "–" rule and the
ranking under other samplers."""

from __future__ import annotations

import dataclasses
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ddpm.ablation.rows import PAPER_SCHEDULE, Objective, objectives
from ddpm.ablation.runs import ObjectiveKey, RunRecord, _finite, _select
from ddpm.ablation.stats import Interval, mean_interval, paired_difference

__all__ = [
    "BASELINE_KEY",
    "DIVERGED",
    "MISSING",
    "NLL_KEYS",
    "Cell",
    "Table",
    "TableRow",
    "build_table",
    "compute_baseline",
    "protocol_num_samples",
    "sampler_keys",
    "sampler_ranking",
]

DIVERGED = "–"
MISSING = "n/a"
#: The row every other row of its schedule is compared with: ε prediction, L_simple, fixed Σ.
BASELINE_KEY: ObjectiveKey = ("eps", "fixed_large", "simple", "none", "")
_SCHEDULE_ORDER = ("linear", "cosine")


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


#: Bits/dim columns in order of preference: the bound as the paper evaluates it (x̂₀ clipped),
#: else the unclipped bound (``metrics.clip_bound=false``, or runs from before clipping).
NLL_KEYS = ("nll_bpd", "nll_bpd_unclipped")


def _nll_key(runs: Iterable[RunRecord]) -> str:
    """The first of :data:`NLL_KEYS` that any run has, else ``nll_bpd``."""
    have = {k for r in runs for k, v in (r.metrics or {}).items() if _finite(v)}
    return next((k for k in NLL_KEYS if k in have), NLL_KEYS[0])


# ---------------------------------------------------------------------------- the table
@dataclass
class Cell:
    """A metric over the runs of one row: display text, raw mean/std/count and the 95%
    confidence interval of the mean (:func:`~ddpm.ablation.stats.mean_interval`)."""

    text: str
    mean: float | None = None
    std: float | None = None
    n: int = 0
    interval: Interval | None = None


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
    #: Row − baseline row of the same schedule (a continuous row without one: the linear
    #: schedule's), paired by seed (``"fd"``, ``"nll"``); None when
    #: this is the baseline, or no seed of both has the metric.
    delta: dict[str, Interval | None] = field(default_factory=dict)
    #: The schedule of the baseline ``delta`` is taken against (its own, or the linear one for
    #: a continuous row without its own); the trade-off figure draws the row in its panel.
    compared_with: str = ""

    @property
    def key(self) -> ObjectiveKey:
        return (self.parameterization, self.variance, self.loss, self.weighting, self.variant)

    @property
    def is_baseline(self) -> bool:
        """This row is ε + L_simple, the one every row of its schedule is compared with."""
        return self.key == BASELINE_KEY

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.runs if r.seed is not None})


def _format(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def _metric(run: RunRecord, key: str) -> Any:
    """``key`` from the run's own metrics, else from its re-evaluations."""
    value = (run.metrics or {}).get(key)
    return run.evaluations.get(key) if value is None else value


def _seed_values(runs: Sequence[RunRecord], key: str | None) -> dict[int, float]:
    """``{seed: value}`` of ``key`` over the stable runs that have it (finite) and a seed."""
    if key is None:
        return {}
    return {
        r.seed: float(_metric(r, key))
        for r in runs
        if r.status == "ok" and r.metrics is not None and r.seed is not None
        and _finite(_metric(r, key))
    }  # fmt: skip


def _interval_text(interval: Interval, digits: int, unit: str = "") -> str:
    """``mean ± half-width (n=k)``; ``mean (n=1)`` for a single value."""
    if interval.n < 2:
        return f"{_format(interval.mean, digits)}{unit} (n=1)"
    return (
        f"{_format(interval.mean, digits)} ± {_format(interval.half_width, digits)}{unit} "
        f"(n={interval.n})"
    )


def _cell(runs: Sequence[RunRecord], key: str | None, digits: int) -> Cell:
    """Mean ± 95% CI half-width (n) of ``key`` over the stable runs; "–" / "n/a" otherwise."""
    finished = [r for r in runs if r.metrics is not None]
    stable = [r for r in finished if r.status == "ok"]
    if finished and not stable:
        return Cell(DIVERGED)
    if key is None or not stable:
        return Cell(MISSING)
    values = [float(_metric(r, key)) for r in stable if _finite(_metric(r, key))]
    if not values:
        return Cell(MISSING)
    return _interval_cell(values, digits)


def _interval_cell(values: Sequence[float], digits: int, unit: str = "") -> Cell:
    interval = mean_interval(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return Cell(_interval_text(interval, digits, unit), interval.mean, std, len(values), interval)


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
    #: The bits/dim column (:data:`NLL_KEYS`).
    nll_key: str = NLL_KEYS[0]


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
    nll_key = _nll_key(runs)
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
            "nll": _cell(members, nll_key, 3),
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
    _paired_deltas(rows, {"fd": fd_key, "nll": nll_key})
    return Table(rows, fd_key, is_key, unclassified, list(runs), baseline, baseline_note, nll_key)


def _paired_deltas(rows: Sequence[TableRow], keys: dict[str, str | None]) -> None:
    """Fill ``row.delta``: each row minus the :data:`BASELINE_KEY` row of its schedule, paired
    by seed (:func:`~ddpm.ablation.stats.paired_difference`). A continuous-time row, whose
    schedule is part of its objective (``variant`` ``continuous``, e.g. VDM's learned
    schedule), is compared with the baseline of :data:`PAPER_SCHEDULE` when its own schedule
    has none."""
    baselines = {r.schedule: r for r in rows if r.is_baseline}
    for row in rows:
        base = baselines.get(row.schedule)
        if base is None and "continuous" in row.variant.split("+"):
            base = baselines.get(PAPER_SCHEDULE)
        row.compared_with = base.schedule if base is not None else row.schedule
        row.delta = {}
        for name, key in keys.items():
            if base is None or base is row:
                row.delta[name] = None
                continue
            row.delta[name] = paired_difference(
                _seed_values(row.runs, key), _seed_values(base.runs, key)
            )


def _out_of_range_cell(runs: Sequence[RunRecord]) -> Cell:
    """Mean ± 95% CI of the share of sample pixels beyond ±(1 + 2/255), in percent, over every
    finished run (stable or not: it describes the samples, it does not decide "–")."""
    values = [
        100.0 * float(r.metrics["samples_out_of_range_fraction"])
        for r in runs
        if r.metrics is not None and _finite(r.metrics.get("samples_out_of_range_fraction"))
    ]
    if not values:
        return Cell(MISSING)
    return _interval_cell(values, 1, unit="%")


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
