"""Run discovery: the run directories of a sweep, what each trained, and whether it finished stably."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "EVALUATIONS_DIR",
    "NOISE_DIR",
    "ObjectiveKey",
    "RunRecord",
    "classify_run",
    "find_runs",
    "objective_variant",
]

#: Sub-directory of a run holding its re-evaluations, one per sampler (``python -m ddpm.sweep_eval``).
EVALUATIONS_DIR = "evaluations"
#: Sub-directory of a run holding its re-evaluations under other evaluation seeds
#: (``python -m ddpm.ablation.noise``).
NOISE_DIR = "noise"
_NOT_RUNS = {
    "wandb", "checkpoints", "samples", "nll", "csv", "tensorboard", EVALUATIONS_DIR, NOISE_DIR,
}  # fmt: skip
_SAMPLE_QUALITY_PREFIXES = ("fid_", "fd_digits_", "is_")

#: (parameterisation, variance, loss, weighting, variant): what makes two runs the same objective;
#: the variant names a non-uniform timestep density and zero terminal SNR (:func:`objective_variant`).
ObjectiveKey = tuple[str, str, str, str, str]


def objective_variant(cfg: DictConfig | None) -> str:
    """What besides the four groups sets a run's objective: ``continuous`` time (and
    ``learned_schedule``, VDM's γ_η, which trains with the objective), ``t~<sampler>`` for a
    timestep sampler other than uniform and ``zero_terminal_snr``, joined by ``+`` (``""`` for
    none of them)."""
    parts = []
    learned = _select(cfg, "schedule.name") == "learned"
    if _select(cfg, "time.name") == "continuous" or learned:
        parts.append("continuous")
    if learned:
        parts.append("learned_schedule")
    sampler = _select(cfg, "module.timestep_sampler")
    if sampler not in (None, "uniform"):
        parts.append(f"t~{sampler}")
    if _select(cfg, "schedule.zero_terminal_snr"):
        parts.append("zero_terminal_snr")
    return "+".join(parts)


@dataclass
class RunRecord:
    """One run directory of a sweep.

    ``status`` is ``"ok"``, ``"unstable"`` (diverged, non-finite, or, once :func:`build_table`
    compares it with the data-Gaussian baseline, a worse Fréchet distance: a "–"), or ``"crashed"`` (no ``metrics.json``: the job died, or is still running);
    ``reason`` says why it is not ``"ok"``. ``evaluations`` holds the sample-quality metrics of
    its re-evaluations under other samplers (``<run>/evaluations/*/metrics.json``).
    """

    path: Path
    parameterization: str | None
    variance: str | None
    loss: str | None
    schedule: str | None
    seed: int | None
    metrics: dict[str, Any] | None
    config: DictConfig | None
    status: str = "ok"
    reason: str = ""
    evaluations: dict[str, float] = field(default_factory=dict)
    weighting: str = "none"
    variant: str = ""

    @property
    def objective_key(self) -> ObjectiveKey | None:
        if None in (self.parameterization, self.variance, self.loss):
            return None
        return (self.parameterization, self.variance, self.loss, self.weighting, self.variant)  # type: ignore[return-value]

    @property
    def checkpoint(self) -> Path | None:
        """The run's ``checkpoints/last.ckpt``, or None (committed results keep no checkpoints)."""
        path = self.path / "checkpoints" / "last.ckpt"
        return path if path.is_file() else None

    @property
    def nll_terms(self) -> Path | None:
        """The saved per-timestep bound terms (``.npy``, float ``[T]``, bits/dim), or None.

        ``nll_terms_npy`` of ``metrics.json`` names the file where the run wrote it; a run copied
        elsewhere (committed results) has it under ``<run>/nll/`` only, newest step last.
        """
        saved = (self.metrics or {}).get("nll_terms_npy")
        if isinstance(saved, str) and saved:
            for candidate in (Path(saved), self.path / "nll" / Path(saved).name):
                if candidate.is_file():
                    return candidate
        found = sorted((self.path / "nll").glob("terms_step*.npy"))
        return found[-1] if found else None


def _is_run_dir(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / ".hydra" / "config.yaml").is_file()


def find_runs(sweep_dir: str | Path) -> list[Path]:
    """Every run directory below ``sweep_dir`` (itself included), sorted; hidden and W&B dirs skipped.

    A run directory holds ``metrics.json`` or ``.hydra/config.yaml``; the search does not descend
    into a run directory (checkpoints, W&B files).
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {str(root)!r} does not exist")
    runs: list[Path] = []
    seen: set[str] = set()  # symlinked directories are followed, each real directory once
    for current, dirs, _files in os.walk(root, followlinks=True):
        path = Path(current)
        real = os.path.realpath(path)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        if _is_run_dir(path):
            runs.append(path)
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _NOT_RUNS)
    return sorted(runs)


def _select(cfg: DictConfig | None, key: str) -> Any:
    if cfg is None:
        return None
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    except Exception:  # an interpolation that needs a running Hydra app
        return None


def _load_config(path: Path) -> DictConfig | None:
    file = path / ".hydra" / "config.yaml"
    if not file.is_file():
        return None
    try:
        cfg = OmegaConf.load(file)
    except Exception:  # a truncated file of a killed job
        return None
    return cfg if isinstance(cfg, DictConfig) else None


def _load_metrics(path: Path) -> tuple[dict[str, Any] | None, str]:
    file = path / "metrics.json"
    if not file.is_file():
        return None, "no metrics.json (crashed, killed or still running)"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        return None, f"unreadable metrics.json ({err})"
    if not isinstance(data, dict):
        return None, "metrics.json is not a JSON object"
    return data, ""


def classify_run(path: str | Path) -> RunRecord:
    """Read one run directory: its objective, schedule, seed, metrics and stability status.

    The objective comes from ``metrics.json`` (``diffusion`` = ``"<param>-<variance>-<loss>"``,
    what actually ran) or, for a crashed run, from ``.hydra/config.yaml``.
    """
    path = Path(path)
    cfg = _load_config(path)
    metrics, problem = _load_metrics(path)
    parts: list[str | None] = [None, None, None]
    if metrics and isinstance(metrics.get("diffusion"), str):
        split = metrics["diffusion"].split("-")
        if len(split) == 3:
            parts = list(split)
    for i, group in enumerate(("parameterization", "variance", "loss")):
        if parts[i] is None:
            parts[i] = _select(cfg, f"{group}.name")
    weighting = (metrics or {}).get("weighting") or _select(cfg, "weighting.name") or "none"
    schedule = (metrics or {}).get("schedule") or _select(cfg, "schedule.name")
    seed = (metrics or {}).get("seed")
    if seed is None:
        seed = _select(cfg, "seed")
    record = RunRecord(
        path=path,
        parameterization=parts[0],
        variance=parts[1],
        loss=parts[2],
        schedule=str(schedule) if schedule is not None else None,
        seed=int(seed) if isinstance(seed, (int, float)) else None,
        metrics=metrics,
        config=cfg,
        weighting=str(weighting),
        variant=objective_variant(cfg),
    )
    if metrics is None:
        record.status, record.reason = "crashed", problem
        return record
    record.evaluations = _load_evaluations(path)
    reason = _instability(metrics)
    if reason:
        record.status, record.reason = "unstable", reason
    return record


def _load_evaluations(path: Path) -> dict[str, float]:
    """Sample-quality metrics of ``<run>/evaluations/*/metrics.json`` (unreadable files skipped)."""
    found: dict[str, float] = {}
    for file in sorted((path / EVALUATIONS_DIR).glob("*/metrics.json")):
        data, _ = _load_metrics(file.parent)
        for key, value in (data or {}).items():
            if key.startswith(_SAMPLE_QUALITY_PREFIXES) and _finite(value):
                found.setdefault(key, float(value))
    return found


def _instability(metrics: Mapping[str, Any]) -> str:
    """Why a finished run counts as unstable from its training and finiteness, or ``""``
    (the comparison with the data-Gaussian baseline is :func:`build_table`'s)."""
    if metrics.get("diverged"):
        step = metrics.get("diverged_at_step")
        return "diverged (non-finite loss" + (f" at step {step})" if step is not None else ")")
    if metrics.get("samples_finite") is False:
        return "non-finite samples"
    for key, value in metrics.items():
        if key.startswith("nonfinite_frac") and _finite(value) and value > 0:
            return f"non-finite samples ({value:.1%} in {key})"
    for key in ("nll_bpd", "nll_bpd_unclipped"):
        nll = metrics.get(key)
        if isinstance(nll, (int, float)) and not isinstance(nll, bool) and not math.isfinite(nll):
            return f"non-finite bound ({key})"
    return ""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
