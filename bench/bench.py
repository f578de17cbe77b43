"""Speed benchmark: training (Lightning and a bare PyTorch loop), sampling, bits/dim, memory.

Run ``make bench DEVICE=cpu|cuda MODELS="ddpm_cifar10 small"`` or::

    python bench/bench.py --device cpu --models ddpm_cifar10 small [--quick]

For every model (``conf/model/<name>.yaml``) and every option (``default``, ``channels_last``,
``bf16_autocast``, ``compile``, ``fused_adam``) it measures on one device:

* training throughput (images/s; the median of several timed windows after warm-up) through
  :class:`ddpm.lit_module.DiffusionLitModule` in a real ``lightning.Trainer`` fit (synthetic
  in-memory data, no logger, no checkpoints, no progress bar), and through a bare PyTorch loop with
  the same network, optimiser, warm-up schedule, gradient clipping, EMA and loss. Their ratio
  (time per step, Lightning ÷ bare) is the Lightning overhead. Lightning and bare runs alternate
  (``--rounds``) so that a change of machine load affects both alike;
* the EMA update's cost as a percentage of a training step;
* sampling throughput per network evaluation (image·NFE/s), ancestral and DDIM, with
  ``pl_module.ema_net`` as every callback samples;
* bits/dim evaluation throughput (image·term/s of the variational bound);
* peak memory of each phase (CUDA ``max_memory_allocated``; on the CPU the process's maximum RSS);
* host↔device synchronisations per training step and per sampling step, counted with a
  ``TorchDispatchMode`` that sees every ``.item()``/``bool()``/``nonzero`` and every host→device
  copy, each attributed to the source line that caused it.

Each phase runs in a fresh Python process (so maximum RSS and compile caches are per phase)
unless ``--in-process`` is given. Results go to ``<out>/<device>.json`` and ``<out>/<device>.md``.
Timings use ``time.perf_counter`` with a device synchronisation at window boundaries only.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
DEFAULT_OUT = ROOT / "bench" / "results"

OPTIONS = ("default", "channels_last", "bf16_autocast", "compile", "fused_adam")
# Image shape (C, H, W) each model is benchmarked at: the data it is configured for.
MODEL_SHAPES: dict[str, tuple[int, int, int]] = {
    "ddpm_cifar10": (3, 32, 32),
    "ddpm_256": (3, 256, 256),
    "small": (1, 8, 8),
    "tiny": (1, 8, 8),
}
PAPER_MODELS = ("ddpm_cifar10", "ddpm_256")

# Per (device, model kind) defaults; every value can be overridden from the command line.
# warmup/window/windows count training steps; sample_steps are network evaluations per chain;
# bpd_terms are terms of the bound per evaluation; *_repeats are timed repetitions.
_DEFAULTS: dict[tuple[str, str], dict[str, int]] = {
    ("cpu", "paper"): dict(
        batch=8,
        warmup=2,
        window=2,
        windows=5,
        rounds=3,
        sample_steps=4,
        sample_repeats=3,
        bpd_terms=4,
        bpd_repeats=3,
        ema_repeats=10,
    ),
    ("cpu", "small"): dict(
        batch=64,
        warmup=10,
        window=20,
        windows=7,
        rounds=3,
        sample_steps=20,
        sample_repeats=5,
        bpd_terms=20,
        bpd_repeats=5,
        ema_repeats=50,
    ),
    ("cuda", "paper"): dict(
        batch=128,
        warmup=20,
        window=20,
        windows=7,
        rounds=3,
        sample_steps=20,
        sample_repeats=5,
        bpd_terms=20,
        bpd_repeats=5,
        ema_repeats=50,
    ),
    ("cuda", "small"): dict(
        batch=256,
        warmup=20,
        window=50,
        windows=7,
        rounds=3,
        sample_steps=50,
        sample_repeats=5,
        bpd_terms=50,
        bpd_repeats=5,
        ema_repeats=100,
    ),
}
_QUICK = dict(
    warmup=1,
    window=1,
    windows=2,
    rounds=1,
    sample_steps=2,
    sample_repeats=1,
    bpd_terms=2,
    bpd_repeats=1,
    ema_repeats=2,
)
SYNC_CHECK_STEPS = 3  # training steps counted by the synchronisation check (after one warm-up)
SYNC_CHECK_SAMPLE_STEPS = 3

log = logging.getLogger("bench")


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def _torch():
    import torch

    return torch


def synchronize(device: Any) -> None:
    """Wait for every queued kernel on ``device`` (a no-op on the CPU, whose ops are synchronous)."""
    torch = _torch()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: Any) -> None:
    """Start a new peak-memory measurement (CUDA only; the CPU's maximum RSS cannot be reset)."""
    torch = _torch()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: Any) -> dict[str, Any]:
    """Peak memory in MiB: CUDA ``max_memory_allocated`` or the process's maximum RSS."""
    torch = _torch()
    device = torch.device(device)
    if device.type == "cuda":
        return {
            "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_memory_kind": "cuda max_memory_allocated",
        }
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KiB on Linux
    return {"peak_memory_mib": maxrss / scale, "peak_memory_kind": "process max RSS"}


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def uptime_text() -> str | None:
    """The output of ``uptime`` (time, users, load), or None without the command."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def median_and_spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and relative interquartile range of ``values`` (seconds)."""
    values = sorted(values)
    median = statistics.median(values)
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4)
    else:
        q1, q3 = values[0], values[-1]
    return {
        "median": median,
        "min": values[0],
        "max": values[-1],
        "iqr_rel": (q3 - q1) / median if median > 0 else math.nan,
        "n": len(values),
    }


def model_kind(model: str) -> str:
    return "paper" if model in PAPER_MODELS else "small"


