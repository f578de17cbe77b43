"""Helpers shared by the notebooks in ``notebooks/``: settings, checkpoints, digits, plots, sweeps.

The notebooks stay short and readable; everything they would otherwise repeat lives here.

Environment variables (all optional):

- ``DDPM_NOTEBOOK_TINY=1``: tiny mode (tiny UNet, T = 50, a few dozen training steps) so that a
  notebook runs end to end in well under a minute; ``tests/test_notebooks.py`` uses it.
- ``DDPM_NOTEBOOK_WORKDIR``: where checkpoints and sweeps are looked for and written
  (``<workdir>/logs/...``); default: the repository root, i.e. the same ``logs/`` as
  ``make quickstart``. Tests point it at a temporary directory so nothing is written to the repo.
- ``DDPM_NOTEBOOK_DEVICE``: torch device for sampling and evaluation (default ``cpu``).

The quickstart checkpoint is ``<workdir>/logs/train/runs/quickstart/<time>/checkpoints/last.ckpt``
(``quickstart_tiny`` in tiny mode). If none exists, :func:`get_or_train_quickstart` trains one with
``experiment=quickstart logger=csv`` through :func:`ddpm.tasks.train.run`, offline.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm.configs import compose_config, repo_root

__all__ = [
    "DEMO_SWEEP_RUNS",
    "ENV_DEVICE",
    "ENV_TINY",
    "ENV_WORKDIR",
    "TINY_OVERRIDES",
    "NotebookSettings",
    "SweepRun",
    "ablation_markdown",
    "bound_terms_bpd",
    "compose_train_config",
    "find_latest_checkpoint",
    "get_or_train_quickstart",
    "heldout_digits",
    "load_sweep",
    "make_demo_sweep",
    "notebook_settings",
    "per_timestep_losses",
    "repo_root",
    "show_grid",
    "train_run",
]

ENV_TINY = "DDPM_NOTEBOOK_TINY"
ENV_WORKDIR = "DDPM_NOTEBOOK_WORKDIR"
ENV_DEVICE = "DDPM_NOTEBOOK_DEVICE"

QUICKSTART_RUN = "quickstart"
QUICKSTART_TINY_RUN = "quickstart_tiny"

# Overrides (on top of any experiment) for a tiny, offline, seconds-long CPU run. Callback settings
# that depend on which callbacks the config has are applied in `_shrink_for_tiny` instead, so a
# config without a given callback still composes.
TINY_OVERRIDES: tuple[str, ...] = (
    "model=tiny",
    "schedule.num_timesteps=50",
    "data.batch_size=32",
    "data.train_repeats=1",
    "trainer.max_steps=40",
    "trainer.log_every_n_steps=10",
    "trainer.val_check_interval=20",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.model_checkpoint.every_n_train_steps=20",
    "module.lr_warmup_steps=5",
    "module.ema_decay=0.9",
)

# The fallback sweep of 03_ablation.ipynb: the paper's best Table 2 row and one that learns Σ.
DEMO_SWEEP_RUNS: tuple[str, ...] = ("table2_eps_simple", "table2_mu_vlb_learned")

_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class NotebookSettings:
    """What a notebook reads from the environment (see the module docstring)."""

    tiny: bool
    workdir: Path
    device: torch.device


def notebook_settings() -> NotebookSettings:
    """Read ``DDPM_NOTEBOOK_TINY``, ``DDPM_NOTEBOOK_WORKDIR`` and ``DDPM_NOTEBOOK_DEVICE``."""
    tiny = os.environ.get(ENV_TINY, "").strip().lower() in _TRUE
    workdir = Path(os.environ.get(ENV_WORKDIR) or repo_root()).expanduser().resolve()
    device = torch.device(os.environ.get(ENV_DEVICE) or "cpu")
    return NotebookSettings(tiny=tiny, workdir=workdir, device=device)


# --------------------------------------------------------------------------- configs and training
def _shrink_for_tiny(cfg: DictConfig) -> None:
    """Make every evaluation callback of ``cfg`` tiny (or remove it); in place."""
    with open_dict(cfg):
        callbacks = cfg.get("callbacks") or {}
        if "sample_quality" in callbacks:
            del cfg.callbacks["sample_quality"]  # needs a feature extractor; not a smoke test
        if callbacks.get("sample_grid"):
            cfg.callbacks.sample_grid.every_n_steps = 0
            cfg.callbacks.sample_grid.num_samples = 4
            cfg.callbacks.sample_grid.sampler = "ancestral"
            cfg.callbacks.sample_grid.steps = None  # all T steps (a strided count may exceed T)
            cfg.callbacks.sample_grid.eta = None
        if callbacks.get("nll"):
            cfg.callbacks.nll.num_images = 8
            cfg.callbacks.nll.batch_size = 8
            cfg.callbacks.nll.progress = False
        final = cfg.get("final_eval") or {}
        for key in ("nll_num_images", "range_check_samples"):
            if key in final:
                cfg.final_eval[key] = 0


def compose_train_config(
    overrides: Sequence[str] = (),
    *,
    tiny: bool = False,
    output_dir: str | Path,
    workdir: str | Path | None = None,
) -> DictConfig:
    """Compose ``conf/train.yaml`` with ``overrides`` for a run written to ``output_dir``.

    Args:
        overrides: Hydra overrides, e.g. ``("experiment=quickstart",)``.
        tiny: add :data:`TINY_OVERRIDES` (after ``overrides``) and shrink evaluation callbacks.
        output_dir: the run directory (checkpoints, metrics.json, csv logs).
        workdir: ``paths.root_dir`` (data, cache and log directories); default: the notebook
            work directory.

    The logger is always ``csv`` (offline, no W&B account needed).
    """
    workdir = Path(workdir) if workdir is not None else notebook_settings().workdir
    cfg = compose_config([*overrides, "logger=csv", *(TINY_OVERRIDES if tiny else ())])
    with open_dict(cfg):
        cfg.paths.root_dir = str(workdir)
        cfg.paths.output_dir = str(Path(output_dir).resolve())
        if cfg.trainer.get("enable_progress_bar", True) and "progress_bar" not in cfg.callbacks:
            # Lightning picks RichProgressBar when rich is installed; inside a Jupyter kernel it
            # redirects stderr so that any tqdm bar (NLL, sample quality) recurses until it fails.
            cfg.callbacks.progress_bar = {
                "_target_": "lightning.pytorch.callbacks.TQDMProgressBar",
                "refresh_rate": int(cfg.trainer.get("log_every_n_steps") or 50),
            }
    if tiny:
        _shrink_for_tiny(cfg)
    return cfg


def train_run(cfg: DictConfig) -> dict[str, Any]:
    """Run :func:`ddpm.tasks.train.run` and save the config as Hydra would (``.hydra/config.yaml``).

    Returns the metrics dict (also in ``<output_dir>/metrics.json``).
    """
    from ddpm.tasks.train import run as train

    output_dir = Path(cfg.paths.output_dir)
    (output_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / ".hydra" / "config.yaml")
    return train(cfg)


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
    """The newest quickstart checkpoint under ``workdir``; train one first if there is none.

    Args:
        tiny: use (or train) the tiny variant ``quickstart_tiny`` (tiny UNet, T = 50, 40 steps,
            seconds on a CPU) instead of ``experiment=quickstart`` (the same run as
            ``make quickstart``).
        workdir: default: :func:`notebook_settings`'s work directory.
        retrain: train a new run even if a checkpoint exists.
        overrides: extra Hydra overrides for a run trained here (e.g. ``("trainer.max_steps=500",)``).

    Returns:
        Path of ``last.ckpt``.
    """
    workdir = Path(workdir) if workdir is not None else notebook_settings().workdir
    run_name = QUICKSTART_TINY_RUN if tiny else QUICKSTART_RUN
    existing = None if retrain else find_latest_checkpoint(workdir, run_name)
    if existing is not None:
        return existing
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    output_dir = workdir / "logs" / "train" / "runs" / run_name / stamp
    all_overrides = ["experiment=quickstart", f"run_name={run_name}", *overrides]
    print(f"no {run_name} checkpoint under {workdir}/logs: training one into {output_dir}")
    cfg = compose_train_config(all_overrides, tiny=tiny, output_dir=output_dir, workdir=workdir)
    train_run(cfg)
    checkpoint = find_latest_checkpoint(workdir, run_name)
    if checkpoint is None:
        raise RuntimeError(f"training finished but wrote no checkpoints/last.ckpt in {output_dir}")
    return checkpoint


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
    images: torch.Tensor,
    nrow: int | None = None,
    ax: Any = None,
    title: str | None = None,
) -> Any:
    """Draw ``[B, C, H, W]`` images in [-1, 1] as one grid (clamped, uint8-rounded); returns ax.

    Args:
        images: the images; values outside [-1, 1] are clamped for display only.
        nrow: images per row (default: about √B).
        ax: a matplotlib Axes (default: a new figure sized to the grid).
        title: axes title.
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
    diffusion: Any,
    net: torch.nn.Module,
    x0: torch.Tensor,
    timesteps: Iterable[int],
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Loss terms at fixed timesteps, averaged over the images ``x0``.

    For every ``t`` in ``timesteps`` all images get that ``t`` and noise from one generator
    seeded with ``seed`` (so curves of different runs see the same x_t).

    Args:
        diffusion: a :class:`~ddpm.diffusion.GaussianDiffusion`.
        net: the (EMA) network.
        x0: ``[B, C, H, W]`` images in [-1, 1] on the diffusion's device.
        timesteps: 0-indexed timesteps.
        seed: noise seed.

    Returns:
        float64 arrays ``[K]`` (``"t"``: int64): every term of ``diffusion.training_losses``
        (the run's own objective: ``loss`` always, ``mse`` and/or ``vlb`` in bits/dim), plus
        objective-independent ones read from the same network output: ``eps_mse``
        (‖ε − ε̂‖² per dimension, ε̂ derived from the unclipped x̂₀), ``x0_mse`` (‖x₀ − x̂₀‖² per
        dimension, x̂₀ clipped to [-1, 1] as the sampler does; unclipped it grows like 1/ᾱₜ) and
        ``bound_bpd`` (the bound's term Lₜ in bits/dim).
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
        add("bound_bpd", diffusion.vlb_terms_from_output(output, x0, x_t, t_batch))
    result = {key: np.asarray(values, dtype=np.float64) for key, values in rows.items()}
    result["t"] = np.asarray(steps, dtype=np.int64)
    return result


# --------------------------------------------------------------------------- sweeps
@dataclass
class SweepRun:
    """One run of an ablation sweep directory (as found by :func:`ddpm.ablation.find_runs`).

    Attributes:
        name: the run's name (``run_name`` of its metrics, else its directory name).
        run_dir: the run directory.
        metrics: the contents of ``metrics.json`` (empty for a crashed run).
        config: ``.hydra/config.yaml`` as a plain dict (empty if absent).
        checkpoint: ``checkpoints/last.ckpt`` if present.
        nll_terms: a saved ``[T]`` array of per-timestep bound terms (bits/dim) if present.
    """

    name: str
    run_dir: Path
    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    nll_terms: Path | None = None

    @property
    def objective(self) -> str:
        """``parameterization-variance-loss`` as in the metrics (or the config)."""
        if self.metrics.get("diffusion"):
            return str(self.metrics["diffusion"])
        parts = [
            str((self.config.get(group) or {}).get("name", "?"))
            for group in ("parameterization", "variance", "loss")
        ]
        return "-".join(parts)


def _nll_terms_path(run_dir: Path, metrics: dict[str, Any]) -> Path | None:
    saved = metrics.get("nll_terms_npy")
    if saved:
        for candidate in (Path(saved), run_dir / "nll" / Path(saved).name):
            if candidate.is_file():
                return candidate
    found = sorted((run_dir / "nll").glob("terms_step*.npy"))
    return found[-1] if found else None


def load_sweep(sweep_dir: str | Path) -> list[SweepRun]:
    """Every run below ``sweep_dir`` (the same runs as the table builder :mod:`ddpm.ablation`).

    Raises:
        FileNotFoundError: if ``sweep_dir`` does not exist.
    """
    from ddpm.ablation import find_runs

    runs = []
    for run_dir in find_runs(sweep_dir):
        metrics_path = run_dir / "metrics.json"
        try:
            metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        except ValueError:  # a truncated file of a killed job
            metrics = {}
        config_path = run_dir / ".hydra" / "config.yaml"
        config = (
            OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
            if config_path.is_file()
            else {}
        )
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        runs.append(
            SweepRun(
                name=str(metrics.get("run_name") or run_dir.name),
                run_dir=run_dir,
                metrics=metrics if isinstance(metrics, dict) else {},
                config=config if isinstance(config, dict) else {},
                checkpoint=checkpoint if checkpoint.is_file() else None,
                nll_terms=_nll_terms_path(run_dir, metrics if isinstance(metrics, dict) else {}),
            )
        )
    return runs


def ablation_markdown(sweep_dir: str | Path) -> str | None:
    """Table 2 of the sweep as markdown, built by :mod:`ddpm.ablation` without writing files.

    Falls back to a committed ``ablation.md`` when the directory has no runs; None if neither.
    """
    from ddpm import ablation

    sweep_dir = Path(sweep_dir)
    records = [ablation.classify_run(path) for path in ablation.find_runs(sweep_dir)]
    if records:
        return ablation.render_markdown(ablation.build_table(records), sweep_dir)
    saved = sweep_dir / "ablation.md"
    return saved.read_text() if saved.is_file() else None


def make_demo_sweep(
    sweep_dir: str | Path,
    tiny: bool = False,
    max_steps: int = 400,
    num_timesteps: int = 200,
    workdir: str | Path | None = None,
) -> Path:
    """Train the experiments :data:`DEMO_SWEEP_RUNS` into ``sweep_dir/<i>-<name>/`` (if missing).

    A small stand-in for the real CPU sweep (``make ablation-cpu``, ``+scale=cpu``) so that 03_ablation.ipynb always has
    something to show. Each run writes ``metrics.json``, ``.hydra/config.yaml``,
    ``checkpoints/last.ckpt`` and (with the NLL callback) ``nll/terms_step*.npy``; runs that
    already have a ``metrics.json`` are kept.

    Args:
        sweep_dir: where the runs go.
        tiny: the tiny configuration (:data:`TINY_OVERRIDES`; seconds per run).
        max_steps: training steps when not tiny (the tiny UNet on digits, batch 64).
        num_timesteps: T when not tiny.
        workdir: ``paths.root_dir`` of the runs (default: the notebook work directory).

    Returns:
        ``sweep_dir``.
    """
    sweep_dir = Path(sweep_dir)
    base = ["data=digits", "trainer=cpu"]
    if not tiny:
        base += [
            "model=tiny",
            f"schedule.num_timesteps={int(num_timesteps)}",
            "data.batch_size=64",
            f"trainer.max_steps={int(max_steps)}",
            f"trainer.log_every_n_steps={max(1, int(max_steps) // 20)}",
            f"trainer.val_check_interval={int(max_steps)}",
            "trainer.limit_val_batches=1",
            "trainer.enable_model_summary=false",
            f"callbacks.model_checkpoint.every_n_train_steps={int(max_steps)}",
            "module.lr_warmup_steps=50",
            "module.ema_decay=0.99",
            "optimizer.lr=1e-3",
        ]
    for index, name in enumerate(DEMO_SWEEP_RUNS):
        output_dir = sweep_dir / f"{index}-{name}"
        if (output_dir / "metrics.json").is_file():
            continue
        cfg = compose_train_config(
            [*base, f"experiment={name}", f"run_name={name}"],
            tiny=tiny,
            output_dir=output_dir,
            workdir=workdir,
        )
        if not tiny:
            _shrink_demo_callbacks(cfg)
        train_run(cfg)
    return sweep_dir


def _shrink_demo_callbacks(cfg: DictConfig) -> None:
    """The demo sweep's evaluation: bits/dim on 64 held-out digits, no sample-quality metric."""
    with open_dict(cfg):
        callbacks = cfg.get("callbacks") or {}
        if "sample_quality" in callbacks:
            del cfg.callbacks["sample_quality"]
        if callbacks.get("sample_grid"):
            cfg.callbacks.sample_grid.every_n_steps = 0
            cfg.callbacks.sample_grid.sampler = "ancestral"
            cfg.callbacks.sample_grid.steps = None
            cfg.callbacks.sample_grid.eta = None
        if callbacks.get("nll"):
            cfg.callbacks.nll.num_images = 64
            cfg.callbacks.nll.batch_size = 64
            cfg.callbacks.nll.progress = False


@torch.no_grad()
def bound_terms_bpd(
    run: SweepRun,
    num_images: int = 32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> np.ndarray | None:
    """Per-timestep terms of the bound, mean over held-out digits, bits/dim ``[T]`` float64.

    Index ``i`` holds the paper's Lᵢ: L₀ = −log p_θ(x₀|x₁) at ``i = 0`` and
    Lᵢ = KL(q(xᵢ|xᵢ₊₁,x₀) ‖ p_θ(xᵢ|xᵢ₊₁)) for ``i ≥ 1`` (paper indices; the term of the paper's
    timestep t = i + 1). The prior L_T is not included. Uses the run's saved ``nll/terms_step*.npy`` when present; else
    computes them from its checkpoint on ``num_images`` held-out digits (``T`` network
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
