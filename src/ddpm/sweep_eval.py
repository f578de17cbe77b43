"""Re-evaluate every run of a sweep under other samplers: ``python -m ddpm.sweep_eval <sweep>``.

For each run directory below the sweep (:func:`ddpm.ablation.find_runs`) that finished
(``metrics.json``) and kept ``checkpoints/last.ckpt``, and for each ``--sampler name:steps``,
this runs ``src/eval.py`` on the checkpoint with that sampler, the run's own sample count and
bits/dim switched off, writing ``<run>/evaluations/<name><steps>/metrics.json``. The table
builder (``python -m ddpm.ablation``) reads those files, so Table 2 gets one column group per
sampler: does the ranking of the objectives depend on the sampler?

Resumable: an evaluation whose ``metrics.json`` exists is skipped, so after a crash the same
command continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ddpm.ablation import EVALUATIONS_DIR, classify_run, find_runs
from ddpm.ablation.rows import experiment_of, parse_experiments, parse_seeds
from ddpm.diffusion.sampling import SamplerSpec

__all__ = ["evaluation_dir", "main", "parse_sampler"]

_ROOT = Path(__file__).resolve().parents[2]


def parse_sampler(text: str) -> SamplerSpec:
    """:meth:`SamplerSpec.parse` for argparse: ``name:steps`` (``ddim:50``, ``dpmpp_2m:20``).

    Raises:
        argparse.ArgumentTypeError: an unknown sampler or bad step count, naming the choices.
    """
    try:
        return SamplerSpec.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def evaluation_dir(run: Path, spec: SamplerSpec) -> Path:
    """``<run>/evaluations/<name><steps>``, e.g. ``evaluations/dpmpp_2m20``."""
    return run / EVALUATIONS_DIR / f"{spec.name}{spec.steps or ''}"


def _command(run: Path, spec: SamplerSpec, out: Path, extra: list[str]) -> list[str]:
    args = [
        sys.executable,
        str(_ROOT / "src" / "eval.py"),
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        f"sample_quality.sampler={spec.name}",
        f"sample_quality.steps={spec.steps if spec.steps is not None else 'null'}",
        "sample_quality.eta=null",
        "sample_quality.spacing=null",
        "nll.enabled=false",
        f"hydra.run.dir={out}",
    ]
    return args + extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument(
        "--sampler",
        dest="samplers",
        type=parse_sampler,
        action="append",
        required=True,
        help="name:steps, repeatable (e.g. --sampler ddim:50 --sampler dpmpp_2m:20)",
    )
    parser.add_argument(
        "--eval-args", nargs="*", default=[], help="extra Hydra overrides of src/eval.py"
    )
    parser.add_argument(
        "--experiments",
        default="",
        help="comma-separated rows to re-evaluate, by experiment name (default: every run)",
    )
    parser.add_argument(
        "--seeds",
        default="",
        help="comma-separated training seeds to re-evaluate (default: every seed)",
    )
    args = parser.parse_args(argv)
    try:
        seeds = set(parse_seeds(args.seeds, "--seeds"))
        wanted = parse_experiments(args.experiments)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs = [r for r in find_runs(args.sweep_dir) if (r / "metrics.json").is_file()]
    if wanted or seeds:
        records = [classify_run(r) for r in runs]
        runs = [
            record.path
            for record in records
            if (not wanted or experiment_of(record.objective_key) in wanted)
            and (not seeds or record.seed in seeds)
        ]
    for run in runs:
        if not (run / "checkpoints" / "last.ckpt").is_file():
            print(f"skipped {run}: no checkpoints/last.ckpt", file=sys.stderr)
    jobs = [
        (run, spec)
        for run in runs
        if (run / "checkpoints" / "last.ckpt").is_file()
        for spec in args.samplers
    ]
    failures = 0
    for run, spec in tqdm(jobs, desc="evaluations", unit="eval"):
        out = evaluation_dir(run, spec)
        if (out / "metrics.json").is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "eval.log", "a") as log:
            proc = subprocess.run(
                _command(run, spec, out, list(args.eval_args)),
                cwd=_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HYDRA_FULL_ERROR": "1"},
            )
        if proc.returncode != 0:
            failures += 1
            print(f"failed: {run} with {spec.name}:{spec.steps} (see {out / 'eval.log'})")
            continue
        metrics = json.loads((out / "metrics.json").read_text())
        keys = [k for k in metrics if k.startswith(("fid_", "fd_digits_", "is_"))]
        tqdm.write(f"{run.name}: " + ", ".join(f"{k}={metrics[k]:.3f}" for k in keys))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
