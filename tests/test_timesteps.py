"""Timestep samplers: uniform and loss-second-moment importance sampling (Improved DDPM)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import leave_process_group  # tests/ is on sys.path under pytest
from ddpm.diffusion import (
    LossSecondMomentSampler,
    UniformSampler,
    make_timestep_sampler,
)

CPU = torch.device("cpu")


class SequentialRing:
    """Plain-Python reference: one loss at a time into a per-t ring buffer of length H."""

    def __init__(self, T: int, H: int) -> None:
        self.history = [[0.0] * H for _ in range(T)]
        self.pos = [0] * T
        self.filled = [0] * T
        self.H = H

    def update(self, ts: list[int], losses: list[float]) -> None:
        for t, loss in zip(ts, losses):
            self.history[t][self.pos[t]] = loss
            self.pos[t] = (self.pos[t] + 1) % self.H
            self.filled[t] = min(self.filled[t] + 1, self.H)


def test_uniform_sampler_range_weights_and_determinism() -> None:
    s = UniformSampler(50)
    t, w = s.sample(20_000, CPU, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (20_000,)
    assert t.min().item() == 0 and t.max().item() == 49
    assert torch.equal(w, torch.ones(20_000))
    counts = torch.bincount(t, minlength=50).double()
    # Each count is Binomial(20000, 1/50): mean 400, sd ≈ 19.8; allow 5 sd.
    assert (counts - 400).abs().max().item() < 5 * math.sqrt(20_000 * 0.02 * 0.98)
    t2, _ = s.sample(20_000, CPU, torch.Generator().manual_seed(0))
    assert torch.equal(t, t2)
    assert torch.equal(s.probabilities(CPU), torch.full((50,), 1 / 50))


def test_second_moment_sampler_is_uniform_before_warm_up() -> None:
    T, H = 20, 4
    s = LossSecondMomentSampler(T, history_per_term=H, uniform_prob=0.01)
    torch.testing.assert_close(s.probabilities(CPU), torch.full((T,), 1 / T), rtol=0, atol=0)
    # Fill every t but one completely, with wildly different losses: still uniform.
    for _ in range(H):
        s.update(torch.arange(T - 1), torch.arange(1, T).float() ** 3)
    s.update(torch.tensor([T - 1] * (H - 1)), torch.ones(H - 1))
    torch.testing.assert_close(s.probabilities(CPU), torch.full((T,), 1 / T), rtol=0, atol=0)
    _, w = s.sample(100, CPU, torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, torch.ones(100), rtol=0, atol=1e-6)
    s.update(torch.tensor([T - 1]), torch.ones(1))  # now warm
    assert not torch.allclose(s.probabilities(CPU), torch.full((T,), 1 / T))


def test_second_moment_probabilities_and_weights() -> None:
    T, H, u = 30, 5, 0.05
    s = LossSecondMomentSampler(T, history_per_term=H, uniform_prob=u)
    rng = np.random.default_rng(1)
    # Losses exactly representable in float32 so the reference sees the stored values.
    losses = rng.uniform(0.1, 3.0, size=(T, H)).astype(np.float32).astype(np.float64)
    losses[7] *= 10.0  # one hard timestep
    for k in range(H):
        perm = rng.permutation(T)
        s.update(torch.from_numpy(perm), torch.from_numpy(losses[perm, k]))
    rms = np.sqrt((losses**2).mean(axis=1))
    expected = (1 - u) * rms / rms.sum() + u / T
    p = s.probabilities(CPU).double().numpy()
    np.testing.assert_allclose(p, expected, rtol=1e-6)  # float32 history: 1e-6 relative
    assert abs(p.sum() - 1.0) < 1e-6
    t, w = s.sample(50_000, CPU, torch.Generator().manual_seed(2))
    np.testing.assert_allclose(w.double().numpy(), 1.0 / (T * expected[t.numpy()]), rtol=1e-6)
    # Empirical frequencies follow p: each count within 5 binomial sd.
    counts = np.bincount(t.numpy(), minlength=T)
    sd = np.sqrt(50_000 * expected * (1 - expected))
    assert (np.abs(counts - 50_000 * expected) < 5 * sd).all()
    # The importance weights keep E_t[w·L] equal to the uniform mean of L.
    per_t = rms
    estimate = (w.double().numpy() * per_t[t.numpy()]).mean()
    spread = (w.double().numpy() * per_t[t.numpy()]).std() / math.sqrt(50_000)
    assert abs(estimate - per_t.mean()) < 5 * spread


@pytest.mark.parametrize("H", [1, 3, 10])
def test_ring_buffer_matches_sequential_updates(H: int) -> None:
    T = 7
    s = LossSecondMomentSampler(T, history_per_term=H)
    ref = SequentialRing(T, H)
    gen = torch.Generator().manual_seed(3)
    # Batches with many repeats of the same t, some longer than the ring itself.
    for batch in (5, 40, 1, 23, 64, 3):
        t = torch.randint(0, T, (batch,), generator=gen)
        if batch == 40:
            t[:25] = 2  # 25 repeats of one t in one batch
        losses = torch.randn(batch, generator=gen)
        s.update(t, losses)
        ref.update(t.tolist(), losses.tolist())
        np.testing.assert_array_equal(s.loss_history.numpy(), np.float32(ref.history))
        assert s.write_pos.tolist() == ref.pos
        assert s.filled.tolist() == ref.filled


def test_sampler_state_is_saved() -> None:
    s = LossSecondMomentSampler(5, history_per_term=2)
    s.update(torch.tensor([0, 1, 1]), torch.tensor([1.0, 2.0, 3.0]))
    state = s.state_dict()
    s2 = LossSecondMomentSampler(5, history_per_term=2)
    s2.load_state_dict(state)
    assert torch.equal(s2.loss_history, s.loss_history)
    assert torch.equal(s2.filled, s.filled)
    assert torch.equal(s2.write_pos, s.write_pos)


def test_make_timestep_sampler() -> None:
    assert isinstance(make_timestep_sampler("uniform", 10), UniformSampler)
    s = make_timestep_sampler("loss_second_moment", 10, history_per_term=3, uniform_prob=0.1)
    assert isinstance(s, LossSecondMomentSampler) and s.history_per_term == 3
    assert isinstance(make_timestep_sampler("importance", 10), LossSecondMomentSampler)
    with pytest.raises(ValueError) as err:
        make_timestep_sampler("lossaware", 10)
    assert "uniform" in str(err.value) and "loss_second_moment" in str(err.value)
    with pytest.raises(ValueError):
        LossSecondMomentSampler(10, history_per_term=0)
    with pytest.raises(ValueError):
        LossSecondMomentSampler(10, uniform_prob=1.5)


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        s = LossSecondMomentSampler(6, history_per_term=2, uniform_prob=0.0)
        gen = torch.Generator().manual_seed(100 + rank)  # every rank sees different t and losses
        for _ in range(4):
            t = torch.randint(0, 6, (5,), generator=gen)
            s.update(t, torch.rand(5, generator=gen) + rank)
        # Plain lists, not tensors: a tensor on a multiprocessing queue is sent as a handle to
        # this process's shared memory, which is gone once the worker exits, so the parent's
        # get() could fail (FileNotFoundError in the resource sharer) depending on timing.
        queue.put((rank, s.loss_history.tolist(), s.filled.tolist(), s.write_pos.tolist()))
        leave_process_group()  # barrier first: both ranks are done with the group
    finally:
        if dist.is_initialized():  # a failed rank leaves without waiting for its peer
            dist.destroy_process_group()


def test_second_moment_sampler_is_synchronised_across_ddp_ranks() -> None:
    """Two gloo ranks on CPU: both hold the history of the rank-ordered concatenated updates."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, rest) for r, *rest in (queue.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ref = SequentialRing(6, 2)
    gens = [torch.Generator().manual_seed(100 + r) for r in range(2)]
    for _ in range(4):
        draws = []
        for r in range(2):
            t = torch.randint(0, 6, (5,), generator=gens[r])
            draws.append((t, torch.rand(5, generator=gens[r]) + r))
        for t, losses in draws:  # all_gather concatenates in rank order
            ref.update(t.tolist(), losses.tolist())
    for r in range(2):
        history, filled, pos = results[r]
        # float32 → Python float → float32 is exact, so equality still checks every bit.
        np.testing.assert_array_equal(np.float32(history), np.float32(ref.history))
        assert filled == ref.filled and pos == ref.pos
