"""Sample quality and cost of every sampler, and the error of the estimated bound, on one checkpoint.

    python bench/samplers.py --ckpt logs/train/runs/quickstart/<time>/checkpoints/last.ckpt \
        --out docs/results/samplers

For each sampler setting it draws ``--num-samples`` images for each of ``--seeds`` (the same
starting noise x_T for every sampler under one seed: a paired comparison), computes the run's
Fréchet distance (``fd_digits`` on the digits, FID otherwise) and times the sampling. For the bound
it evaluates the full sum (K = T) and the stratified estimate at each ``--bound-terms`` K on the
first ``--nll-images`` test images, with the standard error over images and the estimator's own.

Writes ``<out>.json`` (every number, with the command, commit and machine) and ``<out>.md``
(the tables of ``docs/evaluation.md``). Timings are wall-clock seconds of this process on the
machine it ran on: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ddpm.builders import build_datamodule, load_for_inference
from ddpm.diffusion.sampling import SamplerSpec
from ddpm.metrics.bound import evaluate_nll, nll_metric_name
from ddpm.metrics.evaluate import (
    SampleQuality,
    build_feature_extractor,
    resolve_extractor_kind,
    run_sample_quality,
)
from ddpm.metrics.reference import dataset_name_of, reference_statistics
from ddpm.tasks.common import git_commit, write_json_atomic

#: (sampler, steps) of the table: the issue's settings, plus the cheaper neighbours that decide
#: which is the cheapest setting within 10% of DDIM-100.
DEFAULT_SETTINGS = (
    "ancestral:1000",
    "ddim:20",
    "ddim:50",
    "ddim:100",
    "dpmpp_2m:10",
    "dpmpp_2m:15",
    "dpmpp_2m:20",
    "heun:5",
    "heun:9",
    "heun:18",
)
#: Within this fraction of the reference setting's Fréchet distance counts as "as good".
TOLERANCE = 0.10
REFERENCE = "ddim:100"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", help="a checkpoint of src/train.py")
    parser.add_argument("--out", default="docs/results/samplers", help="output path stem")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS))
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--nll-images", type=int, default=100)
    parser.add_argument("--bound-terms", type=int, nargs="+", default=[100, 50])
    parser.add_argument("--cache-dir", default=os.environ.get("DDPM_CACHE_DIR", ".cache"))
    parser.add_argument(
        "--render", type=Path, default=None, help="only rewrite <stem>.md from this <stem>.json"
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(render_markdown(report))
        print(f"wrote {args.render.with_suffix('.md')}")
        return 0
    if not args.ckpt:
        parser.error("--ckpt is required (or --render <report.json>)")
    try:
        specs = [SamplerSpec.parse(s) for s in args.settings]
    except ValueError as err:
        parser.error(f"--settings {err}")

    device = torch.device("cpu")
    diffusion, net, image_shape, run_cfg = load_for_inference(args.ckpt, device=device)
    net.eval()
    T = diffusion.num_timesteps
    data_cfg = OmegaConf.create(OmegaConf.to_container(run_cfg.data, resolve=True))
    datamodule = build_datamodule(OmegaConf.create({"data": data_cfg}))
    kind = resolve_extractor_kind("auto", datamodule)
    extractor = build_feature_extractor(kind, cache_dir=args.cache_dir, device=device)
    reference = reference_statistics(
        datamodule.reference_dataset(),
        extractor,
        dataset_name=dataset_name_of(datamodule),
        cache_dir=args.cache_dir,
        progress=False,
    )

    rows: list[dict[str, Any]] = []
    for spec in specs:
        fds, seconds = [], []
        quality = SampleQuality(
            kind, extractor, reference, num_samples=args.num_samples, sampler=spec,
            num_timesteps=T, compute_is=False,
        )  # fmt: skip
        name = quality.names["fd"]
        for seed in args.seeds:
            start = time.perf_counter()
            result = run_sample_quality(
                diffusion, net, quality, image_shape=tuple(image_shape),
                batch_size=args.batch_size, seed=seed, sampler=spec, progress=False,
            )  # fmt: skip
            seconds.append(time.perf_counter() - start)
            fds.append(result[name])
        row = {
            "setting": f"{spec.name}:{spec.steps or T}",
            "metric": name,
            "sampler": spec.name,
            "steps": spec.steps or T,
            "spacing": spec.effective_spacing(),
            "nfe": spec.nfe(T),
            "fd_per_seed": fds,
            "fd_mean": statistics.fmean(fds),
            "fd_std": statistics.stdev(fds) if len(fds) > 1 else float("nan"),
            "seconds_per_seed": seconds,
            "seconds_mean": statistics.fmean(seconds),
        }
        rows.append(row)
        print(
            f"{row['metric']:28s} NFE {row['nfe']:5d}  fd {row['fd_mean']:8.3f} ± "
            f"{row['fd_std']:.3f}  {row['seconds_mean']:7.2f} s per {args.num_samples}",
            flush=True,
        )

    datamodule.setup("test")
    bounds: list[dict[str, Any]] = []
    for K in [T, *args.bound_terms]:
        estimator = "full" if K == T else "stratified"
        start = time.perf_counter()
        result = evaluate_nll(
            diffusion,
            net,
            datamodule.test_set,
            num_images=args.nll_images,
            seed=0,
            batch_size=args.nll_images,
            progress=False,
            estimator=estimator,
            num_terms=None if K == T else K,
        )
        elapsed = time.perf_counter() - start
        key = nll_metric_name(estimator, None if K == T else K, T)
        bounds.append(
            {
                "metric": key,
                "num_terms": K,
                "nfe_per_image": K,
                "bpd": result[key],
                "stderr": result[f"{key}_stderr"],
                "estimator_stderr": result.get(f"{key}_estimator_stderr", 0.0),
                "seconds": elapsed,
                "num_images": result["nll_num_images"],
            }
        )
        print(
            f"{key:28s} K {K:5d}  {result[key]:.4f} ± {result[f'{key}_stderr']:.4f} bits/dim "
            f"{elapsed:7.2f} s",
            flush=True,
        )

    report = {
        "command": " ".join(["python", "bench/samplers.py", *(argv or sys.argv[1:])]),
        "commit": git_commit(),
        "checkpoint": str(args.ckpt),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "num_timesteps": T,
        "num_samples": args.num_samples,
        "seeds": args.seeds,
        "tolerance": TOLERANCE,
        "reference": REFERENCE,
        "samplers": rows,
        "bound": bounds,
    }
    report["cheapest_within_tolerance"] = cheapest_within_tolerance(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report, out.with_suffix(".json"))
    out.with_suffix(".md").write_text(render_markdown(report))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


def cheapest_within_tolerance(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The setting with the fewest NFE (≤ 20) whose mean fd is within TOLERANCE of REFERENCE's."""
    reference = next((r for r in rows if r["setting"] == REFERENCE), None)
    if reference is None:
        return None
    limit = (1.0 + TOLERANCE) * reference["fd_mean"]
    ok = [r for r in rows if r["nfe"] <= 20 and r["fd_mean"] <= limit]
    if not ok:
        return {"setting": None, "limit": limit}
    best = min(ok, key=lambda r: (r["nfe"], r["fd_mean"]))
    return {"setting": best["setting"], "metric": best["metric"], "limit": limit}


