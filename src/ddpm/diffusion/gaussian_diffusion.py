"""The one public façade: a Gaussian diffusion composed of schedule × parameterisation × variance × loss.

The façade composes and owns no table: the :class:`~ddpm.diffusion.schedule.Schedule` holds α, σ,
log SNR and every derived table, and the strategies receive it (the losses and weightings, which
combine strategies, receive the façade through the structural types of
:mod:`ddpm.diffusion.protocols`). No module of ``ddpm.diffusion`` imports this one back.

Data flows one way, ``x0 → q_sample → net → parameterisation → variance → loss``; training, the
bound and every sampler go through :meth:`GaussianDiffusion.p_mean_variance`, so they cannot drift.

Conventions: images ``x0``/``x_t`` are ``[B, C, H, W]`` (any trailing shape works) in [-1, 1];
``t`` is a LongTensor ``[B]`` of 0-indexed timesteps (index 0 is the paper's t = 1); ``net`` is any
callable ``net(x, t) -> Tensor [B, C·m, ...]`` with ``m = output_channels_multiplier``. The network
is only ever called through :meth:`GaussianDiffusion.model_output`, which hands it the
parameterisation's preconditioned input (x_t itself, except for EDM's c_in x).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ddpm.diffusion.bound import full_bound, stratified_bound, stratum_bounds
from ddpm.diffusion.continuous import At, continuous_bound
from ddpm.diffusion.likelihood import (
    discretized_gaussian_log_likelihood,
    mean_flat_bpd,
    normal_kl,
)
from ddpm.diffusion.losses import Loss, make_loss
from ddpm.diffusion.parameterization import Parameterization, make_parameterization
from ddpm.diffusion.protocols import Net
from ddpm.diffusion.sampling import sample_loop
from ddpm.diffusion.schedule import TABLE_NAMES, Schedule, ScheduleTables, as_schedule
from ddpm.diffusion.spacing import timestep_spacing
from ddpm.diffusion.time import ContinuousTime, Time, make_time
from ddpm.diffusion.variance import Variance, make_variance
from ddpm.diffusion.weighting import Weighting, effective_weighting, make_weighting

__all__ = ["GaussianDiffusion", "Net"]

#: How many respaced children (:meth:`GaussianDiffusion.respaced`) a diffusion keeps, by recency.
RESPACED_CACHE_SIZE = 8


class GaussianDiffusion(nn.Module):
    """A schedule composed with the parameterisation, variance, loss and weighting strategies.

    Args:
        betas: the schedule: a :class:`~ddpm.diffusion.schedule.Schedule` (see
            :func:`~ddpm.diffusion.make_schedule`), or a β table ``[T]`` (see
            :func:`~ddpm.diffusion.make_betas`), which becomes a plain ``Schedule``. The name is
            that of every run configuration (``diffusion.betas: ${schedule}``).
        parameterization: ``eps``, ``x0``, ``mu``, ``v`` or a
            :class:`~ddpm.diffusion.parameterization.Parameterization`.
        variance: ``fixed_large``, ``fixed_small``, ``learned``, ``learned_range`` or a
            :class:`~ddpm.diffusion.variance.Variance`.
        loss: ``simple``, ``vlb``, ``hybrid`` or a :class:`~ddpm.diffusion.losses.Loss`.
        loss_kwargs: extra arguments for a loss given by name (e.g. ``{"vlb_weight": 1e-3}``).
        dtype: dtype of the stored tables; float64 gives exact maths for tests and references.
            None: the schedule's own (float32 for a β table); a schedule of another dtype is
            copied with its tables cast from float64 (:meth:`Schedule.with_dtype`).
        weighting: of the ε-MSE under ``loss=simple`` (:mod:`~ddpm.diffusion.weighting`).
        time: ``discrete`` (None), ``continuous`` or a :class:`~ddpm.diffusion.time.Time`
            (:mod:`ddpm.diffusion.time`). A schedule defined in continuous time only (a learned
            one) implies ``continuous``.

    Raises:
        ValueError: for an unknown name, or a combination the loss cannot train, naming the
            combination and what to use instead; on a zero-terminal-SNR schedule (ᾱ_T = 0),
            ε prediction and any weighting other than ``none`` (the ε-MSE it weights is
            identically zero at the last step); in continuous time, what has no continuous
            form (:meth:`_check_continuous`).

    The schedule is the submodule ``schedule``: its tables are computed in float64 and stored as
    ``dtype`` non-persistent buffers, so they move with ``.to(device)`` and never enter
    checkpoints. The façade exposes the same tensors as its own buffers under the same names
    (``d.alphas_cumprod`` is ``d.schedule.alphas_cumprod``), and delegates ``extract``, the
    forward process and ``pred_eps_from_x0`` to the schedule.
    """

    def __init__(
        self,
        betas: Schedule | torch.Tensor | Sequence[float],
        parameterization: str | Parameterization = "eps",
        variance: str | Variance = "fixed_large",
        loss: str | Loss = "simple",
        loss_kwargs: dict[str, Any] | None = None,
        dtype: torch.dtype | None = None,
        weighting: str | Weighting = "none",
        weighting_kwargs: dict[str, Any] | None = None,
        time: str | Time | None = None,
    ) -> None:
        super().__init__()
        self.parameterization = make_parameterization(parameterization)
        self.variance = make_variance(variance)
        self.loss = make_loss(loss, **dict(loss_kwargs or {}))
        self.loss.validate(self.parameterization, self.variance)
        self.weighting = make_weighting(weighting, **dict(weighting_kwargs or {}))
        if self.weighting.name != "none" and self.loss.name != "simple":
            raise ValueError(
                f"weighting={self.weighting.name} with loss={self.loss.name}: a weighting replaces "
                "the MSE of loss=simple (loss=vlb is itself the ELBO weighting). Use loss=simple "
                f"with weighting={self.weighting.name}, or weighting=none."
            )
        self.schedule = as_schedule(betas, dtype)
        zero_terminal_snr = self.schedule.zero_terminal_snr
        if zero_terminal_snr and not self.parameterization.finite_at_zero_snr:
            raise ValueError(
                f"parameterization={self.parameterization.name} with a zero-terminal-SNR schedule: "
                "its x̂₀ divides by √ᾱ_T = 0 at the last step (for ε: x̂₀ = (x_t − √(1−ᾱ) ε̂)/√ᾱ). "
                "Use parameterization=v or parameterization=x0, or "
                "schedule.zero_terminal_snr=false."
            )
        if zero_terminal_snr and self.weighting.name != "none":
            # One check for every weighting: at SNR = 0 the table's value does not matter (p2's is
            # a finite 1, min_snr's and edm's are not), the ε-MSE it multiplies is zero.
            raise ValueError(
                f"weighting={self.weighting.name} with a zero-terminal-SNR schedule: at SNR = 0 "
                "the ε̂ implied by any network output is x_T = ε, so the ε-space MSE, and every "
                "weighting of it, is zero at the last step, where sampling starts: that step "
                "would never be trained. Use weighting=none with parameterization=v or "
                "parameterization=x0 (their plain MSE trains it), or "
                "schedule.zero_terminal_snr=false."
            )
        time = make_time(time)
        if self.schedule.continuous_only and not time.continuous:
            time = ContinuousTime()  # a learned γ(t) implies continuous time
        if isinstance(time, ContinuousTime):
            time = time.resolved(self.schedule)
        self.time = time
        if time.continuous:
            self._check_continuous()
        self.num_timesteps = self.schedule.num_timesteps
        for name in TABLE_NAMES:  # the schedule's tensors, under the names callers know
            self.register_buffer(name, self.schedule.get_buffer(name), persistent=False)
        if self.weighting.name != "none":
            weights = self.weighting.table(self)
            if not torch.isfinite(weights).all() or (weights < 0).any():
                raise ValueError(
                    f"weighting={self.weighting.name} gives non-finite or negative weights on "
                    "this schedule"
                )
            #: w(t) ``[T]`` on the ε-MSE of loss=simple.
            self.register_buffer("weights", weights.to(self.schedule.dtype), persistent=False)
        self._respaced: OrderedDict[tuple, GaussianDiffusion] = OrderedDict()  # LRU, see respaced
        self.variance.check(self.schedule)  # e.g. an analytic variance's Γ must have T entries

    def _check_continuous(self) -> None:
        """Refuse what has no continuous-time form, naming the fix."""
        fix = "or time=discrete"
        if self.schedule.zero_terminal_snr:
            raise ValueError(
                "time=continuous with a zero-terminal-SNR schedule: γ(1) = ∞, so the prior "
                "term and γ′ near t = 1 are infinite. Use schedule.zero_terminal_snr=false, " + fix
            )
        if self.variance.learned:
            raise ValueError(
                f"time=continuous with variance={self.variance.name}: a learned variance is a "
                "per-step quantity (between β̃ and β of one step) with no continuous-time form; "
                "VDM's bound has none. Use variance=fixed_large or variance=fixed_small, " + fix
            )
        if not self.parameterization.mean_from_pred_x0:
            raise ValueError(
                f"time=continuous with parameterization={self.parameterization.name}: μ̃ is "
                "the mean of one step t → t−1, which continuous time does not have. Use "
                "parameterization=eps, x0, v or edm, " + fix
            )
        if self.schedule.learnable and (self.loss.name != "vlb" or self.weighting.name != "none"):
            raise ValueError(
                f"schedule=learned with loss={self.loss.name} and "
                f"weighting={self.weighting.name}: the learned schedule's endpoints train on "
                "the bound and its shape on the variance of the bound's diffusion loss, whose "
                "mean the shape does not change; under any other objective the shape would "
                "change the objective itself. Use loss=vlb weighting=none, or a fixed schedule "
                "(e.g. schedule=cosine time=continuous)"
            )
        if self.weighting.name != "none" and not self.weighting.continuous_form:
            raise ValueError(
                f"weighting={self.weighting.name} has no continuous-time form; use one of "
                "elbo, min_snr, p2, sigmoid, edm or none, " + fix
            )

    def with_schedule(self, schedule: Schedule) -> GaussianDiffusion:
        """The same composition on another schedule of the same T (e.g. a learned schedule's
        EMA copy, for evaluation); the strategies are shared, the respaced cache is not."""
        if schedule.num_timesteps != self.num_timesteps:
            raise ValueError(
                f"with_schedule: T={schedule.num_timesteps}, this diffusion has "
                f"T={self.num_timesteps}"
            )
        return GaussianDiffusion(
            schedule,
            self.parameterization,
            self.variance,
            self.loss,
            weighting=self.weighting,
            time=self.time,
        ).to(schedule.device)  # the weighting's table is made on the host

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> GaussianDiffusion:
        """Move/cast the tables (``.to``, ``.cuda``, ``.double``, ...) and drop respaced children.

        The façade's table buffers are the schedule's tensors: after the schedule has moved they
        point at its new tensors again. The children are not submodules (they must not enter
        ``state_dict``), so ``fn`` would not reach them, and their strategies hold the parent and
        its ``timestep_map`` as plain attributes that casting the child could not update
        either. Rebuilding them on demand from the float64 βs is cheap and exact, and releases the
        old device's memory.
        """
        result = super()._apply(fn, recurse)
        if recurse:
            for name in TABLE_NAMES:
                self._buffers[name] = self.schedule.get_buffer(name)
        self._respaced.clear()
        return result

    def use_variance(self, variance: str | Variance) -> None:
        """Evaluate and sample with another reverse variance from now on (no retraining).

        For inference on a trained model: a fixed variance in place of another, or
        :class:`~ddpm.diffusion.variance.AnalyticVariance`. The respaced children, built with
        the old variance, are dropped.

        Raises:
            ValueError: when the swap changes whether the network predicts the variance (its
                output channels are fixed by training), or the variance cannot serve this
                diffusion (:meth:`~ddpm.diffusion.variance.Variance.check`).
        """
        variance = make_variance(variance)
        if variance.learned or self.variance.learned:
            raise ValueError(
                f"variance={variance.name} in place of variance={self.variance.name}: a learned "
                "variance is part of the network's output, so it can neither be replaced nor "
                "replace another; swap only between fixed variances (fixed_large, fixed_small, "
                "analytic)"
            )
        variance.check(self.schedule)
        self.variance = variance
        self._respaced.clear()

    # ------------------------------------------------------------------ helpers
    @property
    def output_channels_multiplier(self) -> int:
        """How many times the data channels the network must output (2 for learned variances)."""
        return 2 if self.variance.learned else 1

    @property
    def name(self) -> str:
        """``parameterization-variance-loss``, e.g. ``eps-fixed_large-simple``."""
        return f"{self.parameterization.name}-{self.variance.name}-{self.loss.name}"

    @property
    def betas_float64(self) -> torch.Tensor:
        """β ``[T]`` float64 on the host (the schedule's)."""
        return self.schedule.betas_float64

    def extract(self, table: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` reshaped to ``[B, 1, …, 1]`` to broadcast against ``like`` (no host copy);
        :meth:`Schedule.extract <ddpm.diffusion.schedule.Schedule.extract>`."""
        return self.schedule.extract(table, t, like)

    def split_output(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split the network output into (parameterisation part, variance part or None)."""
        if not self.variance.learned:
            return output, None
        if output.shape[1] % 2:
            raise ValueError(
                f"variance={self.variance.name} needs 2C output channels, got {output.shape[1]}"
            )
        return output.chunk(2, dim=1)

    def model_output(
        self,
        net: Net,
        x_t: torch.Tensor,
        t: torch.Tensor,
        schedule: ScheduleTables | None = None,
    ) -> torch.Tensor:
        """The network output ``[B, C·m, ...]`` at (x_t, t): ``net(net_input(x_t, t), c(t))``.

        ``t`` are this diffusion's timesteps (indices, or continuous times); the network
        receives the time strategy's noise input c(t) (the index itself in discrete time, see
        :class:`~ddpm.diffusion.time.ContinuousTime`); the parameterisation preconditions x_t
        (identity except for ``edm``). ``schedule``: the batch's
        :class:`~ddpm.diffusion.schedule.ScheduleAt` in continuous time (None: the schedule).
        """
        schedule = self.schedule if schedule is None else schedule
        return net(
            self.parameterization.net_input(schedule, x_t, t),
            self.time.network_input(schedule, t),
        )

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(
        self, x0: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x0): (mean, variance, log_variance), variance terms ``[B, 1, …]``."""
        return self.schedule.q_mean_variance(x0, t)

    def q_sample(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t = √ᾱₜ x0 + √(1−ᾱₜ) ε."""
        return self.schedule.q_sample(x0, t, noise)

    def q_posterior_mean(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """μ̃ₜ(x_t, x0) of q(x_{t−1} | x_t, x0)."""
        return self.schedule.q_posterior_mean(x0, x_t, t)

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t−1} | x_t, x0): (mean, β̃ₜ, log β̃ₜ clipped)."""
        return self.schedule.q_posterior_mean_variance(x0, x_t, t)

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self,
        net_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """p_θ(x_{t−1} | x_t) from a network output.

        Returns a dict with ``mean``, ``variance``, ``log_variance`` and ``pred_x0`` (x̂₀, clipped
        to [-1, 1] when ``clip_denoised``). With ε/x₀/v prediction clipping changes the mean, which
        is recomputed from the clipped x̂₀; with μ̃ prediction the mean is the output as it is.
        """
        net_output = net_output.to(x_t.dtype)
        mean_output, var_output = self.split_output(net_output)
        variance, log_variance = self.variance(self.schedule, var_output, x_t, t)
        pred_x0 = self.parameterization.pred_x0(self.schedule, mean_output, x_t, t)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean = self.parameterization.mean(self.schedule, mean_output, x_t, t, pred_x0)
        return {
            "mean": mean,
            "variance": variance.expand_as(x_t),
            "log_variance": log_variance.expand_as(x_t),
            "pred_x0": pred_x0,
        }

    def pred_eps_from_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_x0: torch.Tensor
    ) -> torch.Tensor:
        """ε̂ = (x_t − √ᾱₜ x̂₀)/√(1−ᾱₜ) (finite at zero terminal SNR, where it is x_T)."""
        return self.schedule.pred_eps_from_x0(x_t, t, pred_x0)

    # ------------------------------------------------------------------ objectives
    def effective_weighting(self, timestep_sampler: Any | None = None) -> dict[str, torch.Tensor]:
        """What the configured objective weights per timestep: the weight on the ε-MSE of the
        mean and the density of t (and λ), as float64 host tensors ``[T]``
        (:func:`~ddpm.diffusion.weighting.effective_weighting`)."""
        return effective_weighting(self, timestep_sampler)

    def training_losses(
        self,
        net: Net,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-example loss terms ``[B]`` of the configured objective; ``"loss"`` is always present.

        ``t``: timestep indices ``[B]`` (long), or continuous times in [0, 1] (floating) under
        ``time=continuous``, where the schedule is evaluated once for the batch
        (:meth:`Schedule.at <ddpm.diffusion.schedule.Schedule.at>`) and the loss reads it
        through that view.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        d: Any = self
        if t.is_floating_point():
            if not self.time.continuous:
                raise ValueError(
                    "continuous times t with time=discrete: pass timestep indices (a "
                    "LongTensor), or build the diffusion with time=continuous"
                )
            d = At(self, self.schedule.at(t))
        x_t = d.schedule.q_sample(x0, t, noise)
        output = self.model_output(net, x_t, t, schedule=d.schedule)
        expected = x0.shape[1] * self.output_channels_multiplier
        if output.shape[1] != expected:
            raise ValueError(
                f"the network outputs {output.shape[1]} channels but {self.name} needs {expected} "
                f"(data channels × {self.output_channels_multiplier}); set the model's out_channels"
            )
        return self.loss(d, output.to(x0.dtype), x0, x_t, t, noise)

    def vlb_terms_from_output(
        self,
        net_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool,
    ) -> torch.Tensor:
        """Lₜ in bits/dim ``[B]``: KL(q(x_{t−1}|x_t,x0) ‖ p_θ) for t > 0, −log p_θ(x0|x1) at t = 0.

        ``clip_denoised`` clips x̂₀ to [-1, 1] inside p_θ (:meth:`p_mean_variance`): the training
        losses pass False (the official ``kl`` loss), the evaluation of the bound True (the
        official ``calc_bpd_loop``), so the bound is that of the model the sampler samples from.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(net_output, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat_bpd(
            normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        )
        decoder_nll = -mean_flat_bpd(
            discretized_gaussian_log_likelihood(
                x0, means=out["mean"], log_scales=0.5 * out["log_variance"]
            )
        )
        return torch.where(t == 0, decoder_nll, kl)

    def vlb_term_bpd(
        self,
        net: Net,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
    ) -> torch.Tensor:
        """Lₜ of the bound in bits/dim ``[B]`` for the given x_t (KL for t > 0, decoder NLL at 0);
        x̂₀ clipped as the paper's evaluation does unless ``clip_denoised=False``."""
        return self.vlb_terms_from_output(
            self.model_output(net, x_t, t), x0, x_t, t, clip_denoised=clip_denoised
        )

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x0) ‖ N(0, I)) in bits/dim ``[B]`` (no parameters)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        zeros = torch.zeros_like(mean)
        return mean_flat_bpd(normal_kl(mean, log_variance, zeros, zeros))

    def nll_bpd(
        self,
        net: Net,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
        clip_denoised: bool = True,
        num_steps: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The full variational bound on −log p(x0) in bits/dim (:func:`~ddpm.diffusion.bound.full_bound`),
        x̂₀ clipped inside every term as the paper evaluates it unless ``clip_denoised=False``.

        In continuous time, VDM's bound with L_∞ from T stratified times per image, the same
        number of network evaluations (:func:`~ddpm.diffusion.continuous.continuous_bound`), or
        its T′-step form L_T′ with ``num_steps`` = T′.

        Returns:
            ``total [B]``, ``terms [B, T]`` (decoder NLL at index 0; in continuous time stratum
            i's share of the diffusion loss, with ``decoder [B]`` and ``stderr [B]`` beside)
            and ``prior [B]``.
        """
        if self.time.continuous:
            return continuous_bound(
                self,
                net,
                x0,
                self.num_timesteps,
                num_steps=num_steps,
                generator=generator,
                clip_denoised=clip_denoised,
                progress=progress,
            )
        self._no_steps_in_discrete_time(num_steps)
        return full_bound(
            self, net, x0, generator=generator, progress=progress, clip_denoised=clip_denoised
        )

    def _no_steps_in_discrete_time(self, num_steps: int | None) -> None:
        if num_steps is not None:
            raise ValueError(
                f"nll.num_steps={num_steps}: the T-step bound L_T is a form of the continuous "
                "bound; this discrete-time model's bound already has its T = "
                f"{self.num_timesteps} steps. Leave nll.num_steps=null"
            )

    def stratum_bounds(self, num_terms: int) -> torch.Tensor:
        """Edges ``[K+1]`` of the K strata of :meth:`nll_bpd_stratified` (host LongTensor)."""
        return stratum_bounds(self.num_timesteps, num_terms)

    def nll_bpd_stratified(
        self,
        net: Net,
        x0: torch.Tensor,
        num_terms: int,
        generator: torch.Generator | None = None,
        clip_denoised: bool = True,
        num_steps: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """An unbiased estimate of the bound from K ≪ T terms per image, with its standard error
        (:func:`~ddpm.diffusion.bound.stratified_bound`); x̂₀ clipped unless ``clip_denoised=False``.

        Returns:
            ``total [B]``, ``stderr [B]`` (bits/dim), ``t [B, K]``, ``terms [B, K]``,
            ``weights [K]`` and ``prior [B]``; in continuous time those of
            :func:`~ddpm.diffusion.continuous.continuous_bound` with K strata (L_T′ with
            ``num_steps`` = T′).
        """
        if self.time.continuous:
            return continuous_bound(
                self,
                net,
                x0,
                num_terms,
                num_steps=num_steps,
                generator=generator,
                clip_denoised=clip_denoised,
            )
        self._no_steps_in_discrete_time(num_steps)
        return stratified_bound(
            self, net, x0, num_terms, generator=generator, clip_denoised=clip_denoised
        )

    # ------------------------------------------------------------------ sampling
    def respaced(
        self, steps: int, spacing: str = "linspace"
    ) -> tuple[GaussianDiffusion, torch.Tensor]:
        """A diffusion over ``steps`` of the T timesteps and the original index of each of them.

        The kept timesteps follow ``spacing`` (see :func:`~ddpm.diffusion.spacing.timestep_spacing`;
        the default ``linspace`` strides evenly from 0 to T−1); the respaced βs are recomputed from
        ᾱ so that ᾱ is unchanged at every kept step: β'ᵢ = 1 − ᾱ[kᵢ]/ᾱ[kᵢ₋₁]. The result is
        cached per (steps, device, dtype, spacing): the :data:`RESPACED_CACHE_SIZE` most recently
        used keys are kept, and moving or casting this diffusion empties the cache (the next
        call rebuilds the child on the new device and dtype).
        """
        steps = int(steps)
        if not 2 <= steps <= self.num_timesteps:
            raise ValueError(
                f"steps={steps}: choose between 2 and num_timesteps={self.num_timesteps}"
            )
        key = (steps, self.betas.device, self.betas.dtype, spacing)
        if key not in self._respaced:
            kept = timestep_spacing(self.schedule, steps, spacing)
            schedule = self.schedule.respaced(kept)
            kept = kept.to(self.betas.device)
            child = GaussianDiffusion(
                schedule,
                self.parameterization.respaced(self, kept),
                self.variance.respaced(self, kept),
                self.loss,
            ).to(self.betas.device)
            child.register_buffer("timestep_map", kept, persistent=False)
            self._respaced[key] = child
            # Bounded: a sweep over many step counts must not keep every child (and its device
            # tables) alive; a run uses a handful (sampling, bits/dim, grids).
            while len(self._respaced) > RESPACED_CACHE_SIZE:
                self._respaced.popitem(last=False)
        self._respaced.move_to_end(key)
        child = self._respaced[key]
        return child, child.timestep_map

    @torch.no_grad()
    def sample(
        self,
        net: Net,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        steps: int | None = None,
        eta: float | None = None,
        clip_denoised: bool = True,
        return_pred_x0: bool = False,
        x_T: torch.Tensor | None = None,
        t_start: int | None = None,
        progress: bool = False,
        sampler: str | None = None,
        spacing: str | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        **sampler_opts: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Draw samples ``[B, C, H, W]`` from the reverse process.

        Args:
            net: the (EMA) network.
            shape: ``(B, C, H, W)``.
            generator: the only source of randomness (on the buffers' device); None uses torch's
                global RNG.
            steps: number of timesteps visited; None means all T (Algorithm 2 for ``ancestral``),
                fewer respaces the chain (see ``spacing``).
            eta: DDIM's η, only with ``sampler="ddim"`` (None there means 0, deterministic).
            clip_denoised: clip x̂₀ to [-1, 1] at every step, as the official sampler does.
            return_pred_x0: also return x̂₀ along the chain, ``[steps, B, C, H, W]`` (first = t=T).
            x_T: start from this noise instead of drawing it (or from this x_t with ``t_start``).
            t_start: start the chain at this original timestep index with ``x_T`` as x_t (for
                interpolation and conceptual compression); it must be one of the kept steps.
            progress: show a progress bar.
            sampler: a name from :data:`~ddpm.diffusion.sampling.SAMPLERS` (``ancestral``,
                ``ddim``, ``dpmpp_2m``, ``heun``); None is ``ancestral``.
            spacing: timestep spacing (``linspace``, ``uniform``, ``trailing``, ``logsnr``,
                ``karras``); None is the sampler's default
                (:data:`~ddpm.diffusion.spacing.DEFAULT_SPACING`).
            callback: called once per step with a dict holding at least ``i`` (step number,
                0 = noisiest), ``t`` (original timestep), ``x`` (x_t entering the step) and
                ``pred_x0``.
            sampler_opts: extra keyword options of the chosen sampler.

        Returns:
            the samples, or ``(samples, pred_x0_chain)`` when ``return_pred_x0``.

        Raises:
            ValueError: unknown sampler or spacing (naming the choices), ``eta`` with a sampler
                other than ``ddim``, ``t_start`` with an ODE solver, bad ``steps``/``x_T``.
        """
        return sample_loop(
            self,
            net,
            shape,
            generator=generator,
            steps=steps,
            eta=eta,
            clip_denoised=clip_denoised,
            return_pred_x0=return_pred_x0,
            x_T=x_T,
            t_start=t_start,
            progress=progress,
            sampler=sampler,
            spacing=spacing,
            callback=callback,
            **sampler_opts,
        )

    def extra_repr(self) -> str:
        return (
            f"T={self.num_timesteps}, parameterization={self.parameterization.name}, "
            f"variance={self.variance.name}, loss={self.loss!r}"
        )
