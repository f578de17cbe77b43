"""Log-likelihood building blocks: Gaussian KL, the discretised Gaussian decoder, bits/dim.

Every function is elementwise (broadcasting) and returns **nats**; :func:`mean_flat_bpd` turns a
per-element quantity into **bits/dim** per example.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "mean_flat_bpd",
    "normal_kl",
]

_LN2 = math.log(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# Half a bin of the 256-level grid over [-1, 1]: bins have width 2/255.
_HALF_BIN = 1.0 / 255.0
_PROB_FLOOR = 1e-12


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) ‖ N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2).square() * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The official code's tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log p(x) of a Gaussian discretised to 256 bins of width 2/255 on [-1, 1], in nats.

    The outer bins extend to ±∞; probabilities are floored at 1e-12 as in the official code.

    Args:
        x: data on the 256-level grid in [-1, 1], any shape.
        means, log_scales: decoder mean and log standard deviation, broadcastable to ``x``.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + _HALF_BIN))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - _HALF_BIN))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=_PROB_FLOOR))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=_PROB_FLOOR))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=_PROB_FLOOR))
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: ``[B, ...] -> [B]``."""
    return x.flatten(1).mean(dim=1)


def mean_flat_bpd(nats: torch.Tensor) -> torch.Tensor:
    """Per-element nats ``[B, ...]`` to per-example **bits/dim** ``[B]``."""
    return mean_flat(nats) / _LN2
