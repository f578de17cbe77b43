"""The UNet of Ho et al. (2020), "Denoising Diffusion Probabilistic Models".

A PixelCNN++-style UNet with a Wide-ResNet backbone, GroupNorm, swish non-linearities, a
sinusoidal timestep embedding fed to every residual block and single-head self-attention at
chosen resolutions.  The module knows nothing about diffusion: it maps ``(x, t)`` to an image-shaped
tensor and the caller decides what that output means (ε, x₀, μ, v, variances...).

With the paper's CIFAR-10 configuration (``base_channels=128, channel_mult=(1, 2, 2, 2),
num_res_blocks=2, attn_resolutions=(16,), out_channels=3``) the network has exactly 35,746,307
parameters, like the official TensorFlow implementation.

Layout (``L = len(channel_mult)`` levels, level ``i`` works at ``resolution / 2**i`` pixels with
``base_channels * channel_mult[i]`` channels)::

    conv_in 3x3 ─► down level 0 ─► ... ─► down level L-1 ─► middle (res, attn, res)
    down level i: num_res_blocks x (ResBlock [+ Attention]), then stride-2 conv (not at L-1)
    up level i:   (num_res_blocks + 1) x (concat skip, ResBlock [+ Attention]),
                  then nearest x2 + conv 3x3 (not at level 0)
    GroupNorm ─► swish ─► conv_out 3x3 (zero-initialised)

Every activation saved on the way down (the output of ``conv_in``, of each residual/attention
block and of each downsampling conv) is concatenated, in reverse order, to the input of one
residual block on the way up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "sinusoidal_timestep_embedding"]

DOWNSAMPLE_PADDINGS = ("asymmetric", "symmetric")


def sinusoidal_timestep_embedding(
    t: torch.Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of (possibly fractional) timesteps.

    With ``half = dim // 2`` and frequencies ``f_i = exp(-ln(max_period) * i / (half - freq_shift))``
    for ``i = 0 … half-1`` the embedding is ``[sin(t f), cos(t f)]`` (or ``[cos, sin]`` when
    ``flip_sin_to_cos``), zero-padded by one column when ``dim`` is odd.  The defaults
    (``freq_shift=1``, sin first) are the official DDPM TensorFlow convention
    (``ln(10000) / (half - 1)``) reproduced by the released ``google/ddpm-*`` checkpoints;
    ``diffusers``' ``UNet2DModel`` defaults correspond to ``flip_sin_to_cos=True, freq_shift=0``.

    The arithmetic is done in float32 whatever the input dtype, exactly like the official and
    the diffusers code, so converted weights see bit-identical embeddings.

    Args:
        t: timesteps, shape ``[B]``, integer or floating (0-indexed diffusion steps).
        dim: embedding width.
        flip_sin_to_cos: put the cosines first.
        freq_shift: the ``s`` in ``half - s`` of the frequency denominator.
        max_period: the longest period, in timesteps.

    Returns:
        float32 tensor ``[B, dim]`` on ``t``'s device.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape [B], got shape {tuple(t.shape)}")
    half = dim // 2
    if half - freq_shift <= 0:
        raise ValueError(
            f"embedding dim {dim} is too small for freq_shift={freq_shift}: need "
            f"dim // 2 > freq_shift; use a larger base_channels or freq_shift=0"
        )
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period))
    frequencies = torch.exp(exponent / (half - freq_shift))
    angles = t.to(torch.float32)[:, None] * frequencies[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    embedding = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=1)
    if dim % 2 == 1:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def _xavier_(module: nn.Conv2d | nn.Linear) -> None:
    """Official TF init: variance scaling, fan_avg, uniform, scale 1 (= Glorot uniform); zero bias."""
    nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _zero_(module: nn.Conv2d | nn.Linear) -> None:
    """Exactly zero weight and bias (the official code uses a 1e-10 scale; zero is cleaner)."""
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class ResBlock(nn.Module):
    """Residual block: GN → swish → conv3x3 → (+ dense(swish(temb))) → GN → swish → dropout →
    conv3x3 (zero-initialised), plus a 1x1 skip convolution when the channel count changes.

    Shapes: ``x [B, in_channels, H, W]``, ``temb_act [B, temb_dim]`` (already swished) →
    ``[B, out_channels, H, W]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_dim: int,
        dropout: float,
        num_groups: int,
        eps: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_channels)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip: nn.Module = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )
        for layer in (self.conv1, self.temb_proj, self.skip):
            if isinstance(layer, nn.Conv2d | nn.Linear):
                _xavier_(layer)
        _zero_(self.conv2)

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb_act)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the ``H*W`` positions, with a residual connection.

    ``GN → q, k, v = dense(·) → softmax(q kᵀ / √C) v → dense (zero-initialised)`` applied per
    position; shapes ``[B, C, H, W] → [B, C, H, W]``.
    """

    def __init__(self, channels: int, num_groups: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, eps=eps)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)
        for layer in (self.q, self.k, self.v):
            _xavier_(layer)
        _zero_(self.proj_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(tokens)[:, None] for proj in (self.q, self.k, self.v))  # [B, 1, HW, C]
        attended = F.scaled_dot_product_attention(q, k, v)[:, 0]  # scale 1/sqrt(C)
        out = self.proj_out(attended).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class Downsample(nn.Module):
    """Stride-2 3x3 convolution halving ``H`` and ``W``: ``[B, C, H, W] → [B, C, H/2, W/2]``.

    ``padding="asymmetric"`` pads one zero row/column at the bottom/right only (TensorFlow's
    ``SAME`` padding, used by the official code and the ``google/ddpm-*`` checkpoints);
    ``"symmetric"`` pads one on every side (PyTorch ``padding=1``).
    """

    def __init__(self, channels: int, padding: str) -> None:
        super().__init__()
        self.asymmetric = padding == "asymmetric"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.asymmetric else 1)
        _xavier_(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: ``[B, C, H, W] → [B, C, 2H, 2W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        _xavier_(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownLevel(nn.Module):
    """One resolution on the way down: ``res_blocks[j]`` each followed by ``attn_blocks[j]``
    (empty list when the level has no attention), then ``downsample`` (``None`` at the last level).
    """

    def __init__(
        self,
        res_blocks: list[ResBlock],
        attn_blocks: list[AttentionBlock],
        downsample: Downsample | None,
    ) -> None:
        super().__init__()
        self.res_blocks = nn.ModuleList(res_blocks)
        self.attn_blocks = nn.ModuleList(attn_blocks)
        self.downsample = downsample


class UpLevel(nn.Module):
    """One resolution on the way up: ``num_res_blocks + 1`` residual blocks taking a skip
    connection each, optional attention after each, then ``upsample`` (``None`` at level 0)."""

    def __init__(
        self,
        res_blocks: list[ResBlock],
        attn_blocks: list[AttentionBlock],
        upsample: Upsample | None,
    ) -> None:
        super().__init__()
        self.res_blocks = nn.ModuleList(res_blocks)
        self.attn_blocks = nn.ModuleList(attn_blocks)
        self.upsample = upsample


class MiddleBlock(nn.Module):
    """ResBlock → Attention → ResBlock at the lowest resolution; shape preserving."""

    def __init__(self, channels: int, temb_dim: int, dropout: float, num_groups: int, eps: float):
        super().__init__()
        self.res1 = ResBlock(channels, channels, temb_dim, dropout, num_groups, eps)
        self.attn = AttentionBlock(channels, num_groups, eps)
        self.res2 = ResBlock(channels, channels, temb_dim, dropout, num_groups, eps)

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x, temb_act)), temb_act)


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    """Turn a list/tuple/ListConfig of integers into a tuple, with a helpful error otherwise."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(
            f"{name} must be a list of integers, got {value!r}; write e.g. {name}: [1, 2, 2, 2]"
        )
    items = list(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must contain integers only, got {items!r}")
    return tuple(items)


def _check_positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class UNet(nn.Module):
    """The DDPM UNet (Ho et al., 2020, appendix B), ``net(x, t) -> [B, out_channels, H, W]``.

    Args:
        in_channels: image channels C of the input ``x``.
        out_channels: output channels (``2 * C`` for learned-variance models).
        base_channels: width of level 0 and of the sinusoidal timestep embedding.
        channel_mult: per-level width multipliers; level ``i`` has
            ``base_channels * channel_mult[i]`` channels and works at ``resolution / 2**i``.
        num_res_blocks: residual blocks per level on the way down (``+1`` on the way up).
        attn_resolutions: feature-map sizes (in pixels) at which self-attention follows each
            residual block; each must be one of ``resolution / 2**i``.
        dropout: dropout probability inside the residual blocks.
        resolution: the training image size (square); decides which levels get attention.
            Inputs of other sizes divisible by ``2**(len(channel_mult) - 1)`` also work.
        num_groups: GroupNorm groups; must divide every level's channel count.
        time_embed_dim: width of the time-embedding MLP (default ``4 * base_channels``).
        flip_sin_to_cos: timestep embedding order ``[cos, sin]`` instead of ``[sin, cos]``.
        freq_shift: frequency denominator ``half - freq_shift`` (official DDPM: 1).
        norm_eps: GroupNorm epsilon (official TF ``group_norm``: 1e-6).
        downsample_padding: ``"asymmetric"`` (TF SAME, official) or ``"symmetric"``.

    The last three arguments and ``flip_sin_to_cos`` only matter for loading released
    checkpoints; their defaults reproduce the official TensorFlow code.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resolution: int = 32,
        num_groups: int = 32,
        time_embed_dim: int | None = None,
        flip_sin_to_cos: bool = False,
        freq_shift: float = 1.0,
        norm_eps: float = 1e-6,
        downsample_padding: str = "asymmetric",
    ) -> None:
        super().__init__()
        in_channels = _check_positive_int("in_channels", in_channels)
        out_channels = _check_positive_int("out_channels", out_channels)
        base_channels = _check_positive_int("base_channels", base_channels)
        num_res_blocks = _check_positive_int("num_res_blocks", num_res_blocks)
        resolution = _check_positive_int("resolution", resolution)
        num_groups = _check_positive_int("num_groups", num_groups)
        channel_mult = _int_tuple("channel_mult", channel_mult)
        attn_resolutions = _int_tuple("attn_resolutions", attn_resolutions)
        if time_embed_dim is None:
            time_embed_dim = 4 * base_channels
        time_embed_dim = _check_positive_int("time_embed_dim", time_embed_dim)
        if not channel_mult or any(m < 1 for m in channel_mult):
            raise ValueError(
                f"channel_mult must be a non-empty list of positive integers, got {channel_mult}"
            )
        num_levels = len(channel_mult)
        factor = 2 ** (num_levels - 1)
        if resolution % factor != 0:
            raise ValueError(
                f"resolution={resolution} is not divisible by 2**(len(channel_mult)-1)={factor}; "
                f"use fewer levels in channel_mult={list(channel_mult)} or a resolution that is a "
                f"multiple of {factor}"
            )
        level_resolutions = [resolution // 2**i for i in range(num_levels)]
        unknown = sorted(set(attn_resolutions) - set(level_resolutions))
        if unknown:
            raise ValueError(
                f"attn_resolutions contains {unknown}, which no level has; with resolution="
                f"{resolution} and {num_levels} levels the feature-map sizes are "
                f"{level_resolutions}; choose attn_resolutions among them (or [] for none)"
            )
        widths = [base_channels * m for m in channel_mult]
        bad_widths = [w for w in widths if w % num_groups != 0]
        if bad_widths:
            raise ValueError(
                f"num_groups={num_groups} must divide every level's channel count "
                f"base_channels*channel_mult={widths}, but not {bad_widths}; choose num_groups "
                f"dividing base_channels={base_channels} (e.g. {math.gcd(*widths)})"
            )
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if base_channels // 2 - freq_shift <= 0:
            raise ValueError(
                f"base_channels={base_channels} is too small for freq_shift={freq_shift}: the "
                f"timestep embedding needs base_channels // 2 > freq_shift"
            )
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {norm_eps}")
        if downsample_padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(
                f"downsample_padding={downsample_padding!r} is not one of {DOWNSAMPLE_PADDINGS}"
            )

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.base_channels = base_channels
        self.channel_mult = channel_mult
        self.num_res_blocks = num_res_blocks
        self.attn_resolutions = attn_resolutions
        self.resolution = resolution
        self.num_groups = num_groups
        self.time_embed_dim = time_embed_dim
        self.flip_sin_to_cos = bool(flip_sin_to_cos)
        self.freq_shift = float(freq_shift)
        self.downsample_factor = factor

        dropout = float(dropout)
        eps = float(norm_eps)

        def res_block(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, time_embed_dim, dropout, num_groups, eps)

        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        _xavier_(self.time_mlp[0])
        _xavier_(self.time_mlp[2])
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        _xavier_(self.conv_in)

        # Down path; skip_widths records the channel count of every saved activation.
        skip_widths = [base_channels]
        width = base_channels
        down_levels = []
        for level, mult in enumerate(channel_mult):
            has_attn = level_resolutions[level] in attn_resolutions
            res_blocks, attn_blocks = [], []
            for _ in range(num_res_blocks):
                res_blocks.append(res_block(width, base_channels * mult))
                width = base_channels * mult
                if has_attn:
                    attn_blocks.append(AttentionBlock(width, num_groups, eps))
                skip_widths.append(width)
            downsample = None
            if level != num_levels - 1:
                downsample = Downsample(width, downsample_padding)
                skip_widths.append(width)
            down_levels.append(DownLevel(res_blocks, attn_blocks, downsample))
        self.down_levels = nn.ModuleList(down_levels)

        self.middle = MiddleBlock(width, time_embed_dim, dropout, num_groups, eps)

        # Up path, ordered as executed: up_levels[0] is the lowest resolution (level L-1).
        up_levels = []
        for level in reversed(range(num_levels)):
            has_attn = level_resolutions[level] in attn_resolutions
            res_blocks, attn_blocks = [], []
            for _ in range(num_res_blocks + 1):
                res_blocks.append(
                    res_block(width + skip_widths.pop(), base_channels * channel_mult[level])
                )
                width = base_channels * channel_mult[level]
                if has_attn:
                    attn_blocks.append(AttentionBlock(width, num_groups, eps))
            upsample = Upsample(width) if level != 0 else None
            up_levels.append(UpLevel(res_blocks, attn_blocks, upsample))
        self.up_levels = nn.ModuleList(up_levels)
        assert not skip_widths, "every skip connection must be consumed"

        self.norm_out = nn.GroupNorm(num_groups, width, eps=eps)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)
        _zero_(self.conv_out)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"base_channels={self.base_channels}, channel_mult={self.channel_mult}, "
            f"num_res_blocks={self.num_res_blocks}, attn_resolutions={self.attn_resolutions}, "
            f"resolution={self.resolution}"
        )

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """Sinusoidal embedding followed by the MLP: ``t [B] → [B, time_embed_dim]``."""
        emb = sinusoidal_timestep_embedding(
            t,
            self.base_channels,
            flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift,
        )
        return self.time_mlp(emb.to(self.time_mlp[0].weight.dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict an image-shaped tensor from a noisy image and its timestep.

        Args:
            x: ``[B, in_channels, H, W]`` float, ``H`` and ``W`` divisible by
                ``2**(len(channel_mult) - 1)``.
            t: ``[B]`` timesteps (long or float; a 0-dim tensor is broadcast to the batch).

        Returns:
            ``[B, out_channels, H, W]`` in ``x``'s dtype.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected x of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )
        if x.shape[2] % self.downsample_factor or x.shape[3] % self.downsample_factor:
            raise ValueError(
                f"input size {tuple(x.shape[2:])} must be divisible by {self.downsample_factor}"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape [B]=[{x.shape[0]}], got shape {tuple(t.shape)}")
        temb_act = F.silu(self.time_embedding(t.to(x.device)))

        h = self.conv_in(x)
        skips = [h]
        for level in self.down_levels:
            for j, block in enumerate(level.res_blocks):
                h = block(h, temb_act)
                if len(level.attn_blocks):
                    h = level.attn_blocks[j](h)
                skips.append(h)
            if level.downsample is not None:
                h = level.downsample(h)
                skips.append(h)

        h = self.middle(h, temb_act)

        for level in self.up_levels:
            for j, block in enumerate(level.res_blocks):
                h = block(torch.cat([h, skips.pop()], dim=1), temb_act)
                if len(level.attn_blocks):
                    h = level.attn_blocks[j](h)
            if level.upsample is not None:
                h = level.upsample(h)

        return self.conv_out(F.silu(self.norm_out(h)))