def settings_for(device: str, model: str, quick: bool, overrides: dict[str, int]) -> dict[str, int]:
    """Benchmark settings for one model: defaults ← quick mode ← command-line overrides."""
    base = dict(_DEFAULTS[("cuda" if device.startswith("cuda") else "cpu", model_kind(model))])
    if quick:
        base.update(_QUICK)
        base["batch"] = min(base["batch"], 4 if model_kind(model) == "paper" else 16)
    base.update({k: v for k, v in overrides.items() if v is not None})
    if base["warmup"] < 1 or base["window"] < 1 or base["windows"] < 1 or base["rounds"] < 1:
        raise ValueError("warmup, window, windows and rounds must all be >= 1")
    if base["sample_steps"] < 2 or base["bpd_terms"] < 2:
        raise ValueError("sample_steps and bpd_terms must be >= 2 (a respaced chain needs 2)")
    return base


def option_skip_reason(option: str, device: str) -> str | None:
    """Why ``option`` cannot run on ``device``, or None."""
    torch = _torch()
    if option == "fused_adam" and not device.startswith("cuda"):
        return (
            "CUDA only: DiffusionLitModule passes fused=True to the optimiser on CUDA and ignores "
            "the flag elsewhere, so on this device it would measure the default again"
        )
    if (
        option == "bf16_autocast"
        and device.startswith("cuda")
        and not torch.cuda.is_bf16_supported()
    ):
        return "this GPU has no bfloat16 support"
    return None


def option_overrides(option: str) -> list[str]:
    """Hydra overrides that switch ``option`` on (``default``: none)."""
    if option == "default":
        return []
    if option not in OPTIONS:
        raise ValueError(f"unknown option {option!r}: choose from {', '.join(OPTIONS)}")
    return [f"module.{option}=true"]


def compose_config(model: str, option: str, extra: Sequence[str] = ()) -> Any:
    """The training config (``conf/train.yaml``) for ``model`` with ``option`` switched on."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[f"model={model}", *option_overrides(option), *extra])
    finally:
        GlobalHydra.instance().clear()
    return cfg


def synthetic_loader(
    image_shape: Sequence[int], batch: int, num_batches: int, seed: int, device: Any
) -> Any:
    """A shuffled DataLoader over random images on the 256-level grid in [-1, 1] (CPU tensors).

    Holds ``min(num_batches, 512)`` batches so a benchmark run is usually a single epoch (as
    in a real run, where epochs are long); batches are pinned when the device is CUDA.
    """
    torch = _torch()
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(seed)
    count = batch * max(1, min(num_batches, 512))
    images = torch.randint(0, 256, (count, *image_shape), generator=generator).float() / 127.5 - 1
    return DataLoader(
        TensorDataset(images),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=0,
        pin_memory=torch.device(device).type == "cuda",
        generator=torch.Generator().manual_seed(seed + 1),
    )


def _quiet_lightning() -> None:
    """Silence Lightning's start-up chatter in benchmark workers (not in the library)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    for message in (
        ".*GPU available but not used.*",
        ".*defined a `validation_step` but have no `val_dataloader`.*",
        ".*module\\(s\\) in eval mode at the start of training.*",
        ".*LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", message=message)


def _device_index(device: Any) -> list[int] | int:
    torch = _torch()
    device = torch.device(device)
    if device.type == "cuda":
        return [device.index or 0]
    return 1


# ---------------------------------------------------------------------------------------------
# Host↔device synchronisation counter
# ---------------------------------------------------------------------------------------------
_SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",
        "nonzero",
        "masked_select",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
    }
)
_HOST_TENSOR_OPS = frozenset({"lift_fresh", "lift_fresh_copy"})
_MACHINERY = (
    "torch/utils/_python_dispatch.py",
    "torch/_ops.py",
    "torch/_tensor.py",
    "torch/overrides.py",
    "torch/_compile.py",
    "torch/_dynamo/eval_frame.py",
)


def _short_path(path: str) -> str:
    path = path.replace("\\", "/")
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    root = str(ROOT).replace("\\", "/") + "/"
    return path[len(root) :] if path.startswith(root) else path


def classify_origin(origin: str) -> str:
    """``ddpm`` (this project), ``lightning``, ``torch.optim``, ``bench`` or ``other``."""
    if origin.startswith(("src/ddpm/", "ddpm/")):
        return "ddpm"
    if origin.startswith("lightning/"):
        return "lightning"
    if origin.startswith("torch/optim/"):
        return "torch.optim"
    if origin.startswith("bench/"):
        return "bench"
    return "other"


