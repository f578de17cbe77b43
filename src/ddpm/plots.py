"""A run's results as pictures in its own directory, no W&B needed.

``plot_run(run_dir)`` reads what the run left there, Lightning's ``CSVLogger`` files
(``csv/version_*/metrics.csv``; a resumed run adds a version) and the bound's per-timestep terms
(``nll/terms_step*.npy``), and draws them with matplotlib into ``<run_dir>/plots/``:

- ``training.png``: the training loss, overall and per quartile of t (log scale), and the
  learning rate, against the optimiser step;
- ``sample_quality.png``: every sample-quality metric (``fd_*``, ``fid_*``, ``is_*``) against the
  step, when the run computed one;
- ``bound_terms.png``: the newest per-timestep terms Lₜ of the bound (bits/dim, log scale) and
  their cumulative share of the total.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = ["logged_curves", "plot_run"]

_QUALITY_PREFIXES = ("fd_", "fid_", "is_")


def logged_curves(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from every ``csv/version_*/metrics.csv`` of the run,
    in version order (a resumed run continues the curve), finite values only."""
    curves: dict[str, list[tuple[int, float]]] = {}
    files = sorted(
        Path(run_dir).glob("csv/version_*/metrics.csv"),
        key=lambda p: int(p.parent.name.split("_")[-1]),
    )
    for file in files:
        with file.open(newline="") as handle:
            for row in csv.DictReader(handle):
                step = row.get("step")
                if not step:
                    continue
                for key, text in row.items():
                    if key in ("step", "epoch") or not text:
                        continue
                    value = float(text)
                    if math.isfinite(value):
                        curves.setdefault(key, []).append((int(float(step)), value))
    return curves


def _plot(ax, curves: dict[str, list[tuple[int, float]]], keys: Iterable[str]) -> bool:
    drawn = False
    for key in keys:
        points = curves.get(key)
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=key, marker="o" if len(points) < 20 else None)
            drawn = True
    if drawn:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_xlabel("step")
    return drawn


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw the run's curves and bound terms into ``<run_dir>/plots/``; returns the files written
    (none when the run logged nothing to CSV and saved no bound terms)."""
    # Figures built without pyplot: no global backend is touched, so a notebook that trains a
    # run keeps showing its own figures inline.
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    out = run_dir / "plots"
    written: list[Path] = []
    curves = logged_curves(run_dir)

    def save(fig, name: str) -> None:
        out.mkdir(exist_ok=True)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        written.append(out / name)

    losses = ["train/loss", *(f"train/loss_q{q}" for q in range(4)), "val/loss"]
    lrs = sorted(k for k in curves if k.startswith("lr-"))
    if any(k in curves for k in losses):
        fig = Figure(figsize=(11, 4))
        axes = fig.subplots(1, 2)
        _plot(axes[0], curves, losses)
        axes[0].set_yscale("log")
        axes[0].set_title("loss (q0–q3: quartiles of t, q0 nearest the data)")
        if not _plot(axes[1], curves, lrs):
            axes[1].set_visible(False)
        axes[1].set_title("learning rate")
        save(fig, "training.png")

    quality = sorted(k for k in curves if k.startswith(_QUALITY_PREFIXES) and "_std" not in k)
    if quality:
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        _plot(ax, curves, quality)
        ax.set_title("sample quality (lower is better for fd/fid)")
        save(fig, "sample_quality.png")

    terms_files = sorted((run_dir / "nll").glob("terms_step*.npy"))
    if terms_files:
        terms = np.load(terms_files[-1])
        t = np.arange(1, terms.size + 1)  # the paper's t: index 0 is t = 1 (the decoder)
        fig = Figure(figsize=(11, 4))
        axes = fig.subplots(1, 2)
        axes[0].semilogy(t, np.maximum(terms, 1e-12))
        axes[0].set_xlabel("t")
        axes[0].set_ylabel("Lₜ (bits/dim)")
        axes[0].set_title(f"bound terms ({terms_files[-1].stem})")
        axes[1].plot(t, np.cumsum(terms) / terms.sum())
        axes[1].set_xlabel("t")
        axes[1].set_ylabel("cumulative share of Σ Lₜ")
        for ax in axes:
            ax.grid(alpha=0.3)
        save(fig, "bound_terms.png")
    return written
