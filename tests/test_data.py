"""Tests of ddpm.data: value grid, shapes, splits, flips, offline CIFAR-10 and error messages.

Nothing here downloads: CIFAR-10 is faked in tmp_path (python-pickle batch format) and the
download function is monkeypatched where the download branch is exercised.
"""

from __future__ import annotations

import pickle
import struct
import tarfile
import urllib.error
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import (
    CIFAR10DataModule,
    DatasetCorruptedError,
    DatasetNotFoundError,
    DigitsDataModule,
    ImageFolderDataModule,
    load_digits_split,
    uint8_to_unit_range,
)
from ddpm.data.digits import digits_split_indices
from ddpm.data.folder import load_image_uint8

GRID_TOL = 1e-5  # x * 127.5 + 127.5 must be an integer in 0..255 to this tolerance


def assert_on_grid(x: torch.Tensor) -> None:
    """float32 in [-1, 1] and on the 256-level grid u8 / 127.5 - 1."""
    assert x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    scaled = x.double() * 127.5 + 127.5
    assert (scaled - scaled.round()).abs().max().item() < GRID_TOL
    assert scaled.round().min() >= 0 and scaled.round().max() <= 255


def expected_float(u8: np.ndarray) -> torch.Tensor:
    """Independent float64 reference of the scaling, cast to float32 at the end."""
    return torch.from_numpy(u8.astype(np.float64) / 127.5 - 1.0).float()


def index_and_flip(
    loader: torch.utils.data.DataLoader, stored: list[torch.Tensor], epoch: int = 0
) -> list[tuple[int, bool]]:
    """One epoch of ``loader`` as ``(index into stored, flipped)`` per returned image.

    ``stored`` are the unflipped ``[C, H, W]`` images; each must differ from its mirror image.
    """
    loader.sampler.set_epoch(epoch)  # as Lightning does at the start of every epoch
    seen = []
    for batch in loader:
        for x in batch:
            found = [(i, False) for i, s in enumerate(stored) if torch.equal(x, s)]
            found += [(i, True) for i, s in enumerate(stored) if torch.equal(x, s.flip(-1))]
            assert len(found) == 1, "a returned image is neither a stored image nor its mirror"
            seen.extend(found)
    return seen


# --------------------------------------------------------------------------------------- common


def test_uint8_to_unit_range_endpoints_and_grid() -> None:
    u8 = torch.arange(256, dtype=torch.uint8)
    x = uint8_to_unit_range(u8)
    assert x[0].item() == -1.0 and x[255].item() == 1.0
    torch.testing.assert_close(x, expected_float(u8.numpy()), rtol=0, atol=1e-7)
    assert_on_grid(x)
    with pytest.raises(TypeError):
        uint8_to_unit_range(torch.zeros(3))


# --------------------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_disjoint_and_matches_sklearn() -> None:
    from sklearn.datasets import load_digits

    train_idx, test_idx = digits_split_indices("train"), digits_split_indices("test")
    assert len(train_idx) == 1500 and len(test_idx) == 297
    assert set(train_idx.tolist()).isdisjoint(test_idx.tolist())
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(1797))
    np.testing.assert_array_equal(train_idx, digits_split_indices("train"))  # deterministic
    np.testing.assert_array_equal(digits_split_indices("val"), test_idx)

    bunch = load_digits()
    for split, idx in (("train", train_idx), ("test", test_idx)):
        images, labels = load_digits_split(split)
        assert images.dtype == torch.uint8 and images.shape == (len(idx), 1, 8, 8)
        ref = np.floor(bunch.images[idx] * 255.0 / 16.0 + 0.5)  # values 0..16: no .5 ties
        np.testing.assert_array_equal(images[:, 0].numpy(), ref.astype(np.uint8))
        np.testing.assert_array_equal(labels.numpy(), bunch.target[idx])
    assert load_digits_split("train")[0].max().item() == 255
    with pytest.raises(ValueError, match="unknown digits split"):
        load_digits_split("validation")