def _make_sync_counter_class() -> type:
    from torch.utils._python_dispatch import TorchDispatchMode

    this_file = str(Path(__file__).resolve()).replace("\\", "/")

    class HostSyncCounter(TorchDispatchMode):
        """Counts ops that synchronise host and device, each with the source line behind it.

        ``device_to_host``: ``.item()``/``bool()``/``float()`` of a tensor
        (``aten._local_scalar_dense``), data-dependent shapes (``nonzero``, ``masked_select``,
        ``unique``) and copies to host memory (``.to("cpu")``). ``host_to_device``: copies from
        host memory to an accelerator. ``host_tensor``: tensors built from Python data
        (``torch.tensor(...)``), a host→device copy whenever they end up on an accelerator.

        On an accelerator only device tensors count. On the CPU every tensor is a host tensor, so
        to catch on a CPU-only machine the code paths that would synchronise a GPU, reads count
        unless the tensor derives only from an explicit host copy made while counting (a
        ``.to("cpu")`` output, or the result of ops whose tensor inputs all are such copies):
        reading a host snapshot does not wait for the device.

        ``events`` maps ``(kind, op, origin)`` to a count, where ``origin`` is
        ``file:line (function)`` of the innermost frame outside torch's dispatch machinery.
        """

        def __init__(self, device: Any) -> None:
            super().__init__()
            from torch.utils.weak import WeakIdKeyDictionary

            self.device = _torch().device(device)
            self.events: Counter = Counter()
            self.host_copies = WeakIdKeyDictionary()
            #: Whether events are recorded; host copies are tracked whenever the mode is active.
            self.counting = True

        def _origin(self) -> str:
            frame = sys._getframe(2)
            while frame is not None:
                filename = frame.f_code.co_filename.replace("\\", "/")
                if filename != this_file and not filename.endswith(_MACHINERY):
                    return f"{_short_path(filename)}:{frame.f_lineno} ({frame.f_code.co_name})"
                frame = frame.f_back
            return "<unknown>"

        def _on_device(self, tensor: Any) -> bool:
            """Would reading ``tensor`` wait for the device?"""
            if tensor in self.host_copies:
                return False
            return self.device.type == "cpu" or tensor.device.type != "cpu"

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            torch = _torch()
            from torch.utils._pytree import tree_leaves

            name = func.overloadpacket.__name__
            inputs = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
            kind, host_copy = None, False
            if name in _SYNC_OPS:
                if inputs and self._on_device(inputs[0]):
                    kind = "device_to_host"
            elif name == "_to_copy":
                src, dst = args[0], kwargs.get("device")
                dst_type = torch.device(dst).type if dst is not None else src.device.type
                if src.device.type == "cpu" and dst_type != "cpu":
                    kind = "host_to_device"
                elif dst is not None and dst_type == "cpu":
                    host_copy = True
                    if self._on_device(src):
                        kind = "device_to_host"
            elif name == "copy_":
                dst, src = args[0], args[1]
                if (
                    isinstance(src, torch.Tensor)
                    and src.device.type == "cpu"
                    and dst.device.type != "cpu"
                ):
                    kind = "host_to_device"
            elif name in _HOST_TENSOR_OPS:
                kind = "host_tensor"
            if kind is not None and self.counting:
                self.events[(kind, name, self._origin())] += 1
            out = func(*args, **kwargs)
            if host_copy or (inputs and all(x in self.host_copies for x in inputs)):
                for x in tree_leaves(out):
                    if isinstance(x, torch.Tensor):
                        self.host_copies[x] = True
            return out

        def summary(self, steps: int) -> dict[str, Any]:
            """Counts per step by kind and by origin class, and every origin with its count."""
            by_kind: Counter = Counter()
            by_class: Counter = Counter()
            for (kind, _, origin), count in self.events.items():
                by_kind[kind] += count
                if kind == "device_to_host":
                    by_class[classify_origin(origin)] += count
            return {
                "steps": steps,
                "per_step": {k: v / steps for k, v in sorted(by_kind.items())},
                "device_to_host_per_step_by_origin": {
                    k: v / steps for k, v in sorted(by_class.items())
                },
                "events": [
                    {"kind": kind, "op": op, "origin": origin, "count": count}
                    for (kind, op, origin), count in sorted(self.events.items())
                ],
            }

    return HostSyncCounter


def host_sync_counter(device: Any) -> Any:
    """A fresh ``HostSyncCounter`` (a ``TorchDispatchMode``; use it as a context manager)."""
    return _make_sync_counter_class()(device)


# ---------------------------------------------------------------------------------------------
# Phases (each runs in its own process unless --in-process)
# ---------------------------------------------------------------------------------------------
def _build(spec: dict[str, Any]) -> tuple[Any, Any]:
    """(config, LightningModule) for the spec, seeded so every phase starts from the same weights."""
    torch = _torch()
    from ddpm.builders import build_module

    cfg = compose_config(spec["model"], spec["option"], spec.get("overrides", ()))
    torch.manual_seed(spec["seed"])
    module = build_module(cfg, tuple(spec["image_shape"]))
    return cfg, module


def _window_seconds(stamps: Sequence[float], window: int) -> list[float]:
    """Seconds per step of each window from the boundary timestamps."""
    return [(b - a) / window for a, b in itertools.pairwise(stamps)]


def phase_train_lightning(spec: dict[str, Any]) -> dict[str, Any]:
    """Training throughput through ``DiffusionLitModule`` in a real ``Trainer.fit``."""
    torch = _torch()
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    _quiet_lightning()
    device = torch.device(spec["device"])
    s = spec["settings"]
    total_steps = s["warmup"] + s["window"] * s["windows"]
    cfg, module = _build(spec)
    loader = synthetic_loader(
        spec["image_shape"], s["batch"], total_steps + 1, spec["seed"], device
    )
    boundaries = {s["warmup"] + k * s["window"] for k in range(s["windows"] + 1)}

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
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=_device_index(device),
        max_steps=total_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        gradient_clip_algorithm=cfg.trainer.gradient_clip_algorithm,
        precision=cfg.trainer.precision,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        benchmark=device.type == "cuda",
        deterministic=False,
        use_distributed_sampler=False,
        callbacks=[timer],
        default_root_dir=spec["tmp_dir"],
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


