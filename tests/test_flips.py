"""Random flips are planned by the training sampler: per rank, per epoch, resumable, worker-free.

The flip of an image is read back from the returned tensor itself: every stored image differs from
its own mirror image and from every other image and mirror, so a returned ``[C, H, W]`` tensor
names exactly one ``(index, flipped)`` pair.
"""

from __future__ import annotations

import pytest
import torch

from ddpm.data.common import ImageDataModuleBase, UInt8ImageDataset
from ddpm.data.resumable import ResumableDataLoader, ShardedSampler

N = 64  # images 1×4×4: tiny, but distinct from each other and from their mirror images
BATCH = 4
SEED = 11

Pair = tuple[int, bool]


def _images() -> torch.Tensor:
    images = torch.randint(0, 256, (N, 1, 4, 4), dtype=torch.uint8, generator=_gen(0))
    oriented = {bytes(x.flip(-1).numpy()) for x in images} | {bytes(x.numpy()) for x in images}
    assert len(oriented) == 2 * N  # all images and mirror images distinct
    return images


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


IMAGES = _images()
LOOKUP: dict[bytes, Pair] = {
    **{bytes(x.numpy()): (i, False) for i, x in enumerate(IMAGES)},
    **{bytes(x.flip(-1).numpy()): (i, True) for i, x in enumerate(IMAGES)},
}


def decode(batches: list[torch.Tensor]) -> list[Pair]:
    """``[B, 1, 4, 4]`` float batches → the ``(index, flipped)`` of every image, in order."""
    out = []
    for batch in batches:
        u8 = (batch * 127.5 + 127.5).round().to(torch.uint8)
        out.extend(LOOKUP[bytes(x.numpy())] for x in u8)
    return out


def loader(num_workers: int, flips: bool = True, **kwargs) -> ResumableDataLoader:
    """A training loader as the datamodules build it (persistent workers, drop_last)."""
    sampler = ShardedSampler(N, shuffle=True, seed=SEED, flips=flips)
    return ResumableDataLoader(
        UInt8ImageDataset(IMAGES),
        sampler=sampler,
        batch_size=BATCH,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        drop_last=True,
        **kwargs,
    )


def epoch(dl: ResumableDataLoader, e: int | None = None) -> list[torch.Tensor]:
    if e is not None:
        dl.sampler.set_epoch(e)  # as Lightning does at the start of every epoch
    return list(dl)


def as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world: int) -> None:
    monkeypatch.setattr("ddpm.data.resumable._rank_and_world", lambda: (rank, world))


def test_dataset_takes_an_index_or_an_index_flip_pair() -> None:
    ds = UInt8ImageDataset(IMAGES)
    assert torch.equal(ds[3], ds[(3, False)])
    assert torch.equal(ds[(3, True)], ds[3].flip(-1))
    assert not torch.equal(ds[(3, True)], ds[3])
    assert decode([torch.stack([ds[5], ds[(5, True)]])]) == [(5, False), (5, True)]


def test_ranks_get_disjoint_indices_and_their_own_flips_whatever_num_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shares: dict[int, list[Pair]] = {}
    for rank in (0, 1):
        as_rank(monkeypatch, rank, 2)
        without_workers = decode(epoch(loader(0)))
        with_workers = decode(epoch(loader(2)))
        # Flips are a function of (seed, epoch, position), not of the worker processes.
        assert with_workers == without_workers
        # Planning flips leaves the order of indices bit-identical to a loader without flips.
        assert [i for i, _ in with_workers] == [i for i, _ in decode(epoch(loader(0, False)))]
        shares[rank] = with_workers
    indices = [{i for i, _ in shares[r]} for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == N // 2
    assert indices[0].isdisjoint(indices[1]) and indices[0] | indices[1] == set(range(N))
    # Identical worker seeds on both ranks used to give both ranks the same coins by position.
    assert [f for _, f in shares[0]] != [f for _, f in shares[1]]


def test_each_epoch_has_its_own_flips_and_a_loader_entered_later_replays_them() -> None:
    uninterrupted = loader(2)
    epoch0 = decode(epoch(uninterrupted, 0))
    epoch1_batches = epoch(uninterrupted, 1)
    epoch1 = decode(epoch1_batches)
    # Persistent workers restarted on resume, or reseeded alike per epoch, used to replay the
    # same coins by position in every epoch.
    assert [f for _, f in epoch1] != [f for _, f in epoch0]
    assert dict(epoch1) != dict(epoch0)  # and per image, too

    entered = loader(2)
    entered.load_state_dict({"epoch": 1, "batches_consumed": 0})
    entered.sampler.set_epoch(1)  # Lightning sets the restored epoch again
    resumed = epoch(entered)
    assert len(resumed) == len(epoch1_batches)
    for a, b in zip(resumed, epoch1_batches, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rank", [0, 1])
def test_mid_epoch_resume_yields_the_remaining_batches_with_their_flips(
    monkeypatch: pytest.MonkeyPatch, rank: int
) -> None:
    as_rank(monkeypatch, rank, 2)
    full = epoch(loader(2), 2)  # 32 images of this rank → 8 batches of 4
    consumed = 3
    resumed_loader = loader(2)
    resumed_loader.load_state_dict({"epoch": 2, "batches_consumed": consumed})
    resumed = epoch(resumed_loader)
    assert decode(resumed) == decode(full[consumed:])
    assert len(resumed) == len(full) - consumed
    for a, b in zip(resumed, full[consumed:], strict=True):
        assert torch.equal(a, b)
    assert resumed_loader.state_dict() == {"epoch": 2, "batches_consumed": len(full)}
    assert any(f for _, f in decode(resumed)) and not all(f for _, f in decode(resumed))


class _ToyDataModule(ImageDataModuleBase):
    image_shape = (1, 4, 4)

    def __init__(self, random_flip: bool) -> None:
        super().__init__(
            batch_size=BATCH, num_workers=0, pin_memory=False, seed=SEED, random_flip=random_flip
        )

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self.val_set = self.test_set = UInt8ImageDataset(IMAGES)


def test_flip_frequency_is_plausible_and_only_training_flips() -> None:
    dm = _ToyDataModule(random_flip=True)
    dm.setup()
    train = dm.train_dataloader()
    coins = [f for e in range(4) for _, f in decode(epoch(train, e))]
    assert len(coins) == 4 * N
    # Binomial(256, 1/2): mean 128, sd 8; outside [96, 160] (4 sd) has probability < 1e-4.
    assert 96 <= sum(coins) <= 160
    for eval_loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert decode(list(eval_loader)) == [(i, False) for i in range(N)]

    plain = _ToyDataModule(random_flip=False)
    plain.setup()
    pairs = decode(epoch(plain.train_dataloader(), 0))
    assert not any(f for _, f in pairs)
    assert [i for i, _ in pairs] == [i for i, _ in decode(epoch(train, 0))]
