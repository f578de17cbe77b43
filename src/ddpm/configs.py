"""Where the Hydra configs live and how a training config is composed outside a Hydra app."""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "compose_config",
    "conf_dir",
    "register_resolvers",
    "repo_root",
    "run_stamp",
    "slurm_job_id",
]


def slurm_job_id() -> str | None:
    """The SLURM job id of this process (``<array job>_<task>`` for an array task), or None.

    A requeued job keeps its id, so it names what a job must find again after a preemption.
    """
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def run_stamp() -> str:
    """The last component of a single run's directory (``conf/hydra/default.yaml``).

    ``slurm-<job id>`` inside a SLURM job, so that a requeued ``sbatch … python src/train.py …``
    finds its own run directory again (with ``resume=true`` it continues from ``last.ckpt``);
    otherwise the start time, ``%Y-%m-%d_%H-%M-%S``.
    """
    job = slurm_job_id()
    return f"slurm-{job}" if job else datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def register_resolvers() -> None:
    """Register the OmegaConf resolvers the configs use (``${run_stamp:}``); idempotent.

    Cached, like Hydra's ``${now:}``: every reference in one config resolves to the same value.
    """
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)


def repo_root() -> Path:
    """The repository root (the directory holding ``conf/train.yaml``).

    Raises:
        FileNotFoundError: when the package is not an editable install of the repository and the
            working directory holds no ``conf/train.yaml`` either.
    """
    for candidate in (Path(__file__).resolve().parents[2], Path.cwd(), *Path.cwd().parents):
        if (candidate / "conf" / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        "cannot find the repository's conf/train.yaml; work from the repository checkout "
        "(pip install -e . and start Python or Jupyter there)"
    )


def conf_dir() -> Path:
    """The repository's ``conf/`` directory."""
    return repo_root() / "conf"


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides``, as ``src/train.py`` would compose it.

    Compositions are cached per (config directory, overrides) for the process; each call returns
    its own copy, so callers may modify it.
    """
    return copy.deepcopy(_compose(str(conf_dir()), tuple(overrides)))


@functools.lru_cache(maxsize=64)
def _compose(directory: str, overrides: tuple[str, ...]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(directory, version_base="1.3"):
            return compose("train", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()
