"""Every row of the ablation table as a weighting of the ε-MSE over λ = log SNR (Kingma & Gao 2023).

Each experiment of the table (:func:`ddpm.ablation.objectives`) is composed as ``src/train.py``
would compose it, and :meth:`~ddpm.diffusion.GaussianDiffusion.effective_weighting` gives the
weight per unit of λ that its loss and timestep density put on ‖ε − ε̂‖². The figure of
``docs/objectives.md`` and ``notebooks/04_objectives.ipynb`` is made here:

    python -m ddpm.objectives --out docs/images/objectives-weighting.png

Curves are normalised to unit area over λ: Adam is nearly invariant to the overall scale of the
loss, so the shape is what tells objectives apart.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddpm.ablation import Objective, objectives

__all__ = ["RowWeighting", "main", "plot_weightings", "row_weightings"]


@dataclass
class RowWeighting:
    """One table row's effective weighting.

    Attributes:
        objective: the row.
        log_snr: λₜ ``[T]`` (float64, decreasing in t).
        per_log_snr: the ε-MSE weight per unit of λ ``[T]``, normalised to unit area over λ.
        note: what was approximated, if anything (the bound with a learned Σ is drawn with
            σₜ² = βₜ, since its weight depends on the learned variance).
    """

    objective: Objective
    log_snr: np.ndarray
    per_log_snr: np.ndarray
    note: str = ""


def row_weightings(overrides: Sequence[str] = ()) -> list[RowWeighting]:
    """The effective weighting of every table row (paper configuration unless ``overrides``)."""
    from ddpm.builders import build_diffusion
    from ddpm.configs import compose_config
    from ddpm.diffusion import GaussianDiffusion, make_timestep_sampler

    rows = []
    for objective in objectives():
        cfg = compose_config([f"experiment={objective.experiment}", *overrides])
        d = build_diffusion(cfg)
        note = ""
        if d.loss.name == "vlb" and d.variance.learned:
            d = GaussianDiffusion(d.schedule, d.parameterization, "fixed_large", "vlb")
            note = "bound drawn with σ² = β in place of the learned Σ"
        sampler = make_timestep_sampler(
            str(cfg.module.timestep_sampler),
            d.schedule,
            **dict(cfg.module.get("timestep_sampler_kwargs") or {}),
        )
        curves = d.effective_weighting(sampler)
        lam = curves["log_snr"].numpy()
        per = curves["effective_log_snr"].numpy()
        finite = np.isfinite(lam)
        area = -np.trapezoid(per[finite], lam[finite])  # λ decreases in t
        rows.append(RowWeighting(objective, lam, per / area, note))
    return rows


_PAPER_ROWS = ("table2_", "ext_")


def plot_weightings(rows: Sequence[RowWeighting], path: str | Path | None = None) -> Any:
    """Two panels against λ (log-scale weight): the Table 2 rows and extensions, and the
    objectives-as-weightings rows with ε + L_simple for reference. Saved to ``path`` if given.

    Returns:
        the matplotlib Figure.
    """
    import matplotlib.pyplot as plt  # the figure is returned for display (notebooks)

    fig, axes = plt.subplots(1, 2, figsize=(13, 6.8), sharey=True)
    reference = next(r for r in rows if r.objective.experiment == "table2_eps_simple")
    groups = (
        [r for r in rows if r.objective.experiment.startswith(_PAPER_ROWS)],
        [reference, *(r for r in rows if not r.objective.experiment.startswith(_PAPER_ROWS))],
    )
    titles = ("Table 2 and extensions", "Objectives as weightings")
    styles = ["-", "--", ":", "-."]
    for ax, group, title in zip(axes, groups, titles):
        for i, row in enumerate(group):
            finite = np.isfinite(row.log_snr) & (row.per_log_snr > 0)
            label = row.objective.label + (f" ({row.note})" if row.note else "")
            ax.plot(
                row.log_snr[finite],
                row.per_log_snr[finite],
                styles[i % len(styles)],
                lw=1.6,
                label=label,
            )
        ax.set_yscale("log")
        ax.set_xlabel("λ = log SNR")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False)
    axes[0].set_ylabel("weight on ‖ε − ε̂‖² per unit λ (unit area)")
    axes[0].set_ylim(1e-6, 10.0)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ddpm.objectives [--out FIGURE.png] [overrides ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m ddpm.objectives",
        description="Plot the effective weighting of every ablation row against log SNR.",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/images/objectives-weighting.png"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. schedule=cosine")
    args = parser.parse_args(argv)
    rows = row_weightings(args.overrides)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_weightings(rows, args.out)
    for row in rows:
        peak = row.log_snr[np.nanargmax(np.where(np.isfinite(row.log_snr), row.per_log_snr, 0))]
        print(f"{row.objective.experiment:30s} peak at λ = {peak:6.2f}  {row.note}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
