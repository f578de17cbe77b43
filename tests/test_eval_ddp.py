"""``src/eval.py`` on two processes (``trainer=ddp``, gloo on the CPU) gives what one process gives.

A tiny run is trained, then evaluated once with one process and once with
``trainer=ddp trainer.accelerator=cpu trainer.devices=2``. N = 130 samples in batches of 20 are
7 global batches (rank 0 draws 4, rank 1 draws 3, the last one short); 9 bits/dim images in
batches of 4 are 3 batches. Compared:

- the images: the union of the per-rank ``samples_rank{r}.npz`` equals the single process's, byte
  for byte, each index exactly once;
- ``fd_digits`` and bits/dim (and its standard error, prior and decoder terms) to 1e-6 absolute:
  the states are float64 sums, so only the order of the additions differs. N exceeds the 64
  feature dimensions: with N ≤ D the covariance is singular and the eigenvalues near 0 of
  Σ₁Σ₂ turn float64 rounding into ~1e-8 relative changes of the distance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_cli import run, tiny  # tests/ is on sys.path under pytest

EVAL = [
    "sample_quality.num_samples=130",
    "sample_quality.batch_size=20",
    "sample_quality.sampler=ddim",
    "sample_quality.steps=5",
    "sample_quality.save_samples=true",
    "nll.num_images=9",
    "nll.batch_size=4",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("eval_ddp_run")
    run_dir = tmp / "run"
    proc = run(
        ["src/train.py", "experiment=quickstart", *tiny(tmp), f"hydra.run.dir={run_dir}"], tmp
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def evaluations(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    tmp = tmp_path_factory.mktemp("eval_ddp")
    ckpt = checkpoint
    out = {}
    for world, extra in (
        (1, []),
        (2, ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]),
    ):
        out[world] = tmp / f"eval{world}"
        proc = run(
            [
                "src/eval.py",
                f"ckpt_path={ckpt}",
                *EVAL,
                *extra,
                f"output_dir={out[world]}",
                f"paths.log_dir={tmp / 'logs'}",
            ],
            tmp,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _samples(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    parts = [np.load(p) for p in sorted((directory / "samples").glob("samples_rank*.npz"))]
    indices = np.concatenate([p["indices"] for p in parts])
    images = np.concatenate([p["images"] for p in parts])
    order = np.argsort(indices)
    return indices[order], images[order]


def test_two_processes_draw_the_same_images_exactly_once(evaluations) -> None:
    one_idx, one = _samples(evaluations[1])
    two_idx, two = _samples(evaluations[2])
    assert len(list((evaluations[2] / "samples").glob("samples_rank*.npz"))) == 2
    np.testing.assert_array_equal(one_idx, np.arange(130))
    np.testing.assert_array_equal(two_idx, np.arange(130))  # no index twice, none missing
    assert one.shape == (130, 8, 8, 1) and one.dtype == np.uint8
    np.testing.assert_array_equal(two, one)


def test_two_processes_give_the_same_metrics(evaluations) -> None:
    one, two = (json.loads((evaluations[w] / "metrics.json").read_text()) for w in (1, 2))
    assert one["world_size"] == 1 and two["world_size"] == 2
    keys = ["fd_digits_130_ddim5", "nll_bpd", "nll_bpd_stderr", "nll_prior_bpd", "nll_decoder_bpd"]
    for key in keys:
        assert np.isfinite(one[key]), key
        assert two[key] == pytest.approx(one[key], abs=1e-6, rel=0), key
    assert one["nll_num_images"] == two["nll_num_images"] == 9
    terms = [np.load(evaluations[w] / "nll_terms.npy") for w in (1, 2)]
    np.testing.assert_allclose(terms[1], terms[0], rtol=0, atol=1e-9)


def test_eval_without_inception_weights_is_one_clear_error(checkpoint: Path, tmp_path) -> None:
    """eval.py was asked for FID: a missing Inception network stops it (the training callback
    would warn and carry on), with the instructions and no traceback."""
    proc = run(
        [
            "src/eval.py",
            f"ckpt_path={checkpoint}",
            "sample_quality.feature_extractor=inception",
            "sample_quality.num_samples=10",
            "metrics.inception_weights=null",
            "metrics.allow_download=false",
            "nll.enabled=false",
            f"output_dir={tmp_path / 'out'}",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        tmp_path,
        env={"TORCH_HOME": str(tmp_path / "torch")},
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error:" in proc.stderr and "DDPM_INCEPTION_WEIGHTS" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()
