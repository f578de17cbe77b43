"""Where the noise of a table cell comes from: ``python -m ddpm.ablation.noise <sweep_dir>``.

A cell is a mean over training seeds, and each run's number is itself one draw of the
evaluation (which x_T the sampler started from, which x_t the bound saw). For one checkpoint
per row (the run of the lowest training seed) this re-runs ``src/eval.py`` under ``k``
evaluation seeds, with the run's own sizes, writing ``<run>/noise/seed<k>/metrics.json``
(resumable: an existing file is kept; runs without a checkpoint, such as committed results, are
decomposed from the re-evaluations they hold). Then, per row and metric (the Fréchet distance and
bits/dim):

- evaluation noise: the standard deviation over the evaluation seeds of that one checkpoint
  (its own end-of-training evaluation included);
- total noise: the standard deviation of the runs' own numbers over training seeds, each with
  its own evaluation seed: Var_total = Var_training + Var_evaluation;
- training noise: √max(Var_total − Var_evaluation, 0).

Writes ``noise.md`` and ``noise.csv`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ddpm.ablation.rows import experiment_of, parse_experiments, parse_seeds
from ddpm.ablation.runs import NOISE_DIR, RunRecord, _finite, classify_run, find_runs
from ddpm.ablation.table import _sample_quality_keys

__all__ = ["NoiseRow", "decompose", "main"]

_ROOT = Path(__file__).resolve().parents[3]


@dataclass
class NoiseRow:
    """The noise of one (row, metric): standard deviations and their counts."""

    experiment: str
    metric: str
    checkpoint_seed: int
    evaluation_sd: float
    evaluation_n: int
    total_sd: float
    total_n: int

    @property
    def training_sd(self) -> float:
        return math.sqrt(max(self.total_sd**2 - self.evaluation_sd**2, 0.0))

    @property
    def ratio(self) -> float:
        """Evaluation sd / training sd (∞ when the training part is 0)."""
        return self.evaluation_sd / self.training_sd if self.training_sd > 0 else math.inf


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def _noise_metrics(run: RunRecord) -> list[dict]:
    found = []
    for file in sorted((run.path / NOISE_DIR).glob("seed*/metrics.json")):
        try:
            found.append(json.loads(file.read_text()))
        except (OSError, ValueError):
            continue
    return found


def decompose(runs: Sequence[RunRecord], metrics: Sequence[str]) -> list[NoiseRow]:
    """One :class:`NoiseRow` per (row with a re-evaluated checkpoint, metric)."""
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        if run.status == "ok" and run.objective_key is not None and run.seed is not None:
            groups.setdefault((run.objective_key, run.schedule), []).append(run)
    rows = []
    for members in groups.values():
        members = sorted(members, key=lambda r: r.seed)
        checkpoint = next((r for r in members if _noise_metrics(r)), None)
        if checkpoint is None:
            continue
        for metric in metrics:
            own = [float(r.metrics[metric]) for r in members if _finite(r.metrics.get(metric))]
            repeats = [
                float(m[metric]) for m in _noise_metrics(checkpoint) if _finite(m.get(metric))
            ]
            if _finite(checkpoint.metrics.get(metric)):
                repeats.append(float(checkpoint.metrics[metric]))
            if len(own) < 2 or len(repeats) < 2:
                continue
            rows.append(
                NoiseRow(
                    experiment_of(checkpoint.objective_key), metric, int(checkpoint.seed), _sd(repeats),
                    len(repeats), _sd(own), len(own),
                )
            )  # fmt: skip
    return rows


def _evaluate(run: RunRecord, seeds: Sequence[int], extra: Sequence[str]) -> int:
    failures = 0
    for seed in tqdm(seeds, desc=run.path.name, unit="seed", leave=False):
        out = run.path / NOISE_DIR / f"seed{seed}"
        if (out / "metrics.json").is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, str(_ROOT / "src" / "eval.py"),
            f"ckpt_path={run.path / 'checkpoints' / 'last.ckpt'}", f"seed={seed}",
            f"hydra.run.dir={out}", *extra,
        ]  # fmt: skip
        with open(out / "eval.log", "a") as log:
            proc = subprocess.run(command, cwd=_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "HYDRA_FULL_ERROR": "1"})  # fmt: skip
        if proc.returncode != 0:
            failures += 1
            print(f"failed: {run.path} with seed={seed} (see {out / 'eval.log'})", file=sys.stderr)
    return failures


def render(rows: Sequence[NoiseRow]) -> str:
    lines = [
        "| Row | Metric | Evaluation sd (k) | Total sd over training seeds (n) | Training sd "
        "| Evaluation / training |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "∞" if math.isinf(r.ratio) else f"{r.ratio:.2f}"
        lines.append(
            f"| {r.experiment} | `{r.metric}` | {r.evaluation_sd:.3f} ({r.evaluation_n}) "
            f"| {r.total_sd:.3f} ({r.total_n}) | {r.training_sd:.3f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ddpm.ablation.noise", description=__doc__.split("\n")[0]
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument(
        "--experiments", default="", help="comma-separated rows to re-evaluate (default: every row)"
    )
    parser.add_argument(
        "--eval-seeds", default="1000,1001,1002,1003", help="comma-separated evaluation seeds"
    )
    parser.add_argument(
        "--eval-args", nargs="*", default=[], help="extra Hydra overrides of src/eval.py"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where noise.md/.csv go (default: the sweep)"
    )
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: sweep directory {str(args.sweep_dir)!r} does not exist", file=sys.stderr)
        return 1
    try:
        seeds = parse_seeds(args.eval_seeds, "--eval-seeds")
        wanted = parse_experiments(args.experiments)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = [classify_run(p) for p in find_runs(args.sweep_dir)]
    chosen: dict[tuple, RunRecord] = {}
    for run in sorted(
        (r for r in runs if r.status == "ok" and r.seed is not None), key=lambda r: r.seed
    ):
        if wanted and experiment_of(run.objective_key) not in wanted:
            continue
        if (run.path / "checkpoints" / "last.ckpt").is_file():
            chosen.setdefault((run.objective_key, run.schedule), run)
    # Runs copied without checkpoints (committed results) are decomposed from the re-evaluations
    # they already hold.
    failures = sum(_evaluate(run, seeds, args.eval_args) for run in chosen.values())
    fd_key, _ = _sample_quality_keys(runs)
    rows = decompose(runs, [k for k in (fd_key, "nll_bpd") if k])
    if wanted:
        rows = [r for r in rows if r.experiment in wanted]
    if not rows:
        print(
            "error: nothing to decompose: no row has a checkpoint to re-evaluate "
            f"(checkpoints/last.ckpt) or re-evaluations under {NOISE_DIR}/",
            file=sys.stderr,
        )
        return 1
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    text = render(rows)
    (out / "noise.md").write_text(text)
    with (out / "noise.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["experiment", "metric", "checkpoint_seed", "evaluation_sd", "evaluation_n",
                         "total_sd", "total_n", "training_sd"])  # fmt: skip
        for r in rows:
            writer.writerow([r.experiment, r.metric, r.checkpoint_seed, r.evaluation_sd,
                             r.evaluation_n, r.total_sd, r.total_n, r.training_sd])  # fmt: skip
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
