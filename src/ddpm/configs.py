"""Where the Hydra configs live and how a training config is composed outside a Hydra app."""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

__all__ = ["compose_config", "conf_dir", "repo_root"]


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
