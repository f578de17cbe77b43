"""Loading a checkpoint never runs code from it (issue #13 A).

The hostile file is a real ``torch.save`` pickle whose payload creates a marker file when it is
unpickled with ``weights_only=False`` (the first test shows it does), so each refusal test also
checks the marker is absent: the code in the file never ran.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from conftest import TinyNet  # tests/ is on sys.path under pytest
from ddpm.builders import load_checkpoint
from ddpm.callbacks.checkpoint_io import AtomicCheckpointIO
from ddpm.diffusion import GaussianDiffusion, make_betas
from ddpm.errors import CheckpointError
from ddpm.lit_module import DiffusionLitModule


class _TouchOnUnpickle:
    """Unpickles as ``Path(marker).touch()``: stands in for any code a hostile file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.marker),))


class _PlainObject:
    """A harmless custom class: still only arbitrary unpickling can rebuild it."""

    def __init__(self) -> None:
        self.value = 1


def _hostile_checkpoint(tmp_path: Path, name: str = "hostile.ckpt") -> tuple[Path, Path]:
    """A Lightning-shaped checkpoint carrying the payload; returns (checkpoint, marker)."""
    marker = tmp_path / f"{name}.ran"
    path = tmp_path / name
    torch.save(
        {
            "state_dict": {"net.weight": torch.zeros(2)},
            "global_step": 2,
            "evil": _TouchOnUnpickle(marker),
        },
        path,
    )
    return path, marker


def _tiny_module() -> DiffusionLitModule:
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(make_betas("cosine", 20))
    return DiffusionLitModule(TinyNet(20), diffusion, (1, 8, 8), lr_warmup_steps=1, seed=0)


def _trainer(root: Path, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)],
        plugins=[AtomicCheckpointIO()],
    )


def _loader() -> DataLoader:
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return DataLoader(TensorDataset(images), batch_size=4)


def test_the_payload_runs_under_full_unpickling(tmp_path: Path) -> None:
    """Control: the hostile file is live, so the refusal tests below prove something."""
    path, marker = _hostile_checkpoint(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.is_file()


def test_load_checkpoint_refuses_code_in_the_file(tmp_path: Path) -> None:
    path, marker = _hostile_checkpoint(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message
    assert "arbitrary unpickling" in message and "execute code" in message
    assert "getattr" in message  # the offending global, named from the file
    assert "only if you trust the file" in message.lower()
    assert not marker.exists(), "the checkpoint's code ran"


def test_load_checkpoint_refuses_objects_of_unknown_classes(tmp_path: Path) -> None:
    path = tmp_path / "object.ckpt"
    torch.save({"state_dict": {}, "extra": _PlainObject()}, path)
    with pytest.raises(CheckpointError, match=r"_PlainObject.*arbitrary unpickling"):
        load_checkpoint(path)


@pytest.mark.parametrize("weights_only", [None, True, False])
def test_checkpoint_io_refuses_code_in_the_file(tmp_path: Path, weights_only: bool | None) -> None:
    """Lightning's resume path reads through the plugin; even weights_only=False is not honoured."""
    path, marker = _hostile_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=weights_only)
    assert not marker.exists(), "the checkpoint's code ran"


def test_trainer_resume_refuses_code_in_the_file(tmp_path: Path) -> None:
    path, marker = _hostile_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        _trainer(tmp_path / "run", max_steps=3).fit(
            _tiny_module(), train_dataloaders=_loader(), ckpt_path=str(path)
        )
    assert not marker.exists(), "the checkpoint's code ran"


def test_genuine_checkpoints_load_and_resume(tmp_path: Path) -> None:
    """A real checkpoint of the project's module loads with weights_only=True and resumes."""
    _trainer(tmp_path / "run", max_steps=2).fit(_tiny_module(), train_dataloaders=_loader())
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] == 2 and checkpoint["image_shape"] == [1, 8, 8]
    assert set(checkpoint["state_dict"]) >= {"net.conv.weight", "ema.ema_net.conv.weight"}
    via_plugin = AtomicCheckpointIO().load_checkpoint(last)
    assert torch.equal(
        via_plugin["state_dict"]["net.conv.weight"], checkpoint["state_dict"]["net.conv.weight"]
    )

    resumed = _trainer(tmp_path / "resumed", max_steps=3)
    resumed.fit(_tiny_module(), train_dataloaders=_loader(), ckpt_path=str(last))
    assert resumed.global_step == 3


def test_hand_built_checkpoint_of_plain_values_loads(tmp_path: Path) -> None:
    path = tmp_path / "plain.ckpt"
    saved = {
        "state_dict": {"w": torch.arange(4.0), "step": torch.tensor(3)},
        "global_step": 3,
        "run_config": {"seed": 1, "name": "x", "lr": 2e-4, "steps": [1, 2], "none": None},
        "image_shape": [1, 8, 8],
        "rng": ["MT19937", torch.zeros(3, dtype=torch.int64), 0, 0, 0.0],
    }
    torch.save(saved, path)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], saved["state_dict"]["w"])
    assert loaded["run_config"] == saved["run_config"] and loaded["global_step"] == 3
    assert loaded["rng"][0] == "MT19937" and torch.equal(loaded["rng"][1], saved["rng"][1])


def test_missing_and_damaged_files_keep_their_messages(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read") as err:
        AtomicCheckpointIO().load_checkpoint(damaged)
    # A damaged file is not an unsafe one, and torch's advice to retry unsafely is not passed on.
    assert "arbitrary unpickling" not in str(err.value)
    assert "weights_only" not in str(err.value)
