"""Tests for the paper's UNet (src/ddpm/models/unet.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddpm.models import UNet
from ddpm.models.unet import AttentionBlock, sinusoidal_timestep_embedding

PAPER_CIFAR10 = dict(
    in_channels=3,
    out_channels=3,
    base_channels=128,
    channel_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(16,),
    dropout=0.1,
    resolution=32,
    num_groups=32,
)
DDPM_256 = dict(
    in_channels=3,
    out_channels=3,
    base_channels=128,
    channel_mult=(1, 1, 2, 2, 4, 4),
    num_res_blocks=2,
    attn_resolutions=(16,),
    dropout=0.0,
    resolution=256,
    num_groups=32,
)
DIGITS = dict(
    in_channels=1,
    out_channels=1,
    base_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    resolution=8,
    num_groups=8,
    dropout=0.0,
)
TINY = dict(
    in_channels=3,
    out_channels=3,
    base_channels=16,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    resolution=16,
    num_groups=4,
    dropout=0.0,
)


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def randomize_zero_init_layers(net: UNet, seed: int = 0) -> None:
    """Give every parameter a random value so the network output depends on all of them
    (GroupNorm scales near 1, weights ~ N(0, 0.25 / fan_in), biases ~ N(0, 0.01))."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if param.ndim > 1:
                param.copy_(noise * 0.5 / math.sqrt(param[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)


# ------------------------------------------------------------------ parameter counts
def test_paper_cifar10_has_exactly_35_746_307_parameters():
    with torch.device("meta"):
        net = UNet(**PAPER_CIFAR10)
    assert n_params(net) == 35_746_307


def test_defaults_are_the_paper_cifar10_configuration():
    with torch.device("meta"):
        assert n_params(UNet()) == 35_746_307


def test_doubling_out_channels_changes_only_the_final_conv():
    with torch.device("meta"):
        net3 = UNet(**PAPER_CIFAR10)
        net6 = UNet(**{**PAPER_CIFAR10, "out_channels": 6})
    shapes3 = {k: v.shape for k, v in net3.named_parameters()}
    shapes6 = {k: v.shape for k, v in net6.named_parameters()}
    assert shapes3.keys() == shapes6.keys()
    changed = sorted(k for k in shapes3 if shapes3[k] != shapes6[k])
    assert changed == ["conv_out.bias", "conv_out.weight"]
    # final conv 3x3 from 128 channels: 3 more output channels = 3 * (128*9 + 1) parameters
    assert n_params(net6) - n_params(net3) == 3 * (128 * 9 + 1) == 3459


def test_ddpm_256_parameter_count():
    # the count of the released google/ddpm-*-256 UNets (cross-checked against diffusers'
    # UNet2DModel in tests/test_convert.py)
    with torch.device("meta"):
        assert n_params(UNet(**DDPM_256)) == 113_673_219


# ------------------------------------------------------------------ shapes
@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        (DIGITS, (3, 1, 8, 8)),
        ({**DIGITS, "out_channels": 2}, (2, 1, 8, 8)),
        (TINY, (2, 3, 16, 16)),
        ({**TINY, "out_channels": 6}, (1, 3, 16, 16)),
        (
            {**TINY, "channel_mult": (1, 2), "attn_resolutions": (), "num_res_blocks": 2},
            (2, 3, 16, 16),
        ),
        ({**TINY, "attn_resolutions": (16, 8, 4)}, (2, 3, 16, 16)),
        (TINY, (2, 3, 8, 24)),  # non-square, other size than `resolution`
        ({**TINY, "downsample_padding": "symmetric", "time_embed_dim": 24}, (2, 3, 16, 16)),
    ],
)
def test_output_shape(kwargs, shape):
    net = UNet(**kwargs)
    randomize_zero_init_layers(net)
    x = torch.randn(shape)
    t = torch.randint(0, 1000, (shape[0],))
    out = net(x, t)
    assert out.shape == (shape[0], kwargs["out_channels"], *shape[2:])
    assert out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_paper_cifar10_forward_shape_and_zero_initial_output():
    torch.manual_seed(0)
    net = UNet(**PAPER_CIFAR10).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32), torch.tensor([0, 999]))
    assert out.shape == (2, 3, 32, 32)
    assert torch.equal(out, torch.zeros_like(out))


# ------------------------------------------------------------------ initialisation
def test_zero_initialised_layers_make_the_initial_output_exactly_zero():
    torch.manual_seed(0)
    net = UNet(**{**TINY, "out_channels": 6})
    out = net(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 500, 999]))
    assert torch.equal(out, torch.zeros_like(out))


def test_exactly_the_paper_layers_are_zero_initialised():
    net = UNet(**TINY)
    zero = sorted(name for name, p in net.named_parameters() if p.ndim > 1 and not p.any())
    expected = sorted(
        [name for name, _ in net.named_parameters() if name.endswith("conv2.weight")]
        + [name for name, _ in net.named_parameters() if name.endswith("proj_out.weight")]
        + ["conv_out.weight"]
    )
    assert zero == expected
    # residual branches with zero last conv start as the identity / skip projection
    res = net.down_levels[0].res_blocks[0]
    x = torch.randn(2, 16, 16, 16)
    assert torch.equal(res(x, torch.randn(2, net.time_embed_dim)), x)


def test_every_parameter_receives_a_gradient():
    net = UNet(**TINY)
    randomize_zero_init_layers(net)
    out = net(torch.randn(2, 3, 16, 16), torch.tensor([3, 700]))
    out.square().mean().backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []


