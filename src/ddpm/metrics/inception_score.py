"""Inception Score from classifier logits, with torch-fidelity 0.4.0's conventions.

IS = exp(E_x KL(p(y|x) ‖ p(y))), computed per split and reported as (mean, std) over splits:

- p(y|x) = softmax of the logits (for Inception: ``logits_unbiased``, the 1008-way layer without
  its bias), in float64;
- rows are first permuted with ``numpy.random.RandomState(2020).permutation(N)`` (torch-fidelity's
  default ``samples_shuffle=True, rng_seed=2020``), so the value depends on the row order of the
  input; our pipelines always pass rows in global sample-index order;
- split i holds rows ``[i·N//splits, (i+1)·N//splits)`` of the permuted array;
- p(y) of a split is the mean of its p(y|x); KL uses log-softmax for log p(y|x);
- std is the population standard deviation (``numpy.std``, ddof = 0).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["inception_score"]


def inception_score(
    logits: torch.Tensor | np.ndarray,
    splits: int = 10,
    shuffle: bool = True,
    rng_seed: int = 2020,
) -> tuple[float, float]:
    """Inception Score (mean, std over splits) of class logits.

    Args:
        logits: ``[N, K]`` unnormalised class scores (any float dtype; computed in float64).
        splits: number of splits (10 in the literature and torch-fidelity).
        shuffle: permute rows with ``RandomState(rng_seed)`` first (torch-fidelity default).
        rng_seed: seed of that permutation (torch-fidelity default 2020).

    Returns:
        ``(mean, std)``, dimensionless; 1 for a constant p(y|x), at most K.
    """
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().to(device="cpu", dtype=torch.float64).numpy()
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"logits must be [N, K], got shape {x.shape}")
    n = x.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits={splits} must be between 1 and the number of rows N={n}")
    if not np.all(np.isfinite(x)):
        raise ValueError("logits contain NaN or Inf")
    if shuffle:
        x = x[np.random.RandomState(rng_seed).permutation(n)]
    shifted = x - x.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_split, log_p_split = p[lo:hi], log_p[lo:hi]
        log_marginal = np.log(p_split.mean(axis=0, keepdims=True))
        kl = np.where(p_split > 0, p_split * (log_p_split - log_marginal), 0.0).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))
