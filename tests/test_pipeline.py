"""The training pipeline: config composition, every objective combination, train(), resume."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ddpm.builders import (
    build_datamodule,
    build_diffusion,
    build_module,
    load_module_from_checkpoint,
)
from ddpm.errors import CheckpointError, ConfigError, OutputDirError
from ddpm.tasks.train import run as train

CONF = Path(__file__).resolve().parents[1] / "conf"
PARAMETERIZATIONS = ["eps", "x0", "mu", "v", "edm"]
VARIANCES = ["fixed_large", "fixed_small", "learned", "learned_range"]
LOSSES = ["simple", "vlb", "hybrid"]
SCHEDULES = ["linear", "cosine", "quad", "sigmoid"]


def _is_valid(variance: str, loss: str) -> bool:
    learned = variance.startswith("learned")
    return not (learned and loss == "simple") and not (not learned and loss == "hybrid")


def _group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_groups_offer_the_documented_choices():
    assert _group_choices("parameterization") == sorted(PARAMETERIZATIONS)
    # analytic: Analytic-DPM's variance of a trained model, for eval.py/sample.py only.
    assert _group_choices("variance") == sorted([*VARIANCES, "analytic"])
    assert _group_choices("loss") == sorted(LOSSES)
    # learned: VDM's γ_η (continuous time only; its own tests in tests/test_vdm.py).
    assert _group_choices("schedule") == sorted([*SCHEDULES, "learned"])
    assert _group_choices("time") == ["continuous", "discrete"]
    assert {"cifar10", "digits", "folder"} <= set(_group_choices("data"))
    assert {"ddpm_cifar10", "small", "tiny"} <= set(_group_choices("model"))
    assert {"default", "cpu", "gpu", "ddp"} <= set(_group_choices("trainer"))
    assert {"wandb", "csv", "tensorboard"} <= set(_group_choices("logger"))


@pytest.mark.parametrize(
    "group",
    [
        "parameterization",
        "variance",
        "loss",
        "schedule",
        "time",
        "data",
        "model",
        "trainer",
        "logger",
        "callbacks",
        "experiment",
        "optimizer",
        "evaluation",
    ],
)
def test_every_yaml_in_every_group_composes(compose_cfg, group):
    for choice in _group_choices(group):
        cfg = compose_cfg(f"{group}={choice}", tiny=False)
        assert cfg is not None
        # Resolve everything that does not need a running Hydra app.
        if group == "experiment":
            assert cfg.run_name
        else:
            assert cfg[group] is not None or group == "experiment"


def test_default_config_is_the_paper_run(compose_cfg):
    cfg = compose_cfg("parameterization=eps", "loss=simple", tiny=False)
    assert cfg.parameterization.name == "eps" and cfg.variance.name == "fixed_large"
    assert cfg.loss.name == "simple" and cfg.schedule.name == "linear"
    assert cfg.schedule.num_timesteps == 1000 and cfg.data._target_.endswith("CIFAR10DataModule")
    assert cfg.optimizer.lr == pytest.approx(2e-4) and cfg.module.lr_warmup_steps == 5000
    assert cfg.module.ema_decay == pytest.approx(0.9999) and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.data.batch_size == 128 and cfg.trainer.max_steps == 800_000
    assert cfg.run_name == "eps-fixed_large-simple-linear"


COMBOS = list(itertools.product(PARAMETERIZATIONS, VARIANCES, LOSSES, SCHEDULES))


@pytest.mark.parametrize("variance,loss", list(itertools.product(VARIANCES, LOSSES)))
def test_one_finite_training_step_for_every_valid_combination(compose_cfg, variance, loss):
    """All 5 parameterisations × 4 schedules for this variance × loss: one step, finite grads."""
    base = compose_cfg(f"variance={variance}", f"loss={loss}")
    for parameterization, schedule in itertools.product(PARAMETERIZATIONS, SCHEDULES):
        overrides = [parameterization, variance, loss, schedule]
        cfg = base.copy()
        # Swap in the group files directly (composing 16 times per case is slow); each file is
        # composed through Hydra in test_every_yaml_in_every_group_composes.
        cfg.parameterization = OmegaConf.load(
            CONF / "parameterization" / f"{parameterization}.yaml"
        )
        cfg.schedule = OmegaConf.load(CONF / "schedule" / f"{schedule}.yaml")
        cfg.schedule.num_timesteps = 50
        if not _is_valid(variance, loss):
            with pytest.raises(ConfigError, match=f"loss={loss} with variance={variance}"):
                build_diffusion(cfg)
            continue
        torch.manual_seed(0)
        module = build_module(cfg, (1, 8, 8))
        x0 = torch.rand(6, 1, 8, 8) * 2 - 1
        t = torch.tensor([0, 1, 5, 10, 48, 49])
        terms = module.diffusion.training_losses(module.net, x0, t)
        loss_value = terms["loss"].mean()
        loss_value.backward()
        assert torch.isfinite(loss_value), overrides
        grads = [p.grad for p in module.net.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), overrides
        assert module.net.out_channels == (2 if variance.startswith("learned") else 1)


def test_invalid_combination_stops_train_before_data(compose_cfg, tmp_path):
    cfg = compose_cfg("variance=learned", "loss=simple", "data=cifar10")
    with pytest.raises(ConfigError, match="Use loss=hybrid or loss=vlb"):
        train(cfg)
    assert not (tmp_path / "data").exists()


def test_fast_dev_run_through_train(compose_cfg, tmp_path):
    cfg = compose_cfg("+trainer.fast_dev_run=true")
    metrics = train(cfg)
    assert metrics["global_step"] == 1 and metrics["diverged"] is False
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["global_step"] == 1 and on_disk["diffusion"] == "eps-fixed_large-simple"


def test_train_writes_metrics_samples_and_checkpoints(compose_cfg, tmp_path):
    metrics = train(compose_cfg())
    run = tmp_path / "run"
    assert metrics["global_step"] == 3
    assert (run / "checkpoints" / "last.ckpt").is_file()
    # Saves every 2 steps, 3 steps in all: last.ckpt still holds the final step.
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3
    assert (run / "samples" / "final.png").is_file()
    assert not list(run.rglob(".*.tmp")), "no half-written temporary files may remain"
    assert metrics["nll_bpd"] > metrics["nll_prior_bpd"] > 0
    assert Path(metrics["nll_terms_npy"]).is_file()
    assert metrics["samples_finite"] is True
    assert 0.0 <= metrics["samples_out_of_range_fraction"] <= 1.0


def test_resume_restores_step_and_ema_exactly(compose_cfg, tmp_path):
    cfg = compose_cfg("trainer.max_steps=4", "callbacks.model_checkpoint.every_n_train_steps=2")
    train(cfg)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    step2 = ckpt_dir / "step_0000002.ckpt"
    assert step2.is_file(), sorted(p.name for p in ckpt_dir.iterdir())
    reference = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert reference["global_step"] == 4

    # Resume from step 2 into a fresh directory and train to step 4 again.
    resumed_cfg = compose_cfg("trainer.max_steps=4", f"ckpt_path={step2}")
    resumed_cfg.paths.output_dir = str(tmp_path / "resumed")
    metrics = train(resumed_cfg)
    assert metrics["global_step"] == 4
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]
    # Same data order, timesteps and noise after the resume: weights agree to float32 rounding.
    # (Fused kernels may round differently with different memory alignment, ~1e-8 here; one
    # optimiser step with other data or noise moves weights by ~lr = 1e-4, 100x the tolerance.)
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)

    # Loading restores the EMA and the step exactly.
    module, _ = load_module_from_checkpoint(step2)
    saved = torch.load(step2, weights_only=True)
    assert int(module.ema.num_updates) == saved["global_step"] == 2
    for key, value in module.ema.state_dict().items():
        assert torch.equal(value, saved["state_dict"][f"ema.{key}"]), key


def test_rebuild_from_checkpoint_uses_saved_config(compose_cfg, tmp_path):
    train(compose_cfg("parameterization=v", "variance=learned_range", "loss=hybrid"))
    module, cfg = load_module_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert module.diffusion.name == "v-learned_range-hybrid"
    assert cfg.schedule.num_timesteps == 50 and module.net.out_channels == 2


def test_bad_checkpoint_and_output_dir_give_clear_errors(compose_cfg, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        train(compose_cfg(f"ckpt_path={tmp_path / 'missing.ckpt'}"))
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        train(compose_cfg(f"ckpt_path={corrupt}"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = compose_cfg()
    cfg.paths.output_dir = str(blocker / "run")
    with pytest.raises(OutputDirError, match="cannot write to the output directory"):
        train(cfg)


def test_non_finite_loss_marks_run_diverged(compose_cfg, tmp_path):
    # A learning rate of 1e30 makes the weights overflow within a couple of steps.
    metrics = train(
        compose_cfg("optimizer.lr=1e30", "trainer.gradient_clip_val=null", "trainer.max_steps=6")
    )
    assert metrics["diverged"] is True and metrics["diverged_at_step"] >= 1
    assert "non-finite training loss at step" in metrics["error"]
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["diverged"] is True


def test_digits_datamodule_from_config_yields_grid_values(compose_cfg):
    datamodule = build_datamodule(compose_cfg())
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.shape == (16, 1, 8, 8)
    u8 = (batch + 1) * 127.5
    assert torch.allclose(u8, u8.round(), atol=1e-4)


def test_no_checkpoint_holds_a_diverged_model(compose_cfg, tmp_path):
    """Checkpoints every step, loss checked only every 1000: the save itself refuses NaN weights."""
    metrics = train(
        compose_cfg(
            "optimizer.lr=1e30",
            "trainer.gradient_clip_val=null",
            "trainer.max_steps=6",
            "trainer.log_every_n_steps=1000",
            "module.check_finite_every_n_steps=1000",
            "callbacks.model_checkpoint.every_n_train_steps=1",
        )
    )
    assert metrics["diverged"] is True
    assert "non-finite weights" in metrics["error"]
    written = sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    for path in written:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        for key, value in state.items():
            if value.is_floating_point():
                assert torch.isfinite(value).all(), f"{path.name}: {key} is not finite"
    assert metrics["diverged_at_step"] >= len([p for p in written if p.name != "last.ckpt"])


def test_each_job_of_one_process_gets_its_own_wandb_run(compose_cfg, tmp_path):
    """A multirun's jobs share a process (Hydra's basic launcher): each must finish its W&B run."""
    import wandb

    run_dirs = []
    for job in ("job0", "job1"):
        cfg = compose_cfg("logger=wandb", "trainer.max_steps=1")
        cfg.paths.output_dir = str(tmp_path / job)
        train(cfg)
        assert wandb.run is None, "the W&B run of a finished job is still open"
        run_dirs += sorted((tmp_path / job / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2 and run_dirs[0].name != run_dirs[1].name


def test_a_run_keeps_last_plus_a_bounded_number_of_checkpoints(compose_cfg, tmp_path):
    """+scale=tiny keeps the newest 2 periodic checkpoints (by step) and last.ckpt, however
    many it wrote on the way."""
    cfg = compose_cfg("trainer.max_steps=10", "callbacks.model_checkpoint.every_n_train_steps=2")
    assert cfg.callbacks.model_checkpoint.save_top_k == 2
    train(cfg)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step_0000008.ckpt", "step_0000010.ckpt"]
