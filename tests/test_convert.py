"""Tests for the diffusers → UNet converter (src/ddpm/models/convert.py).

The reference is diffusers' own ``UNet2DModel`` (a dev extra): we build one with random weights,
``save_pretrained`` it, convert it and compare outputs.  Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from ddpm.models import UNet
from ddpm.models.convert import unet_from_diffusers, unet_kwargs_from_diffusers_config

# The released google/ddpm-cifar10-32 config (paper CIFAR-10 model, official TF conventions).
CIFAR10_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    attention_head_dim=None,
    norm_num_groups=32,
    norm_eps=1e-6,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
)
# google/ddpm-{celebahq,church,bedroom,cat}-256
DDPM_256_CONFIG = {
    **CIFAR10_CONFIG,
    "sample_size": 256,
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
}
# The 256 layout scaled down for CPU: six levels, attention at the fifth (4x4 here).
SMALL_256_STYLE = {
    **DDPM_256_CONFIG,
    "sample_size": 64,
    "block_out_channels": (8, 8, 16, 16, 32, 32),
    "norm_num_groups": 4,
}
# Same, with diffusers' default conventions and a learned-variance-sized output.
SMALL_DIFFUSERS_DEFAULTS = {
    **SMALL_256_STYLE,
    "out_channels": 6,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "norm_eps": 1e-5,
}
TINY_CONFIG = {
    **CIFAR10_CONFIG,
    "sample_size": 16,
    "block_out_channels": (8, 16),
    "down_block_types": ("AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D"),
    "layers_per_block": 1,
    "norm_num_groups": 4,
}
TIMESTEPS = torch.tensor([0, 999, 371])


def make_diffusers_unet(config: dict, seed: int = 0):
    """A diffusers UNet2DModel with every weight random (zero-init layers included)."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):  # skip diffusers' own initialisation: every value is set below
        model = diffusers.UNet2DModel(**config)
    assert not list(model.buffers())
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim > 1:
                param.copy_(noise * 0.5 / math.sqrt(param[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return model.eval()


def compare(model, net: UNet, config: dict, dtype: torch.dtype, atol: float) -> None:
    model, net = model.to(dtype), net.to(dtype)
    size = config["sample_size"]
    x = torch.randn(len(TIMESTEPS), config["in_channels"], size, size, dtype=dtype)
    with torch.no_grad():
        expected = model(x, TIMESTEPS).sample
        actual = net(x, TIMESTEPS)
    assert actual.shape == expected.shape == (len(TIMESTEPS), config["out_channels"], size, size)
    assert expected.abs().mean() > 0.1  # the comparison is not between two zero tensors
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def test_paper_cifar10_checkpoint_converts_exactly(tmp_path):
    model = make_diffusers_unet(CIFAR10_CONFIG)
    model.save_pretrained(tmp_path)
    net = unet_from_diffusers(tmp_path)
    assert not net.training
    assert sum(p.numel() for p in net.parameters()) == 35_746_307
    assert net.channel_mult == (1, 2, 2, 2) and net.attn_resolutions == (16,)
    torch.manual_seed(1)
    compare(model, net, CIFAR10_CONFIG, torch.float32, atol=1e-5)


@pytest.mark.parametrize("config", [SMALL_256_STYLE, SMALL_DIFFUSERS_DEFAULTS], ids=["tf", "hf"])
def test_256_style_checkpoint_converts_exactly(tmp_path, config):
    model = make_diffusers_unet(config)
    model.save_pretrained(tmp_path)
    net = unet_from_diffusers(tmp_path)
    torch.manual_seed(2)
    compare(model, net, config, torch.float32, atol=1e-5)
    compare(model, net, config, torch.float64, atol=1e-10)


def test_bin_weights_legacy_attention_names_and_unet_subfolder(tmp_path):
    """Old pipeline snapshots: weights as .bin in unet/, attention as query/key/value/proj_attn."""
    model = make_diffusers_unet(TINY_CONFIG)
    model.save_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    legacy = {}
    for key, value in model.state_dict().items():
        for new, old in [("to_q", "query"), ("to_k", "key"), ("to_v", "value")]:
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key.replace(".to_out.0.", ".proj_attn.")] = value.clone()
    assert any(".proj_attn." in k for k in legacy)
    torch.save(legacy, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    net = unet_from_diffusers(str(tmp_path))
    compare(model, net, TINY_CONFIG, torch.float64, atol=1e-10)


def test_ddpm_256_config_gives_the_released_architecture():
    diffusers = pytest.importorskip("diffusers")
    kwargs = unet_kwargs_from_diffusers_config(DDPM_256_CONFIG)
    assert kwargs == dict(
        in_channels=3,
        out_channels=3,
        base_channels=128,
        channel_mult=[1, 1, 2, 2, 4, 4],
        num_res_blocks=2,
        attn_resolutions=[16],
        dropout=0.0,
        resolution=256,
        num_groups=32,
        time_embed_dim=None,
        flip_sin_to_cos=False,
        freq_shift=1.0,
        norm_eps=1e-6,
        downsample_padding="asymmetric",
    )
    with torch.device("meta"):
        ours = sum(p.numel() for p in UNet(**kwargs).parameters())
        theirs = sum(p.numel() for p in diffusers.UNet2DModel(**DDPM_256_CONFIG).parameters())
    assert ours == theirs == 113_673_219


# ------------------------------------------------------------------ failures
def save_state_dict(directory: Path, state_dict: dict, config: dict) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(directory / "diffusion_pytorch_model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **config}))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state_dict = {k: v.clone() for k, v in make_diffusers_unet(TINY_CONFIG).state_dict().items()}
    del state_dict["mid_block.attentions.0.to_k.weight"]
    state_dict["mid_block.attentions.0.extra.weight"] = torch.zeros(3)
    save_state_dict(tmp_path, state_dict, TINY_CONFIG)
    with pytest.raises(ValueError) as info:
        unet_from_diffusers(tmp_path)
    message = str(info.value)
    assert "missing keys (1): mid_block.attentions.0.to_k.weight" in message
    assert "unexpected keys (1): mid_block.attentions.0.extra.weight" in message


def test_checkpoint_not_matching_its_config_reports_shapes(tmp_path):
    state_dict = make_diffusers_unet({**TINY_CONFIG, "out_channels": 6}).state_dict()
    save_state_dict(tmp_path, dict(state_dict), TINY_CONFIG)  # config claims 3 outputs
    with pytest.raises(ValueError, match=r"shape mismatches \(2\): conv_out.weight: checkpoint"):
        unet_from_diffusers(tmp_path)


def test_corrupted_weights_file_raises_value_error(tmp_path):
    save_state_dict(tmp_path, {"x": torch.zeros(1)}, TINY_CONFIG)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not read the weights file"):
        unet_from_diffusers(tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"attention_head_dim": 8}, "single-head"),
        ({"num_class_embeds": 10}, "num_class_embeds=10"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
        ({"up_block_types": ("UpBlock2D", "UpBlock2D")}, "must mirror down_block_types"),
        ({"block_out_channels": (8, 12)}, "multiples of the first entry"),
        ({"down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D")}, "must use only"),
    ],
)
def test_unsupported_configs_are_rejected(override, message):
    with pytest.raises(ValueError, match=message):
        unet_kwargs_from_diffusers_config({**TINY_CONFIG, **override})


def test_nonexistent_path_names_the_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        unet_from_diffusers(tmp_path / "no" / "such" / "model")
    message = str(info.value)
    assert "config.json" in message and "diffusion_pytorch_model.safetensors" in message


def test_directory_without_the_files_names_them(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"does not contain config.json and diffusion_"):
        unet_from_diffusers(tmp_path)


def test_repo_id_needs_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so "google/ddpm-cifar10-32" is not a local path
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails, no network
    with pytest.raises(ImportError, match="huggingface_hub"):
        unet_from_diffusers("google/ddpm-cifar10-32")


def test_repo_id_is_fetched_with_snapshot_download(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    model = make_diffusers_unet(TINY_CONFIG)
    model.save_pretrained(tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    net = unet_from_diffusers("someone/tiny-ddpm")
    assert calls[0][0] == "someone/tiny-ddpm"
    assert "diffusion_pytorch_model.safetensors" in calls[0][1]
    compare(model, net, TINY_CONFIG, torch.float64, atol=1e-10)

    def offline(repo_id, allow_patterns):
        raise OSError("network is unreachable")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"network is unreachable.*config.json"):
        unet_from_diffusers("someone/other-ddpm")
