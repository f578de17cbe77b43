"""Fréchet distance between Gaussians fitted to features.

The formula is the one torch-fidelity 0.4.0 uses for FID (so our numbers equal
``torch_fidelity.calculate_metrics(fid=True)`` on the same features)::

    FD = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 · Σᵢ Re √λᵢ(Σ₁ Σ₂)

where λᵢ are the (generally complex) eigenvalues of the non-symmetric product Σ₁Σ₂, the square
root is the principal complex one and only its real part is kept. No ε is added to the
diagonals (torch-fidelity 0.4.0 adds none either): tiny negative eigenvalues of a
rank-deficient product simply contribute 0. Everything runs in float64.

Covariances are unbiased (divide by N − 1), like ``numpy.cov(x, rowvar=False)``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["frechet_distance", "mean_cov"]


def mean_cov(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of features ``[N, D]``.

    The in-memory counterpart of :class:`~ddpm.metrics.quality.FeatureMoments` (which streams).
    """
    if isinstance(features, torch.Tensor):
        features = features.detach().to(device="cpu", dtype=torch.float64).numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    Args:
        mu1, mu2: means ``[D]``.
        sigma1, sigma2: covariances ``[D, D]`` (symmetric positive semi-definite).

    Returns:
        ``‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2 Σᵢ Re √λᵢ(Σ₁Σ₂)`` in squared feature units (torch-fidelity's
        formula; see the module docstring).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be 1-D of equal shape, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be [{d}, {d}], got {sigma1.shape} and {sigma2.shape}")
    for name, value in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} contains NaN or Inf")
    diff = mu1 - mu2
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)
    trace_sqrt_product = float(np.sum(np.sqrt(eigenvalues).real))
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product)
