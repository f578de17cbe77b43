"""A real 2-process gloo run of the sharded evaluation, compared with a single process.

N = 21 samples in batches of 4 gives 6 global batches: rank 0 draws batches 0, 2, 4 (12 images),
rank 1 batches 1, 3, 5 (4 + 4 + 1 = 9 images), an uneven split with a short last batch. A tiny
stand-in feature network keeps it fast; the Inception graph itself is covered by
``test_metrics_inception.py``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import TinyNet  # tests/ is on sys.path under pytest
from ddpm.data.common import UInt8ImageDataset
from ddpm.data.digits import load_digits_split
from ddpm.diffusion import GaussianDiffusion, make_betas
from ddpm.metrics import (
    compute_sample_quality,
    evaluate_nll,
    generate_samples_sharded,
    mean_cov,
    reference_statistics,
)
from ddpm.metrics.distributed import gather_to_rank0

N, BATCH, SEED, ROUND = 21, 4, 7, 3
SHAPE = (1, 8, 8)


class TinyExtractor:
    """Deterministic stand-in feature network: 16-d tanh features, 10 logits."""

    name = "tiny"
    feature_layer = "tanh16"
    weights_sha256 = "0" * 64
    has_logits = True
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


def _run_all(out: Path, cache_dir: Path, rank: int) -> None:
    net, diffusion, digits, reference = _setup()
    net.train()  # the pipeline must switch dropout off and restore the mode
    indices, images = generate_samples_sharded(diffusion, net, SHAPE, N, BATCH, SEED, ROUND)
    assert net.training
    gathered = gather_to_rank0((indices, images))
    quality = compute_sample_quality(
        diffusion,
        net,
        TinyExtractor(),
        reference if rank == 0 else None,
        image_shape=SHAPE,
        num_samples=N,
        batch_size=BATCH,
        seed=SEED,
        round_idx=ROUND,
        is_splits=3,
        progress=False,
    )
    ref_stats = reference_statistics(
        digits, TinyExtractor(), dataset_name="toy", cache_dir=cache_dir, batch_size=BATCH
    )
    nll = evaluate_nll(diffusion, net, digits, num_images=N, seed=5, batch_size=BATCH)
    results = {
        "gathered": gathered,
        "quality": quality,
        "ref": ref_stats,
        "nll": nll,
        "local": indices,
    }
    torch.save(_plain(results), out / f"rank{rank}.pt")


def _worker(rank: int, world_size: int, port: int, out: str, cache_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        _run_all(Path(out), Path(cache_dir), rank)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    multi = tmp_path_factory.mktemp("multi")
    single = tmp_path_factory.mktemp("single")
    mp.spawn(
        _worker,
        args=(2, _free_port(), str(multi), str(multi / "cache")),
        nprocs=2,
        join=True,
    )
    _run_all(single, single / "cache", rank=0)  # no process group: world size 1
    load = lambda p: torch.load(p, weights_only=True)  # noqa: E731
    return {
        "r0": load(multi / "rank0.pt"),
        "r1": load(multi / "rank1.pt"),
        "single": load(single / "rank0.pt"),
    }


def test_gathered_samples_are_exactly_n_distinct_and_world_size_independent(results) -> None:
    gathered = results["r0"]["gathered"]
    assert results["r1"]["gathered"] is None  # only rank 0 receives
    assert [g[0].numel() for g in gathered] == [12, 9]  # uneven shares
    indices = torch.cat([g[0] for g in gathered])
    images = torch.cat([g[1] for g in gathered])
    assert indices.numel() == N and sorted(indices.tolist()) == list(range(N))
    assert torch.unique(images.flatten(1), dim=0).shape[0] == N  # no two ranks drew the same
    single_indices, single_images = results["single"]["gathered"][0]
    torch.testing.assert_close(images[indices.argsort()], single_images[single_indices.argsort()])


def test_metrics_equal_single_process_and_agree_across_ranks(results) -> None:
    r0, r1, single = (
        results["r0"]["quality"],
        results["r1"]["quality"],
        results["single"]["quality"],
    )
    assert r0 == r1  # broadcast: identical on every rank (checkpoint monitors agree)
    assert r0["num_samples"] == N and set(r0) == set(single)
    for key in ("fd", "is_mean", "is_std"):
        assert r0[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key
    assert r0["fd"] > 0 and r0["is_mean"] > 1


def test_reference_statistics_sharded_equal_single_process(results) -> None:
    assert results["r1"]["ref"] is None
    for a, b in zip(results["r0"]["ref"], results["single"]["ref"]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_nll_sharded_equals_single_process(results) -> None:
    r0, r1, single = results["r0"]["nll"], results["r1"]["nll"], results["single"]["nll"]
    assert r0["nll_num_images"] == N
    for key in ("nll_bpd", "nll_prior_bpd", "nll_decoder_bpd", "nll_bpd_stderr"):
        assert r0[key] == r1[key]
        assert r0[key] == pytest.approx(single[key], rel=1e-6), key
    np.testing.assert_allclose(r0["terms_bpd"], single["terms_bpd"], rtol=1e-6)
