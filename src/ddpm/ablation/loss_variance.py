"""The variance of the continuous bound's diffusion loss over training, per row and seed.

Continuous-ELBO runs log ``train/diffusion_var``, the variance over the batch of the per-example
diffusion loss ½γ′(t)‖ε − ε̂‖² (bits/dim)², at every logging step. VDM's learned schedule
minimises it; a fixed schedule does not. This draws the curves of every run of each sweep
directory and tables the mean over the last quarter of training, with the ratio between rows
paired by seed (95% t interval of the log ratio):

    python -m ddpm.ablation.loss_variance logs/vdm_study/vdm_learned logs/vdm_study/vdm_cosine \\
        --out docs/results/vdm
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ddpm.ablation.stats import mean_interval
from ddpm.plots import logged_curves

__all__ = ["late_variances", "main"]

KEY = "train/diffusion_var"


def late_variances(sweep: Path, fraction: float = 0.25) -> dict[int, dict[str, Any]]:
    """``{seed: {"steps", "values", "late_mean"}}`` for every run ``<seed>-*`` of ``sweep``
    with ``train/diffusion_var`` logged; ``late_mean`` averages the last ``fraction`` of steps."""
    found: dict[int, dict[str, Any]] = {}
    for run in sorted(sweep.iterdir()):
        if not run.is_dir() or not run.name.split("-")[0].isdigit():
            continue
        curve = logged_curves(run).get(KEY)
        if not curve:
            continue
        steps, values = zip(*curve, strict=True)
        cut = steps[-1] * (1.0 - fraction)
        late = [v for s, v in curve if s > cut]
        seed = int(run.name.split("-")[0])
        found[seed] = {
            "steps": list(steps),
            "values": list(values),
            "late_mean": sum(late) / len(late),
        }
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ddpm.ablation.loss_variance SWEEP [SWEEP ...] [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m ddpm.ablation.loss_variance")
    parser.add_argument("sweeps", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = {sweep.name: late_variances(sweep) for sweep in args.sweeps}
    names = list(rows)
    lines = [
        "| row | seeds | diffusion-loss variance, last quarter of training, (bits/dim)² |",
        "|---|---|---|",
    ]
    for name in names:
        values = [r["late_mean"] for r in rows[name].values()]
        cell = mean_interval(values)
        half = f" ± {cell.half_width:.3g}" if cell.n > 1 else ""
        lines.append(f"| {name} | {cell.n} | {cell.mean:.4g}{half} |")
    result: dict[str, Any] = {
        "rows": {n: {s: r["late_mean"] for s, r in rows[n].items()} for n in names}
    }
    if len(names) >= 2:
        first, second = rows[names[0]], rows[names[1]]
        seeds = sorted(set(first) & set(second))
        logs = [math.log(second[s]["late_mean"] / first[s]["late_mean"]) for s in seeds]
        interval = mean_interval(logs)
        ratio = [math.exp(interval.mean), math.exp(interval.low), math.exp(interval.high)]
        lines.append("")
        lines.append(
            f"{names[1]} ÷ {names[0]}, paired by seed (n = {interval.n}): "
            f"{ratio[0]:.3g} [95% CI {ratio[1]:.3g}, {ratio[2]:.3g}]"
        )
        result["ratio"] = {"of": [names[1], names[0]], "mean_ci95": ratio, "n": interval.n}
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

        args.out.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        for i, name in enumerate(names):
            for j, (_, run) in enumerate(sorted(rows[name].items())):
                ax.plot(run["steps"], run["values"], color=f"C{i}", alpha=0.6, lw=1,
                        label=name if j == 0 else None)  # fmt: skip
        ax.set(xlabel="step", ylabel="variance over the batch, (bits/dim)²", yscale="log",
               title="variance of the diffusion loss during training")  # fmt: skip
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.out / "loss-variance.png", dpi=120)
        (args.out / "loss-variance.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "loss-variance.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
