"""One uint8 quantiser: ``samples.npz`` and the metrics see the same bytes (issue #13 B)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ddpm.images import make_grid, quantize_to_uint8
from ddpm.metrics import SampleQuality, run_sample_quality
from ddpm.tasks import sample as sample_task

SHAPE = (1, 8, 8)
NUM = 4  # 4 · 64 = 256 pixels


def _hard_images() -> torch.Tensor:
    """``[NUM, 1, 8, 8]`` float32: non-finite, out-of-range, exact grid and ordinary values."""
    special = [float("nan"), float("inf"), -float("inf"), -3.0, 7.0, 1.0001, -1.0001, -1e30, 1e30]
    grid = (torch.arange(0, 256, 2, dtype=torch.float64) / 127.5 - 1.0).tolist()  # k/127.5 − 1
    rest = NUM * 64 - len(special) - len(grid)
    ordinary = (torch.rand(rest, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2).tolist()
    values = torch.tensor(special + grid + ordinary, dtype=torch.float32)
    return values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(1))].view(
        NUM, *SHAPE
    )


def _reference_bytes(images: torch.Tensor) -> np.ndarray:
    """The documented mapping in float64: NaN → x = 0, ±Inf → ±1, then clamp(round(...))."""
    x = np.nan_to_num(images.double().numpy(), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


class _FixedSamples(nn.Module):
    """A diffusion stand-in whose ``sample`` hands out the given images, batch after batch."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("betas", torch.full((2,), 0.5))
        self.images = images
        self.start = 0
        self.num_timesteps = 2

    def sample(self, net: nn.Module, shape: tuple[int, ...], **kwargs: object) -> torch.Tensor:
        batch = self.images[self.start : self.start + shape[0]]
        self.start += shape[0]
        return batch.clone()


class _RecordingExtractor:
    """Feature extractor that keeps the uint8 batches the metrics pipeline hands it."""

    name = "recording"
    feature_layer = "mean"
    weights_sha256 = "0" * 64
    num_features = 2
    has_logits = False
    num_logits = 0
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, images_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen.append(images_u8.clone())
        flat = images_u8.float().flatten(1)
        return {"features": torch.stack([flat.mean(1), flat.std(1)], dim=1)}


def _sample_cli_bytes(images: torch.Tensor, tmp_path: Path, monkeypatch) -> np.ndarray:
    """What ``src/sample.py`` writes to ``samples.npz``, as ``[N, C, H, W]``."""
    monkeypatch.setattr(
        sample_task,
        "load_for_inference",
        lambda *args, **kwargs: (_FixedSamples(images), nn.Identity(), SHAPE, None),
    )
    cfg = OmegaConf.create(
        {
            "output_dir": str(tmp_path / "samples"),
            "device": "cpu",
            "sampler": "ancestral",
            "steps": None,
            "eta": None,
            "spacing": None,
            "ckpt_path": "unused.ckpt",
            "pretrained": None,
            "num_samples": NUM,
            "batch_size": 3,  # two batches, the second short
            "seed": 0,
            "clip_denoised": True,
            "grid_scale": 1,
        }
    )
    result = sample_task.run(cfg)
    with np.load(result["npz"]) as npz:
        return npz["images"].transpose(0, 3, 1, 2)


def _metrics_bytes(images: torch.Tensor) -> np.ndarray:
    """What the FID/IS pipeline feeds its feature network."""
    extractor = _RecordingExtractor()
    quality = SampleQuality(
        "digits", extractor, (np.zeros(2), np.eye(2)), num_samples=NUM, sampler=None,
        num_timesteps=20, compute_is=False,
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match="NaN/Inf"):
        run_sample_quality(
            _FixedSamples(images), nn.Identity(), quality, image_shape=SHAPE, batch_size=3,
            seed=0, progress=False,
        )  # fmt: skip
    return torch.cat(extractor.seen).numpy()


def test_sample_cli_and_metrics_quantise_to_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    images = _hard_images()
    reference = _reference_bytes(images)
    assert reference[torch.isnan(images).numpy()].tolist() == [128]  # the case that diverged
    from_cli = _sample_cli_bytes(images, tmp_path, monkeypatch)
    from_metrics = _metrics_bytes(images)
    np.testing.assert_array_equal(from_cli, reference)
    np.testing.assert_array_equal(from_metrics, reference)
    np.testing.assert_array_equal(make_grid(images[:1], nrow=1, padding=0)[..., 0], reference[0, 0])


@pytest.mark.parametrize(
    ("value", "expected"),
    [(float("nan"), 128), (float("inf"), 255), (-float("inf"), 0), (-5.0, 0), (5.0, 255)],
)
def test_non_finite_and_out_of_range_values_have_fixed_bytes(value: float, expected: int) -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert quantize_to_uint8(torch.tensor([value], dtype=dtype)).item() == expected, dtype
