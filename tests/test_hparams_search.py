"""Optuna search through Hydra (conf/hparams_search/, the optional ``optuna`` extra)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from conftest import CONF_DIR, ROOT, TINY  # tests/ is on sys.path under pytest
from ddpm.dashboard import sample_quality_keys

SEARCHED = {"optimizer.lr", "module.ema_decay", "module.lr_warmup_steps"}
_REASON = "the optuna extra is not installed: pip install -e '.[optuna]'"


def _search_override(name: str = "quickstart_optuna") -> str:
    """``hparams_search=<name>`` as documented, once conf/train.yaml declares the group.

    Until its defaults list has ``- hparams_search: null`` Hydra only takes the group appended
    (``+hparams_search=...``), and once it has, it refuses the appended form;
    :func:`test_train_config_declares_the_hparams_search_group` checks the declaration.
    """
    defaults = OmegaConf.load(CONF_DIR / "train.yaml").defaults
    declared = any(isinstance(d, DictConfig) and "hparams_search" in d for d in defaults)
    return f"{'' if declared else '+'}hparams_search={name}"


@pytest.fixture
def optuna_sweeper():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason=_REASON)
    return pytest.importorskip("optuna", reason=_REASON)


def test_train_config_declares_the_hparams_search_group():
    # `python src/train.py -m experiment=quickstart hparams_search=quickstart_optuna` (the
    # documented usage) needs the group in train.yaml's defaults, after experiment so that the
    # search's optimized_metric wins over the experiment's.
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "train.yaml").defaults)
    assert {"hparams_search": None} in defaults, "add `- hparams_search: null` to conf/train.yaml"
    names = [next(iter(d)) if isinstance(d, dict) else d for d in defaults]
    assert names.index("hparams_search") > names.index("experiment")


def test_quickstart_optuna_composes_a_search_of_the_quickstart(optuna_sweeper):
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose(
                "train",
                overrides=["experiment=quickstart", _search_override()],
                return_hydra_config=True,
            )
    finally:
        GlobalHydra.instance().clear()
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("optuna_sweeper.OptunaSweeper")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.direction == "minimize" and sweeper.n_trials == 20
    # The objective is the metric the quickstart's end-of-training evaluation computes.
    assert cfg.optimized_metric == "fd_digits_1k_dpmpp15"
    assert sample_quality_keys(cfg)["fd"] == [cfg.optimized_metric]
    assert cfg.task_name == "quickstart_optuna"  # its log directory and W&B group

    assert set(sweeper.params) == SEARCHED
    for key in SEARCHED:  # every searched key is a real config key
        assert OmegaConf.select(cfg, key, default=None) is not None, key
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    assert not fixed and set(space) == SEARCHED
    lr, ema, warmup = (
        space[k] for k in ("optimizer.lr", "module.ema_decay", "module.lr_warmup_steps")
    )
    assert isinstance(lr, optuna_sweeper.distributions.LogUniformDistribution)
    assert isinstance(ema, optuna_sweeper.distributions.CategoricalDistribution)
    assert isinstance(warmup, optuna_sweeper.distributions.IntUniformDistribution)
    # The quickstart's own values lie inside the search space.
    assert lr.low <= cfg.optimizer.lr <= lr.high
    assert cfg.module.ema_decay in ema.choices
    assert warmup.low <= cfg.module.lr_warmup_steps <= warmup.high


def test_two_optuna_trials_of_a_tiny_model_end_to_end(optuna_sweeper, tmp_path):
    sweep_dir = tmp_path / "sweep"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # The tiny scale with its end-of-training sample-quality evaluation on (8 samples: the
    # metric is fd_digits_8_dpmpp2); the search's warm-up overrides the scale's.
    tiny = [*TINY, "callbacks.sample_quality.on_train_end=true"]
    command = [
        sys.executable,
        "src/train.py",
        "-m",
        "experiment=quickstart",
        _search_override(),
        *tiny,
        "optimized_metric=fd_digits_8_dpmpp2",
        f"paths.root_dir={tmp_path}",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={storage}",  # to read every trial back, not only the best
        "hydra.sweeper.study_name=tiny",
    ]
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "DDPM_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "HYDRA_FULL_ERROR": "1",
    }
    proc = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=840, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    study = optuna_sweeper.load_study(study_name="tiny", storage=storage)
    trials = study.trials
    assert len(trials) == 2
    assert all(t.state == optuna_sweeper.trial.TrialState.COMPLETE for t in trials)
    assert all(math.isfinite(t.value) and t.value >= 0 for t in trials)
    assert trials[0].params != trials[1].params
    for trial in trials:
        assert set(trial.params) == SEARCHED
        (job_dir,) = sweep_dir.glob(f"{trial.number}-*")  # <hydra.job.num>-<run_name>
        metrics = OmegaConf.load(job_dir / "metrics.json")
        assert metrics.optimized_metric == "fd_digits_8_dpmpp2"
        assert trial.value == pytest.approx(metrics.fd_digits_8_dpmpp2, rel=1e-12)
        job_cfg = OmegaConf.load(job_dir / ".hydra" / "config.yaml")  # the trial's parameters
        for key, value in trial.params.items():  # were the ones the job trained with
            assert OmegaConf.select(job_cfg, key) == pytest.approx(value), key

    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert results.name == "optuna"
    assert results.best_value == pytest.approx(min(t.value for t in trials))
    assert dict(results.best_params) == study.best_trial.params
