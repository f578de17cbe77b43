"""``python -m ddpm.ablation <sweep_dir>``: the table of a sweep directory."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ddpm.ablation.render import log_wandb, write_table
from ddpm.ablation.runs import classify_run, find_runs
from ddpm.ablation.table import _sample_quality_keys, build_table, compute_baseline

__all__ = ["main"]


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