def phase_train_bare(spec: dict[str, Any]) -> dict[str, Any]:
    """The same training step in a plain PyTorch loop, plus the EMA update's own cost."""
    torch = _torch()
    from hydra.utils import instantiate

    from ddpm.builders import build_diffusion, build_net
    from ddpm.diffusion import make_timestep_sampler
    from ddpm.ema import ExponentialMovingAverage
    from ddpm.models.speed import run_net

    device = torch.device(spec["device"])
    s = spec["settings"]
    total_steps = s["warmup"] + s["window"] * s["windows"]
    cfg = compose_config(spec["model"], spec["option"], spec.get("overrides", ()))
    module_cfg = cfg.module
    torch.manual_seed(spec["seed"])
    diffusion = build_diffusion(cfg)
    net = build_net(cfg, diffusion, tuple(spec["image_shape"]))
    if module_cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    ema = ExponentialMovingAverage(net, decay=float(module_cfg.ema_decay))
    net, ema, diffusion = net.to(device), ema.to(device), diffusion.to(device)
    net.train()
    sampler = make_timestep_sampler(module_cfg.timestep_sampler, diffusion.num_timesteps).to(device)
    # The module's training forward, without the module: the same function, the same options.
    compiled = torch.compile(net) if module_cfg.compile else net

    def forward(x_t: Any, t: Any) -> Any:
        return run_net(
            compiled, x_t, t, bool(module_cfg.channels_last), bool(module_cfg.bf16_autocast)
        )

    factory = instantiate(cfg.optimizer) if cfg.get("optimizer") else None
    factory = factory or (lambda params, **kw: torch.optim.Adam(params, lr=2e-4, **kw))
    if module_cfg.fused_adam and device.type == "cuda":
        optimizer = factory(net.parameters(), fused=True)
    else:
        optimizer = factory(net.parameters())
    warmup_steps = max(int(module_cfg.lr_warmup_steps), 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps)
    )
    clip = cfg.trainer.gradient_clip_val
    if clip and cfg.trainer.gradient_clip_algorithm != "norm":
        raise ValueError("the bare loop implements gradient_clip_algorithm=norm only")
    loader = synthetic_loader(
        spec["image_shape"], s["batch"], total_steps + 1, spec["seed"], device
    )
    boundaries = {s["warmup"] + k * s["window"] for k in range(s["windows"] + 1)}

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

    ema_times = []
    for _ in range(s["ema_repeats"]):
        synchronize(device)
        start = time.perf_counter()
        ema.update(net)
        synchronize(device)
        ema_times.append(time.perf_counter() - start)
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
    torch = _torch()
    from ddpm.models.speed import fast_inference_net

    device = torch.device(spec["device"])
    s = spec["settings"]
    _, module = _build(spec)
    module = module.to(device).eval()
    option = spec["option"]
    speed = {k: option == k for k in ("channels_last", "bf16_autocast", "compile")}
    net, diffusion = fast_inference_net(module.ema_net, **speed), module.diffusion
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
        times = []
        for _ in range(s["sample_repeats"]):
            synchronize(device)
            start = time.perf_counter()
            diffusion.sample(
                net, shape, generator=generator, sampler=sampler, steps=s["sample_steps"]
            )
            synchronize(device)
            times.append(time.perf_counter() - start)
        results[sampler] = {"chain_s": times, "nfe": s["sample_steps"], "batch": batch}

    # Bits/dim: the bound of a K-step respaced schedule costs K terms of exactly the per-term
    # work of the full T-step bound (one network evaluation and the KL/decoder maths).
    x0 = torch.randint(0, 256, shape, generator=generator, device=device).float() / 127.5 - 1
    child, _ = diffusion.respaced(s["bpd_terms"])
    warm, _ = diffusion.respaced(2)
    warm.nll_bpd(net, x0, generator=generator)
    times = []
    for _ in range(s["bpd_repeats"]):
        synchronize(device)
        start = time.perf_counter()
        child.nll_bpd(net, x0, generator=generator)
        synchronize(device)
        times.append(time.perf_counter() - start)
    results["bpd"] = {
        "eval_s": times,
        "terms": s["bpd_terms"],
        "batch": batch,
        "full_bound_terms": diffusion.num_timesteps,
    }
    results.update(peak_memory_mib(device))
    return results


def mark_host_step_counters(optimizers: Sequence[Any], counter: Any) -> int:
    """Mark the optimisers' ``step`` counters that live in host memory on every device.

    Unless an optimiser is ``capturable`` or ``fused``, torch.optim keeps each parameter's
    ``state["step"]`` as a CPU tensor even when the parameters are on an accelerator, so reading
    it (Adam's single-tensor path calls ``.item()`` on it) does not wait for the device. On the
    CPU such a tensor cannot be told from a device tensor, so it is marked explicitly, the same
    way as an explicit host snapshot. Returns the number of tensors marked.
    """
    torch = _torch()
    marked = 0
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if group.get("capturable") or group.get("fused"):
                continue
            for param in group["params"]:
                step = optimizer.state.get(param, {}).get("step")
                if isinstance(step, torch.Tensor) and step.device.type == "cpu":
                    counter.host_copies[step] = True
                    marked += 1
    return marked


def phase_sync_check(spec: dict[str, Any]) -> dict[str, Any]:
    """Host↔device synchronisations per training step (Lightning fit) and per sampling step.

    The counted training steps follow a warm-up that ends with a logging step (so what was
    logged then is alive, as in a real run) and are not logging steps themselves. A step is
    counted from one ``on_train_batch_start`` to the next, so Lightning's per-step bookkeeping
    after ``on_train_batch_end`` (metrics for the progress bar and loggers) is included.
    """
    torch = _torch()
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    _quiet_lightning()
    device = torch.device(spec["device"])
    cfg, module = _build(spec)
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
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=_device_index(device),
        max_steps=total_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        gradient_clip_algorithm=cfg.trainer.gradient_clip_algorithm,
        log_every_n_steps=log_every,
        use_distributed_sampler=False,
        callbacks=[hook],
        default_root_dir=spec["tmp_dir"],
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