# ------------------------------------------------------------------ behaviour
def test_samples_in_a_batch_are_independent_in_eval_mode():
    net = UNet(**TINY).eval()
    randomize_zero_init_layers(net)
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0, 400, 999])
    with torch.no_grad():
        batched = net(x, t)
        single = torch.cat([net(x[i : i + 1], t[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_output_depends_on_t_and_accepts_float_and_scalar_timesteps():
    net = UNet(**DIGITS).eval()
    randomize_zero_init_layers(net)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out_long = net(x, torch.tensor([10, 10]))
        out_float = net(x, torch.tensor([10.0, 10.0]))
        out_scalar = net(x, torch.tensor(10))
        out_other = net(x, torch.tensor([11, 11]))
    assert torch.equal(out_long, out_float)
    assert torch.equal(out_long, out_scalar)
    assert (out_long - out_other).abs().max() > 1e-4


def test_dropout_is_active_only_in_training_mode():
    net = UNet(**{**DIGITS, "dropout": 0.5})
    randomize_zero_init_layers(net)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 6])
    with torch.no_grad():
        net.train()
        assert not torch.equal(net(x, t), net(x, t))
        net.eval()
        assert torch.equal(net(x, t), net(x, t))


def test_float64_forward():
    net = UNet(**DIGITS).double()
    randomize_zero_init_layers(net)
    out = net(torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 999]))
    assert out.dtype == torch.float64


def test_sinusoidal_embedding_matches_the_official_formula():
    # official DDPM (TF): half = dim // 2, f_i = exp(-ln(10000) * i / (half - 1)), [sin, cos]
    dim, half = 128, 64
    t = torch.tensor([0, 1, 17, 500, 999])
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / (half - 1))
    angles = t.double()[:, None] * freqs[None]
    reference = torch.cat([angles.sin(), angles.cos()], dim=1)
    emb = sinusoidal_timestep_embedding(t, dim)
    assert emb.dtype == torch.float32 and emb.shape == (5, dim)
    # float32 angles for t=999 carry ~1e-4 absolute rounding error (as in the official code)
    torch.testing.assert_close(emb.double(), reference, atol=2e-4, rtol=0)
    assert torch.equal(emb[0], torch.cat([torch.zeros(half), torch.ones(half)]))

    # diffusers-default convention: freq_shift 0, cosines first; odd dims get a zero column
    freqs0 = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    angles0 = t.double()[:, None] * freqs0[None]
    flipped = sinusoidal_timestep_embedding(t, dim + 1, flip_sin_to_cos=True, freq_shift=0)
    reference0 = torch.cat(
        [angles0.cos(), angles0.sin(), torch.zeros(5, 1, dtype=torch.float64)], 1
    )
    torch.testing.assert_close(flipped.double(), reference0, atol=2e-4, rtol=0)


def test_attention_block_matches_a_naive_float64_reference():
    torch.manual_seed(0)
    block = AttentionBlock(channels=8, num_groups=2, eps=1e-6).double()
    nn.init.normal_(block.proj_out.weight)
    nn.init.normal_(block.proj_out.bias)
    x = torch.randn(2, 8, 4, 3, dtype=torch.float64)

    h = nn.functional.group_norm(x, 2, block.norm.weight, block.norm.bias, eps=1e-6)
    tokens = h.flatten(2).transpose(1, 2)  # [B, HW, C]
    q, k, v = block.q(tokens), block.k(tokens), block.v(tokens)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1)
    reference = x + block.proj_out(weights @ v).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x), reference, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------ configuration
def test_accepts_lists_and_omegaconf_listconfig():
    omegaconf = pytest.importorskip("omegaconf")
    config = omegaconf.OmegaConf.create(
        {**TINY, "channel_mult": [1, 2, 2], "attn_resolutions": [8]}
    )
    net = UNet(**config)
    assert net.channel_mult == (1, 2, 2) and net.attn_resolutions == (8,)
    assert n_params(net) == n_params(UNet(**TINY))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"resolution": 18}, r"resolution=18 is not divisible by 2\*\*\(len\(channel_mult\)-1\)=4"),
        ({"num_groups": 5}, r"num_groups=5 must divide"),
        ({"base_channels": 10}, r"num_groups=4 must divide.*\[10, 20, 20\], but not \[10\]"),
        ({"attn_resolutions": (32,)}, r"attn_resolutions contains \[32\].*\[16, 8, 4\]"),
        ({"channel_mult": ()}, r"channel_mult must be a non-empty"),
        ({"channel_mult": 2}, r"channel_mult must be a list of integers"),
        ({"channel_mult": (1, 0)}, r"channel_mult must be a non-empty list of positive"),
        ({"num_res_blocks": 0}, r"num_res_blocks must be a positive integer, got 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"in_channels": 0}, r"in_channels must be a positive integer"),
        ({"downsample_padding": "same"}, r"downsample_padding='same' is not one of"),
        ({"base_channels": 4, "num_groups": 2, "freq_shift": 2}, r"too small for freq_shift"),
    ],
)
def test_invalid_arguments_raise_naming_the_value(override, message):
    with pytest.raises(ValueError, match=message):
        UNet(**{**TINY, **override})


def test_invalid_inputs_raise():
    net = UNet(**TINY)
    with pytest.raises(ValueError, match=r"expected x of shape \[B, 3, H, W\]"):
        net(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="must be divisible by 4"):
        net(torch.randn(2, 3, 18, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"expected t of shape \[B\]=\[2\]"):
        net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))
