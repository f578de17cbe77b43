"""Load Hugging Face ``diffusers`` ``UNet2DModel`` checkpoints into our :class:`~ddpm.models.UNet`.

The released DDPM models (``google/ddpm-cifar10-32``, ``google/ddpm-celebahq-256``,
``google/ddpm-church-256`` …) are distributed in the diffusers layout: a ``config.json`` and a
``diffusion_pytorch_model.safetensors`` (or ``.bin``) state dict.  This module reads those two
files with ``json`` and ``safetensors``/``torch.load`` only (no ``diffusers`` import), builds the
matching :class:`UNet` and renames the weights, so the result is called as ``net(x_t, t)``.

Key correspondence (ours → diffusers)::

    time_mlp.0 / time_mlp.2                 time_embedding.linear_1 / linear_2
    conv_in, norm_out, conv_out             conv_in, conv_norm_out, conv_out
    down_levels.i.res_blocks.j              down_blocks.i.resnets.j
    down_levels.i.attn_blocks.j             down_blocks.i.attentions.j
    down_levels.i.downsample.conv           down_blocks.i.downsamplers.0.conv
    middle.res1 / attn / res2               mid_block.resnets.0 / attentions.0 / resnets.1
    up_levels.k.res_blocks.j                up_blocks.k.resnets.j      (k = 0: lowest resolution)
    up_levels.k.attn_blocks.j               up_blocks.k.attentions.j
    up_levels.k.upsample.conv               up_blocks.k.upsamplers.0.conv
    ResBlock  norm1 conv1 temb_proj norm2 conv2 skip
              norm1 conv1 time_emb_proj norm2 conv2 conv_shortcut
    Attention norm q k v proj_out
              group_norm to_q to_k to_v to_out.0   (legacy: query key value proj_attn)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ddpm.models.unet import UNet

__all__ = [
    "CONFIG_FILE",
    "WEIGHT_FILES",
    "convert_diffusers_state_dict",
    "unet_from_diffusers",
    "unet_kwargs_from_diffusers_config",
]

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_EXPECTED_FILES = f"{CONFIG_FILE} and {WEIGHT_FILES[0]} (or {WEIGHT_FILES[1]})"
_MAX_LISTED_KEYS = 40

_RES_LEAVES: dict[str, tuple[str, ...]] = {
    "norm1": ("norm1",),
    "conv1": ("conv1",),
    "temb_proj": ("time_emb_proj",),
    "norm2": ("norm2",),
    "conv2": ("conv2",),
    "skip": ("conv_shortcut",),
}
_ATTN_LEAVES: dict[str, tuple[str, ...]] = {
    "norm": ("group_norm",),
    "q": ("to_q", "query"),
    "k": ("to_k", "key"),
    "v": ("to_v", "value"),
    "proj_out": ("to_out.0", "proj_attn"),
}
# Downsample2D stores its conv as `conv`; old checkpoints also used `op` or `Conv2d_0`.
_RESAMPLE_LEAVES = ("conv", "op", "Conv2d_0")


# ---------------------------------------------------------------------------------------------
# config.json → UNet kwargs
# ---------------------------------------------------------------------------------------------
def _require(config: Mapping[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> None:
    value = config.get(key, default)
    if value not in allowed:
        raise ValueError(
            f"unsupported diffusers config: {key}={value!r}; the DDPM UNet supports only "
            f"{key} in {list(allowed)}"
        )


def unet_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Translate a diffusers ``UNet2DModel`` ``config.json`` into :class:`UNet` keyword arguments.

    ``block_out_channels`` become ``base_channels`` and ``channel_mult``; the levels whose
    ``down_block_types`` entry is ``AttnDownBlock2D`` become ``attn_resolutions``
    (``sample_size / 2**level``); ``downsample_padding`` 0 / 1 become ``"asymmetric"`` /
    ``"symmetric"``; missing keys take diffusers' defaults.

    Raises:
        ValueError: for features the paper's UNet does not have (other block types, multi-head
            attention, class conditioning, Fourier time embeddings, scale-shift norm, …).
    """
    class_name = config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise ValueError(f"expected a diffusers UNet2DModel config, got _class_name={class_name!r}")
    _require(config, "time_embedding_type", ("positional",), "positional")
    _require(config, "act_fn", ("silu", "swish"), "silu")
    _require(config, "center_input_sample", (False,), False)
    _require(config, "class_embed_type", (None,), None)
    _require(config, "num_class_embeds", (None,), None)
    _require(config, "resnet_time_scale_shift", ("default",), "default")
    _require(config, "mid_block_type", ("UNetMidBlock2D",), "UNetMidBlock2D")
    _require(config, "add_attention", (True,), True)
    _require(config, "downsample_type", ("conv",), "conv")
    _require(config, "upsample_type", ("conv",), "conv")
    _require(config, "mid_block_scale_factor", (1,), 1)

    block_out_channels = [int(c) for c in config.get("block_out_channels", (224, 448, 672, 896))]
    down_types = list(config.get("down_block_types", config.get("down_blocks", ())))
    up_types = list(config.get("up_block_types", config.get("up_blocks", ())))
    num_levels = len(block_out_channels)
    if not (len(down_types) == len(up_types) == num_levels) or num_levels == 0:
        raise ValueError(
            f"block_out_channels {block_out_channels}, down_block_types {down_types} and "
            f"up_block_types {up_types} must have the same non-zero length"
        )
    base_channels = block_out_channels[0]
    if any(c % base_channels for c in block_out_channels):
        raise ValueError(
            f"block_out_channels {block_out_channels} must all be multiples of the first entry "
            f"{base_channels} to be expressed as base_channels * channel_mult"
        )
    channel_mult = [c // base_channels for c in block_out_channels]

    down_allowed = ("DownBlock2D", "AttnDownBlock2D")
    if any(t not in down_allowed for t in down_types):
        raise ValueError(f"down_block_types {down_types} must use only {list(down_allowed)}")
    attn_levels = [i for i, t in enumerate(down_types) if t == "AttnDownBlock2D"]
    expected_up = [
        "AttnUpBlock2D" if num_levels - 1 - k in attn_levels else "UpBlock2D"
        for k in range(num_levels)
    ]
    if up_types != expected_up:
        raise ValueError(
            f"up_block_types {up_types} must mirror down_block_types {down_types}, i.e. be "
            f"{expected_up}"
        )

    sample_size = config.get("sample_size")
    if isinstance(sample_size, list | tuple):
        if len(sample_size) != 2 or sample_size[0] != sample_size[1]:
            raise ValueError(f"only square sample_size is supported, got {sample_size}")
        sample_size = sample_size[0]
    if not isinstance(sample_size, int):
        raise ValueError(f"config.json needs an integer sample_size, got {sample_size!r}")

    num_groups = config.get("norm_num_groups", 32)
    if not isinstance(num_groups, int):
        raise ValueError(f"norm_num_groups must be an integer, got {num_groups!r}")
    attn_groups = config.get("attn_norm_num_groups")
    if attn_groups not in (None, num_groups):
        raise ValueError(
            f"attn_norm_num_groups={attn_groups} differs from norm_num_groups={num_groups}; "
            f"the DDPM UNet uses one GroupNorm group count everywhere"
        )

    head_dim = config.get("attention_head_dim", 8)
    if head_dim is not None:
        attention_widths = [block_out_channels[i] for i in attn_levels] + [block_out_channels[-1]]
        if any(width != head_dim for width in attention_widths):
            raise ValueError(
                f"attention_head_dim={head_dim} means multi-head attention at widths "
                f"{attention_widths}; the DDPM UNet is single-head (attention_head_dim null or "
                f"equal to the channel count)"
            )

    padding = config.get("downsample_padding", 1)
    if padding not in (0, 1):
        raise ValueError(f"downsample_padding must be 0 or 1, got {padding!r}")

    return {
        "in_channels": int(config.get("in_channels", 3)),
        "out_channels": int(config.get("out_channels", 3)),
        "base_channels": base_channels,
        "channel_mult": channel_mult,
        "num_res_blocks": int(config.get("layers_per_block", 2)),
        "attn_resolutions": [sample_size // 2**i for i in attn_levels],
        "dropout": float(config.get("dropout", 0.0)),
        "resolution": sample_size,
        "num_groups": num_groups,
        "time_embed_dim": config.get("time_embedding_dim"),
        "flip_sin_to_cos": bool(config.get("flip_sin_to_cos", True)),
        "freq_shift": float(config.get("freq_shift", 0)),
        "norm_eps": float(config.get("norm_eps", 1e-5)),
        "downsample_padding": "asymmetric" if padding == 0 else "symmetric",
    }


# ---------------------------------------------------------------------------------------------
# state dict renaming
# ---------------------------------------------------------------------------------------------
def _diffusers_names(key: str) -> tuple[str, ...]:
    """Candidate diffusers names (preferred first) for one of our state-dict keys."""
    module, _, tensor_name = key.rpartition(".")
    parts = module.split(".")
    bases: tuple[str, ...]
    if parts[0] == "time_mlp":
        bases = ({"0": "time_embedding.linear_1", "2": "time_embedding.linear_2"}[parts[1]],)
    elif module in ("conv_in", "conv_out"):
        bases = (module,)
    elif module == "norm_out":
        bases = ("conv_norm_out",)
    elif parts[0] in ("down_levels", "up_levels"):
        block = f"{'down' if parts[0] == 'down_levels' else 'up'}_blocks.{parts[1]}"
        kind = parts[2]
        if kind == "res_blocks":
            bases = tuple(f"{block}.resnets.{parts[3]}.{leaf}" for leaf in _RES_LEAVES[parts[4]])
        elif kind == "attn_blocks":
            bases = tuple(
                f"{block}.attentions.{parts[3]}.{leaf}" for leaf in _ATTN_LEAVES[parts[4]]
            )
        else:  # downsample / upsample
            sampler = "downsamplers" if kind == "downsample" else "upsamplers"
            bases = tuple(f"{block}.{sampler}.0.{leaf}" for leaf in _RESAMPLE_LEAVES)
    elif parts[0] == "middle":
        if parts[1] == "attn":
            bases = tuple(f"mid_block.attentions.0.{leaf}" for leaf in _ATTN_LEAVES[parts[2]])
        else:
            index = {"res1": 0, "res2": 1}[parts[1]]
            bases = tuple(f"mid_block.resnets.{index}.{leaf}" for leaf in _RES_LEAVES[parts[2]])
    else:  # pragma: no cover - guards against a UNet change without a converter change
        raise RuntimeError(f"no diffusers name known for UNet parameter {key!r}")
    return tuple(f"{base}.{tensor_name}" for base in bases)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f", … and {more} more" if more > 0 else "")


def convert_diffusers_state_dict(
    state_dict: Mapping[str, torch.Tensor], net: UNet
) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DModel`` state dict to ``net``'s keys (float32, same device).

    Both the current attention names (``to_q``, ``to_out.0``) and the legacy ones (``query``,
    ``proj_attn``) are accepted; 1x1-conv-shaped attention weights ``[C, C, 1, 1]`` are reshaped
    to the linear ``[C, C]``.

    Raises:
        ValueError: listing every missing key, unexpected key and shape mismatch, when the
            checkpoint does not fit the UNet built from its config.
    """
    remaining = set(state_dict)
    converted: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    for key, reference in net.state_dict().items():
        candidates = _diffusers_names(key)
        present = [name for name in candidates if name in state_dict]
        if not present:
            missing.append(candidates[0])
            continue
        remaining.difference_update(present)
        tensor = state_dict[present[0]]
        if tensor.ndim == 4 and reference.ndim == 2 and tensor.shape[2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]
        if tensor.shape != reference.shape:
            mismatched.append(
                f"{present[0]}: checkpoint {tuple(tensor.shape)}, expected {tuple(reference.shape)}"
            )
            continue
        converted[key] = tensor.to(torch.float32).contiguous()
    unexpected = sorted(remaining)
    if missing or unexpected or mismatched:
        lines = ["the diffusers state dict does not match the UNet built from its config.json:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
        raise ValueError("\n".join(lines))
    return converted


# ---------------------------------------------------------------------------------------------
# files: local directory or Hub repo id
# ---------------------------------------------------------------------------------------------
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def _find_model_files(directory: Path) -> tuple[Path, Path] | None:
    """``(config.json, weights)`` in ``directory`` or its ``unet/`` subfolder, else ``None``."""
    for folder in (directory, directory / "unet"):
        if (folder / CONFIG_FILE).is_file():
            for name in WEIGHT_FILES:
                if (folder / name).is_file():
                    return folder / CONFIG_FILE, folder / name
    return None


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise ImportError(
            f"{repo_id!r} is not a local directory, and downloading it from the Hugging Face "
            f"Hub needs the optional package huggingface_hub (pip install huggingface_hub). "
            f"Alternatively put {_EXPECTED_FILES} in a directory and pass its path."
        ) from error
    directory: Path | None = None
    try:
        for weights in WEIGHT_FILES:  # safetensors first; fall back to .bin only if needed
            patterns = [CONFIG_FILE, weights, f"unet/{CONFIG_FILE}", f"unet/{weights}"]
            directory = Path(snapshot_download(repo_id, allow_patterns=patterns))
            if _find_model_files(directory) is not None:
                break
    except Exception as error:  # network, authentication, unknown repo …
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local directory nor downloadable from the Hugging Face "
            f"Hub ({type(error).__name__}: {error}). Pass a directory containing "
            f"{_EXPECTED_FILES}."
        ) from error
    assert directory is not None
    return directory


def _resolve(path_or_repo_id: str | Path) -> tuple[Path, Path]:
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        directory = path
    elif path.exists():
        raise FileNotFoundError(
            f"{path} is a file; pass the directory containing {_EXPECTED_FILES} instead"
        )
    elif isinstance(path_or_repo_id, str) and _REPO_ID.match(path_or_repo_id):
        directory = _download(path_or_repo_id)
    else:
        raise FileNotFoundError(
            f"{path} does not exist. Expected a directory containing {_EXPECTED_FILES} "
            f"(as written by diffusers' UNet2DModel.save_pretrained, possibly in a unet/ "
            f"subfolder) or a Hugging Face repo id such as 'google/ddpm-cifar10-32'."
        )
    files = _find_model_files(directory)
    if files is None:
        found = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(
            f"{directory} does not contain {_EXPECTED_FILES} (nor a unet/ subfolder with them); "
            f"found {found}"
        )
    return files


def _load_weights(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device=str(torch.device(map_location)))
        state_dict = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"could not read the weights file {path}: {error}") from error
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state_dict).__name__})")
    return state_dict


def unet_from_diffusers(
    path_or_repo_id: str | Path, map_location: str | torch.device = "cpu"
) -> UNet:
    """Build a :class:`UNet` holding the weights of a diffusers ``UNet2DModel`` checkpoint.

    Args:
        path_or_repo_id: a directory with ``config.json`` and
            ``diffusion_pytorch_model.safetensors`` (or ``.bin``), directly or in ``unet/``;
            or a Hub repo id such as ``"google/ddpm-cifar10-32"`` (downloaded with
            ``huggingface_hub.snapshot_download`` when that optional package is installed).
        map_location: device for the weights and the returned network.

    Returns:
        The network in eval mode, float32, on ``map_location``; ``net(x [B,C,H,W], t [B])``
        gives the same output as the diffusers model's ``.sample``.

    Raises:
        FileNotFoundError: the directory or the expected files do not exist.
        ImportError: a repo id was given but huggingface_hub is not installed.
        ValueError: unsupported config, unreadable weights, or a state dict that does not fit
            (missing / unexpected keys and shape mismatches are listed).
    """
    config_path, weights_path = _resolve(path_or_repo_id)
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"could not parse {config_path}: {error}") from error
    kwargs = unet_kwargs_from_diffusers_config(config)
    with torch.device("meta"):
        net = UNet(**kwargs)
    converted = convert_diffusers_state_dict(_load_weights(weights_path, map_location), net)
    net.load_state_dict(converted, strict=True, assign=True)
    return net.to(map_location).eval()
