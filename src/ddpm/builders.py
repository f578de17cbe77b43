"""Build every object of a run from its (Hydra) configuration, and rebuild a run from a checkpoint.

Entry points (``src/train.py``, ``src/eval.py``, ``src/sample.py``), tests and notebooks share these,
so a checkpoint always rebuilds exactly the model it was trained as.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.checkpoints import safe_load
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import CheckpointError, ConfigError, OutputDirError
from ddpm.lit_module import DiffusionLitModule

__all__ = [
    "build_datamodule",
    "build_diffusion",
    "build_module",
    "build_net",
    "ensure_writable_dir",
    "load_checkpoint",
    "load_for_inference",
    "load_inference_module",
    "load_module_from_checkpoint",
]


def _instantiate(node: Any, what: str, **kwargs: Any) -> Any:
    """``instantiate`` that turns a bad configuration into one clear :class:`ConfigError`."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, (ValueError, TypeError)):
            raise ConfigError(f"invalid {what} configuration: {cause}") from None
        raise


def build_diffusion(cfg: DictConfig) -> GaussianDiffusion:
    """The :class:`GaussianDiffusion` of ``cfg.diffusion`` (schedule × parameterisation × variance × loss).

    Raises:
        ConfigError: for a combination the loss cannot train, with the core's message.
    """
    return _instantiate(cfg.diffusion, "diffusion")


def build_datamodule(cfg: DictConfig) -> Any:
    """The LightningDataModule of ``cfg.data``."""
    return _instantiate(cfg.data, "data")


def build_net(
    cfg: DictConfig, diffusion: GaussianDiffusion, image_shape: tuple[int, int, int]
) -> torch.nn.Module:
    """The network of ``cfg.model`` with in/out channels and resolution set from the data.

    Output channels are ``C × diffusion.output_channels_multiplier`` (2C for learned variances).
    """
    channels, height, width = image_shape
    if height != width:
        raise ConfigError(f"images must be square for the UNet, got {height}×{width}")
    return _instantiate(
        cfg.model,
        "model",
        in_channels=channels,
        out_channels=channels * diffusion.output_channels_multiplier,
        resolution=height,
    )


