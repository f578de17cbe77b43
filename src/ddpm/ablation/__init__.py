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

from ddpm.ablation.cli import main
from ddpm.ablation.render import (
    csv_rows,
    display_row,
    headers,
    log_wandb,
    render_markdown,
    sampler_csv_rows,
    write_table,
)
from ddpm.ablation.rows import PAPER_SCHEDULE, Objective, objectives
from ddpm.ablation.runs import (
    EVALUATIONS_DIR,
    ObjectiveKey,
    RunRecord,
    classify_run,
    find_runs,
    objective_variant,
)
from ddpm.ablation.table import (
    DIVERGED,
    MISSING,
    Cell,
    Table,
    TableRow,
    build_table,
    compute_baseline,
    protocol_num_samples,
    sampler_keys,
    sampler_ranking,
)

__all__ = [
    "DIVERGED",
    "EVALUATIONS_DIR",
    "MISSING",
    "PAPER_SCHEDULE",
    "Cell",
    "Objective",
    "ObjectiveKey",
    "RunRecord",
    "Table",
    "TableRow",
    "build_table",
    "classify_run",
    "compute_baseline",
    "csv_rows",
    "display_row",
    "find_runs",
    "headers",
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
