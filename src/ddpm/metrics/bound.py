"""Bits/dim of a model: a torchmetrics metric and the (collective) evaluation.

Three estimators of one quantity (``nll.estimator``): the variational bound, in full
(:meth:`~ddpm.diffusion.GaussianDiffusion.nll_bpd`) or as an unbiased estimate from K terms
(:meth:`~ddpm.diffusion.GaussianDiffusion.nll_bpd_stratified`), and the exact likelihood of the
probability-flow ODE (:func:`~ddpm.diffusion.ode_likelihood.ode_nll_bpd`).

The images ``0 .. num_images − 1`` of a dataset are cut into global batches; batch b goes to rank
``b % world_size``, which evaluates it with a generator seeded from ``(seed, start index)``.
:class:`BitsPerDim` reduces the per-image results to float64 sums, so a DDP run merges them with
torchmetrics' ``sum`` reduction and the result does not depend on the world size. Nothing inside
a batch is collective (the ODE solver's step count differs from batch to batch): the ranks meet
only after their last batch, to agree that none failed and to merge the sums.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric

from ddpm.diffusion.ode_likelihood import ODELikelihoodSettings, ode_nll_bpd
from ddpm.metrics.collective import Collective, single_process
from ddpm.metrics.sampling import EvalMode, batch_seed, shard_batches

__all__ = [
    "NLL_ESTIMATORS",
    "BitsPerDim",
    "dataset_image",
    "evaluate_nll",
    "nll_metric_name",
    "run_nll",
]

#: Likelihood estimators: ``full`` sums all T terms of the bound (the paper's protocol);
#: ``stratified`` draws one term per stratum of t
#: (:meth:`~ddpm.diffusion.GaussianDiffusion.nll_bpd_stratified`); ``ode`` is the exact
#: likelihood of the probability-flow ODE (:mod:`ddpm.diffusion.ode_likelihood`), not a bound.
NLL_ESTIMATORS = ("full", "stratified", "ode")


def nll_metric_name(
    estimator: str,
    num_terms: int | None,
    num_timesteps: int,
    clip_denoised: bool = True,
    num_steps: int | None = None,
) -> str:
    """``nll_bpd`` for the full bound (or K = T); ``nll_bpd_k{K}`` for the stratified estimate;
    ``_unclipped`` appended when x̂₀ is not clipped inside the terms (not the paper's protocol);
    ``nll_bpd_ode`` for the probability-flow ODE likelihood (which clips nothing). For a
    continuous-time model's T-step bound L_T (``num_steps`` = T), ``_steps{T}`` follows
    ``nll_bpd`` (``nll_bpd_steps100``, ``nll_bpd_steps100_k50``).

    Raises:
        ValueError: unknown estimator, ``stratified`` without 2 ≤ ``num_terms`` ≤ T, or
            ``num_steps`` with the ODE or below 1.
    """
    if estimator not in NLL_ESTIMATORS:
        raise ValueError(f"unknown nll estimator {estimator!r}: choose one of {NLL_ESTIMATORS}")
    if num_steps is not None and (estimator == "ode" or int(num_steps) < 1):
        raise ValueError(
            f"nll.num_steps={num_steps}: the T-step bound L_T of a continuous-time model needs "
            "T >= 1 and nll.estimator=full or stratified"
        )
    if estimator == "ode":
        return "nll_bpd_ode"
    suffix = "" if clip_denoised else "_unclipped"
    base = "nll_bpd" if num_steps is None else f"nll_bpd_steps{int(num_steps)}"
    if estimator == "full":
        return base + suffix
    if num_terms is None or not 2 <= int(num_terms) <= int(num_timesteps):
        raise ValueError(
            f"nll.estimator=stratified needs nll.num_terms between 2 and T={num_timesteps}, "
            f"got {num_terms}"
        )
    k = "" if int(num_terms) == int(num_timesteps) else f"_k{int(num_terms)}"
    return f"{base}{k}{suffix}"


class BitsPerDim(Metric):
    """Mean bound (or ODE likelihood) over images, in bits/dim, with its standard error.

    Args:
        num_timesteps: T.
        estimator: ``"full"``, ``"stratified"`` or ``"ode"``.
        num_terms: K for ``"stratified"``.
        clip_denoised: x̂₀ clipped inside every term (the paper's evaluation; default) or not;
            the ODE does not clip.
        ode: the ODE's solver settings for ``"ode"`` (an
            :class:`~ddpm.diffusion.ode_likelihood.ODELikelihoodSettings` or its mapping, e.g.
            ``nll.ode``; None: the defaults, rtol = atol = 1e-5, dopri5, one Rademacher probe).
        num_images: keep the total of every image ``0 .. num_images − 1`` (by its index in the
            dataset; :meth:`update` then needs ``start``), for paired comparisons between
            likelihoods on the same images: ``compute()`` adds ``per_image_bpd``. None: sums
            only.
        num_steps: for a continuous-time model, VDM's T-step bound L_T with T = ``num_steps``
            in place of L_∞ (None: L_∞; refused for a discrete-time model).
        report_cost: also report the bound's cost, as the ODE always does: ``B_nfe`` (network
            evaluations per image: T, or K for the stratified estimate), ``B_seconds`` (the
            batches' wall-clock, summed over batches and ranks) and ``B_seconds_per_image``.

    ``compute()`` returns, with ``B`` = :func:`nll_metric_name`: ``B`` (mean bound), ``B_stderr``
    (standard error of that mean over images; for a stratified estimate it contains the
    estimator's noise), ``nll_prior_bpd`` (mean L_T, exact for both estimators),
    ``nll_num_images``; for ``full`` also ``nll_decoder_bpd`` (mean L₀; ``_unclipped`` appended
    when unclipped) and ``terms_bpd`` (float64
    ``[T]``, mean Lₜ per timestep index, index 0 = decoder: an array, not a metric; in continuous
    time stratum i's share of the diffusion loss, the decoder given apart); for
    ``stratified`` also ``B_estimator_stderr`` = √(Σᵢ Varᵢ)/n from the per-image collapsed-strata
    variances.

    For ``ode`` (B = ``nll_bpd_ode``): ``B``, ``B_stderr`` (over images: it contains the
    dequantisation and Hutchinson noise), ``B_prior`` (the prior's part, −log N(x(λ_min); 0, I)
    per dim), ``B_num_images``, ``B_estimator_stderr`` (the Hutchinson part, √(Σᵢ Varᵢ)/n, from
    the spread of the probes: only with ≥ 2 probes, 0 for the exact divergence), and the cost:
    ``B_nfe`` (mean evaluations of the network per ODE solve = forward passes per image; each
    also costs ``hutchinson_samples`` vector-Jacobian products), ``B_seconds`` (solver
    wall-clock summed over batches and ranks) and ``B_seconds_per_image``. No key is shared
    with the bound's.

    With ``num_images``: ``per_image_bpd`` (float64 ``[num_images]``, the total of image i at
    index i: an array, not a metric); every image must have been added exactly once. The
    per-image states are float64 ``[num_images]`` sums to which each image's rank alone adds
    a non-zero value, so DDP merges them exactly and the array does not depend on the world size.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(
        self,
        num_timesteps: int,
        estimator: str = "full",
        num_terms: int | None = None,
        clip_denoised: bool = True,
        ode: ODELikelihoodSettings | Mapping[str, Any] | None = None,
        *,
        num_images: int | None = None,
        report_cost: bool = False,
        num_steps: int | None = None,
    ):
        super().__init__()
        self.name = nll_metric_name(estimator, num_terms, num_timesteps, clip_denoised, num_steps)
        self.num_steps = None if num_steps is None else int(num_steps)
        self.ode = ODELikelihoodSettings.from_config(ode) if estimator == "ode" else None
        self.clip_denoised = bool(clip_denoised)
        self.estimator = estimator
        self.num_terms = None if num_terms is None else int(num_terms)
        self.num_timesteps = int(num_timesteps)
        f64 = torch.float64
        self.add_state("count", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        for name in ("total_sum", "total_sq_sum", "prior_sum", "decoder_sum", "estimator_var_sum"):
            self.add_state(name, torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        terms = self.num_timesteps if estimator == "full" else 0
        self.add_state("terms_sum", torch.zeros(terms, dtype=f64), dist_reduce_fx="sum")
        self.report_cost = bool(report_cost) or estimator == "ode"
        if self.report_cost:  # the cost: evaluations and seconds per batch (one solve for ODE)
            self.add_state("solves", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
            for name in ("nfe_sum", "seconds_sum"):
                self.add_state(name, torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        if num_images is not None and int(num_images) < 1:
            raise ValueError(f"num_images={num_images}: keep at least one image, or pass None")
        self.num_images = None if num_images is None else int(num_images)
        if self.num_images is not None:
            size = self.num_images
            self.add_state("image_sum", torch.zeros(size, dtype=f64), dist_reduce_fx="sum")
            self.add_state(
                "image_count", torch.zeros(size, dtype=torch.int64), dist_reduce_fx="sum"
            )

    @property
    def network_evaluations_per_image(self) -> int | None:
        """Forward passes of the network per image for the bound: T for ``full`` (one per term;
        L_T needs none), K for ``stratified``; None for ``ode`` (the solver decides)."""
        if self.estimator == "full":
            return self.num_timesteps
        if self.estimator == "stratified":
            return self.num_terms
        return None

    def update(self, out: Mapping[str, Any], start: int | None = None) -> None:
        """Add one batch: the dict of ``nll_bpd`` (``total``, ``prior``, ``terms [B, T]``), of
        ``nll_bpd_stratified`` (``total``, ``prior``, ``stderr``) or of ``ode_nll_bpd``
        (``total``, ``prior``, ``stderr``, ``nfe``, ``seconds``), per image in bits/dim; with
        ``report_cost`` the bound's dicts also carry ``seconds`` (the batch's wall-clock).

        Args:
            out: the batch's results (``total [B]`` etc.).
            start: dataset index of the batch's first image (its images are
                ``start .. start + B − 1``); needed when per-image totals are kept.

        Raises:
            ValueError: per-image totals are kept and ``start`` is missing or the batch runs
                past ``num_images``.
        """
        total = out["total"].to(self.device, torch.float64)
        if self.num_images is not None:
            if start is None:
                raise ValueError("BitsPerDim keeps per-image totals: update(out, start=...)")
            stop = int(start) + total.shape[0]
            if not 0 <= int(start) <= stop <= self.num_images:
                raise ValueError(
                    f"images {start}..{stop - 1} outside the {self.num_images} kept per image"
                )
            self.image_sum[int(start) : stop] += total
            self.image_count[int(start) : stop] += 1
        self.count += total.shape[0]
        self.total_sum += total.sum()
        self.total_sq_sum += total.square().sum()
        self.prior_sum += out["prior"].to(self.device, torch.float64).sum()
        if self.estimator == "full":
            terms = out["terms"].to(self.device, torch.float64)
            self.terms_sum += terms.sum(dim=0)
            # Continuous time: the decoder beside the terms (which share out the diffusion loss).
            decoder = (
                out["decoder"].to(self.device, torch.float64) if "decoder" in out else terms[:, 0]
            )
            self.decoder_sum += decoder.sum()
        elif self.estimator == "stratified" or self._has_estimator_stderr():
            self.estimator_var_sum += out["stderr"].to(self.device, torch.float64).square().sum()
        if self.report_cost:
            nfe = out["nfe"] if self.estimator == "ode" else self.network_evaluations_per_image
            self.solves += 1
            self.nfe_sum += float(nfe)  # type: ignore[arg-type]
            self.seconds_sum += float(out["seconds"])

    def _has_estimator_stderr(self) -> bool:
        """Whether the ODE's Hutchinson estimate has a standard error (≥ 2 probes, or exact)."""
        assert self.ode is not None
        return self.ode.divergence == "exact" or self.ode.num_probes > 1

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
        result: dict[str, float | np.ndarray] = {self.name: mean, f"{self.name}_stderr": stderr}
        if self.num_images is not None:
            result["per_image_bpd"] = self._per_image(n)
        if self.estimator == "ode":
            result[f"{self.name}_prior"] = float(self.prior_sum) / n
            result[f"{self.name}_num_images"] = n
            if self._has_estimator_stderr():
                result[f"{self.name}_estimator_stderr"] = (
                    math.sqrt(float(self.estimator_var_sum)) / n
                )
            result.update(self._cost(n))
            return result
        if self.report_cost:
            result.update(self._cost(n))
        result["nll_prior_bpd"] = float(self.prior_sum) / n
        result["nll_num_images"] = n
        if self.estimator == "full":
            terms = (self.terms_sum / n).cpu().numpy()
            result["nll_decoder_bpd" + ("" if self.clip_denoised else "_unclipped")] = (
                float(self.decoder_sum) / n
            )
            result["terms_bpd"] = terms
        else:
            result[f"{self.name}_estimator_stderr"] = math.sqrt(float(self.estimator_var_sum)) / n
        return result

    def _cost(self, n: int) -> dict[str, float]:
        """``B_nfe`` (mean network evaluations per batch = per image: a batch's images share
        the ODE's steps), ``B_seconds`` (summed over batches and ranks), ``B_seconds_per_image``."""
        solves = max(int(self.solves), 1)
        return {
            f"{self.name}_nfe": float(self.nfe_sum) / solves,
            f"{self.name}_seconds": float(self.seconds_sum),
            f"{self.name}_seconds_per_image": float(self.seconds_sum) / n,
        }

    def _per_image(self, n: int) -> np.ndarray:
        """The kept per-image totals ``[num_images]`` (float64).

        Raises:
            RuntimeError: an image was added twice, or not at all (then the paired comparison
                would not be over the same images).
        """
        counts = self.image_count.cpu()
        if n != self.num_images or not bool((counts == 1).all()):
            missing = int((counts == 0).sum())
            repeated = int((counts > 1).sum())
            raise RuntimeError(
                f"per-image bits/dim: {missing} of {self.num_images} images never added, "
                f"{repeated} added more than once"
            )
        return self.image_sum.cpu().numpy().copy()


def dataset_image(item: Any) -> torch.Tensor:
    """One dataset item as an image tensor in [−1, 1]: the first element of a tuple, uint8
    pixels mapped by u8/127.5 − 1."""
    if isinstance(item, (list, tuple)):
        item = item[0]
    if item.dtype == torch.uint8:
        item = item.float() / 127.5 - 1.0
    return item


def run_nll(
    diffusion: nn.Module,
    net: nn.Module,
    dataset: Dataset,
    metric: BitsPerDim,
    *,
    num_images: int,
    batch_size: int,
    seed: int,
    strategy: Collective | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Bits/dim on images ``0 .. num_images − 1`` of ``dataset``, sharded (collective).

    Batch ``b`` (images ``[b·batch_size, …)``) runs on rank ``b % world_size`` with a generator
    ``torch.Generator(device).manual_seed(batch_seed(seed, start, "nll"))`` passed to
    ``diffusion.nll_bpd`` (``metric.estimator == "full"``), ``diffusion.nll_bpd_stratified``
    with ``metric.num_terms``, x̂₀ clipped as ``metric.clip_denoised`` says, or
    :func:`~ddpm.diffusion.ode_likelihood.ode_nll_bpd` with ``metric.ode`` (``"ode"``); so the
    result does not depend on the world size. ``net`` must be the plain (EMA) network, never a
    DDP wrapper: no rank may wait on another inside a batch.

    Returns:
        :meth:`BitsPerDim.compute`, on every rank.

    Raises:
        ValueError: no image, or ``metric`` keeps per-image totals for another number of images
            than the ``min(num_images, len(dataset))`` evaluated.
        RuntimeError: on every rank, when a batch failed on any rank (its own error where it
            happened); the ranks agree on it before merging, so none is left waiting.
    """
    device = diffusion.betas.device  # type: ignore[union-attr]
    strategy = single_process(strategy, device)
    n = min(int(num_images), len(dataset))  # type: ignore[arg-type]
    if n < 1:
        raise ValueError(f"need at least one image, got num_images={num_images}")
    if metric.num_images is not None and metric.num_images != n:
        raise ValueError(
            f"the metric keeps per-image totals of {metric.num_images} images, but {n} are "
            "evaluated (num_images capped at the dataset size)"
        )
    metric.reset()
    metric.to(device)
    batches: Any = shard_batches(n, batch_size, strategy.global_rank, strategy.world_size)
    progress = progress and strategy.global_rank == 0
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"bits/dim on {n} images", unit="batch", leave=False)
    error: Exception | None = None
    with EvalMode(net), torch.no_grad():
        try:
            for start, stop in batches:
                x0 = torch.stack([dataset_image(dataset[i]) for i in range(start, stop)])
                x0 = x0.to(device=device, dtype=diffusion.betas.dtype)  # type: ignore[union-attr]
                seed_b = batch_seed(seed, start, "nll")
                generator = torch.Generator(device=device).manual_seed(seed_b)
                began = time.perf_counter()
                out = _batch_nll(diffusion, net, x0, metric, generator, progress)
                if metric.report_cost and "seconds" not in out:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # the batch's kernels, not their launch
                    out = {**out, "seconds": time.perf_counter() - began}
                metric.update(out, start=start)
        except Exception as exc:  # every rank must reach the decision below
            error = exc
    if not strategy.reduce_boolean_decision(error is None, all=True):
        if error is not None:
            raise error
        raise RuntimeError("bits/dim failed on another rank (see its error message)")
    return metric.compute()


def _batch_nll(
    diffusion: nn.Module,
    net: nn.Module,
    x0: torch.Tensor,
    metric: BitsPerDim,
    generator: torch.Generator,
    progress: bool,
) -> dict[str, Any]:
    """One batch's per-image results for ``metric.estimator`` (see :meth:`BitsPerDim.update`)."""
    steps = {} if metric.num_steps is None else {"num_steps": metric.num_steps}
    if metric.estimator == "full":
        return diffusion.nll_bpd(  # type: ignore[operator]
            net, x0, generator=generator, clip_denoised=metric.clip_denoised, **steps
        )
    if metric.estimator == "stratified":
        return diffusion.nll_bpd_stratified(  # type: ignore[operator]
            net, x0, metric.num_terms, generator=generator, clip_denoised=metric.clip_denoised,
            **steps,
        )  # fmt: skip
    return ode_nll_bpd(
        diffusion,  # type: ignore[arg-type]
        net,
        x0,
        settings=metric.ode,
        generator=generator,
        progress=progress,
    )


def evaluate_nll(
    diffusion: nn.Module,
    net: nn.Module,
    dataloader: DataLoader | Dataset,
    *,
    num_images: int = 1000,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = True,
    estimator: str = "full",
    num_terms: int | None = None,
    clip_denoised: bool = True,
    strategy: Collective | None = None,
    ode: ODELikelihoodSettings | Mapping[str, Any] | None = None,
    per_image: bool = False,
    report_cost: bool = False,
) -> dict[str, Any]:
    """Bits/dim (the variational bound, or the ODE likelihood) on the first ``num_images``
    images (collective).

    Args:
        diffusion: the :class:`~ddpm.diffusion.GaussianDiffusion`, on the evaluation device.
        net: the EMA network (put in eval mode while evaluating).
        dataloader: a DataLoader (only its ``dataset`` and ``batch_size`` are used: images are
            taken in dataset order, never through a shuffling sampler) or a Dataset of float
            ``[C, H, W]`` images in [-1, 1].
        num_images: how many images (from index 0; capped at the dataset size).
        seed: seeds the per-batch noise generators (see :func:`run_nll`).
        batch_size: default the loader's batch size, else 64.
        progress: tqdm bar on rank 0.
        estimator: ``"full"`` (all T terms, the paper's protocol; T network evaluations per
            image), ``"stratified"`` (an unbiased estimate from ``num_terms`` = K terms) or
            ``"ode"`` (the probability-flow ODE likelihood, ``nll_bpd_ode``; a forward pass and
            ``hutchinson_samples`` vector-Jacobian products per solver evaluation).
        num_terms: K, for ``"stratified"``.
        clip_denoised: clip x̂₀ inside every term (the paper's evaluation) or not (``_unclipped``).
        strategy: the run's strategy (None: this process alone).
        ode: the ODE's settings (:class:`~ddpm.diffusion.ode_likelihood.ODELikelihoodSettings`
            or a mapping such as ``nll.ode``), for ``"ode"``.
        per_image: also return ``per_image_bpd``, float64 ``[n]``: the total of each image, in
            dataset order (for paired comparisons; :class:`BitsPerDim`'s ``num_images``).
        report_cost: the bound's cost keys too (``B_nfe``, ``B_seconds``,
            ``B_seconds_per_image``; the ODE always reports them).

    Returns:
        :meth:`~ddpm.metrics.bound.BitsPerDim.compute` (bits/dim, on every rank). A full and a
        stratified evaluation of one run never write the same key with different values.
    """
    dataset = dataloader.dataset if isinstance(dataloader, DataLoader) else dataloader
    loader_batch = dataloader.batch_size if isinstance(dataloader, DataLoader) else None
    kept = min(int(num_images), len(dataset)) if per_image else None  # type: ignore[arg-type]
    metric = BitsPerDim(
        diffusion.num_timesteps,  # type: ignore[arg-type]
        estimator,
        num_terms,
        clip_denoised,
        ode=ode,
        num_images=kept,
        report_cost=report_cost,
    )
    return run_nll(
        diffusion,
        net,
        dataset,
        metric,
        num_images=num_images,
        batch_size=int(batch_size or loader_batch or 64),
        seed=seed,
        strategy=strategy,
        progress=progress,
    )
