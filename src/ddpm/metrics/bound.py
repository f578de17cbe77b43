"""Bits/dim of the variational bound as a :class:`torchmetrics.Metric` with float64 sum states.

The per-image results of :meth:`~ddpm.diffusion.GaussianDiffusion.nll_bpd` (the full bound) or
:meth:`~ddpm.diffusion.GaussianDiffusion.nll_bpd_stratified` (an unbiased estimate from K terms)
are reduced to sums, so a DDP run merges them with torchmetrics' ``sum`` reduction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torchmetrics import Metric

__all__ = ["NLL_ESTIMATORS", "BitsPerDim", "nll_metric_name"]

#: Bound estimators: ``full`` sums all T terms (the paper's protocol); ``stratified`` draws one
#: term per stratum of t (:meth:`~ddpm.diffusion.GaussianDiffusion.nll_bpd_stratified`).
NLL_ESTIMATORS = ("full", "stratified")


def nll_metric_name(estimator: str, num_terms: int | None, num_timesteps: int) -> str:
    """``nll_bpd`` for the full bound (or K = T); ``nll_bpd_k{K}`` for the stratified estimate.

    Raises:
        ValueError: unknown estimator, or ``stratified`` without 2 ≤ ``num_terms`` ≤ T.
    """
    if estimator not in NLL_ESTIMATORS:
        raise ValueError(f"unknown nll estimator {estimator!r}: choose one of {NLL_ESTIMATORS}")
    if estimator == "full":
        return "nll_bpd"
    if num_terms is None or not 2 <= int(num_terms) <= int(num_timesteps):
        raise ValueError(
            f"nll.estimator=stratified needs nll.num_terms between 2 and T={num_timesteps}, "
            f"got {num_terms}"
        )
    return "nll_bpd" if int(num_terms) == int(num_timesteps) else f"nll_bpd_k{int(num_terms)}"


class BitsPerDim(Metric):
    """Mean bound over images, in bits/dim, with its standard error.

    Args:
        num_timesteps: T.
        estimator: ``"full"`` or ``"stratified"``.
        num_terms: K for ``"stratified"``.

    ``compute()`` returns, with ``B`` = :func:`nll_metric_name`: ``B`` (mean bound), ``B_stderr``
    (standard error of that mean over images; for a stratified estimate it contains the
    estimator's noise), ``nll_prior_bpd`` (mean L_T, exact for both estimators),
    ``nll_num_images``; for ``full`` also ``nll_decoder_bpd`` (mean L₀) and ``terms_bpd`` (float64
    ``[T]``, mean Lₜ per timestep index, index 0 = decoder: an array, not a metric); for
    ``stratified`` also ``B_estimator_stderr`` = √(Σᵢ Varᵢ)/n from the per-image collapsed-strata
    variances.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, num_timesteps: int, estimator: str = "full", num_terms: int | None = None):
        super().__init__()
        self.name = nll_metric_name(estimator, num_terms, num_timesteps)
        self.estimator = estimator
        self.num_terms = None if num_terms is None else int(num_terms)
        self.num_timesteps = int(num_timesteps)
        f64 = torch.float64
        self.add_state("count", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        for name in ("total_sum", "total_sq_sum", "prior_sum", "estimator_var_sum"):
            self.add_state(name, torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        terms = self.num_timesteps if estimator == "full" else 0
        self.add_state("terms_sum", torch.zeros(terms, dtype=f64), dist_reduce_fx="sum")

    def update(self, out: Mapping[str, torch.Tensor]) -> None:
        """Add one batch: the dict of ``nll_bpd`` (``total``, ``prior``, ``terms [B, T]``) or of
        ``nll_bpd_stratified`` (``total``, ``prior``, ``stderr``), per image in bits/dim."""
        total = out["total"].to(self.device, torch.float64)
        self.count += total.shape[0]
        self.total_sum += total.sum()
        self.total_sq_sum += total.square().sum()
        self.prior_sum += out["prior"].to(self.device, torch.float64).sum()
        if self.estimator == "full":
            self.terms_sum += out["terms"].to(self.device, torch.float64).sum(dim=0)
        else:
            self.estimator_var_sum += out["stderr"].to(self.device, torch.float64).square().sum()

    def compute(self) -> dict[str, float | np.ndarray]:
        n = int(self.count)
        if n < 1:
            raise RuntimeError("BitsPerDim.compute() before any image was added")
        mean = float(self.total_sum) / n
        if n > 1:
            var = (float(self.total_sq_sum) - n * mean * mean) / (n - 1)
            stderr = math.sqrt(max(var, 0.0) / n)
        else:
            stderr = float("nan")
        result: dict[str, float | np.ndarray] = {
            self.name: mean,
            f"{self.name}_stderr": stderr,
            "nll_prior_bpd": float(self.prior_sum) / n,
            "nll_num_images": n,
        }
        if self.estimator == "full":
            terms = (self.terms_sum / n).cpu().numpy()
            result["nll_decoder_bpd"] = float(terms[0])
            result["terms_bpd"] = terms
        else:
            result[f"{self.name}_estimator_stderr"] = math.sqrt(float(self.estimator_var_sum)) / n
        return result
