"""EMA maths, atomic checkpoint writes and sample-grid images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ddpm.callbacks.checkpoint_io import AtomicCheckpointIO
from ddpm.ema import ExponentialMovingAverage
from ddpm.images import make_grid, quantize_to_uint8


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))


def test_first_update_copies_then_lerps_like_the_float64_formula():
    net = _net()
    ema = ExponentialMovingAverage(net, decay=0.9)
    with torch.no_grad():
        for p in ema.ema_net.parameters():
            p.fill_(123.0)  # must be overwritten by the first update ("copied at the first step")
    ema.update(net)
    for a, b in zip(ema.ema_net.parameters(), net.parameters()):
        assert torch.equal(a, b)
    history = [[p.detach().double().clone() for p in net.parameters()]]
    expected = [p.detach().double().clone() for p in net.parameters()]
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net)
        history.append([p.detach().double().clone() for p in net.parameters()])
        expected = [0.9 * e + 0.1 * p for e, p in zip(expected, history[-1])]
    for got, want in zip(ema.ema_net.parameters(), expected):
        # float32 arithmetic against a float64 reference: rtol 1e-6.
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert int(ema.num_updates) == 4


def test_ema_copies_buffers_and_stays_in_eval_mode():
    net = _net()
    ema = ExponentialMovingAverage(net, decay=0.99)
    net.train()
    net(torch.randn(8, 3))  # BatchNorm running statistics move
    ema.update(net)
    assert torch.equal(ema.ema_net[1].running_mean, net[1].running_mean)
    ema.train()
    assert not ema.ema_net.training, "dropout must stay off in the EMA copy"
    assert all(not p.requires_grad for p in ema.ema_net.parameters())


def test_resumed_ema_does_not_copy_again():
    net = _net()
    ema = ExponentialMovingAverage(net, decay=0.5)
    ema.update(net)
    state = ema.state_dict()
    restored = ExponentialMovingAverage(_net(), decay=0.5)
    restored.load_state_dict(state)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    restored.update(net)  # after a resume this is a lerp, not a copy
    for got, base, new in zip(
        restored.ema_net.parameters(), ema.ema_net.parameters(), net.parameters()
    ):
        torch.testing.assert_close(got, 0.5 * base + 0.5 * new)


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_bad_decay_is_refused(decay):
    with pytest.raises(ValueError, match="ema decay"):
        ExponentialMovingAverage(_net(), decay=decay)


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    assert torch.load(target, weights_only=True)["step"] == 1

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["step"] == 1, (
        "a failed write must leave the old checkpoint intact"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "no temporary file left"


def test_uint8_quantisation_rounds_and_grid_places_images():
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0, 1.5]).view(1, 1, 1, 5)
    assert quantize_to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]  # round((x+1)·127.5)
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    grid = make_grid(images, nrow=2, padding=1)
    assert grid.shape == (7, 7, 1)
    assert np.all(grid[1:3, 4:6, 0] == 1) and np.all(grid[4:6, 1:3, 0] == 2)


@pytest.mark.parametrize("b, c, nrow", [(5, 1, None), (7, 3, 3), (4, 3, 4), (1, 1, None)])
def test_grid_layout_equals_a_hand_built_grid(b: int, c: int, nrow: int | None) -> None:
    """Row-major placement, ⌈√B⌉ images per row by default, black padding, C channels kept; a
    single image is returned as it is (torchvision's rule)."""
    generator = torch.Generator().manual_seed(b * 10 + c)
    images = torch.randint(0, 256, (b, c, 3, 4), dtype=torch.uint8, generator=generator)
    pad, per_row = 2, nrow or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / per_row))
    expected = np.zeros((rows * (3 + pad) + pad, per_row * (4 + pad) + pad, c), np.uint8)
    for i in range(b):
        y, x = pad + (i // per_row) * (3 + pad), pad + (i % per_row) * (4 + pad)
        expected[y : y + 3, x : x + 4] = images[i].permute(1, 2, 0).numpy()
    if b == 1:
        expected = images[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(make_grid(images, nrow=nrow, padding=pad), expected)
