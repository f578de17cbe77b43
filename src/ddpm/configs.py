"""Where the Hydra configs live and how a training config is composed outside a Hydra app."""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

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
    """The SLURM job id of this batch job (``<array job>_<task>`` for an array task), or None.

    A requeued job keeps its id, so it names what a job must find again after a preemption.
    None in an interactive allocation (job name ``bash`` or ``interactive``, Lightning's rule),
    where one job runs many unrelated commands and nothing is requeued.
    """
    if os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
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


# Flags after which Hydra composes nothing, or prints instead of running.
_NO_RUN_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion",
                 "-sc", "--version", "--resolve", "-p", "--package", "--config-path", "-cp",
                 "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun")  # fmt: skip


def preflight(config_name: str, argv: Sequence[str]) -> str | None:
    """Check a command line as Hydra will see it; return one line for the user, or None if fine.

    Composes ``conf/<config_name>.yaml`` with the command's overrides before Hydra runs, for the
    two mistakes Hydra itself reports badly:

    - a misspelt key (``trainer.max_step=5``): Hydra says "not in struct" and suggests
      ``+trainer.max_step=5``, which fails later; here the nearest valid keys are named;
    - a run directory below a file (``hydra.run.dir=<file>``, ``paths.log_dir=<file>``): Hydra
      fails with a ``FileExistsError`` / ``NotADirectoryError`` traceback before the run starts.

    Command lines with a sweep (``-m a=1,2``) or a Hydra flag (``--help``, ``--cfg``) are left to
    Hydra. Every other composition error is left to Hydra too (its messages are clear).
    """
    args = [a for a in argv if a not in ("-m", "--multirun")]
    if any(a.split("=")[0] in _NO_RUN_FLAGS for a in args):
        return None
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except HydraException:
        return None  # a syntax error: Hydra's own message says where
    if any(o.is_sweep_override() for o in overrides):
        return None
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            try:
                cfg = compose(config_name, overrides=args, return_hydra_config=True)
            except HydraException as err:
                return _misspelt_key(config_name, args, overrides, err)
    finally:
        GlobalHydra.instance().clear()
    multirun = len(args) != len(argv)
    return None if multirun else _run_dir_problem(cfg)


def _misspelt_key(config_name: str, args: list[str], overrides: list, err: Exception) -> str | None:
    import difflib
    import re

    from hydra import compose

    found = re.search(r"Could not override '([^']+)'", str(err))
    if not found:
        return None
    key = found.group(1)
    culprit = next((o for o in overrides if o.key_or_group == key), None)
    if culprit is None or culprit.is_add() or culprit.is_force_add():
        return None
    rest = [a for a, o in zip(args, overrides, strict=True) if o is not culprit]
    try:
        cfg = compose(config_name, overrides=rest, return_hydra_config=False)
    except Exception:
        return None
    # The deepest node that exists on the key's path, and the first component that does not.
    node: Any = cfg
    parts = key.split(".")
    depth = 0
    while depth < len(parts) - 1 and isinstance(node, DictConfig) and parts[depth] in node:
        node = node[parts[depth]]
        depth += 1
    parent, missing = ".".join(parts[:depth]), parts[depth]
    if not isinstance(node, DictConfig):
        return (
            f"{key} is not a setting of conf/{config_name}.yaml ({parent} is a value, not a group)"
        )
    matches = difflib.get_close_matches(missing, [str(k) for k in node.keys()], n=3, cutoff=0.6)
    listing = f"python src/{config_name}.py --cfg job" + (f" --package {parent}" if parent else "")
    if not matches:
        return f"{key} is not a setting of conf/{config_name}.yaml; `{listing}` lists the settings"
    names = " or ".join(".".join([*parts[:depth], m, *parts[depth + 1 :]]) for m in matches)
    return f"{key} is not a setting of conf/{config_name}.yaml; did you mean {names}?"


def _run_dir_problem(cfg: DictConfig) -> str | None:
    """One line when the run directory cannot be created because a path on the way is a file."""
    try:
        run_dir = Path(str(cfg.hydra.run.dir))
    except Exception:  # an interpolation only Hydra's own run can resolve: nothing to check here
        return None
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            if path.is_dir():
                return None
            return (
                f"cannot create the run directory {run_dir}: {path} is a file, not a directory; "
                "point hydra.run.dir (or paths.log_dir) at a directory"
            )
    return None