def test_digits_datamodule_batches_padding_and_no_flips() -> None:
    dm = DigitsDataModule(batch_size=64, pad_to=16, train_repeats=3)
    assert dm.image_shape == (1, 16, 16)
    assert dm.num_train == 1500 and dm.num_test == 297
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == (3 * 1500) // 64  # drop_last=True
    assert not loader.persistent_workers
    batch = next(iter(loader))
    assert batch.shape == (64, 1, 16, 16)
    assert_on_grid(batch)
    border = torch.ones(16, 16, dtype=torch.bool)
    border[4:12, 4:12] = False
    assert (batch[:, 0][:, border] == -1.0).all()  # symmetric padding with the background

    train_u8, _ = load_digits_split("train")
    test_u8, _ = load_digits_split("test")
    train_set = dm.train_set
    assert len(train_set) == 3 * 1500
    for i in (0, 7, 1499):
        want = expected_float(train_u8[i, :, :, :].numpy())
        for _ in range(5):  # the training set must never flip digits
            torch.testing.assert_close(train_set[i][:, 4:12, 4:12], want, rtol=0, atol=1e-7)
        torch.testing.assert_close(train_set[i + 1500], train_set[i], rtol=0, atol=0)

    val_batch = next(iter(dm.val_dataloader()))  # ordered, held-out images
    torch.testing.assert_close(
        val_batch[:, :, 4:12, 4:12], expected_float(test_u8[:64].numpy()), rtol=0, atol=1e-7
    )
    ref = dm.reference_dataset()
    assert len(ref) == 1500
    torch.testing.assert_close(ref[5], train_set[5], rtol=0, atol=0)

    dm.setup("test")
    assert len(dm.test_dataloader().dataset) == 297
    dm_workers = DigitsDataModule(num_workers=1)
    dm_workers.setup("fit")
    assert dm_workers.train_dataloader().persistent_workers


def test_digits_same_across_instances_and_invalid_args() -> None:
    a, b = DigitsDataModule(), DigitsDataModule()
    a.setup("fit")
    b.setup("fit")
    assert a.image_shape == (1, 8, 8)
    torch.testing.assert_close(a.val_set[10], b.val_set[10], rtol=0, atol=0)
    torch.testing.assert_close(a.train_set[3], b.train_set[3], rtol=0, atol=0)
    for bad in (6, 9):
        with pytest.raises(ValueError, match="pad_to"):
            DigitsDataModule(pad_to=bad)
    with pytest.raises(ValueError, match="train_repeats"):
        DigitsDataModule(train_repeats=0)
    with pytest.raises(RuntimeError, match="before setup"):
        DigitsDataModule().train_dataloader()


def test_digits_runs_under_trainer() -> None:
    seen: list[tuple[int, ...]] = []

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            seen.append(tuple(batch.shape))
            return ((batch - self.w) ** 2).mean()

        def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
            seen.append(tuple(batch.shape))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        fast_dev_run=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), datamodule=DigitsDataModule(batch_size=16))
    assert seen == [(16, 1, 8, 8)] * 4


# --------------------------------------------------------------------------------------- CIFAR-10


