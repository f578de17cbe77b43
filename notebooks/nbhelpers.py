"""What the notebooks in this folder need to set up, plot and find runs; not part of the package.

The notebooks import it as ``import nbhelpers as nh`` (Jupyter starts their kernel in this
folder; ``tests/test_notebooks.py`` does the same). Sweeps are read with the table builder's
reader, :func:`ddpm.ablation.find_runs` and :func:`ddpm.ablation.classify_run`.

Environment variables (all optional):

- ``DDPM_NOTEBOOK_TINY=1``: tiny mode (``+scale=tiny``: tiny UNet, T = 50, 3 training steps), so
  that a notebook runs end to end in well under a minute; the tests use it.
- ``DDPM_NOTEBOOK_WORKDIR``: where checkpoints and sweeps are looked for and written
  (``<workdir>/logs/...``); default: the repository root, i.e. the same ``logs/`` as
  ``make quickstart``. The tests point it at a temporary directory.
- ``DDPM_NOTEBOOK_DEVICE``: torch device for sampling and evaluation (default ``cpu``).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict

from ddpm import ablation
from ddpm.configs import compose_config, repo_root

ENV_TINY = "DDPM_NOTEBOOK_TINY"
ENV_WORKDIR = "DDPM_NOTEBOOK_WORKDIR"
ENV_DEVICE = "DDPM_NOTEBOOK_DEVICE"

QUICKSTART_RUN = "quickstart"
QUICKSTART_TINY_RUN = "quickstart_tiny"
# The stand-in sweep of 03_ablation.ipynb: the paper's best Table 2 row and one that learns Σ.
DEMO_SWEEP_RUNS: tuple[str, ...] = ("table2_eps_simple", "table2_mu_vlb_learned")


@dataclass(frozen=True)
class NotebookSettings:
    """What a notebook reads from the environment (see the module docstring)."""

    tiny: bool
    workdir: Path
    device: torch.device


def notebook_settings() -> NotebookSettings:
    """Read ``DDPM_NOTEBOOK_TINY``, ``DDPM_NOTEBOOK_WORKDIR`` and ``DDPM_NOTEBOOK_DEVICE``."""
    tiny = os.environ.get(ENV_TINY, "").strip().lower() in ("1", "true", "yes", "on")
    workdir = Path(os.environ.get(ENV_WORKDIR) or repo_root()).expanduser().resolve()
    device = torch.device(os.environ.get(ENV_DEVICE) or "cpu")
    return NotebookSettings(tiny=tiny, workdir=workdir, device=device)


# --------------------------------------------------------------------------- training
def train(overrides: Sequence[str], output_dir: Path, workdir: Path) -> dict[str, Any]:
    """Train ``conf/train.yaml`` + ``overrides`` into ``output_dir`` with CSV logs; the metrics.

    Writes ``.hydra/config.yaml`` as Hydra would, so that :func:`ddpm.ablation.classify_run`
    reads the run like any other; data and caches live under ``workdir``.
    """
    from ddpm.tasks.train import run

    cfg = compose_config([*overrides, "logger=csv"])  # offline: no W&B account needed
    with open_dict(cfg):
        cfg.paths.root_dir = str(workdir)
        cfg.paths.output_dir = str(output_dir.resolve())
    (output_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / ".hydra" / "config.yaml")
    return run(cfg)


def find_latest_checkpoint(workdir: str | Path, run_name: str = QUICKSTART_RUN) -> Path | None:
    """Newest ``<workdir>/logs/train/runs/<run_name>/*/checkpoints/last.ckpt`` (by mtime), or None."""
    runs = Path(workdir) / "logs" / "train" / "runs" / run_name
    found = [p for p in runs.glob("*/checkpoints/last.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def get_or_train_quickstart(
    tiny: bool = False,
    workdir: str | Path | None = None,
    retrain: bool = False,
    overrides: Sequence[str] = (),
) -> Path:
    """The newest quickstart checkpoint ``last.ckpt`` under ``workdir``; trains one if there is none.

    Args:
        tiny: the run ``quickstart_tiny`` (``+scale=tiny``, seconds on a CPU) instead of
            ``quickstart`` (``experiment=quickstart``, the run of ``make quickstart``).
        workdir: default: :func:`notebook_settings`'s work directory.
        retrain: train a new run even if a checkpoint exists.
        overrides: extra Hydra overrides for a run trained here, e.g. ``("trainer.max_steps=500",)``.
    """
    workdir = Path(workdir) if workdir is not None else notebook_settings().workdir
    run_name = QUICKSTART_TINY_RUN if tiny else QUICKSTART_RUN
    existing = None if retrain else find_latest_checkpoint(workdir, run_name)
    if existing is not None:
        return existing
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    output_dir = workdir / "logs" / "train" / "runs" / run_name / stamp
    print(f"no {run_name} checkpoint under {workdir}/logs: training one into {output_dir}")
    scale = ["+scale=tiny"] if tiny else []
    train(
        ["experiment=quickstart", f"run_name={run_name}", *scale, *overrides], output_dir, workdir
    )
    checkpoint = find_latest_checkpoint(workdir, run_name)
    if checkpoint is None:
        raise RuntimeError(f"training finished but wrote no checkpoints/last.ckpt in {output_dir}")
    return checkpoint


