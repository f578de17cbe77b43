"""The benchmark's phases; each takes a spec (a JSON-able dict) and returns a JSON-able result.

A spec names the ``phase``, ``model``, ``option``, ``device``, ``image_shape``, ``settings``
(:func:`bench.settings.settings_for`), Hydra ``overrides``, ``seed`` and ``tmp_dir``. Times are
seconds (``time.perf_counter``, with a device synchronisation at window boundaries only).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from bench.settings import SYNC_CHECK_SAMPLE_STEPS, SYNC_CHECK_STEPS
from bench.workload import (
    bench_trainer,
    build_for_spec,
    compose_config,
    peak_memory_mib,
    quiet_lightning,
    reset_peak_memory,
    step_plan,
    synchronize,
    synthetic_loader,
)
from ddpm.builders import build_diffusion, build_net
from ddpm.diffusion import make_timestep_sampler
from ddpm.ema import ExponentialMovingAverage
from ddpm.models.speed import fast_inference_net, run_net, speed_options
from ddpm.optim import build_optimizer
from ddpm.sync_counter import host_sync_counter, mark_host_step_counters


def _window_seconds(stamps: Sequence[float], window: int) -> list[float]:
    """Seconds per step of each window from the boundary timestamps."""
    return [(b - a) / window for a, b in itertools.pairwise(stamps)]


def _timed(device: torch.device, repeats: int, work: Callable[[], Any]) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``work``, synchronising the device around each."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def phase_train_lightning(spec: dict[str, Any]) -> dict[str, Any]:
    """Training throughput through ``DiffusionLitModule`` in a real ``Trainer.fit``."""
    quiet_lightning()
    device = torch.device(spec["device"])
    s = spec["settings"]
    total_steps, boundaries = step_plan(s)
    cfg, module = build_for_spec(spec)
    loader = synthetic_loader(
        spec["image_shape"], s["batch"], total_steps + 1, spec["seed"], device
    )

    class WindowTimer(Callback):
        """Timestamps at window boundaries (with a device synchronisation there only)."""

        def __init__(self) -> None:
            self.count = 0
            self.stamps: list[float] = []
            self.first_start = 0.0
            self.first_step_s = math.nan
            self.last_end: float | None = None
            self.between: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = time.perf_counter()
            if self.last_end is not None and self.count >= s["warmup"]:
                self.between.append(now - self.last_end)
            if self.count == 0:
                synchronize(device)
                self.first_start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.count += 1
            if self.count == 1 or self.count in boundaries:
                synchronize(device)
                now = time.perf_counter()
                if self.count == 1:
                    self.first_step_s = now - self.first_start
                if self.count in boundaries:
                    self.stamps.append(now)
            self.last_end = time.perf_counter()

    timer = WindowTimer()
    trainer = bench_trainer(
        cfg,
        device,
        total_steps,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        callbacks=[timer],
        root_dir=spec["tmp_dir"],
        precision=cfg.trainer.precision,
        benchmark=device.type == "cuda",
        deterministic=False,
    )
    reset_peak_memory(device)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    synchronize(device)
    fit_s = time.perf_counter() - start
    if timer.count != total_steps:
        raise RuntimeError(f"the fit ran {timer.count} steps, expected {total_steps}")
    return {
        "step_s_windows": _window_seconds(timer.stamps, s["window"]),
        "between_batches_s": timer.between,
        "first_step_s": timer.first_step_s,
        "fit_s": fit_s,
        "steps": total_steps,
        "num_parameters": sum(p.numel() for p in module.net.parameters()),
        **peak_memory_mib(device),
    }


def bare_optimizer(
    cfg: DictConfig, params: Any, device: torch.device | str
) -> tuple[Optimizer, LambdaLR]:
    """The optimiser and warm-up schedule ``DiffusionLitModule`` builds from ``cfg``.

    The same library function (:func:`ddpm.optim.build_optimizer`) with the same arguments as
    ``configure_optimizers``: the configured factory, ``module.lr_warmup_steps`` (optimiser
    steps) and ``speed.fused_adam`` (CUDA only).
    """
    factory = instantiate(cfg.optimizer) if cfg.get("optimizer") else None
    return build_optimizer(
        params,
        factory,
        lr_warmup_steps=int(cfg.module.lr_warmup_steps),
        fused=bool(cfg.speed.fused_adam),
        device=device,
    )


def phase_train_bare(spec: dict[str, Any]) -> dict[str, Any]:
    """The same training step in a plain PyTorch loop, plus the EMA update's own cost."""
    device = torch.device(spec["device"])
    s = spec["settings"]
    total_steps, boundaries = step_plan(s)
    cfg = compose_config(spec["model"], spec["option"], spec.get("overrides", ()))
    module_cfg, speed = cfg.module, cfg.speed
    torch.manual_seed(spec["seed"])
    diffusion = build_diffusion(cfg)
    net = build_net(cfg, diffusion, tuple(spec["image_shape"]))
    if speed.channels_last:
        net = net.to(memory_format=torch.channels_last)
    ema = ExponentialMovingAverage(net, decay=float(module_cfg.ema_decay))
    net, ema, diffusion = net.to(device), ema.to(device), diffusion.to(device)
    net.train()
    sampler = make_timestep_sampler(module_cfg.timestep_sampler, diffusion.num_timesteps).to(device)
    # The module's training forward, without the module: the same function, the same options.
    compiled = torch.compile(net) if speed.compile else net

    def forward(x_t: Any, t: Any) -> Any:
        return run_net(compiled, x_t, t, bool(speed.channels_last), bool(speed.bf16_autocast))

    optimizer, scheduler = bare_optimizer(cfg, net.parameters(), device)
    clip = cfg.trainer.gradient_clip_val
    if clip and cfg.trainer.gradient_clip_algorithm != "norm":
        raise ValueError("the bare loop implements gradient_clip_algorithm=norm only")
    loader = synthetic_loader(
        spec["image_shape"], s["batch"], total_steps + 1, spec["seed"], device
    )

    def batches() -> Iterator[Any]:
        while True:
            yield from loader

    def train_step(batch: Any) -> None:
        x0 = batch[0].to(device, non_blocking=True)
        t, weights = sampler.sample(x0.shape[0], device)
        terms = diffusion.training_losses(forward, x0, t)
        sampler.update(t, terms["loss"])
        loss = (terms["loss"] * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), float(clip))
        optimizer.step()
        scheduler.step()
        ema.update(net)

    reset_peak_memory(device)
    stamps: list[float] = []
    between: list[float] = []
    first_step_s = math.nan
    iterator = batches()
    for count in range(1, total_steps + 1):
        if count == 1:
            synchronize(device)
            first_start = time.perf_counter()
        fetch_start = time.perf_counter()
        batch = next(iterator)
        if count > s["warmup"]:
            between.append(time.perf_counter() - fetch_start)
        train_step(batch)
        if count == 1 or count in boundaries:
            synchronize(device)
            now = time.perf_counter()
            if count == 1:
                first_step_s = now - first_start
            if count in boundaries:
                stamps.append(now)
    memory = peak_memory_mib(device)

    ema_times = _timed(device, s["ema_repeats"], lambda: ema.update(net))
    return {
        "step_s_windows": _window_seconds(stamps, s["window"]),
        "between_batches_s": between,
        "first_step_s": first_step_s,
        "steps": total_steps,
        "ema_update_s": ema_times,
        **memory,
    }