def _py2_style_batch_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickle laid out like the official python-2 files (protocol 2, str keys/bytes)."""

    def binstring(b: bytes) -> bytes:
        return b"T" + struct.pack("<i", len(b)) + b

    def binint(i: int) -> bytes:
        return b"J" + struct.pack("<i", i)

    n, d = data.shape
    out = b"\x80\x02}(" + binstring(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
    out += binint(0) + b"\x85" + binstring(b"b") + b"\x87R"
    out += b"(" + binint(1) + binint(n) + binint(d) + b"\x86"
    out += b"cnumpy\ndtype\n" + binstring(b"u1") + b"\x89\x88\x87R"
    out += b"(" + binint(3) + binstring(b"|") + b"NNN" + binint(-1) + binint(-1) + binint(0)
    out += b"tb\x89" + binstring(data.tobytes()) + b"tb"
    out += binstring(b"labels") + b"](" + b"".join(binint(v) for v in labels) + b"eu."
    return out


def make_fake_cifar(root: Path, n_train_per_batch: int = 4, n_test: int = 3) -> dict:
    """Write a tiny cifar-10-batches-py under root; return the raw uint8 rows per split."""
    rng = np.random.RandomState(123)
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rows: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(files):
        n = n_test if name == "test_batch" else n_train_per_batch
        data = rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)
        labels = rng.randint(0, 10, size=n).tolist()
        rows["test" if name == "test_batch" else "train"].append(data)
        if k == 0:  # one file in the official python-2 layout, the others as python-3 pickles
            (batches / name).write_bytes(_py2_style_batch_pickle(data, labels))
        else:
            entry = {b"batch_label": name.encode(), b"data": data, b"labels": labels}
            (batches / name).write_bytes(pickle.dumps(entry))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    (batches / "batches.meta").write_bytes(pickle.dumps(meta))
    return {split: np.concatenate(v) for split, v in rows.items()}


def _forbid_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to download")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", boom)


def test_fake_cifar_loads_offline_with_exact_pixel_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_download(monkeypatch)
    raw = make_fake_cifar(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=4, num_workers=0, download=True)
    assert dm.image_shape == (3, 32, 32)
    dm.prepare_data()  # complete local copy: no download attempted even with download=True
    dm.setup(None)
    assert dm.num_train == 20 and dm.num_test == 3

    ref = dm.reference_dataset()
    assert len(ref) == 20
    for i in (0, 3, 4, 19):  # 0..3 come from the python-2-style file
        row = raw["train"][i]
        for c, h, w in ((0, 0, 0), (1, 5, 17), (2, 31, 30)):
            want = row[c * 1024 + h * 32 + w] / 127.5 - 1.0
            assert abs(ref[i][c, h, w].item() - want) < 1e-6
        torch.testing.assert_close(
            ref[i], expected_float(row.reshape(3, 32, 32)), rtol=0, atol=1e-7
        )
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch.shape == (3, 3, 32, 32)
    torch.testing.assert_close(
        test_batch, expected_float(raw["test"].reshape(-1, 3, 32, 32)), rtol=0, atol=1e-7
    )
    train_batch = next(iter(dm.train_dataloader()))
    assert train_batch.shape == (4, 3, 32, 32)
    assert len(dm.train_dataloader()) == 5
    assert_on_grid(train_batch)
    assert_on_grid(test_batch)


def test_cifar_flips_train_only(tmp_path: Path) -> None:
    raw = make_fake_cifar(tmp_path, n_train_per_batch=8)  # 40 training images
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=4, num_workers=0, download=False)
    dm.setup("fit")
    reference = dm.reference_dataset()
    stored = [reference[i] for i in range(len(reference))]
    torch.testing.assert_close(
        stored[0], expected_float(raw["train"][0].reshape(3, 32, 32)), rtol=0, atol=1e-7
    )
    assert all(not torch.equal(x, x.flip(-1)) for x in stored)
    train = dm.train_dataloader()
    assert train.sampler.flips
    pairs = [index_and_flip(train, stored, epoch) for epoch in range(3)]
    for epoch_pairs in pairs:  # every training image once per epoch
        assert sorted(i for i, _ in epoch_pairs) == list(range(40))
    n_flipped = sum(f for epoch_pairs in pairs for _, f in epoch_pairs)
    assert 38 <= n_flipped <= 82  # Binomial(120, 1/2): outside this range (±4 sd) has p < 1e-4
    assert pairs[1] != pairs[0]  # every epoch has its own coins
    # The sampler plans the flips: worker processes (seeded alike on every rank) change nothing.
    workers = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=4, num_workers=2)
    workers.setup("fit")
    assert index_and_flip(workers.train_dataloader(), stored, 1) == pairs[1]

    test_u8 = raw["test"].reshape(-1, 3, 32, 32)
    for loader in (dm.val_dataloader(), dm.val_dataloader()):  # held-out set: never flipped
        assert not loader.sampler.flips
        torch.testing.assert_close(
            torch.cat(list(loader)), expected_float(test_u8), rtol=0, atol=1e-7
        )
    assert all(torch.equal(reference[i], stored[i]) for i in range(40))
    no_flip = CIFAR10DataModule(
        data_dir=str(tmp_path), batch_size=4, num_workers=0, download=False, random_flip=False
    )
    no_flip.setup("fit")
    unflipped = index_and_flip(no_flip.train_dataloader(), stored)
    assert unflipped == [(i, False) for i, _ in pairs[0]]  # same order, no flips


def test_cifar_missing_offline_raises_clear_error(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"), download=False)
    for call in (dm.prepare_data, lambda: dm.setup("fit"), dm.reference_dataset):
        with pytest.raises(DatasetNotFoundError) as info:
            call()
        msg = str(info.value)
        assert str(tmp_path / "nowhere") in msg
        assert "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py" in msg
        assert "download=False" in msg


def test_cifar_download_failure_raises_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", offline)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(DatasetNotFoundError, match="download failed") as info:
        dm.prepare_data()
    assert str(tmp_path) in str(info.value) and "cifar-10-python.tar.gz" in str(info.value)
    assert not isinstance(info.value, DatasetCorruptedError)


def test_cifar_local_archive_is_extracted_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", offline)
    raw = make_fake_cifar(tmp_path / "src")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    dm = CIFAR10DataModule(data_dir=str(data_dir), download=True)
    dm.prepare_data()
    assert (data_dir / "cifar-10-batches-py" / "test_batch").is_file()
    assert not [p for p in data_dir.iterdir() if p.name.startswith(".cifar10-extract")]
    dm.setup("test")
    torch.testing.assert_close(
        dm.test_set[2], expected_float(raw["test"][2].reshape(3, 32, 32)), rtol=0, atol=1e-7
    )


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_cifar_corrupt_archive_raises_clear_error(tmp_path: Path, damage: str) -> None:
    make_fake_cifar(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    blob = archive.read_bytes()
    archive.write_bytes(b"not a tarball" * 50 if damage == "garbage" else blob[: len(blob) // 2])
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(DatasetCorruptedError) as info:
        dm.prepare_data()
    assert str(archive) in str(info.value) and "delete" in str(info.value)
    assert isinstance(info.value, DatasetNotFoundError)  # same kind of error


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign_global", "wrong_shape"])
def test_cifar_corrupt_batch_raises_clear_error(tmp_path: Path, damage: str) -> None:
    make_fake_cifar(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:2000])
    elif damage == "garbage":
        bad.write_bytes(b"\x00\x01garbage" * 100)
    elif damage == "foreign_global":  # refused by the restricted unpickler, never constructed
        bad.write_bytes(pickle.dumps({b"data": Path("x"), b"labels": [0]}))
    else:
        data = np.zeros((2, 100), dtype=np.uint8)
        bad.write_bytes(pickle.dumps({b"data": data, b"labels": [0, 1]}))
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=False)
    dm.prepare_data()  # files are present, so nothing to do
    with pytest.raises(DatasetCorruptedError) as info:
        dm.setup("fit")
    assert str(bad) in str(info.value) and "delete" in str(info.value)


# --------------------------------------------------------------------------------------- folder


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    rng = np.random.RandomState(7)
    root = tmp_path / "imgs"
    sizes = [(20, 24), (24, 20), (16, 16), (40, 30), (18, 33), (30, 30), (25, 19)]
    for i, (h, w) in enumerate(sizes):
        sub = "sub/" if i % 3 == 0 else ""
        ext = ".PNG" if i == 4 else ".png"
        _write(root / f"{sub}img{i}{ext}", rng.randint(0, 256, (h, w, 3)).astype(np.uint8))
    _write(root / "gray.bmp", rng.randint(0, 256, (16, 16)).astype(np.uint8))
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"ignored because hidden")
    return root


def test_folder_datamodule_shapes_grid_split(image_folder: Path) -> None:
    dm = ImageFolderDataModule(
        data_dir=str(image_folder), image_size=16, batch_size=3, num_workers=0, val_fraction=0.25
    )
    assert dm.image_shape == (3, 16, 16)
    assert dm.num_train + dm.num_test == 8 and dm.num_test == 2  # round(0.25 * 8)
    dm.setup(None)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (3, 3, 16, 16)
    assert_on_grid(batch)
    assert len(dm.train_dataloader()) == 6 // 3
    val = next(iter(dm.val_dataloader()))
    assert val.shape == (2, 3, 16, 16)
    assert_on_grid(val)
    assert len(dm.reference_dataset()) == 6

    other = ImageFolderDataModule(data_dir=str(image_folder), image_size=16, val_fraction=0.25)
    assert other.train_paths == dm.train_paths and other.heldout_paths == dm.heldout_paths
    assert set(dm.train_paths).isdisjoint(dm.heldout_paths)
    names = {p.name for p in dm.train_paths + dm.heldout_paths}
    assert "img4.PNG" in names and "gray.bmp" in names and "notes.txt" not in names
    tiny_fraction = ImageFolderDataModule(data_dir=str(image_folder), val_fraction=0.001)
    assert tiny_fraction.num_test == 1  # at least one held-out image


def test_folder_crop_resize_and_gray(tmp_path: Path) -> None:
    rng = np.random.RandomState(3)
    tall = rng.randint(0, 256, (20, 16, 3)).astype(np.uint8)  # H=20, W=16: crop rows 2..18
    _write(tmp_path / "tall.png", tall)
    got = load_image_uint8(tmp_path / "tall.png", 16)
    np.testing.assert_array_equal(got.numpy(), tall[2:18].transpose(2, 0, 1))

    const = np.zeros((40, 64, 3), dtype=np.uint8)
    const[...] = (10, 200, 77)
    _write(tmp_path / "const.png", const)  # shorter side 40 → 16: 16×25.6 → 16×26, crop 16×16
    got = load_image_uint8(tmp_path / "const.png", 16)
    assert got.shape == (3, 16, 16) and got.dtype == torch.uint8
    assert (got == torch.tensor([10, 200, 77], dtype=torch.uint8)[:, None, None]).all()

    gray = rng.randint(0, 256, (16, 16)).astype(np.uint8)
    _write(tmp_path / "g.png", gray)
    got = load_image_uint8(tmp_path / "g.png", 16)
    for c in range(3):
        np.testing.assert_array_equal(got[c].numpy(), gray)


def test_folder_flips_train_only(tmp_path: Path) -> None:
    rng = np.random.RandomState(5)
    for i in range(12):
        _write(tmp_path / f"{i}.png", rng.randint(0, 256, (8, 8, 3)).astype(np.uint8))
    dm = ImageFolderDataModule(
        data_dir=str(tmp_path), image_size=8, batch_size=3, num_workers=0, val_fraction=0.25
    )
    dm.setup(None)
    reference = dm.reference_dataset()
    stored = [reference[i] for i in range(len(reference))]
    assert len(stored) == 9 and all(not torch.equal(x, x.flip(-1)) for x in stored)
    train = dm.train_dataloader()
    pairs = [p for epoch in range(4) for p in index_and_flip(train, stored, epoch)]
    assert any(f for _, f in pairs) and not all(f for _, f in pairs)  # 36 coins
    workers = ImageFolderDataModule(
        data_dir=str(tmp_path), image_size=8, batch_size=3, num_workers=2, val_fraction=0.25
    )
    workers.setup("fit")
    assert index_and_flip(workers.train_dataloader(), stored, 2) == pairs[18:27]

    heldout = [dm.val_set[i] for i in range(len(dm.val_set))]
    for loader in (dm.val_dataloader(), dm.test_dataloader()):  # never flipped, in order
        assert not loader.sampler.flips
        assert index_and_flip(loader, heldout) == [(i, False) for i in range(3)]
    assert all(torch.equal(dm.reference_dataset()[i], stored[i]) for i in range(9))


def test_folder_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(DatasetNotFoundError, match="does not exist") as info:
        ImageFolderDataModule(data_dir=str(missing)).setup("fit")
    assert str(missing) in str(info.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetNotFoundError, match="no images") as info:
        ImageFolderDataModule(data_dir=str(empty)).setup("fit")
    assert str(empty) in str(info.value)

    bad_dir = tmp_path / "bad"
    _write(bad_dir / "ok.png", np.zeros((8, 8, 3), dtype=np.uint8))
    (bad_dir / "broken.png").write_bytes(b"\x89PNG definitely not")
    dm = ImageFolderDataModule(data_dir=str(bad_dir), image_size=8, val_fraction=0.5)
    dm.setup(None)
    broken = next(ds for ds in (dm.train_set, dm.val_set) if ds.paths[0].name == "broken.png")
    with pytest.raises(DatasetCorruptedError) as info:
        broken[0]
    assert str(bad_dir / "broken.png") in str(info.value)

    with pytest.raises(ValueError, match="val_fraction"):
        ImageFolderDataModule(data_dir=str(bad_dir), val_fraction=1.0)