def _build_optimizer_factory(node: DictConfig) -> Any:
    """The optimiser factory of ``cfg.optimizer``, tried once on a stand-in parameter so that a bad
    setting (``optimizer.lr=-1e-3``) stops here with the keys named, not inside ``trainer.fit``."""
    factory = _instantiate(node, "optimizer")
    try:
        factory([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        given = ", ".join(
            f"optimizer.{key}={value}"
            for key, value in node.items()
            if not str(key).startswith("_")
        )
        raise ConfigError(f"invalid optimizer settings ({given}): {err}") from None
    return factory


def build_module(cfg: DictConfig, image_shape: tuple[int, int, int]) -> DiffusionLitModule:
    """The LightningModule wiring net, diffusion and optimiser from ``cfg``.

    ``cfg.module`` gives its arguments and ``cfg.speed`` (``conf/speed/``) its speed options.
    """
    diffusion = build_diffusion(cfg)
    net = build_net(cfg, diffusion, image_shape)
    optimizer = _build_optimizer_factory(cfg.optimizer) if cfg.get("optimizer") else None
    module_cfg = OmegaConf.to_container(cfg.module, resolve=True) if cfg.get("module") else {}
    speed = OmegaConf.to_container(cfg.speed, resolve=True) if cfg.get("speed") else {}
    return DiffusionLitModule(
        net=net,
        diffusion=diffusion,
        image_shape=image_shape,
        optimizer=optimizer,
        **module_cfg,
        **speed,
    )


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` and check a file can be written there, or raise :class:`OutputDirError`."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputDirError(
            f"cannot write to the output directory {str(path)!r} ({err.strerror}); "
            "choose another with paths.log_dir=... or paths.output_dir=..."
        ) from None
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint onto the CPU without running any code from it.

    Reads through :func:`ddpm.checkpoints.safe_load` (``torch.load(weights_only=True)``), the
    same reader Lightning's resume path uses via ``AtomicCheckpointIO``.

    Raises:
        CheckpointError: naming the file, when it is missing, unreadable, references Python
            objects that only arbitrary unpickling can build, or has no ``state_dict``.
    """
    checkpoint = safe_load(path, map_location="cpu")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def load_module_from_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[DiffusionLitModule, DictConfig]:
    """Rebuild the LightningModule saved in ``path`` from the run configuration stored in it.

    Returns ``(module, cfg)``; the module is in eval mode with its EMA network loaded.
    """
    checkpoint = load_checkpoint(path)
    if "run_config" not in checkpoint or "image_shape" not in checkpoint:
        raise CheckpointError(
            f"{str(path)!r} has no saved run configuration; it was not written by src/train.py"
        )
    cfg = OmegaConf.create(checkpoint["run_config"])
    module = build_module(cfg, tuple(checkpoint["image_shape"]))
    missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{str(path)!r} does not match its configuration: missing keys {missing[:10]}, "
            f"unexpected keys {unexpected[:10]}"
        )
    return module.to(map_location).eval(), cfg


def load_inference_module(
    ckpt_path: str | Path | None = None,
    pretrained: str | Path | None = None,
    pretrained_diffusion: DictConfig | None = None,
) -> tuple[DiffusionLitModule, DictConfig | None]:
    """The LightningModule to evaluate (on the CPU), and the run config (None for a released model).

    A checkpoint gives its own module; a released model (see :func:`load_for_inference`) is
    wrapped in a :class:`DiffusionLitModule` whose EMA network is a copy of its weights.
    """
    if ckpt_path and not pretrained:
        return load_module_from_checkpoint(ckpt_path)
    diffusion, net, image_shape, _ = load_for_inference(ckpt_path, pretrained, pretrained_diffusion)
    return DiffusionLitModule(net=net, diffusion=diffusion, image_shape=image_shape).eval(), None


def load_for_inference(
    ckpt_path: str | Path | None = None,
    pretrained: str | Path | None = None,
    pretrained_diffusion: DictConfig | None = None,
    device: str | torch.device = "cpu",
) -> tuple[GaussianDiffusion, torch.nn.Module, tuple[int, int, int], DictConfig | None]:
    """The (diffusion, EMA network, image shape, run config) to sample or evaluate with.

    Exactly one of ``ckpt_path`` (a checkpoint of ``src/train.py``; the EMA weights are used) or
    ``pretrained`` (a diffusers-layout directory or Hugging Face repo id such as
    ``google/ddpm-cifar10-32``, combined with ``pretrained_diffusion``, a ``GaussianDiffusion``
    node) must be given.
    """
    if bool(ckpt_path) == bool(pretrained):
        raise ConfigError(
            "give exactly one of ckpt_path=<run>/checkpoints/last.ckpt or "
            f"pretrained=<dir or repo id> (got ckpt_path={ckpt_path!r}, pretrained={pretrained!r})"
        )
    if ckpt_path:
        module, cfg = load_module_from_checkpoint(ckpt_path, map_location=device)
        return module.ema_diffusion, module.ema_net, module.image_shape, cfg
    from ddpm.models.convert import unet_from_diffusers

    if pretrained_diffusion is None:
        raise ConfigError("pretrained=... needs pretrained_diffusion (schedule and objective)")
    try:
        net = unet_from_diffusers(str(pretrained), map_location="cpu")
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise CheckpointError(f"cannot load pretrained={pretrained!r}: {err}") from None
    diffusion = _instantiate(pretrained_diffusion, "pretrained_diffusion")
    image_shape = (int(net.in_channels), int(net.resolution), int(net.resolution))
    return diffusion.to(device), net.to(device).eval(), image_shape, None
