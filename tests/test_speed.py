"""Speed options at inference (``ddpm.models.speed``): same outputs as the plain network.

Tolerances: channels-last is float32 with another summation order inside the convolutions
(relative 1e-5); bfloat16 autocast has an 8-bit mantissa (relative ~4e-3 per op, 2e-2 overall).
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ddpm.diffusion import GaussianDiffusion, make_parameterization
from ddpm.errors import ConfigError
from ddpm.models import UNet
from ddpm.models.speed import SpeedOptionsNet, fast_inference_net, run_net, speed_options

SHAPE = (1, 8, 8)


def _net() -> UNet:
    """A tiny UNet with non-zero output (its last convolution is zero-initialised)."""
    torch.manual_seed(0)
    net = UNet(
        in_channels=1, out_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
        attn_resolutions=(4,), dropout=0.0, resolution=8, num_groups=8,
    )  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return net.eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, *SHAPE, generator=generator), torch.tensor([0, 10, 500, 999])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_no_option_returns_the_network_itself():
    net = _net()
    assert fast_inference_net(net) is net


@torch.no_grad()
def test_channels_last_gives_the_plain_output():
    net = _net()
    x, t = _inputs()
    expected = net(x, t)
    fast = fast_inference_net(net, channels_last=True)
    assert isinstance(fast, SpeedOptionsNet)
    assert fast.net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    out = fast(x, t)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert _rel(out, expected) < 1e-5


@torch.no_grad()
def test_bf16_autocast_gives_the_plain_output_within_bf16_precision():
    net = _net()
    x, t = _inputs()
    expected = net(x, t)
    out = fast_inference_net(net, bf16_autocast=True)(x, t)
    assert out.dtype == torch.float32  # the diffusion maths after the network stays float32
    assert 0 < _rel(out, expected) < 2e-2  # autocast really ran, and stayed close


@torch.no_grad()
def test_run_net_is_what_the_wrapper_calls():
    net = _net()
    x, t = _inputs()
    wrapped = fast_inference_net(net, bf16_autocast=True)
    assert torch.equal(wrapped(x, t), run_net(net, x, t, bf16_autocast=True))


@torch.no_grad()
def test_sampling_through_the_wrapper_matches_the_plain_network():
    """A deterministic DDIM chain: the same generator gives the same images (float32 options)."""
    diffusion = GaussianDiffusion(
        torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), make_parameterization("eps")
    )
    net = _net()
    plain = diffusion.sample(net, (3, *SHAPE), generator=torch.Generator().manual_seed(2),
                             sampler="ddim", steps=5)  # fmt: skip
    fast = fast_inference_net(_net(), channels_last=True)
    faster = diffusion.sample(fast, (3, *SHAPE), generator=torch.Generator().manual_seed(2),
                              sampler="ddim", steps=5)  # fmt: skip
    assert (faster - plain).abs().max().item() < 1e-4


def test_speed_options_from_config_and_a_clear_error_on_typos():
    node = OmegaConf.create({"channels_last": True, "bf16_autocast": False})
    assert speed_options(node) == {"channels_last": True, "bf16_autocast": False, "compile": False}
    assert speed_options(None) == {"channels_last": False, "bf16_autocast": False, "compile": False}
    with pytest.raises(ConfigError, match=r"unknown speed option.*bf16.*choose from"):
        speed_options(OmegaConf.create({"bf16": True}))
    # The group's training-only option is accepted and does not reach the inference network.
    assert speed_options(OmegaConf.create({"fused_adam": True, "compile": True})) == {
        "channels_last": False, "bf16_autocast": False, "compile": True,
    }  # fmt: skip


def test_one_speed_group_reaches_training_sampling_and_evaluation(compose_cfg):
    """``conf/speed/`` is in train.yaml, sample.yaml and eval.yaml, and training builds its
    module from it (there is no ``module.channels_last`` any more)."""
    from ddpm.builders import build_module

    for name in ("train", "sample", "eval"):
        cfg = compose_cfg("speed.channels_last=true", config_name=name, tiny=False)
        assert cfg.speed == {
            "channels_last": True, "bf16_autocast": False, "compile": False, "fused_adam": False,
        }, name  # fmt: skip
    cfg = compose_cfg("speed.channels_last=true", "speed.bf16_autocast=true")
    assert "channels_last" not in cfg.module
    module = build_module(cfg, (1, 8, 8))
    assert module.channels_last and module.bf16_autocast and not module.fused_adam
    assert module.net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
@torch.no_grad()
def test_compile_gives_the_plain_output():
    net = _net()
    x, t = _inputs()
    expected = net(x, t)
    try:
        out = fast_inference_net(net, compile=True)(x, t)
    except Exception as err:  # no C++ compiler or an unsupported platform
        pytest.skip(f"torch.compile does not work on this machine: {type(err).__name__}: {err}")
    assert _rel(out, expected) < 1e-5  # float32; inductor fuses and reorders elementwise ops
