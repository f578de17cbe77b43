"""How far the ancestral sampler's x_t drifts from the forward process: ``python -m ddpm.ablation.drift``.

Under the forward process the mean square of x_t per dimension is known from the data alone:

    E_q‖x_t‖²/d = ᾱ_t · E‖x₀‖²/d + (1 − ᾱ_t).

A reverse chain that matches q (the ideal model) keeps its samples' mean square on that curve
at every step. A model whose per-step mean errors are correlated across steps (each one cheap
in its KL term, of size error²/2σ_t²) moves the chain off the curve, and the deviation grows
along the chain. This command measures the ratio of the two RMS values at every t for one or
more checkpoints, with the paper's sampler (all T ancestral steps, x̂₀ clipped, μ̃'s mean
unclipped), and the fraction of final pixels outside [−1, 1]:

    python -m ddpm.ablation.drift <ckpt> [<ckpt> ...] --samples 256 --out drift.json --plot drift.png

Nothing is synchronised per step: the per-step mean squares stay on the device until the end.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ddpm.diffusion import GaussianDiffusion

__all__ = ["chain_mean_square", "forward_mean_square", "main", "measure_checkpoint"]


def forward_mean_square(d: GaussianDiffusion, data_mean_square: float) -> torch.Tensor:
    """``E_q‖x_t‖²/d`` for t = 0 … T−1 (float64 ``[T]``), given ``E‖x₀‖²/d`` of the data."""
    alpha_bar = d.alphas_cumprod.double().cpu()
    return alpha_bar * float(data_mean_square) + (1.0 - alpha_bar)


@torch.no_grad()
def chain_mean_square(
    d: GaussianDiffusion,
    net: torch.nn.Module,
    shape: Sequence[int],
    *,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the full ancestral sampler; return (per-t mean square of x_t entering step t, float64
    ``[T]`` indexed by t, and the final samples ``[B, C, H, W]``)."""
    device = d.betas.device
    generator = torch.Generator(device=device).manual_seed(int(seed))
    squares: dict[int, torch.Tensor] = {}

    def record(state: dict[str, Any]) -> None:
        squares[int(state["t"])] = state["x"].double().square().mean()  # stays on the device

    samples = d.sample(net, tuple(shape), generator=generator, sampler="ancestral", callback=record)
    per_t = torch.stack([squares[t] for t in range(d.num_timesteps)]).cpu()
    return per_t, samples


def measure_checkpoint(
    ckpt: str | Path, num_samples: int = 256, seed: int = 0, device: str = "cpu"
) -> dict[str, Any]:
    """The drift of one checkpoint's ancestral chain against its data's forward process."""
    from ddpm.builders import build_datamodule, load_module_from_checkpoint

    module, cfg = load_module_from_checkpoint(ckpt, map_location=device)
    d, net = module.ema_diffusion.to(device), module.ema_net.to(device)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    reference = datamodule.reference_dataset()  # training images, no flips
    images = torch.stack([reference[i] for i in range(len(reference))]).double()
    data_ms = float(images.square().mean())
    q = forward_mean_square(d, data_ms)
    chain, samples = chain_mean_square(d, net, (num_samples, *module.image_shape), seed=seed)
    ratio = (chain / q).sqrt()
    return {
        "ckpt": str(ckpt),
        "diffusion": d.name,
        "global_step": int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]),
        "num_samples": int(num_samples),
        "seed": int(seed),
        "data_mean_square": data_ms,
        "rms_ratio": ratio.tolist(),  # index t, chain RMS / forward RMS
        "max_rms_ratio": float(ratio.max()),
        "final_rms_ratio": float(ratio[0]),
        "out_of_range_fraction": float((samples.abs() > 1.0 + 2.0 / 255).double().mean()),
    }


def _plot(results: list[dict[str, Any]], path: Path, labels: Sequence[str]) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for result, label in zip(results, labels, strict=True):
        ratio = result["rms_ratio"]
        ax.plot(
            range(len(ratio)),
            ratio,
            label=f"{label} ({result['out_of_range_fraction']:.0%} out of range)",
        )
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel("t (sampling runs from right to left)")
    ax.set_ylabel("RMS of x_t: chain / forward process")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpts", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="*", default=None, help="one per checkpoint")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--plot", type=Path, default=None, help="write the RMS ratio against t")
    args = parser.parse_args(argv)
    labels = args.labels or [str(p) for p in args.ckpts]
    if len(labels) != len(args.ckpts):
        parser.error(
            f"--labels needs one label per checkpoint ({len(args.ckpts)}), got {len(labels)}"
        )
    results = []
    for ckpt, label in zip(args.ckpts, labels, strict=True):
        result = measure_checkpoint(ckpt, args.samples, args.seed, args.device)
        result["label"] = label
        results.append(result)
        print(
            f"{label}: max RMS ratio {result['max_rms_ratio']:.3f}, final {result['final_rms_ratio']:.3f}, "
            f"{result['out_of_range_fraction']:.1%} of pixels out of range",
            flush=True,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    if args.plot:
        _plot(results, args.plot, labels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
