"""What the benchmark measures and how long: models, options, per-device step counts.

Imports no torch at module level, so ``bench/bench.py --help`` and the report stay fast.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
DEFAULT_OUT = ROOT / "bench" / "results"
# The script `make bench` runs; worker processes run it again with --worker.
ENTRY_SCRIPT = ROOT / "bench" / "bench.py"

OPTIONS = ("default", "channels_last", "bf16_autocast", "compile", "fused_adam")
# Image shape (C, H, W) each model is benchmarked at: the data it is configured for.
MODEL_SHAPES: dict[str, tuple[int, int, int]] = {
    "ddpm_cifar10": (3, 32, 32),
    "ddpm_256": (3, 256, 256),
    "small": (1, 8, 8),
    "tiny": (1, 8, 8),
}
PAPER_MODELS = ("ddpm_cifar10", "ddpm_256")

# The settings each of which has a command-line flag (``--sample-steps`` for sample_steps).
TUNABLE = (
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

# Per (device, model kind) defaults; every value can be overridden from the command line.
# warmup/window/windows count training steps; sample_steps are network evaluations per chain;
# bpd_terms are terms of the bound per evaluation; *_repeats are timed repetitions.
_COLUMNS = ("batch", *TUNABLE)
_TABLE: dict[tuple[str, str], tuple[int, ...]] = {
    # batch, warmup, window, windows, rounds, sample_steps, sample_repeats, bpd_terms,
    # bpd_repeats, ema_repeats
    ("cpu", "paper"): (8, 2, 2, 5, 3, 4, 3, 4, 3, 10),
    ("cpu", "small"): (64, 10, 20, 7, 3, 20, 5, 20, 5, 50),
    ("cuda", "paper"): (128, 20, 20, 7, 3, 20, 5, 20, 5, 50),
    ("cuda", "small"): (256, 20, 50, 7, 3, 50, 5, 50, 5, 100),
}
DEFAULTS: dict[tuple[str, str], dict[str, int]] = {
    key: dict(zip(_COLUMNS, row, strict=True)) for key, row in _TABLE.items()
}
QUICK = dict(
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


def model_kind(model: str) -> str:
    """``paper`` for the paper's UNets, ``small`` for every other model."""
    return "paper" if model in PAPER_MODELS else "small"


def settings_for(
    device: str, model: str, quick: bool, overrides: dict[str, int | None]
) -> dict[str, int]:
    """Benchmark settings for one model: defaults ← quick mode ← command-line overrides.

    Values count training steps (``warmup``, ``window``, ``windows``), rounds, network
    evaluations per chain (``sample_steps``), terms of the bound (``bpd_terms``), timed
    repetitions (``*_repeats``) and images (``batch``). None in ``overrides`` keeps the default.
    """
    base = dict(DEFAULTS[("cuda" if device.startswith("cuda") else "cpu", model_kind(model))])
    if quick:
        base.update(QUICK)
        base["batch"] = min(base["batch"], 4 if model_kind(model) == "paper" else 16)
    base.update({k: v for k, v in overrides.items() if v is not None})
    if base["warmup"] < 1 or base["window"] < 1 or base["windows"] < 1 or base["rounds"] < 1:
        raise ValueError("warmup, window, windows and rounds must all be >= 1")
    if base["sample_steps"] < 2 or base["bpd_terms"] < 2:
        raise ValueError("sample_steps and bpd_terms must be >= 2 (a respaced chain needs 2)")
    return base


def option_skip_reason(option: str, device: str) -> str | None:
    """Why ``option`` cannot run on ``device``, or None."""
    if option == "fused_adam" and not device.startswith("cuda"):
        return (
            "CUDA only: DiffusionLitModule passes fused=True to the optimiser on CUDA and ignores "
            "the flag elsewhere, so on this device it would measure the default again"
        )
    if option == "bf16_autocast" and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_bf16_supported():
            return "this GPU has no bfloat16 support"
    return None


def option_overrides(option: str) -> list[str]:
    """Hydra overrides that switch ``option`` on (``default``: none)."""
    if option == "default":
        return []
    if option not in OPTIONS:
        raise ValueError(f"unknown option {option!r}: choose from {', '.join(OPTIONS)}")
    return [f"speed.{option}=true"]
