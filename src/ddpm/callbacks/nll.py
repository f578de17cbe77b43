"""Bits/dim (the variational bound, or the probability-flow ODE likelihood) of the EMA network on
held-out images."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import Dataset

from ddpm.callbacks._evaluation import publish_metrics, unwrap_diffusion, unwrap_ema_net
from ddpm.diffusion.ode_likelihood import ODELikelihoodSettings
from ddpm.diffusion.variance import Variance
from ddpm.inference_variance import tag_nll_metrics
from ddpm.metrics.bound import NLL_ESTIMATORS, BitsPerDim, nll_metric_name, run_nll

__all__ = ["NLLCallback"]

log = logging.getLogger(__name__)

_SPLITS = ("val", "test")


class NLLCallback(pl.Callback):
    """The bound (prior + T terms, discretised decoder) on a subset of the val/test split, x̂₀
    clipped to [-1, 1] inside every term as the paper's evaluation does (``clip_denoised``).

    Runs every ``every_n_steps`` steps, at the end of training and at the end of ``trainer.test``
    (``src/eval.py``). The first ``num_images`` images of the split are sharded across ranks
    (disjoint batches merged by a :class:`~ddpm.metrics.bound.BitsPerDim` torchmetrics metric; the
    result does not depend on the world size). Logged metrics (identical on every rank in
    ``trainer.callback_metrics``):
    ``nll_bpd`` (total), ``nll_bpd_stderr``, ``nll_prior_bpd`` (L_T), ``nll_decoder_bpd`` (L₀)
    and ``nll_num_images``. With ``estimator="stratified"`` the total is the unbiased estimate
    from ``num_terms`` = K terms per image, named ``nll_bpd_k{K}`` (with ``_stderr`` and
    ``_estimator_stderr``); the unclipped bound appends ``_unclipped``. With ``estimator="ode"``
    it is the exact likelihood of the probability-flow ODE (not a bound), ``nll_bpd_ode`` with
    ``_stderr``, ``_prior``, ``_num_images``, its cost ``_nfe``, ``_seconds``,
    ``_seconds_per_image`` and, with ≥ 2 Hutchinson probes, ``_estimator_stderr``
    (:class:`~ddpm.metrics.bound.BitsPerDim`). For the full bound the
    per-timestep terms (mean Lₜ over images, ``[T]``) go to W&B as a line plot when a
    ``WandbLogger`` is attached, and are always saved as ``<run dir>/nll/terms_step{step:07d}.npy``.

    Cost: ``T`` network evaluations per image for the full bound (1000 × 1000 images = 1M
    forward passes), K for the stratified estimate; for the ODE the adaptive solver's number of
    evaluations (typically one to a few hundred at rtol = atol = 1e-5), each a forward pass and
    ``hutchinson_samples`` vector-Jacobian products of the batch.

    Args:
        num_images: held-out images evaluated (from index 0; capped at the split size).
        batch_size: images per batch (a global batch runs on one rank).
        split: ``"test"`` or ``"val"`` (the datamodule's ``test_set`` / ``val_set``).
        every_n_steps: evaluate when ``global_step % every_n_steps == 0``; 0/None: never.
        on_train_end: also evaluate at the end of training.
        on_test: evaluate at the end of ``trainer.test``.
        seed: seeds the noise of each batch (with the image index).
        save_terms: write the per-timestep terms as ``.npy`` in the run directory.
        progress: tqdm bar on rank 0.
        estimator: ``"full"`` (the paper's protocol), ``"stratified"`` or ``"ode"``.
        num_terms: K for ``"stratified"`` (2 ≤ K ≤ T).
        clip_denoised: clip x̂₀ to [-1, 1] inside every term, as the paper's evaluation does;
            False gives the unclipped bound, its keys suffixed ``_unclipped`` (the ODE does not
            clip).
        ode: the ODE's settings for ``"ode"`` (``rtol``, ``atol``, ``method``,
            ``hutchinson_samples``, ``divergence``, ``max_num_steps``; see
            :class:`~ddpm.diffusion.ode_likelihood.ODELikelihoodSettings`); None: the defaults.
        per_image: also keep each image's total: ``last_result["per_image_bpd"]``, float64
            ``[n]`` in dataset order (not logged), for paired comparisons
            (``nll.likelihoods`` of ``src/eval.py``).
        report_cost: report the bound's cost too (``B_nfe``, ``B_seconds``,
            ``B_seconds_per_image``), as the ODE always does.
        variance: evaluate with this reverse variance in place of the model's own (e.g. an
            :class:`~ddpm.diffusion.variance.AnalyticVariance`), swapped in for the evaluation
            and back afterwards; the results are named for it (``nll_bpd_analytic``, ...).
        num_steps: for a continuous-time model, VDM's T-step bound L_T with T = ``num_steps``
            in place of L_∞ (``nll_bpd_steps{T}``); refused for a discrete-time model.
    """

    def __init__(
        self,
        num_images: int = 1000,
        batch_size: int = 100,
        split: str = "test",
        every_n_steps: int | None = None,
        on_train_end: bool = True,
        on_test: bool = True,
        seed: int = 0,
        save_terms: bool = True,
        progress: bool = True,
        estimator: str = "full",
        num_terms: int | None = None,
        clip_denoised: bool = True,
        ode: ODELikelihoodSettings | Mapping[str, Any] | None = None,
        per_image: bool = False,
        report_cost: bool = False,
        variance: Variance | None = None,
        num_steps: int | None = None,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        if int(num_images) < 1 or int(batch_size) < 1:
            raise ValueError(
                f"num_images and batch_size must be >= 1, got {num_images}, {batch_size}"
            )
        if estimator not in NLL_ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}: choose one of {NLL_ESTIMATORS}")
        if estimator == "stratified" and (num_terms is None or int(num_terms) < 2):
            raise ValueError(f"estimator='stratified' needs num_terms >= 2, got {num_terms}")
        self.ode = ODELikelihoodSettings.from_config(ode) if estimator == "ode" else None
        self.estimator = estimator
        self.num_terms = None if num_terms is None else int(num_terms)
        self.clip_denoised = bool(clip_denoised)
        self.num_images = int(num_images)
        self.batch_size = int(batch_size)
        self.split = split
        self.every_n_steps = int(every_n_steps or 0)
        self.run_on_train_end = bool(on_train_end)
        self.run_on_test = bool(on_test)
        self.seed = int(seed)
        self.save_terms = bool(save_terms)
        self.progress = bool(progress)
        self.per_image = bool(per_image)
        self.report_cost = bool(report_cost)
        self.variance = variance
        self.num_steps = None if num_steps is None else int(num_steps)
        self._last_step: int | None = None
        self.last_result: dict | None = None
        self.last_terms_path: Path | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run_on_train_end:
            self.evaluate(trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run_on_test:
            self.evaluate(trainer, pl_module)

    def _dataset(self, trainer: pl.Trainer) -> Dataset:
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError("NLLCallback needs the trainer to have a datamodule")
        dataset = getattr(datamodule, f"{self.split}_set", None)
        if dataset is None:
            datamodule.setup("test" if self.split == "test" else "validate")
            dataset = getattr(datamodule, f"{self.split}_set", None)
        if dataset is None:
            raise RuntimeError(f"{type(datamodule).__name__} has no {self.split}_set")
        return dataset

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        """Run one evaluation now (collective) and publish it.

        Returns:
            :meth:`~ddpm.metrics.bound.BitsPerDim.compute` (``terms_bpd`` and, with
            ``per_image``, ``per_image_bpd`` included; named for ``variance`` when given; for the
            ODE also ``nll_bpd_ode_settings``, the solver settings as a dict), or ``{}`` when this
            step was evaluated already.
        """
        step = trainer.global_step
        if self._last_step == step:
            return {}
        self._last_step = step
        diffusion = unwrap_diffusion(pl_module)
        dataset = self._dataset(trainer)
        n = min(self.num_images, len(dataset))  # type: ignore[arg-type]
        metric = BitsPerDim(
            diffusion.num_timesteps,
            self.estimator,
            self.num_terms,
            self.clip_denoised,
            self.ode,
            num_images=n if self.per_image else None,
            report_cost=self.report_cost,
            num_steps=self.num_steps,
        )
        own = diffusion.variance
        if self.variance is not None:
            diffusion.use_variance(self.variance)
        try:
            result = run_nll(
                diffusion,
                unwrap_ema_net(pl_module),
                dataset,
                metric,
                num_images=self.num_images,
                batch_size=self.batch_size,
                seed=self.seed,
                strategy=trainer.strategy,
                progress=self.progress,
            )
        finally:
            if self.variance is not None:
                diffusion.use_variance(own)
        terms = result.pop("terms_bpd", None)
        per_image = result.pop("per_image_bpd", None)
        if self.variance is not None:
            result = tag_nll_metrics(result, f"_{self.variance.name}", self.estimator)
        name = self.metric_name(diffusion.num_timesteps)
        publish_metrics(trainer, {k: float(v) for k, v in result.items()})
        if trainer.is_global_zero:
            if terms is not None:
                self._write_terms(trainer, terms, step)
            log.info(
                "step %d: %s=%.4f ± %.4f on %d images",
                step,
                name,
                result[name],
                result[f"{name}_stderr"],
                result.get(f"{name}_num_images", result.get("nll_num_images")),
            )
        if terms is not None:
            result["terms_bpd"] = terms
        if per_image is not None:
            result["per_image_bpd"] = per_image
        if self.ode is not None:  # the protocol beside the numbers (metrics.json), not logged
            result[f"{name}_settings"] = self.ode.as_dict()
        self.last_result = result
        return result

    def metric_name(self, num_timesteps: int) -> str:
        """The name this callback reports its total under for a diffusion of ``num_timesteps``:
        :func:`~ddpm.metrics.bound.nll_metric_name`, with ``_<variance>`` appended when it
        evaluates with another variance (``nll_bpd_analytic``)."""
        name = nll_metric_name(
            self.estimator, self.num_terms, num_timesteps, self.clip_denoised, self.num_steps
        )
        if self.variance is not None and self.estimator != "ode":
            name += f"_{self.variance.name}"
        return name

    def _write_terms(self, trainer: pl.Trainer, terms: np.ndarray, step: int) -> None:
        if self.save_terms:
            out_dir = Path(trainer.default_root_dir) / "nll"
            out_dir.mkdir(parents=True, exist_ok=True)
            self.last_terms_path = out_dir / f"terms_step{step:07d}.npy"
            np.save(self.last_terms_path, terms)
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                table = wandb.Table(
                    data=[[t, float(v)] for t, v in enumerate(terms)], columns=["t", "bpd"]
                )
                plot = wandb.plot.line(
                    table, "t", "bpd", title=f"bound terms L_t (bits/dim), step {step}"
                )
                logger.experiment.log({"nll_terms": plot, "trainer/global_step": step})
