"""A real 2-process run (gloo on the CPU) of the evaluation path, compared with a single process.

The workers are started as a cluster launcher starts them (``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_*`` in the environment), so Lightning Fabric joins the process group instead of
spawning, and leaves the group before it exits (``conftest.leave_process_group``). Each worker's
output goes to its own log file, quoted when it fails.

N = 21 samples in batches of 4 gives 6 global batches: rank 0 draws batches 0, 2, 4 (12 images),
rank 1 batches 1, 3, 5 (4 + 4 + 1 = 9 images), an uneven split with a short last batch. A tiny
stand-in feature network keeps it fast; the Inception graph itself is covered by
``test_metrics_inception.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import (  # tests/ is on sys.path under pytest
    TinyNet,
    free_port,
    join_as_rank,
    leave_process_group,
    run_ranks,
)
from ddpm.data.common import UInt8ImageDataset
from ddpm.data.digits import load_digits_split
from ddpm.diffusion import GaussianDiffusion, make_betas
from ddpm.metrics import (
    SampleQuality,
    evaluate_nll,
    generate_samples_sharded,
    mean_cov,
    reference_statistics,
    run_sample_quality,
    single_process,
)

N, BATCH, SEED = 21, 4, 7
SHAPE = (1, 8, 8)


class TinyExtractor:
    """Deterministic stand-in feature network: 16-d tanh features, 10 logits."""

    name = "tiny"
    feature_layer = "tanh16"
    weights_sha256 = "0" * 64
    num_features = 16
    has_logits = True
    num_logits = 10
    device = torch.device("cpu")

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.w = torch.randn(64, 16, generator=generator) / 8.0
        self.v = torch.randn(16, 10, generator=generator) * 2.0

    def __call__(self, images_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images_u8.float().flatten(1) / 127.5 - 1.0
        features = torch.tanh(x @ self.w)
        return {"features": features, "logits": features @ self.v}


def _setup() -> tuple[TinyNet, GaussianDiffusion, UInt8ImageDataset, tuple]:
    torch.manual_seed(0)
    net = TinyNet()
    diffusion = GaussianDiffusion(make_betas("cosine", 20))
    digits = UInt8ImageDataset(load_digits_split("test")[0][:N])
    reference = mean_cov(np.random.RandomState(0).standard_normal((50, 16)) * 0.3)
    return net, diffusion, digits, reference


def _plain(obj: Any) -> Any:
    """``obj`` with numpy arrays as tensors and numpy scalars as Python numbers (both lossless).

    So the result files load with ``torch.load(weights_only=True)``, like every file the project
    reads: numpy objects would need arbitrary unpickling.
    """
    if isinstance(obj, np.ndarray):
        return torch.tensor(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {key: _plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(value) for value in obj)
    return obj


def _run_all(out: Path, cache_dir: Path, strategy: Any) -> None:
    net, diffusion, digits, reference = _setup()
    strategy = single_process(strategy)  # None: Lightning's single-device strategy
    rank, world = strategy.global_rank, strategy.world_size
    net.train()  # the pipeline must switch dropout off and restore the mode
    indices, images = generate_samples_sharded(
        diffusion, net, SHAPE, N, BATCH, SEED, rank=rank, world_size=world
    )
    assert net.training
    quality = SampleQuality(
        "digits", TinyExtractor(), reference, num_samples=N, sampler=None,
        num_timesteps=diffusion.num_timesteps, is_splits=3,
    )  # fmt: skip
    metrics = run_sample_quality(
        diffusion, net, quality, image_shape=SHAPE, batch_size=BATCH, seed=SEED,
        strategy=strategy, progress=False,
    )  # fmt: skip
    ref_stats = reference_statistics(
        digits, TinyExtractor(), dataset_name="toy", cache_dir=cache_dir, batch_size=BATCH,
        strategy=strategy,
    )  # fmt: skip
    nll = evaluate_nll(
        diffusion, net, digits, num_images=N, seed=5, batch_size=BATCH, strategy=strategy
    )
    results = {"indices": indices, "images": images, "quality": metrics, "ref": ref_stats}
    torch.save(_plain({**results, "nll": nll}), out / f"rank{rank}.pt")


WORLD = 2


def _worker(rank: int, port: int, out: str, cache_dir: str) -> None:
    fabric = join_as_rank(rank, port, WORLD, out)
    _run_all(Path(out), Path(cache_dir), fabric.strategy)
    leave_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    multi = tmp_path_factory.mktemp("multi")
    single = tmp_path_factory.mktemp("single")
    port = free_port()
    run_ranks(_worker, lambda rank: (rank, port, str(multi), str(multi / "cache")), multi, WORLD)
    _run_all(single, single / "cache", strategy=None)  # this process alone: world size 1
    load = lambda p: torch.load(p, weights_only=True)  # noqa: E731
    return {
        "r0": load(multi / "rank0.pt"),
        "r1": load(multi / "rank1.pt"),
        "single": load(single / "rank0.pt"),
    }


def test_samples_are_exactly_n_distinct_and_world_size_independent(results) -> None:
    parts = [results["r0"], results["r1"]]
    assert [p["indices"].numel() for p in parts] == [12, 9]  # uneven shares
    indices = torch.cat([p["indices"] for p in parts])
    images = torch.cat([p["images"] for p in parts])
    assert indices.numel() == N and sorted(indices.tolist()) == list(range(N))
    assert torch.unique(images.flatten(1), dim=0).shape[0] == N  # no two ranks drew the same
    single = results["single"]
    torch.testing.assert_close(
        images[indices.argsort()], single["images"][single["indices"].argsort()]
    )


def test_metrics_equal_single_process_and_agree_across_ranks(results) -> None:
    r0, r1, single = (results[k]["quality"] for k in ("r0", "r1", "single"))
    assert r0 == r1  # merged by torchmetrics: identical on every rank (checkpoint monitors agree)
    assert set(r0) == set(single) == {"fd_digits_21", "is_21", "is_21_std"}
    for key in single:
        assert r0[key] == pytest.approx(single[key], rel=1e-9, abs=1e-12), key
    assert r0["fd_digits_21"] > 0 and r0["is_21"] > 1


def test_reference_statistics_sharded_equal_single_process(results) -> None:
    for rank in ("r0", "r1"):  # every rank gets the merged statistics
        for a, b in zip(results[rank]["ref"], results["single"]["ref"]):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_nll_sharded_equals_single_process(results) -> None:
    r0, r1, single = results["r0"]["nll"], results["r1"]["nll"], results["single"]["nll"]
    assert r0["nll_num_images"] == N
    for key in ("nll_bpd", "nll_prior_bpd", "nll_decoder_bpd", "nll_bpd_stderr"):
        assert r0[key] == r1[key]
        assert r0[key] == pytest.approx(single[key], rel=1e-6), key
    np.testing.assert_allclose(r0["terms_bpd"], single["terms_bpd"], rtol=1e-6)


def test_x_T_depends_on_seed_and_sample_index_only() -> None:
    """Sample i starts from the same x_T whatever the batch split or N: with a deterministic
    sampler (DDIM, η = 0) the first images of a larger evaluation are those of a smaller one."""
    from ddpm.diffusion.sampling import SamplerSpec
    from ddpm.metrics.sampling import initial_noise

    whole = initial_noise(SEED, 0, 9, SHAPE)
    split = torch.cat([initial_noise(SEED, 0, 4, SHAPE), initial_noise(SEED, 4, 9, SHAPE)])
    assert torch.equal(whole, split) and whole.shape == (9, *SHAPE)
    assert not torch.equal(initial_noise(SEED + 1, 0, 9, SHAPE), whole)
    assert len({tuple(row.flatten().tolist()) for row in whole}) == 9  # every sample its own

    net, diffusion, _, _ = _setup()
    ddim = SamplerSpec("ddim", 5)
    _, small = generate_samples_sharded(diffusion, net, SHAPE, 6, 6, SEED, ddim)
    _, large = generate_samples_sharded(diffusion, net, SHAPE, 10, 4, SEED, ddim)
    # Other batch sizes may change the float rounding of the network's batched convolutions.
    torch.testing.assert_close(large[:6], small, rtol=0, atol=1e-5)