def make_demo_sweep(
    sweep_dir: str | Path, tiny: bool = False, workdir: str | Path | None = None
) -> Path:
    """Train :data:`DEMO_SWEEP_RUNS` into ``sweep_dir/<i>-<experiment>/``; returns ``sweep_dir``.

    A stand-in for the real CPU sweep (``make ablation-cpu``) so that 03_ablation.ipynb always
    has something to show: ``+scale=demo`` (a minute per run; ``+scale=tiny`` when ``tiny``).
    Runs that already hold a ``metrics.json`` are kept.
    """
    sweep_dir = Path(sweep_dir)
    workdir = Path(workdir) if workdir is not None else notebook_settings().workdir
    scale = "+scale=tiny" if tiny else "+scale=demo"
    for index, name in enumerate(DEMO_SWEEP_RUNS):
        output_dir = sweep_dir / f"{index}-{name}"
        if not (output_dir / "metrics.json").is_file():
            train([f"experiment={name}", f"run_name={name}", scale], output_dir, workdir)
    return sweep_dir


# --------------------------------------------------------------------------- data and plots
def heldout_digits(
    num_images: int, image_shape: Sequence[int] = (1, 8, 8), offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out (test split) digits as the model sees them.

    Args:
        num_images: how many, from index ``offset`` of the fixed 297-image test split.
        image_shape: the model's ``(C, S, S)``; images are padded with the background to ``S``.
        offset: first index.

    Returns:
        ``(images, labels)``: float32 ``[N, 1, S, S]`` in [-1, 1] and int64 ``[N]``.
    """
    from ddpm.data import load_digits_split

    u8, labels = load_digits_split("test")
    u8, labels = u8[offset : offset + num_images], labels[offset : offset + num_images]
    pad = (int(image_shape[-1]) - u8.shape[-1]) // 2
    if pad > 0:
        u8 = torch.nn.functional.pad(u8, (pad, pad, pad, pad), value=0)
    return u8.float() / 127.5 - 1.0, labels


def show_grid(
    images: torch.Tensor, nrow: int | None = None, ax: Any = None, title: str | None = None
) -> Any:
    """Draw ``[B, C, H, W]`` images in [-1, 1] as one grid (1-pixel padding); returns the Axes.

    Values outside [-1, 1] are clamped for display only. ``nrow``: images per row (default about
    √B); ``ax``: a matplotlib Axes (default: a new figure sized to the grid).
    """
    import matplotlib.pyplot as plt

    from ddpm.images import make_grid

    grid = make_grid(images.detach().float().cpu().clamp(-1.0, 1.0), nrow=nrow)
    if ax is None:
        height, width = grid.shape[:2]
        _, ax = plt.subplots(figsize=(max(2.0, width / 12), max(2.0, height / 12)))
    if grid.shape[2] == 1:
        ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax


# --------------------------------------------------------------------------- per-timestep curves
@torch.no_grad()
def per_timestep_losses(
    diffusion: Any, net: Any, x0: torch.Tensor, timesteps: Iterable[int], seed: int = 0
) -> dict[str, np.ndarray]:
    """Loss terms at fixed timesteps, averaged over the images ``x0``.

    For every ``t`` in ``timesteps`` all images get that ``t`` and noise from one generator
    seeded with ``seed`` (so curves of different runs see the same x_t).

    Args:
        diffusion: a :class:`~ddpm.diffusion.GaussianDiffusion`.
        net: the (EMA) network, ``net(x [B, C, H, W], t [B]) -> output``.
        x0: ``[B, C, H, W]`` images in [-1, 1] on the diffusion's device.
        timesteps: 0-indexed timesteps.
        seed: noise seed.

    Returns:
        float64 arrays ``[K]`` (``"t"``: int64): every term of ``diffusion.training_losses``
        (the run's own objective: ``loss`` always, ``mse`` and/or ``vlb`` in bits/dim), plus
        objective-independent ones read from the same network output: ``eps_mse``
        (‖ε − ε̂‖² per dimension, ε̂ derived from the unclipped x̂₀), ``x0_mse`` (‖x₀ − x̂₀‖² per
        dimension, x̂₀ clipped to [-1, 1] as the sampler does; unclipped it grows like 1/ᾱₜ) and
        ``bound_bpd`` (the bound's term Lₜ in bits/dim, x̂₀ clipped as the evaluation does).
    """
    steps = [int(t) for t in timesteps]
    generator = torch.Generator(device=x0.device).manual_seed(int(seed))
    dims = tuple(range(1, x0.dim()))
    rows: dict[str, list[float]] = {}

    def add(key: str, value: torch.Tensor) -> None:
        rows.setdefault(key, []).append(float(value.double().mean()))

    for t in steps:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t_batch = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
        for key, value in diffusion.training_losses(net, x0, t_batch, noise=noise).items():
            add(key, value)
        x_t = diffusion.q_sample(x0, t_batch, noise)
        output = diffusion.model_output(net, x_t, t_batch)
        pred_x0 = diffusion.p_mean_variance(output, x_t, t_batch)["pred_x0"]
        pred_eps = diffusion.pred_eps_from_x0(x_t, t_batch, pred_x0)
        add("eps_mse", (noise - pred_eps).square().mean(dim=dims))
        add("x0_mse", (x0 - pred_x0.clamp(-1.0, 1.0)).square().mean(dim=dims))
        bound = diffusion.vlb_terms_from_output(output, x0, x_t, t_batch, clip_denoised=True)
        add("bound_bpd", bound)
    result = {key: np.asarray(values, dtype=np.float64) for key, values in rows.items()}
    result["t"] = np.asarray(steps, dtype=np.int64)
    return result


@torch.no_grad()
def bound_terms_bpd(
    run: ablation.RunRecord,
    num_images: int = 32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> np.ndarray | None:
    """Per-timestep terms of the bound, mean over held-out digits, bits/dim ``[T]`` float64.

    Index ``i`` holds the paper's Lᵢ: L₀ = −log p_θ(x₀|x₁) at ``i = 0`` and
    Lᵢ = KL(q(xᵢ|xᵢ₊₁,x₀) ‖ p_θ(xᵢ|xᵢ₊₁)) for ``i ≥ 1`` (the term of the paper's timestep
    t = i + 1); the prior L_T is not included. The run's saved terms (``run.nll_terms``) when
    present, else computed from its checkpoint on ``num_images`` held-out digits (T network
    evaluations); None when the run has neither.
    """
    if run.nll_terms is not None:
        return np.asarray(np.load(run.nll_terms), dtype=np.float64).reshape(-1)
    if run.checkpoint is None:
        return None
    from ddpm.builders import load_for_inference

    diffusion, net, image_shape, _ = load_for_inference(ckpt_path=run.checkpoint, device=device)
    x0, _ = heldout_digits(num_images, image_shape)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    out = diffusion.nll_bpd(net, x0.to(device), generator=generator)
    return out["terms"].double().mean(dim=0).cpu().numpy()


def ablation_markdown(runs: Sequence[ablation.RunRecord], sweep_dir: str | Path) -> str | None:
    """Table 2 of ``runs`` as markdown, built by :mod:`ddpm.ablation` without writing files.

    Without runs, the ``ablation.md`` committed in ``sweep_dir``; None if there is none either.
    """
    if runs:
        return ablation.render_markdown(ablation.build_table(list(runs)), Path(sweep_dir))
    saved = Path(sweep_dir) / "ablation.md"
    return saved.read_text() if saved.is_file() else None
