"""Evaluation sized by the data and scale: one end-of-training evaluation per metric, the same
sizes in src/eval.py, and a sweep objective that names a metric the run really computed."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import TINY  # tests/ is on sys.path under pytest
from ddpm.callbacks import NLLCallback, SampleQualityCallback
from ddpm.errors import ConfigError
from ddpm.tasks.evaluate import _evaluation_sizes
from ddpm.tasks.train import objective_value
from ddpm.tasks.train import run as train


def _end_of_training(cfg) -> tuple[list[SampleQualityCallback], list[NLLCallback]]:
    callbacks = [instantiate(node) for node in cfg.callbacks.values() if node]
    quality = [c for c in callbacks if isinstance(c, SampleQualityCallback) and c.run_on_train_end]
    nll = [c for c in callbacks if isinstance(c, NLLCallback) and c.run_on_train_end]
    return quality, nll


@pytest.mark.parametrize(
    "overrides,num_samples,steps,nll_images",
    [
        (["data=digits"], 1000, 15, 100),  # sized for digits, not the 10k CIFAR-10 default
        (["data=digits", "+scale=cpu"], 5000, 15, 100),  # the CPU study: one sampler and N
        (["data=cifar10"], 10_000, 100, 1000),
        (["data=cifar10", "+scale=paper"], 50_000, None, 10_000),
    ],
)
def test_one_end_of_training_evaluation_per_metric_sized_by_data_and_scale(
    compose_cfg, overrides, num_samples, steps, nll_images
):
    cfg = compose_cfg(*overrides, tiny=False)
    quality, nll = _end_of_training(cfg)
    assert len(quality) == 1 and len(nll) == 1
    assert quality[0].num_samples == num_samples and quality[0].sampler.steps == steps
    assert nll[0].num_images == nll_images


def test_periodic_evaluation_leaves_the_last_step_to_the_final_one(monkeypatch):
    periodic = SampleQualityCallback(num_samples=10, every_n_steps=5, on_train_end=False)
    final = SampleQualityCallback(num_samples=10, on_train_end=True)
    calls = []
    monkeypatch.setattr(
        periodic, "evaluate", lambda trainer, module: calls.append(trainer.global_step)
    )
    trainer = SimpleNamespace(max_steps=10, callbacks=[periodic, final], global_step=0)
    for step in range(1, 11):
        trainer.global_step = step
        periodic.on_train_batch_end(trainer, None, None, None, 0)
    assert calls == [5]  # step 10 is the final evaluation's
    trainer.callbacks = [periodic]  # alone, the periodic callback also evaluates the last step
    periodic.on_train_batch_end(trainer, None, None, None, 0)
    assert calls == [5, 10]


def test_eval_takes_its_sizes_from_the_run(compose_cfg):
    eval_cfg = compose_cfg(config_name="eval")
    digits_run = compose_cfg("data=digits", tiny=False)
    quality, nll = _evaluation_sizes(eval_cfg, digits_run)
    assert (quality.num_samples, quality.sampler, quality.steps) == (1000, "dpmpp_2m", 15)
    assert (nll.num_images, nll.batch_size, nll.estimator) == (100, 100, "full")
    cpu_run = compose_cfg("data=digits", "+scale=cpu", tiny=False)
    quality, _ = _evaluation_sizes(eval_cfg, cpu_run)
    assert (quality.num_samples, quality.sampler, quality.steps) == (5000, "dpmpp_2m", 15)
    # CIFAR-10 checkpoints and released models keep the paper's protocol.
    for run in (compose_cfg("data=cifar10", tiny=False), None):
        quality, nll = _evaluation_sizes(eval_cfg, run)
        assert (quality.num_samples, quality.sampler, quality.steps) == (50_000, "ancestral", None)
        assert nll.num_images == 10_000 and nll.estimator == "full"
    # Given values win; a checkpoint without saved sizes asks for them by name.
    overridden = compose_cfg(
        "sample_quality.num_samples=20", "nll.num_images=3", config_name="eval"
    )
    quality, nll = _evaluation_sizes(overridden, digits_run)
    assert quality.num_samples == 20 and quality.steps == 15 and nll.num_images == 3
    old_run = OmegaConf.create({"data": {"batch_size": 1}})
    with pytest.raises(ConfigError, match=r"sample_quality\.num_samples=\.\.\."):
        _evaluation_sizes(eval_cfg, old_run)


def test_train_returns_a_metric_that_exists(compose_cfg, tmp_path):
    cfg = compose_cfg(
        *TINY,
        "callbacks.sample_quality.on_train_end=true",  # 8 samples at the tiny scale
        "trainer.max_steps=2",
        "~callbacks.nll",
        tiny=False,
    )
    metrics = train(cfg)
    assert metrics["optimized_metric"] == "fd_digits_8_dpmpp2"
    assert objective_value(metrics) == metrics["fd_digits_8_dpmpp2"] >= 0

    named = compose_cfg("optimized_metric=nll_bpd")
    named.paths.output_dir = str(tmp_path / "named")
    metrics = train(named)
    assert metrics["optimized_metric"] == "nll_bpd" and objective_value(metrics) > 0

    missing = compose_cfg("optimized_metric=fd_digits")  # the bare name never exists
    missing.paths.output_dir = str(tmp_path / "missing")
    with pytest.raises(
        ConfigError, match=r"optimized_metric='fd_digits' was not computed.*nll_bpd"
    ):
        train(missing)
    assert (tmp_path / "missing" / "metrics.json").is_file(), "the run's metrics are kept"


def test_short_digits_run_with_the_default_callbacks_evaluates_at_digits_size(
    compose_cfg, tmp_path
):
    """``python src/train.py data=digits model=tiny trainer.max_steps=20``, default callbacks.

    It must evaluate at the digits sizes (not 10 000 samples) and still write bits/dim and
    fd_digits; its wall-clock time on 2 cores is in the README, not asserted here.
    """
    cfg = compose_cfg("data=digits", "model=tiny", "trainer.max_steps=20", tiny=False)
    cfg.paths.cache_dir = str(tmp_path / "cache")
    metrics = train(cfg)
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["global_step"] == 20 and on_disk["nll_num_images"] == 100
    assert on_disk["nll_bpd"] > 0 and on_disk["fd_digits_1k_dpmpp15"] >= 0
    assert metrics["optimized_metric"] == "fd_digits_1k_dpmpp15"
