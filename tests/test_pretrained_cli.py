"""`src/sample.py pretrained=…` and `src/eval.py pretrained=…` on a local diffusers-layout model."""

from __future__ import annotations

import json

import numpy as np

from test_cli import run  # tests/ is on sys.path under pytest
from test_convert import TINY_CONFIG, make_diffusers_unet

DIGITS_STYLE = {**TINY_CONFIG, "sample_size": 8, "in_channels": 1, "out_channels": 1}


def test_sample_and_eval_a_released_style_model_offline(tmp_path):
    model_dir = tmp_path / "released"
    make_diffusers_unet(DIGITS_STYLE).save_pretrained(model_dir)
    schedule = ["pretrained_diffusion.betas.num_timesteps=50"]

    out = tmp_path / "samples"
    proc = run(
        [
            "src/sample.py",
            f"pretrained={model_dir}",
            *schedule,
            "num_samples=5",
            "steps=10",
            f"hydra.run.dir={out}",
            f"paths.log_dir={tmp_path}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.load(out / "samples.npz")["images"].shape == (5, 8, 8, 1)

    out = tmp_path / "eval"
    proc = run(
        [
            "src/eval.py",
            f"pretrained={model_dir}",
            *schedule,
            "data@pretrained_data=digits",
            "sample_quality.num_samples=10",
            "sample_quality.sampler=ddim",
            "sample_quality.steps=5",
            "sample_quality.eta=0.0",
            "nll.num_images=2",
            f"hydra.run.dir={out}",
            f"paths.log_dir={tmp_path}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["pretrained"] == str(model_dir) and metrics["diffusion"] == "eps-fixed_large-simple"
    )
    assert np.isfinite(metrics["nll_bpd"]) and np.isfinite(metrics["fd_digits_10_ddim5"])


def test_missing_pretrained_directory_is_one_clear_error(tmp_path):
    proc = run(
        [
            "src/sample.py",
            f"pretrained={tmp_path / 'nope'}",
            f"hydra.run.dir={tmp_path / 'o'}",
            f"paths.log_dir={tmp_path}",
        ],
        tmp_path,
    )
    assert proc.returncode == 1
    assert "cannot load pretrained=" in proc.stderr and "config.json" in proc.stderr
    assert "Traceback" not in proc.stderr