def run_phase_here(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one phase in this process; errors become ``{"error": ...}``."""
    if spec.get("threads"):
        _torch().set_num_threads(int(spec["threads"]))
    before = loadavg()
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp:
        spec = {**spec, "tmp_dir": tmp}
        try:
            result = PHASES[spec["phase"]](spec)
        except Exception as err:  # a failing option must not stop the benchmark
            result = {
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(limit=8),
            }
    result["loadavg_before"], result["loadavg_after"] = before, loadavg()
    return result


def run_phase_subprocess(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one phase in a fresh Python process (own max RSS, own compile state)."""
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)]
        command += ["--worker-out", str(out_path)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if out_path.exists():
            return json.loads(out_path.read_text())
        return {
            "error": f"worker exited with code {proc.returncode}",
            "stderr_tail": proc.stderr[-3000:],
        }


# ---------------------------------------------------------------------------------------------
# Orchestration and reports
# ---------------------------------------------------------------------------------------------
def _train_summary(runs: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        return {"error": errors[0], "runs": runs}
    windows = [w for r in runs for w in r["step_s_windows"]]
    stats = median_and_spread(windows)
    between = [x for r in runs for x in r.get("between_batches_s", [])]
    return {
        "step_s": stats,
        "images_per_s": batch / stats["median"],
        "between_batches_ms": 1000 * statistics.median(between) if between else math.nan,
        "first_step_s": [r["first_step_s"] for r in runs],
        "peak_memory_mib": max(r["peak_memory_mib"] for r in runs),
        "peak_memory_kind": runs[0]["peak_memory_kind"],
        "loadavg": [[r["loadavg_before"], r["loadavg_after"]] for r in runs],
        "runs": runs,
    }


def _eval_summary(result: dict[str, Any]) -> dict[str, Any]:
    if "error" in result:
        return result
    out: dict[str, Any] = {}
    for sampler in ("ancestral", "ddim"):
        r = result[sampler]
        stats = median_and_spread(r["chain_s"])
        out[sampler] = {
            "chain_s": stats,
            "nfe": r["nfe"],
            "batch": r["batch"],
            "image_nfe_per_s": r["batch"] * r["nfe"] / stats["median"],
            "s_per_nfe": stats["median"] / r["nfe"],
        }
    r = result["bpd"]
    stats = median_and_spread(r["eval_s"])
    throughput = r["batch"] * r["terms"] / stats["median"]
    out["bpd"] = {
        "eval_s": stats,
        "terms": r["terms"],
        "batch": r["batch"],
        "image_terms_per_s": throughput,
        "full_bound_s_per_image": r["full_bound_terms"] / throughput,
        "full_bound_terms": r["full_bound_terms"],
    }
    out["peak_memory_mib"] = result["peak_memory_mib"]
    out["peak_memory_kind"] = result["peak_memory_kind"]
    out["loadavg"] = [result["loadavg_before"], result["loadavg_after"]]
    return out


def benchmark_model(
    model: str,
    device: str,
    options: Sequence[str],
    settings: dict[str, int],
    run: Callable[[dict[str, Any]], dict[str, Any]],
    overrides: Sequence[str] = (),
    seed: int = 0,
    sync_check: bool = True,
    echo: Callable[[str], None] = print,
    threads: int | None = None,
) -> dict[str, Any]:
    """Every measurement for one model; ``run(spec)`` executes a phase and returns its result."""
    image_shape = MODEL_SHAPES.get(model)
    if image_shape is None:
        raise ValueError(
            f"no image shape known for model={model}; known: {', '.join(MODEL_SHAPES)}"
        )
    base = {
        "model": model,
        "device": device,
        "image_shape": list(image_shape),
        "settings": settings,
        "overrides": list(overrides),
        "seed": seed,
        "threads": threads,
    }
    result: dict[str, Any] = {
        "image_shape": list(image_shape),
        "batch_size": settings["batch"],
        "settings": settings,
        "options": {},
    }
    active = []
    for option in options:
        reason = option_skip_reason(option, device)
        if reason:
            result["options"][option] = {"skipped": reason}
            echo(f"[{model}] {option}: skipped ({reason})")
        else:
            active.append(option)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        option: {"lightning": [], "bare": []} for option in active
    }
    failed: set[str] = set()
    # Rounds outermost, options inside, Lightning and bare loop alternating first: a change of
    # machine load during the benchmark affects every option and both loops alike.
    for round_index in range(settings["rounds"]):
        for option in active:
            if option in failed:
                continue
            order = ("bare", "lightning") if round_index % 2 == 0 else ("lightning", "bare")
            for which in order:
                echo(f"[{model}] {option}: {which} training, round {round_index + 1}")
                phase = "train_bare" if which == "bare" else "train_lightning"
                out = run({**base, "option": option, "phase": phase, "round": round_index})
                runs[option][which].append(out)
                if "error" in out:
                    echo(f"[{model}] {option}: failed: {out['error']}")
                    failed.add(option)
                    break

    for option in active:
        lightning_runs, bare_runs = runs[option]["lightning"], runs[option]["bare"]
        entry: dict[str, Any] = {
            "lightning": _train_summary(lightning_runs, settings["batch"]),
            "bare": _train_summary(bare_runs, settings["batch"]),
        }
        light, bare = entry["lightning"], entry["bare"]
        if "error" not in light and "error" not in bare:
            # Each round compares two runs made back to back, so the median over rounds of the
            # per-round ratios is robust to a change of load (or an odd process) in one round.
            entry["overhead_ratio_per_round"] = [
                statistics.median(lr["step_s_windows"]) / statistics.median(br["step_s_windows"])
                for lr, br in zip(lightning_runs, bare_runs)
            ]
            entry["overhead_ratio"] = statistics.median(entry["overhead_ratio_per_round"])
            entry["overhead_ratio_pooled"] = light["step_s"]["median"] / bare["step_s"]["median"]
            # Host time between one batch's end and the next one's start: the data fetch in
            # both loops, plus Lightning's per-step bookkeeping. Small and far less noisy than
            # the step time, so it bounds the overhead from below when the load is high.
            extra_ms = light["between_batches_ms"] - bare["between_batches_ms"]
            entry["between_batches_extra_ms"] = extra_ms
            entry["between_batches_extra_percent"] = (
                100.0 * extra_ms / (1000.0 * bare["step_s"]["median"])
            )
            ema_s = statistics.median([t for r in bare_runs for t in r["ema_update_s"]])
            entry["ema_update_s"] = ema_s
            entry["ema_percent_of_step"] = 100.0 * ema_s / bare["step_s"]["median"]
            echo(
                f"[{model}] {option}: Lightning {light['images_per_s']:.2f} img/s, bare "
                f"{bare['images_per_s']:.2f} img/s, overhead ratio Lightning ÷ bare = "
                f"{entry['overhead_ratio']:.3f}; EMA {entry['ema_percent_of_step']:.2f}% of a step"
            )
        if option == "fused_adam":
            entry["eval"] = {"skipped": "fused Adam changes the optimiser only"}
        elif "error" not in light:
            echo(f"[{model}] {option}: sampling and bits/dim")
            entry["eval"] = _eval_summary(run({**base, "option": option, "phase": "eval"}))
        result["options"][option] = entry
    result["options"] = {option: result["options"][option] for option in options}
    if sync_check:
        echo(f"[{model}] host↔device synchronisation check")
        result["sync_check"] = run({**base, "option": "default", "phase": "sync_check"})
    return result


def benchmark_fixed_cost(
    device: str,
    run: Callable[[dict[str, Any]], dict[str, Any]],
    quick: bool,
    rounds: int,
    seed: int = 0,
    threads: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Lightning's fixed cost per training step, measured where a step is almost all overhead.

    ``model=tiny`` at batch 1: Lightning's step time minus the bare loop's (median of the
    per-round differences) is the time Lightning adds per step whatever the network; divided by
    a model's step time it bounds that model's overhead with far less noise than the ratio of two
    long, load-sensitive step times.
    """
    overrides = {"batch": 1, "rounds": rounds}
    if not quick:
        overrides.update(warmup=20, window=50, windows=5)
    settings = settings_for(device, "tiny", quick, overrides)
    spec = {
        "model": "tiny",
        "device": device,
        "image_shape": list(MODEL_SHAPES["tiny"]),
        "settings": settings,
        "overrides": [],
        "seed": seed,
        "threads": threads,
        "option": "default",
    }
    light, bare = [], []
    for round_index in range(rounds):
        order = ("bare", "lightning") if round_index % 2 == 0 else ("lightning", "bare")
        for which in order:
            echo(f"[fixed cost] model=tiny batch 1: {which} training, round {round_index + 1}")
            phase = "train_bare" if which == "bare" else "train_lightning"
            out = run({**spec, "phase": phase, "round": round_index})
            if "error" in out:
                return {"error": out["error"]}
            step_ms = 1000.0 * statistics.median(out["step_s_windows"])
            (bare if which == "bare" else light).append(step_ms)
    per_round = [lm - bm for lm, bm in zip(light, bare)]
    result = {
        "model": "tiny",
        "batch": 1,
        "settings": settings,
        "lightning_step_ms": light,
        "bare_step_ms": bare,
        "fixed_cost_ms_per_round": per_round,
        "fixed_cost_ms": statistics.median(per_round),
    }
    echo(f"[fixed cost] Lightning adds {result['fixed_cost_ms']:.2f} ms per training step")
    return result


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_report(results: dict[str, Any]) -> str:
    """A markdown summary of ``results`` (the JSON written next to it has every number)."""
    meta = results["meta"]
    lines = [
        f"# Benchmark results: {results['device']}",
        "",
        f"- Date: {meta['started']} → {meta['finished']} (UTC)",
        f"- Command: `{meta['command']}`",
        f"- Machine: {meta['cpu']}, {meta['num_threads']} torch threads; "
        f"torch {meta['torch']}, lightning {meta['lightning']}, Python {meta['python']}",
        f"- Git commit: {meta['git_commit'] or 'unknown'}"
        + (" (+ local changes)" if meta.get("git_dirty") else ""),
        f"- Load at start: `{meta['uptime_start']}`",
        f"- Load at end: `{meta['uptime_end']}`",
        f"- Mode: {'quick (smoke test; numbers are not meaningful)' if meta['quick'] else 'full'}"
        f"; phases {'in one process' if meta['in_process'] else 'each in a fresh process'}"
        + (
            f"; {meta['resumed_phases']} phases reused from an interrupted run (--resume)"
            if meta.get("resumed_phases")
            else ""
        ),
        "",
        "Training: median seconds per step over timed windows after warm-up (all rounds pooled); "
        "images/s = batch ÷ median step. Overhead = Lightning step ÷ bare-loop step (1.00 = none), "
        "the median over rounds of the ratio within each round (two runs back to back). "
        "Between-batch host ms: median host time from the end of one step to the start of the "
        "next (the data fetch in both loops, plus Lightning's per-step bookkeeping); its excess "
        "over the bare loop, as % of a step, is a low-noise measure of Lightning's loop overhead. "
        "EMA % = one EMA update ÷ bare-loop step. Sampling: image·NFE/s = batch × network "
        "evaluations ÷ chain time (a full T-step ancestral chain yields that ÷ T images/s). "
        "Bits/dim: image·term/s of the bound (the full bound has T terms per image). "
        "Memory: peak of the phase "
        + (
            "(CUDA max_memory_allocated)."
            if results["device"].startswith("cuda")
            else "(process max RSS, including Python and the libraries)."
        ),
        "",
    ]
    for model, res in results["models"].items():
        if "error" in res:
            lines += [f"## {model}", "", f"Failed: {res['error']}", ""]
            continue
        shape = "×".join(str(x) for x in res["image_shape"])
        params = None
        lines += [f"## model={model} ({shape}, batch {res['batch_size']})", ""]
        s = res["settings"]
        lines += [
            f"Settings: warm-up {s['warmup']} steps, {s['windows']} windows × {s['window']} steps, "
            f"{s['rounds']} round(s) each of Lightning and bare loop; sampling chains of "
            f"{s['sample_steps']} NFE × {s['sample_repeats']}; bits/dim over {s['bpd_terms']} "
            f"terms × {s['bpd_repeats']}.",
            "",
            "| option | Lightning img/s | bare img/s | overhead L÷bare (per round) "
            "| step spread IQR/median (L, bare) | between-batch host ms L / bare (extra % of step) "
            "| vs default | EMA % of step | first step s (L) | train peak MiB (L / bare) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        default = res["options"].get("default", {})
        default_ips = default.get("lightning", {}).get("images_per_s")
        for option, entry in res["options"].items():
            if "skipped" in entry:
                lines.append(f"| {option} | skipped: {entry['skipped']} |||||||||")
                continue
            light, bare = entry["lightning"], entry["bare"]
            if "error" in light or "error" in bare:
                err = light.get("error") or bare.get("error")
                lines.append(f"| {option} | failed: {str(err).splitlines()[0][:150]} |||||||||")
                continue
            for r in light["runs"]:
                params = params or r.get("num_parameters")
            per_round = ", ".join(_fmt(x, 3) for x in entry["overhead_ratio_per_round"])
            speedup = light["images_per_s"] / default_ips if default_ips else None
            lines.append(
                f"| {option} | {_fmt(light['images_per_s'])} | {_fmt(bare['images_per_s'])} "
                f"| {_fmt(entry['overhead_ratio'], 3)} ({per_round}) "
                f"| {_fmt(light['step_s']['iqr_rel'])}, {_fmt(bare['step_s']['iqr_rel'])} "
                f"| {_fmt(light['between_batches_ms'])} / {_fmt(bare['between_batches_ms'])} "
                f"({_fmt(entry['between_batches_extra_percent'], 3)}) "
                f"| ×{_fmt(speedup)} | {_fmt(entry['ema_percent_of_step'])} "
                f"| {', '.join(_fmt(x, 1) for x in light['first_step_s'])} "
                f"| {_fmt(light['peak_memory_mib'], 0)} / {_fmt(bare['peak_memory_mib'], 0)} |"
            )
        if params:
            lines += ["", f"Parameters: {params:,}."]
        fixed = results.get("fixed_cost") or {}
        default_entry = res["options"].get("default", {})
        if "fixed_cost_percent_of_step" in default_entry:
            lines += [
                "",
                f"Lightning's fixed cost per step ({_fmt(fixed['fixed_cost_ms'])} ms, measured "
                "with model=tiny at batch 1, below) is "
                f"{_fmt(default_entry['fixed_cost_percent_of_step'], 3)}% of this model's "
                "bare-loop step.",
            ]
        lines += [
            "",
            "| option | ancestral image·NFE/s | DDIM image·NFE/s | bits/dim image·term/s "
            "| full bound s/image | eval peak MiB |",
            "|---|---|---|---|---|---|",
        ]
        for option, entry in res["options"].items():
            ev = entry.get("eval") if isinstance(entry, dict) else None
            if not ev or "skipped" in entry:
                continue
            if "skipped" in ev:
                lines.append(f"| {option} | n/a: {ev['skipped']} |||||")
            elif "error" in ev:
                lines.append(f"| {option} | failed: {str(ev['error'])[:150]} |||||")
            else:
                lines.append(
                    f"| {option} | {_fmt(ev['ancestral']['image_nfe_per_s'])} "
                    f"| {_fmt(ev['ddim']['image_nfe_per_s'])} "
                    f"| {_fmt(ev['bpd']['image_terms_per_s'])} "
                    f"| {_fmt(ev['bpd']['full_bound_s_per_image'], 1)} "
                    f"| {_fmt(ev['peak_memory_mib'], 0)} |"
                )
        sync = res.get("sync_check")
        if sync:
            lines += [
                "",
                "Host↔device synchronisations (default options; every device→host read, with "
                "the source line behind it). Adam's per-parameter `step` counters are not "
                "counted: unless the optimiser is capturable or fused, PyTorch keeps them in host "
                "memory on every device, so reading them does not wait for the device.",
                "",
            ]
            if "error" in sync:
                lines.append(f"- failed: {sync['error']}")
            else:
                lines += sync_check_lines(sync)
        lines.append("")
    fixed = results.get("fixed_cost")
    if fixed:
        lines += ["## Lightning's fixed cost per training step", ""]
        if "error" in fixed:
            lines.append(f"Failed: {fixed['error']}")
        else:
            lines += [
                "model=tiny at batch 1, where a step is almost all loop overhead; median over "
                "rounds of (Lightning step − bare-loop step), each round two runs back to back.",
                "",
                f"- Lightning step ms per round: "
                f"{', '.join(_fmt(x) for x in fixed['lightning_step_ms'])}",
                f"- bare-loop step ms per round: {', '.join(_fmt(x) for x in fixed['bare_step_ms'])}",
                f"- **fixed cost: {_fmt(fixed['fixed_cost_ms'])} ms per step** (per round: "
                f"{', '.join(_fmt(x) for x in fixed['fixed_cost_ms_per_round'])})",
                "",
            ]
    return "\n".join(lines) + "\n"


def sync_check_lines(sync: dict[str, Any]) -> list[str]:
    """Markdown bullet lines for one synchronisation check."""
    lines = []
    labels = {
        "train": f"training step (Lightning fit, not a logging step; log_every_n_steps="
        f"{sync.get('log_every_n_steps')})",
        "sample_ancestral": "ancestral sampling step",
        "sample_ddim": "DDIM sampling step",
    }
    for key, label in labels.items():
        part = sync[key]
        by_origin = part["device_to_host_per_step_by_origin"]
        text = ", ".join(f"{k} {v:g}" for k, v in by_origin.items()) or "none"
        per_step = part["per_step"]
        lines.append(
            f"- per {label}: device→host reads {per_step.get('device_to_host', 0):g} "
            f"(by origin: {text}); host→device copies {per_step.get('host_to_device', 0):g}; "
            f"tensors from host data {per_step.get('host_tensor', 0):g}"
        )
        for event in part["events"]:
            lines.append(
                f"  - {event['kind']} `{event['op']}` ×{event['count']} over {part['steps']} "
                f"steps at `{event['origin']}`"
            )
    return lines


def _git_state() -> tuple[str | None, bool]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            ).stdout.strip()
        )
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return None, False


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ×{os.cpu_count()} logical CPUs"
    return f"{platform.processor() or platform.machine()} ×{os.cpu_count()} logical CPUs"


def wait_for_load(max_load: float | None, max_wait_s: float, echo: Callable[[str], None]) -> None:
    """Wait (at most ``max_wait_s``) until the 1-minute load average is below ``max_load``."""
    if max_load is None:
        return
    deadline = time.monotonic() + max_wait_s
    while (load := loadavg()) and load[0] >= max_load and time.monotonic() < deadline:
        echo(f"load {load[0]:.2f} ≥ {max_load}: waiting")
        time.sleep(15)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--models", nargs="+", default=["ddpm_cifar10", "small"])
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    parser.add_argument("--quick", action="store_true", help="smoke mode: a few steps of each")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="directory for <device>.json/.md")
    parser.add_argument(
        "--batch",
        action="append",
        default=[],
        metavar="MODEL=N",
        help="batch size for a model (default: 8 for the paper UNet on the CPU, 64 for small)",
    )
    for name in (
        "warmup",
        "window",
        "windows",
        "rounds",
        "sample_steps",
        "sample_repeats",
        "bpd_terms",
        "bpd_repeats",
        "ema_repeats",
    ):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra Hydra override, e.g. module.ema_decay=0.999",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--in-process", action="store_true", help="run phases in this process")
    parser.add_argument("--no-sync-check", action="store_true")
    parser.add_argument(
        "--no-fixed-cost",
        action="store_true",
        help="skip measuring Lightning's fixed cost per step (model=tiny, batch 1)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the phases an interrupted run with the same arguments already finished",
    )
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per phase")
    parser.add_argument(
        "--max-load",
        type=float,
        default=None,
        help="before each phase, wait until the 1-minute load average is below this",
    )
    parser.add_argument(
        "--max-wait", type=float, default=600.0, help="longest wait before a phase, seconds"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the results also written to ``<out>/<device>.json``."""
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        result = run_phase_here(spec)
        Path(args.worker_out).write_text(json.dumps(result))
        return result

    torch = _torch()
    import lightning

    device = str(torch.device(args.device))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    batches = {}
    for item in args.batch:
        name, _, value = item.partition("=")
        batches[name] = int(value)

    def echo(message: str) -> None:
        print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = device.replace(":", "")
    # Every finished phase is appended here, so an interrupted run can continue (--resume).
    journal = out / f".{name}.phases.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if args.resume and journal.exists():
        for line in journal.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError, KeyError):
                record = json.loads(line)
                done[record["key"]] = record["result"]
        echo(f"resuming: {len(done)} finished phases in {journal}")
    elif journal.exists():
        journal.unlink()

    def run(spec: dict[str, Any]) -> dict[str, Any]:
        key = json.dumps({k: spec.get(k) for k in sorted(spec) if k != "tmp_dir"}, sort_keys=True)
        if key in done:
            echo("  (result taken from the journal)")
            return done[key]
        wait_for_load(args.max_load, args.max_wait, echo)
        if args.in_process:
            result = run_phase_here(spec)
        else:
            result = run_phase_subprocess(spec, args.timeout)
        if "error" not in result:
            with journal.open("a") as f:
                f.write(json.dumps({"key": key, "result": result}) + "\n")
        return result

    commit, dirty = _git_state()
    results: dict[str, Any] = {
        "device": device,
        "meta": {
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(
                ["python bench/bench.py", *(argv if argv is not None else sys.argv[1:])]
            ),
            "quick": args.quick,
            "in_process": args.in_process,
            "resumed_phases": len(done),
            "uptime_start": uptime_text(),
            "loadavg_start": loadavg(),
            "cpu": _cpu_name(),
            "num_threads": args.threads or torch.get_num_threads(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "python": platform.python_version(),
            "cuda_device": torch.cuda.get_device_name(device)
            if device.startswith("cuda")
            else None,
            "git_commit": commit,
            "git_dirty": dirty,
        },
        "models": {},
    }
    for model in args.models:
        overrides = {
            "batch": batches.get(model),
            **{
                k: getattr(args, k)
                for k in (
                    "warmup",
                    "window",
                    "windows",
                    "rounds",
                    "sample_steps",
                    "sample_repeats",
                    "bpd_terms",
                    "bpd_repeats",
                    "ema_repeats",
                )
            },
        }
        try:
            settings = settings_for(device, model, args.quick, overrides)
            results["models"][model] = benchmark_model(
                model,
                device,
                args.options,
                settings,
                run,
                overrides=args.override,
                seed=args.seed,
                sync_check=not args.no_sync_check,
                echo=echo,
                threads=args.threads,
            )
        except ValueError as err:
            results["models"][model] = {"error": str(err)}
            echo(f"[{model}] {err}")
    if not args.no_fixed_cost:
        rounds = args.rounds or (_QUICK["rounds"] if args.quick else 3)
        fixed = benchmark_fixed_cost(
            device, run, args.quick, rounds, seed=args.seed, threads=args.threads, echo=echo
        )
        results["fixed_cost"] = fixed
        for res in results["models"].values():
            entry = res.get("options", {}).get("default", {})
            if "error" not in fixed and "bare" in entry and "step_s" in entry["bare"]:
                step_ms = 1000.0 * entry["bare"]["step_s"]["median"]
                entry["fixed_cost_percent_of_step"] = 100.0 * fixed["fixed_cost_ms"] / step_ms
    results["meta"]["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    results["meta"]["uptime_end"] = uptime_text()
    results["meta"]["loadavg_end"] = loadavg()

    (out / f"{name}.json").write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    report = markdown_report(results)
    (out / f"{name}.md").write_text(report)
    print(report)
    for model, res in results["models"].items():
        entry = res.get("options", {}).get("default", {})
        if "overhead_ratio" in entry:
            print(f"{model}: overhead ratio Lightning ÷ bare loop = {entry['overhead_ratio']:.3f}")
    journal.unlink(missing_ok=True)
    echo(f"wrote {out / f'{name}.json'} and {out / f'{name}.md'}")
    return results


if __name__ == "__main__":
    main()
