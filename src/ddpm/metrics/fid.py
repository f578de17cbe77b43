"""Fréchet distance between Gaussians fitted to features, and a streaming float64 accumulator.

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

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

__all__ = ["FeatureStats", "frechet_distance", "mean_cov"]


def _as_float64_2d(features: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().to(device="cpu", dtype=torch.float64).numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"features must be a 2-D array [N, D], got shape {array.shape}")
    return array


class FeatureStats:
    """Streaming first and second moments of feature vectors, in float64.

    Holds ``count`` (N), ``sum`` = Σₙ xₙ ``[D]`` and ``outer`` = Σₙ xₙ xₙᵀ = XᵀX ``[D, D]``, so
    accumulators from several batches or ranks can be merged exactly (up to float64 rounding) in
    any order. Memory is ``D² · 8`` bytes (32 MiB for Inception's 2048-d pool features),
    independent of the number of samples.

    Args:
        dim: feature dimension D; None infers it from the first :meth:`update`.
    """

    def __init__(self, dim: int | None = None) -> None:
        self.dim: int | None = None if dim is None else int(dim)
        self.count: int = 0
        self.sum: np.ndarray | None = None
        self.outer: np.ndarray | None = None
        if self.dim is not None:
            self._allocate(self.dim)

    def _allocate(self, dim: int) -> None:
        self.dim = dim
        self.sum = np.zeros(dim, dtype=np.float64)
        self.outer = np.zeros((dim, dim), dtype=np.float64)

    def update(self, features: torch.Tensor | np.ndarray) -> FeatureStats:
        """Add a batch of feature vectors ``[N, D]`` (any float dtype; converted to float64).

        Returns:
            self, for chaining.
        """
        x = _as_float64_2d(features)
        if self.dim is None:
            self._allocate(x.shape[1])
        if x.shape[1] != self.dim:
            raise ValueError(f"feature dimension {x.shape[1]} != accumulator dimension {self.dim}")
        if x.shape[0] == 0:
            return self
        if not np.all(np.isfinite(x)):
            raise ValueError("features contain NaN or Inf")
        assert self.sum is not None and self.outer is not None
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x
        self.count += int(x.shape[0])
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another accumulator's moments into this one (in place).

        Returns:
            self, for chaining.
        """
        if other.count == 0 or other.dim is None:
            return self
        if self.dim is None:
            self._allocate(other.dim)
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dimension {other.dim} into {self.dim}")
        assert self.sum is not None and self.outer is not None
        assert other.sum is not None and other.outer is not None
        self.sum += other.sum
        self.outer += other.outer
        self.count += other.count
        return self

    @classmethod
    def merged(cls, parts: Iterable[FeatureStats]) -> FeatureStats:
        """A new accumulator holding the sum of ``parts`` (merged in iteration order)."""
        out = cls()
        for part in parts:
            out.merge(part)
        return out

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64), as ``numpy.cov(rowvar=False)``.

        Raises:
            ValueError: with fewer than 2 feature vectors.
        """
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        assert self.sum is not None and self.outer is not None
        n = float(self.count)
        mu = self.sum / n
        sigma = (self.outer - n * np.outer(mu, mu)) / (n - 1.0)
        sigma = 0.5 * (sigma + sigma.T)  # exact symmetry despite rounding
        return mu, sigma

    def state_dict(self) -> dict[str, Any]:
        """Plain-python/numpy state (picklable, for gathering across ranks)."""
        return {"dim": self.dim, "count": self.count, "sum": self.sum, "outer": self.outer}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FeatureStats:
        """Inverse of :meth:`state_dict`."""
        out = cls()
        out.dim = state["dim"]
        out.count = int(state["count"])
        out.sum = state["sum"]
        out.outer = state["outer"]
        return out

    def __repr__(self) -> str:
        return f"FeatureStats(dim={self.dim}, count={self.count})"


def mean_cov(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of features ``[N, D]``."""
    return FeatureStats().update(features).mean_cov()


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