def phase_eval(spec: dict[str, Any]) -> dict[str, Any]:
    """Sampling (ancestral and DDIM) and bits/dim throughput with ``ema_net``.

    The option is applied as ``src/sample.py`` and ``src/eval.py`` apply their ``speed`` node
    (:func:`ddpm.models.speed.fast_inference_net`); ``fused_adam`` does not apply here.
    """
    device = torch.device(spec["device"])
    s = spec["settings"]
    cfg, module = build_for_spec(spec)
    module = module.to(device).eval()
    net = fast_inference_net(module.ema_net, **speed_options(cfg.speed))
    diffusion = module.diffusion
    batch = s["batch"]
    shape = (batch, *spec["image_shape"])
    generator = torch.Generator(device=device).manual_seed(spec["seed"])
    reset_peak_memory(device)
    results: dict[str, Any] = {}

    # Warm-up: one short chain of each kind (and the respaced schedules used below).
    diffusion.respaced(s["sample_steps"])
    diffusion.respaced(s["bpd_terms"])
    diffusion.sample(net, shape, generator=generator, steps=2)
    diffusion.sample(net, shape, generator=generator, sampler="ddim", steps=2)

    for sampler in ("ancestral", "ddim"):
        times = _timed(
            device,
            s["sample_repeats"],
            lambda sampler=sampler: diffusion.sample(
                net, shape, generator=generator, sampler=sampler, steps=s["sample_steps"]
            ),
        )
        results[sampler] = {"chain_s": times, "nfe": s["sample_steps"], "batch": batch}

    # Bits/dim: the bound of a K-step respaced schedule costs K terms of exactly the per-term
    # work of the full T-step bound (one network evaluation and the KL/decoder maths).
    x0 = torch.randint(0, 256, shape, generator=generator, device=device).float() / 127.5 - 1
    child, _ = diffusion.respaced(s["bpd_terms"])
    warm, _ = diffusion.respaced(2)
    warm.nll_bpd(net, x0, generator=generator)
    times = _timed(device, s["bpd_repeats"], lambda: child.nll_bpd(net, x0, generator=generator))
    results["bpd"] = {
        "eval_s": times,
        "terms": s["bpd_terms"],
        "batch": batch,
        "full_bound_terms": diffusion.num_timesteps,
    }
    results.update(peak_memory_mib(device))
    return results


