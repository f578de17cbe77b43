"""LightningModule: wiring only. The maths lives in :mod:`ddpm.diffusion`, the network in
:mod:`ddpm.models`, evaluation in :mod:`ddpm.callbacks`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ddpm.diffusion import GaussianDiffusion, make_timestep_sampler
from ddpm.ema import ExponentialMovingAverage
from ddpm.models.speed import run_net
from ddpm.optim import OptimizerFactory, build_optimizer
from ddpm.seeding import gather_rng_states, restore_rng_state, seed_rank_stream

__all__ = ["DiffusionLitModule", "DivergenceError"]


class DivergenceError(RuntimeError):
    """Raised (and caught by ``train``) when the training loss becomes non-finite."""


class DiffusionLitModule(pl.LightningModule):
    """Trains ``net`` on ``diffusion``'s objective and keeps an EMA copy for sampling.

    Args:
        net: the denoiser ``net(x_t, t)``; output channels must match the diffusion.
        diffusion: the :class:`GaussianDiffusion` (schedule, parameterisation, variance, loss).
        image_shape: ``(C, H, W)`` of the data.
        optimizer: a factory ``optimizer(params) -> Optimizer`` (Hydra ``_partial_``); Adam
            lr 2e-4 when None.
        lr_warmup_steps: linear warm-up of the learning rate over this many steps (paper 5000).
        ema_decay: EMA decay (paper 0.9999).
        timestep_sampler: ``uniform``, ``loss_second_moment`` (importance sampling) or
            ``edm_lognormal`` (EDM's density of σ, part of the objective: no reweighting).
        timestep_sampler_kwargs: the sampler's parameters (e.g. ``p_mean``, ``p_std``).
        check_finite_every_n_steps: how often the loss is checked for NaN/inf (a host sync);
            None uses the trainer's ``log_every_n_steps``.
        channels_last: run the UNet in channels-last memory format.
        bf16_autocast: run the UNet under bfloat16 autocast; its output is cast back to float32
            so the diffusion maths and losses stay in float32.
        compile: ``torch.compile`` the UNet for training (the EMA copy stays eager).
        fused_adam: pass ``fused=True`` to the optimiser on CUDA (ignored on the CPU).
        seed: the run's seed. When fitting starts, each rank's global RNGs are re-seeded from
            ``(seed, global_rank)`` (:func:`ddpm.seeding.seed_rank_stream`), so DDP ranks draw
            different timesteps, noise and dropout masks. None leaves the RNGs as they are.

    Attributes ``net``, ``ema_net`` and ``diffusion`` are what callbacks use; sampling and
    evaluation always go through ``ema_net``.
    """

    def __init__(
        self,
        net: nn.Module,
        diffusion: GaussianDiffusion,
        image_shape: tuple[int, int, int] | list[int],
        optimizer: OptimizerFactory | None = None,
        lr_warmup_steps: int = 5000,
        ema_decay: float = 0.9999,
        timestep_sampler: str = "uniform",
        timestep_sampler_kwargs: dict[str, float] | None = None,
        check_finite_every_n_steps: int | None = None,
        channels_last: bool = False,
        bf16_autocast: bool = False,
        compile: bool = False,
        fused_adam: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        # `seed` is in the run config already; as an hparam it would clash with the datamodule's.
        self.save_hyperparameters(ignore=["net", "diffusion", "optimizer", "seed"])
        self.net = net
        self.diffusion = diffusion
        self.image_shape = tuple(int(s) for s in image_shape)
        self.optimizer_factory = optimizer
        self.lr_warmup_steps = int(lr_warmup_steps)
        self.ema = ExponentialMovingAverage(net, decay=ema_decay)
        self.timestep_sampler = make_timestep_sampler(
            timestep_sampler,
            diffusion.schedule,
            continuous=diffusion.time.continuous,
            **dict(timestep_sampler_kwargs or {}),
        )
        # A learned schedule trains with the network (same optimiser) and has its own EMA,
        # which evaluation uses with the EMA network (`ema_diffusion`).
        self.schedule_ema = (
            ExponentialMovingAverage(diffusion.schedule, decay=ema_decay)
            if diffusion.schedule.learnable
            else None
        )
        self.check_finite_every_n_steps = check_finite_every_n_steps
        self.channels_last = bool(channels_last)
        self.bf16_autocast = bool(bf16_autocast)
        self.fused_adam = bool(fused_adam)
        self.seed = None if seed is None else int(seed)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
            self.ema.ema_net.to(memory_format=torch.channels_last)
        # Kept outside the module tree so the state dict has no duplicate `_orig_mod` keys
        # (nn.Module.__setattr__ would register the compiled wrapper as a submodule); it shares
        # every parameter with `net`.
        object.__setattr__(self, "_compiled_net", torch.compile(self.net) if compile else None)
        # Running sums of the loss per quartile of t, flushed at each logging step (no per-step sync).
        self.register_buffer("_quartile_sums", torch.zeros(4), persistent=False)
        self.register_buffer("_quartile_counts", torch.zeros(4), persistent=False)
        self.diverged_at_step: int | None = None
        self._last_loss = torch.zeros(())
        #: The resolved run configuration, stored in every checkpoint so it can be rebuilt.
        self.run_config: dict[str, Any] | None = None
        #: The W&B run id of the training run (``ddpm.tasks.train.wandb_run_id``), or None.
        self.wandb_run_id: str | None = None

    @property
    def ema_net(self) -> nn.Module:
        """The EMA network used for every sample and evaluation."""
        return self.ema.ema_net

    @property
    def ema_diffusion(self) -> GaussianDiffusion:
        """The diffusion every sample and evaluation uses with :attr:`ema_net`: ``diffusion``
        itself, or for a learned schedule the same composition on the schedule's EMA, whose
        T-step tables are recomputed from its current parameters here."""
        if self.schedule_ema is None:
            return self.diffusion
        schedule = self.schedule_ema.ema_net
        schedule.refresh_tables()
        return self.diffusion.with_schedule(schedule)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The training network's output ``[B, C·m, H, W]`` (float32) for ``x_t`` at ``t``."""
        net = self.net if self._compiled_net is None else self._compiled_net
        return run_net(net, x_t, t, self.channels_last, self.bf16_autocast)

    def setup(self, stage: str) -> None:
        """Give this rank its own random stream (before a resume restores the saved streams)."""
        if stage == "fit" and self.seed is not None:
            seed_rank_stream(self.seed, self.global_rank)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
        t, weights = self.timestep_sampler.sample(x0.shape[0], x0.device)
        terms = self.diffusion.training_losses(self, x0, t)
        self.timestep_sampler.update(t, terms["loss"])
        loss = (terms["loss"] * weights).mean()
        self._last_loss = loss.detach()

        if self._is_logging_step():
            for name, value in terms.items():
                mean = value.detach().mean()
                if name == "loss":
                    # A host snapshot: Lightning reads progress-bar metrics with .item() after every
                    # step, which on a device tensor would synchronise each step.
                    mean = mean.to("cpu", copy=True)
                self.log(f"train/{name}", mean, on_step=True, prog_bar=name == "loss")
            if "diffusion" in terms:  # continuous bound: what a learned schedule's shape minimises
                self.log("train/diffusion_var", terms["diffusion"].detach().var(), on_step=True)
        if t.is_floating_point():  # continuous t ∈ [0, 1)
            quartile = (t * 4).long().clamp(0, 3)
        else:
            quartile = (t * 4) // self.diffusion.num_timesteps
        self._quartile_sums.index_add_(0, quartile, terms["loss"].detach().float())
        self._quartile_counts.index_add_(0, quartile, torch.ones_like(terms["loss"]).float())
        return loss

    def _is_logging_step(self) -> bool:
        """Whether Lightning hands this step's metrics to the loggers.

        True every ``log_every_n_steps`` (Lightning's own test), at the last step of a
        ``max_steps`` run (so the final ``train/loss`` in ``callback_metrics`` is the last step's)
        and always under ``fast_dev_run`` or without a trainer.
        """
        trainer = self._trainer
        if trainer is None:
            return True
        step = self.global_step + 1
        every = max(int(trainer.log_every_n_steps or 1), 1)
        max_steps = trainer.max_steps
        return (
            bool(trainer.fast_dev_run)
            or step % every == 0
            or (max_steps is not None and 0 < max_steps <= step)
        )

    def _log_interval(self) -> int:
        if self.check_finite_every_n_steps:
            return int(self.check_finite_every_n_steps)
        return int(getattr(self.trainer, "log_every_n_steps", 50) or 50)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if (self.global_step + 1) % self._log_interval() == 0:
            norms = [p.grad.detach().norm() for p in self.net.parameters() if p.grad is not None]
            if norms:
                self.log("train/grad_norm", torch.stack(norms).norm(), on_step=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step, then update the EMA and (every log interval) check the loss is finite.

        Both happen here rather than in ``on_train_batch_end`` because Lightning runs callbacks'
        batch-end hooks (checkpointing, sample grids) before the module's: a checkpoint must hold
        the EMA of the step it is named after, and never a diverged model.
        """
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.net)
        if self.schedule_ema is not None:
            self.schedule_ema.update(self.diffusion.schedule)
        step = self.global_step + 1  # the step that just finished (global_step counts it later)
        if step % self._log_interval() == 0:
            self._flush_quartiles()
            if not bool(torch.isfinite(self._last_loss)):
                self.diverged_at_step = step
                raise DivergenceError(
                    f"non-finite training loss at step {step} with {self.diffusion.name} "
                    f"(T={self.diffusion.num_timesteps}); the run is marked diverged"
                )

    def _flush_quartiles(self) -> None:
        means = self._quartile_sums / self._quartile_counts.clamp(min=1)
        for q in range(4):
            self.log(f"train/loss_q{q}", means[q], on_step=True)
        self._quartile_sums.zero_()
        self._quartile_counts.zero_()

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Held-out loss with fixed t and noise per batch, so curves are comparable over time."""
        self._held_out_loss(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """The held-out loss on the test split (``trainer.test``; the evaluation callbacks add
        sample quality and bits/dim at the end of the test epoch)."""
        self._held_out_loss(batch, batch_idx, "test")

    def _held_out_loss(self, batch: Any, batch_idx: int, split: str) -> None:
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
        generator = torch.Generator(device=x0.device).manual_seed(1000 + batch_idx)
        if self.diffusion.time.continuous:
            t = torch.rand(x0.shape[0], device=x0.device, generator=generator)
        else:
            t = torch.randint(
                0,
                self.diffusion.num_timesteps,
                (x0.shape[0],),
                device=x0.device,
                generator=generator,
            )
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        terms = self.ema_diffusion.training_losses(self.ema_net, x0, t, noise)
        for name, value in terms.items():
            self.log(f"{split}/{name}", value.mean(), on_epoch=True, sync_dist=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        # The diffusion has parameters only with a learned schedule: otherwise the optimiser's
        # parameters are the network's, as they always were.
        optimizer, scheduler = build_optimizer(
            [*self.net.parameters(), *self.diffusion.parameters()],
            self.optimizer_factory,
            lr_warmup_steps=self.lr_warmup_steps,
            fused=self.fused_adam,
            device=self.device,
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping; with a learned schedule the network and the schedule are
        clipped each by its own norm, so the schedule's gradient (the variance gradient is
        scaled by 2L) never changes the network's."""
        schedule_params = [p for p in self.diffusion.parameters() if p.grad is not None]
        if not schedule_params or not gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        net_params = [p for p in self.net.parameters() if p.grad is not None]
        for group in (net_params, schedule_params):
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(group, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(group, gradient_clip_val)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to save a diverged model; store the run configuration and every rank's RNG state.

        Lightning builds the checkpoint on every rank (rank 0 writes it), so the finiteness check
        and the gathering of the RNG states run everywhere and stay collective. The check is one
        reduction over the weights per checkpoint, not per step. Everything is stored as tensors
        and plain Python values, so the checkpoint loads with ``torch.load(weights_only=True)``.

        Raises:
            DivergenceError: when a weight of the network or of its EMA is NaN or infinite.
        """
        self._check_weights_finite()
        checkpoint["run_config"] = self.run_config
        checkpoint["image_shape"] = list(self.image_shape)
        checkpoint["rng_states_per_rank"] = gather_rng_states()
        if self.wandb_run_id:  # a run resumed from this file elsewhere continues its W&B run
            checkpoint["wandb_run_id"] = self.wandb_run_id

    def _check_weights_finite(self) -> None:
        tensors = [p.detach() for p in self.net.parameters()]
        tensors += [p.detach() for p in self.ema_net.parameters()]
        tensors += [p.detach() for p in self.diffusion.parameters()]  # a learned schedule's
        if self.schedule_ema is not None:
            tensors += [p.detach() for p in self.schedule_ema.parameters()]
        norms = torch._foreach_norm([t.float() for t in tensors], ord=float("inf"))
        if not bool(torch.isfinite(torch.stack(norms)).all()):
            step = self.global_step
            self.diverged_at_step = step
            raise DivergenceError(
                f"non-finite weights at step {step} with {self.diffusion.name} "
                f"(T={self.diffusion.num_timesteps}); no checkpoint of a diverged model is written "
                "and the run is marked diverged"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Continue this rank's saved random stream (exact resume, rank by rank)."""
        states = checkpoint.get("rng_states_per_rank")
        if not states:
            return
        world_size = self.trainer.world_size if self._trainer is not None else 1
        if len(states) != world_size:
            rank_zero_warn(
                f"the checkpoint holds the random streams of {len(states)} rank(s) but this run "
                f"has {world_size}; each rank starts a fresh stream from (seed, rank), so the "
                "resumed run will not replay the original's noise exactly"
            )
            return
        restore_rng_state(states[self.global_rank])
