"""VDM's invariance, measured: one network, its continuous loss under several schedules with the
same endpoints, and the T-step bounds L_T against L_∞.

For a network that reads its noise level as log SNR, the continuous diffusion loss
L_∞ = ½∫ E‖x − x̂(z_v, v)‖² dv over v = SNR ∈ [SNR(1), SNR(0)] does not depend on the schedule
between the endpoints (Kingma et al. 2021): ``linear``'s and ``cosine``'s log-SNR shapes moved to
the learned schedule's endpoints (:class:`~ddpm.diffusion.vdm.RescaledSchedule`) give the same
mean, and only the variance of the one-sample estimator ½γ′(t)‖ε − ε̂‖² (t ~ U(0, 1)) differs.
The learned schedule minimised that variance during training.

    python -m ddpm.ablation.invariance <run>/checkpoints/last.ckpt --out docs/results/vdm

Every schedule sees the same images, the same uniform u (t = u) and the same ε (common random
numbers), so differences are paired. Means: over images of each image's average over draws,
with 95% t intervals of the paired differences. Variances: of the one-sample estimator over all
(image, t, ε) draws, with 95% bootstrap intervals over images for the ratio to the learned
schedule's. Also L_T for several T against L_∞ (:func:`~ddpm.diffusion.continuous.continuous_bound`
with the same strata and ε for every T).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.ablation.stats import mean_interval

__all__ = ["main", "measure_invariance", "measure_step_bounds"]

LN2 = math.log(2.0)


@torch.no_grad()
def _one_sample_losses(d: Any, net: Any, x0: torch.Tensor, u: torch.Tensor, noise: torch.Tensor):
    """½γ′(t)·mean-dims (ε − ε̂)²/ln 2 ``[B]`` (bits/dim) at t = ``u`` ``[B]``."""
    at = d.schedule.at(u)
    x_t = at.q_sample(x0, u, noise)
    output = d.model_output(net, x_t, u, schedule=at)
    eps_hat = d.parameterization.pred_eps(at, output, x_t, u)
    mse = (noise - eps_hat).square().flatten(1).mean(1)
    return 0.5 * at.dgamma * mse / LN2


def measure_invariance(
    diffusion: Any,
    net: Any,
    images: torch.Tensor,
    draws: int,
    seed: int = 0,
    shapes: Sequence[str] = ("linear", "cosine"),
    bootstrap: int = 2000,
) -> dict[str, Any]:
    """The diffusion loss of ``net`` under its own schedule and under ``shapes`` moved to its
    endpoints, on ``images`` ``[N, C, H, W]`` with ``draws`` (t, ε) per image.

    Returns:
        ``{"endpoints": [γ₀, γ₁], "schedules": {name: {"mean", "mean_stderr", "variance",
        "variance_ratio", "variance_ratio_ci95", "mean_diff", "mean_diff_ci95"}}}``
        (bits/dim; differences and ratios against the model's own schedule, ``own``).
    """
    from ddpm.diffusion import make_schedule
    from ddpm.diffusion.vdm import RescaledSchedule

    if not diffusion.time.continuous or diffusion.time.input != "log_snr":
        raise ValueError(
            "the invariance needs a continuous-time network that reads log SNR "
            "(time=continuous with time.network_input=log_snr, e.g. experiment=vdm_learned)"
        )
    own = diffusion.schedule
    gamma_0, gamma_1 = (float(-v.detach()) for v in own.endpoint_log_snrs())
    T = diffusion.num_timesteps
    schedules = {"own": own}
    for name in shapes:
        base = make_schedule(name, T)
        rescaled = RescaledSchedule(base, gamma_0, gamma_1, dtype=own.dtype).to(own.device)
        schedules[name] = rescaled
    n = images.shape[0]
    generator = torch.Generator(device=images.device).manual_seed(seed)
    losses = {name: torch.empty(n, draws, dtype=torch.float64) for name in schedules}
    for r in range(draws):
        u = torch.rand(n, generator=generator, device=images.device)
        noise = torch.randn(images.shape, generator=generator, device=images.device)
        for name, schedule in schedules.items():
            d = diffusion.with_schedule(schedule)
            losses[name][:, r] = _one_sample_losses(d, net, images, u, noise).double().cpu()
    rng = np.random.default_rng(seed)
    resample = rng.integers(0, n, size=(bootstrap, n))
    base = losses["own"].numpy()
    base_var = base.var(ddof=1)
    boot_base = np.array([base[idx].var(ddof=1) for idx in resample])
    result: dict[str, Any] = {
        "endpoints": [gamma_0, gamma_1],
        "num_images": n,
        "draws_per_image": draws,
        "schedules": {},
    }
    for name, values in losses.items():
        v = values.numpy()
        per_image = v.mean(axis=1)
        diff = per_image - base.mean(axis=1)
        boot = np.array([v[idx].var(ddof=1) for idx in resample]) / boot_base
        interval = mean_interval(diff.tolist())
        entry = {
            "mean": float(per_image.mean()),
            "mean_stderr": float(per_image.std(ddof=1) / math.sqrt(n)),
            "variance": float(v.var(ddof=1)),
            "variance_ratio": float(v.var(ddof=1) / base_var),
            "variance_ratio_ci95": [
                float(np.quantile(boot, 0.025)),
                float(np.quantile(boot, 0.975)),
            ],
            "mean_diff": interval.mean,
            "mean_diff_ci95": [interval.low, interval.high],
        }
        result["schedules"][name] = entry
    return result


def measure_step_bounds(
    diffusion: Any,
    net: Any,
    images: torch.Tensor,
    steps: Sequence[int],
    num_points: int,
    seed: int = 0,
) -> dict[str, Any]:
    """The diffusion loss L_T for each T in ``steps`` and L_∞, bits/dim, with the same strata and
    ε for every T, and each L_T − L_∞ with its 95% t interval over images."""
    from ddpm.diffusion.continuous import continuous_bound

    def run(num_steps: int | None) -> np.ndarray:
        generator = torch.Generator(device=images.device).manual_seed(seed)
        out = continuous_bound(
            diffusion, net, images, num_points, num_steps=num_steps, generator=generator
        )
        return out["diffusion"].double().cpu().numpy()

    limit = run(None)
    n = images.shape[0]
    result: dict[str, Any] = {
        "num_images": n,
        "num_points": num_points,
        "L_inf": float(limit.mean()),
        "L_inf_stderr": float(limit.std(ddof=1) / math.sqrt(n)),
        "steps": {},
    }
    for T in steps:
        values = run(int(T))
        interval = mean_interval((values - limit).tolist())
        result["steps"][str(T)] = {
            "L_T": float(values.mean()),
            "L_T_stderr": float(values.std(ddof=1) / math.sqrt(n)),
            "minus_L_inf": interval.mean,
            "minus_L_inf_ci95": [interval.low, interval.high],
        }
    return result


def _markdown(invariance: dict[str, Any], steps: dict[str, Any]) -> str:
    g0, g1 = invariance["endpoints"]
    lines = [
        f"Endpoints γ₀ = {g0:.3f}, γ₁ = {g1:.3f}; {invariance['num_images']} held-out digits × "
        f"{invariance['draws_per_image']} draws of (t, ε), the same for every schedule.",
        "",
        "| schedule (same endpoints) | diffusion loss (bits/dim) | − own, 95% CI | variance of "
        "the one-sample estimate | ÷ own, 95% CI |",
        "|---|---|---|---|---|",
    ]
    for name, e in invariance["schedules"].items():
        lo, hi = e["mean_diff_ci95"]
        rlo, rhi = e["variance_ratio_ci95"]
        label = "learned (own)" if name == "own" else f"{name} log-SNR shape"
        lines.append(
            f"| {label} | {e['mean']:.4f} ± {e['mean_stderr']:.4f} | "
            f"{e['mean_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] | {e['variance']:.4g} | "
            f"{e['variance_ratio']:.3f} [{rlo:.3f}, {rhi:.3f}] |"
        )
    lines += [
        "",
        f"| T | L_T (bits/dim) | L_T − L_∞, 95% CI ({steps['num_images']} digits, "
        f"{steps['num_points']} strata each) |",
        "|---|---|---|",
    ]
    for T, e in steps["steps"].items():
        lo, hi = e["minus_L_inf_ci95"]
        lines.append(
            f"| {T} | {e['L_T']:.4f} ± {e['L_T_stderr']:.4f} | "
            f"{e['minus_L_inf']:+.4f} [{lo:+.4f}, {hi:+.4f}] |"
        )
    lines.append(f"| ∞ | {steps['L_inf']:.4f} ± {steps['L_inf_stderr']:.4f} | 0 |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ddpm.ablation.invariance CKPT [--num-images N] [--draws R] [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m ddpm.ablation.invariance",
        description="One continuous-time network's loss under several schedules with its "
        "endpoints, and L_T against L_∞.",
    )
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--steps", default="2,10,100,1000")
    parser.add_argument("--num-points", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from ddpm.builders import build_datamodule, load_module_from_checkpoint
    from ddpm.metrics.bound import dataset_image

    module, cfg = load_module_from_checkpoint(args.ckpt, map_location="cpu")
    diffusion, net = module.ema_diffusion, module.ema_net
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("test")
    dataset = datamodule.test_set
    count = min(args.num_images, len(dataset))
    images = torch.stack([dataset_image(dataset[i]).float() for i in range(count)])
    invariance = measure_invariance(diffusion, net, images, args.draws, args.seed)
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    step_bounds = measure_step_bounds(diffusion, net, images, steps, args.num_points, args.seed)
    table = _markdown(invariance, step_bounds)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"ckpt": str(args.ckpt), "invariance": invariance, "step_bounds": step_bounds}
        (args.out / "invariance.json").write_text(json.dumps(record, indent=2) + "\n")
        (args.out / "invariance.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