def phase_sync_check(spec: dict[str, Any]) -> dict[str, Any]:
    """Host↔device synchronisations per training step (Lightning fit) and per sampling step.

    The counted training steps follow a warm-up that ends with a logging step (so what was
    logged then is alive, as in a real run) and are not logging steps themselves. A step is
    counted from one ``on_train_batch_start`` to the next, so Lightning's per-step bookkeeping
    after ``on_train_batch_end`` (metrics for the progress bar and loggers) is included.
    """
    quiet_lightning()
    device = torch.device(spec["device"])
    cfg, module = build_for_spec(spec)
    counted = SYNC_CHECK_STEPS
    # Steps 1..log_every are uncounted warm-up, ending with a logging step (so metrics logged
    # then are alive while counting); steps log_every+1 .. log_every+counted are counted.
    log_every = counted + 2
    total_steps = log_every + counted + 1
    batch = min(spec["settings"]["batch"], 4)
    loader = synthetic_loader(spec["image_shape"], batch, total_steps, spec["seed"], device)
    counter = host_sync_counter(device)

    class CountSteps(Callback):
        """Tracks host copies from the first step on; records events in the counted steps."""

        def __init__(self) -> None:
            self.started = 0
            self.active = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.started += 1
            if self.started == 1:
                counter.counting = False
                counter.__enter__()
                self.active = True
            elif self.started == log_every + 1:
                mark_host_step_counters(trainer.optimizers, counter)
                counter.counting = True
            elif self.started == log_every + 1 + counted and self.active:
                counter.__exit__(None, None, None)
                self.active = False

    hook = CountSteps()
    trainer = bench_trainer(
        cfg,
        device,
        total_steps,
        log_every_n_steps=log_every,
        callbacks=[hook],
        root_dir=spec["tmp_dir"],
    )
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        if hook.active:
            counter.__exit__(None, None, None)
    result: dict[str, Any] = {"train": counter.summary(counted), "log_every_n_steps": log_every}

    module = module.to(device).eval()
    shape = (batch, *spec["image_shape"])
    generator = torch.Generator(device=device).manual_seed(spec["seed"])
    steps = SYNC_CHECK_SAMPLE_STEPS
    for sampler in ("ancestral", "ddim"):
        name = f"sample_{sampler}"
        module.diffusion.sample(
            module.ema_net, shape, generator=generator, sampler=sampler, steps=steps
        )
        counter = host_sync_counter(device)
        with counter:
            module.diffusion.sample(
                module.ema_net, shape, generator=generator, sampler=sampler, steps=steps
            )
        result[name] = counter.summary(steps)
    return result


PHASES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "train_lightning": phase_train_lightning,
    "train_bare": phase_train_bare,
    "eval": phase_eval,
    "sync_check": phase_sync_check,
}