def paired_difference(row: dict[str, Any], reference: dict[str, Any]) -> tuple[float, float]:
    """Mean and std over seeds of fd(row) − fd(reference): the same x_T under each seed, so the
    difference is far less noisy than either number."""
    diffs = [a - b for a, b in zip(row["fd_per_seed"], reference["fd_per_seed"], strict=True)]
    std = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    return statistics.fmean(diffs), std


def render_markdown(report: dict[str, Any]) -> str:
    """The two tables (samplers, bound) with the command that produced them."""
    n, seeds = report["num_samples"], report["seeds"]
    reference = next((r for r in report["samplers"] if r["setting"] == report["reference"]), None)
    lines = [
        "<!-- written by bench/samplers.py; do not edit by hand -->",
        f"Command: `{report['command']}` (commit `{report['commit']}`, "
        f"{report['machine']['torch_threads']} torch threads, {report['machine']['platform']}).",
        "",
        f"Sample quality: {n} samples per seed, seeds {', '.join(map(str, seeds))} (the same x_T "
        "for every sampler under one seed); mean ± std over the seeds. Seconds: wall-clock to "
        f"draw and score {n} samples. Δ: the paired difference from {report['reference']} "
        "(mean ± std over the seeds of the per-seed differences).",
        "",
        "| metric | sampler | steps | spacing | NFE | Fréchet distance ↓ | "
        f"Δ vs {report['reference']} | seconds |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["samplers"]:
        delta = ""
        if reference is not None and r is not reference:
            mean, std = paired_difference(r, reference)
            delta = f"{mean:+.2f} ± {std:.2f}"
        lines.append(
            f"| `{r['metric']}` | {r['sampler']} | {r['steps']} | {r['spacing']} | {r['nfe']} | "
            f"{r['fd_mean']:.2f} ± {r['fd_std']:.2f} | {delta} | {r['seconds_mean']:.1f} |"
        )
    best = report.get("cheapest_within_tolerance")
    if best:
        lines += [
            "",
            f"Within {report['tolerance']:.0%} of {report['reference']} (mean fd ≤ "
            f"{best['limit']:.2f}) at ≤ 20 NFE: "
            + (f"`{best['setting']}` is the cheapest." if best["setting"] else "none."),
        ]
    first = report["bound"][0]
    lines += [
        "",
        f"Bound on the first {first['num_images']} test images (bits/dim; ± the standard error "
        "over images, which for an estimate includes its own noise; the estimator's part alone "
        "in its own column):",
        "",
        "| metric | K (NFE per image) | bits/dim | ± stderr | estimator stderr | "
        "Δ from the full bound | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b in report["bound"]:
        lines.append(
            f"| `{b['metric']}` | {b['num_terms']} | {b['bpd']:.4f} | {b['stderr']:.4f} | "
            f"{b['estimator_stderr']:.4f} | {b['bpd'] - first['bpd']:+.4f} | {b['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
