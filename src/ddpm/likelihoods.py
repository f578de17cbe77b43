"""One checkpoint, every likelihood: ``nll.likelihoods`` of ``src/eval.py``, and their table.

``python src/eval.py ckpt_path=… nll.likelihoods=[bound,bound_unclipped,analytic,ode]``
evaluates each listed likelihood of the checkpoint in turn, in one ``trainer.test``, through
the same :class:`~ddpm.callbacks.NLLCallback` (and so the same
:func:`~ddpm.metrics.bound.run_nll`) that evaluates one:

==================== ========================================================= ===================
name                 what                                                      metric
==================== ========================================================= ===================
``bound``            the variational bound, x̂₀ clipped inside every term (the  ``nll_bpd``
                     paper's protocol), the checkpoint's own variance
``bound_unclipped``  the same bound without clipping x̂₀                       ``nll_bpd_unclipped``
``analytic``         the clipped bound with Analytic-DPM's optimal variance     ``nll_bpd_analytic``
                     (a fixed-variance checkpoint; Γ estimated once, cached)
``ode``              the probability-flow ODE likelihood (``nll.ode.*``)        ``nll_bpd_ode``
==================== ========================================================= ===================

**The same images.** Every likelihood runs over images ``0 .. n − 1`` of the same split of the
same datamodule, in the same global batches, each batch's generator seeded from
``(seed, first index)``: the three bounds draw the same xₜ for every term (common random
numbers; clipping and the variance change no draw), the ODE its dequantisation and probes from
the same seeds. Each callback keeps the total of every image by its index
(:class:`~ddpm.metrics.bound.BitsPerDim` with ``num_images``, which fails unless every image
was added exactly once), the comparison checks that every likelihood has the same ``n`` values,
and ``nll_images_sha256`` fingerprints the evaluated images (uint8), so two checkpoints'
comparisons can be checked to share them too.

**Reported**, beside each likelihood's own metrics (``B``, ``B_stderr``, …): its cost ``B_nfe``
(network evaluations per image: T for a bound, the adaptive solver's count for the ODE, each of
those also ``hutchinson_samples`` vector-Jacobian products) and ``B_seconds`` (wall-clock of the
batches, summed over batches and ranks); for ``analytic`` also the one-time estimate of Γ,
``nll_bpd_analytic_gamma_nfe`` (n_Γ·T) and ``nll_bpd_analytic_gamma_seconds`` (spent by this
run: ~0 when the cache was reused). ``nll_differences`` gives, for every likelihood but the
first, its paired difference to the first (the clipped bound when ``bound`` is listed first):
the mean over images of the per-image differences with its Student-t 95% interval
(:func:`~ddpm.ablation.stats.paired_difference`, images in place of seeds) and whether the
interval excludes zero. The per-image values are saved as ``nll_likelihoods.npz``.

``python -m ddpm.likelihoods LABEL=metrics.json ... [--out table.md]`` renders such runs as one
markdown table (one row per checkpoint) and the table of differences.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import Dataset

from ddpm.ablation.stats import LEVEL, paired_difference
from ddpm.errors import ConfigError

__all__ = [
    "LIKELIHOODS",
    "Likelihood",
    "eval_nll_callback",
    "images_sha256",
    "likelihood_callbacks",
    "main",
    "paired_differences",
    "parse_likelihoods",
    "prepare_analytic",
    "render_markdown",
]


@dataclass(frozen=True)
class Likelihood:
    """One entry of ``nll.likelihoods``.

    Attributes:
        name: its name in the list (``bound``, ``bound_unclipped``, ``analytic``, ``ode``).
        estimator: :data:`~ddpm.metrics.bound.NLL_ESTIMATORS` entry (``full`` or ``ode``).
        clip_denoised: x̂₀ clipped inside every term of the bound.
        variance: the reverse variance in place of the checkpoint's own (``analytic``), or None.
        label: a column heading for the table.
    """

    name: str
    estimator: str
    clip_denoised: bool
    variance: str | None
    label: str

    def metric_name(self) -> str:
        """The key its value is reported under (``nll_bpd``, ``nll_bpd_ode``, ...)."""
        if self.estimator == "ode":
            return "nll_bpd_ode"
        name = "nll_bpd" if self.clip_denoised else "nll_bpd_unclipped"
        return f"{name}_{self.variance}" if self.variance else name


#: Every likelihood ``nll.likelihoods`` accepts, by name.
LIKELIHOODS: dict[str, Likelihood] = {
    spec.name: spec
    for spec in (
        Likelihood("bound", "full", True, None, "bound (clipped)"),
        Likelihood("bound_unclipped", "full", False, None, "bound, unclipped"),
        Likelihood("analytic", "full", True, "analytic", "bound, analytic Σ"),
        Likelihood("ode", "ode", True, None, "ODE"),
    )
}


def parse_likelihoods(cfg: DictConfig) -> list[Likelihood] | None:
    """``cfg.nll.likelihoods`` as :class:`Likelihood` entries; None when it is null (the one
    likelihood ``nll.estimator`` gives, as before).

    Raises:
        ConfigError: not a list, an empty list, an unknown or repeated name, or an option that
            the list replaces (``variance=``, ``nll.estimator``/``num_terms``,
            ``metrics.clip_bound=false``), each naming the fix.
    """
    value = OmegaConf.select(cfg, "nll.likelihoods", default=None)
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple, ListConfig)):
        raise ConfigError(
            f"nll.likelihoods={value!r}: give a list, e.g. nll.likelihoods=[bound,ode] "
            f"(choose from {list(LIKELIHOODS)})"
        )
    names = [str(v) for v in value]
    if not names:
        raise ConfigError(
            f"nll.likelihoods=[]: list at least one of {list(LIKELIHOODS)}, or set it to null"
        )
    unknown = [n for n in names if n not in LIKELIHOODS]
    if unknown:
        raise ConfigError(f"nll.likelihoods: unknown {unknown}: choose from {list(LIKELIHOODS)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"nll.likelihoods lists {repeated} more than once")
    node = cfg.get("variance")
    variance = node.get("name") if isinstance(node, DictConfig) else node
    if variance is not None:
        raise ConfigError(
            f"variance={variance} with nll.likelihoods: the list says each likelihood's variance "
            "(analytic is its own entry, the others use the checkpoint's). Drop variance=..."
        )
    if str(OmegaConf.select(cfg, "nll.estimator", default="full")) != "full" or (
        OmegaConf.select(cfg, "nll.num_terms", default=None) is not None
    ):
        raise ConfigError(
            "nll.estimator/nll.num_terms with nll.likelihoods: the list names the estimators "
            "(ode is its own entry). Leave nll.estimator=full and nll.num_terms=null"
        )
    if not bool(OmegaConf.select(cfg, "metrics.clip_bound", default=True)):
        raise ConfigError(
            "metrics.clip_bound=false with nll.likelihoods: list bound_unclipped instead"
        )
    if OmegaConf.select(cfg, "nll.num_steps", default=None) is not None:
        raise ConfigError(
            "nll.num_steps with nll.likelihoods: the list compares the model's own bounds; "
            "evaluate L_T on its own (nll.num_steps=T without nll.likelihoods)"
        )
    return [LIKELIHOODS[n] for n in names]


def prepare_analytic(
    cfg: DictConfig, diffusion: torch.nn.Module, net: torch.nn.Module, run_cfg: DictConfig | None
) -> tuple[Any, dict[str, Any]]:
    """Analytic-DPM's variance of the checkpoint, without keeping it: the diffusion is left
    with its own variance, and the callback of ``analytic`` swaps the returned one in for its
    evaluation only. Call before the speed options wrap ``net`` (Γ's cache hashes its weights).

    Returns:
        the :class:`~ddpm.diffusion.variance.AnalyticVariance`, and for metrics.json
        ``analytic_gamma`` (the estimate's summary: cache path, reused, n_Γ, its standard
        error), ``nll_bpd_analytic_gamma_nfe`` (n_Γ·T network evaluations, once per
        checkpoint) and ``nll_bpd_analytic_gamma_seconds`` (spent now, with the cache read).

    Raises:
        ConfigError: a learned-variance checkpoint (nothing to replace), naming the fix.
    """
    from ddpm.inference_variance import apply_configured_variance

    own = diffusion.variance
    began = time.perf_counter()
    choice = apply_configured_variance(cfg, diffusion, net, run_cfg, override="analytic")
    seconds = time.perf_counter() - began
    analytic = diffusion.variance
    diffusion.use_variance(own)  # type: ignore[operator]
    info = {
        "analytic_gamma": dict(choice.gamma),
        "nll_bpd_analytic_gamma_nfe": float(choice.gamma["num_images"] * diffusion.num_timesteps),
        "nll_bpd_analytic_gamma_seconds": seconds,
    }
    return analytic, info


def likelihood_callbacks(
    likelihoods: Sequence[Likelihood],
    nll: DictConfig,
    seed: int,
    analytic: Any | None = None,
) -> list[Any]:
    """One :class:`~ddpm.callbacks.NLLCallback` per likelihood, all on the same images (the
    first ``nll.num_images`` of the test split, in batches of ``nll.batch_size``) and seeds,
    each keeping its per-image totals and its cost.

    Args:
        likelihoods: :func:`parse_likelihoods`'s entries.
        nll: eval.yaml's ``nll`` node, sizes filled in.
        seed: the evaluation seed.
        analytic: :func:`prepare_analytic`'s variance, when ``analytic`` is listed.
    """
    callbacks = []
    for spec in likelihoods:
        if spec.variance is not None and analytic is None:
            raise ValueError(f"{spec.name} needs the analytic variance (prepare_analytic)")
        callbacks.append(
            eval_nll_callback(
                nll,
                seed,
                estimator=spec.estimator,
                clip_denoised=spec.clip_denoised,
                with_ode=spec.estimator == "ode",
                per_image=True,
                report_cost=True,
                variance=analytic if spec.variance is not None else None,
            )
        )
    return callbacks


def eval_nll_callback(nll: DictConfig, seed: int, with_ode: bool = True, **settings: Any) -> Any:
    """The :class:`~ddpm.callbacks.NLLCallback` of ``src/eval.py``: the first ``nll.num_images``
    of the test split in batches of ``nll.batch_size``, seeded by ``seed``, evaluated once at
    test time with no terms written; ``nll.ode`` passed on when ``with_ode``; ``settings`` are
    the callback's other arguments (estimator, clipping, …)."""
    from ddpm.callbacks import NLLCallback

    ode = OmegaConf.to_container(nll.ode) if with_ode and nll.get("ode") is not None else None
    return NLLCallback(
        num_images=int(nll.num_images),
        batch_size=int(nll.batch_size),
        split="test",
        on_train_end=False,
        seed=seed,
        save_terms=False,
        ode=ode,
        **settings,
    )


def paired_differences(
    per_image: Mapping[str, np.ndarray], reference: str, level: float = LEVEL
) -> dict[str, dict[str, Any]]:
    """Every likelihood minus ``reference``, image by image: the paired comparison.

    The values of two likelihoods on one image share the image (and, between the bounds, every
    xₜ), so their errors are correlated and the difference is far better determined than the
    two standard errors suggest; the Student-t interval over images of the per-image
    differences (:func:`~ddpm.ablation.stats.paired_difference`) accounts for that.

    Args:
        per_image: ``{metric name: bits/dim [n]}``, image i at index i, every array over the
            same n images.
        reference: the key the others are compared with.
        level: the confidence level.

    Returns:
        ``{name: {reference, mean, stderr, low, high, level, n, resolved}}`` for every key but
        ``reference`` (bits/dim; ``low``/``high``: the interval at ``level``; ``resolved``: it
        excludes 0; NaN bounds for n < 2).

    Raises:
        KeyError: ``reference`` is not in ``per_image``.
        ValueError: the arrays do not all have the same length (not the same images).
    """
    base = np.asarray(per_image[reference], dtype=np.float64)
    lengths = {name: int(np.asarray(v).shape[0]) for name, v in per_image.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"per-image values over different numbers of images: {lengths}")
    out: dict[str, dict[str, Any]] = {}
    for name, values in per_image.items():
        if name == reference:
            continue
        diff = np.asarray(values, dtype=np.float64) - base
        interval = paired_difference(dict(enumerate(values)), dict(enumerate(base)), level)
        assert interval is not None  # same indices: never disjoint
        n = interval.n
        stderr = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        out[name] = {
            "reference": reference,
            "mean": interval.mean,
            "stderr": stderr,
            "low": interval.low,
            "high": interval.high,
            "level": level,
            "n": n,
            "resolved": interval.resolved,
        }
    return out


def images_sha256(dataset: Dataset, num_images: int) -> str:
    """sha256 (hex) of images ``0 .. num_images − 1`` of ``dataset`` as uint8 bytes (the
    256-level grid), with their shape: equal for two evaluations exactly when they saw the same
    images in the same order."""
    from ddpm.metrics.bound import dataset_image

    digest = hashlib.sha256()
    for i in range(int(num_images)):
        image = dataset_image(dataset[i]).detach().cpu().to(torch.float64)
        pixels = torch.round((image + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)
        digest.update(f"{tuple(pixels.shape)}|".encode())
        digest.update(pixels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def collect(
    likelihoods: Sequence[Likelihood], callbacks: Sequence[Any]
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The callbacks' results after ``trainer.test``: the metrics (each likelihood's keys,
    ``nll_likelihoods``, ``nll_differences`` to the first), the per-image totals
    ``{name: [n]}`` and the bounds' mean terms ``{name: [T]}``.

    Raises:
        RuntimeError: a callback has no result, or no per-image values.
    """
    metrics: dict[str, Any] = {}
    per_image: dict[str, np.ndarray] = {}
    terms: dict[str, np.ndarray] = {}
    for spec, callback in zip(likelihoods, callbacks, strict=True):
        result = dict(callback.last_result or {})
        values = result.pop("per_image_bpd", None)
        if values is None:
            raise RuntimeError(f"nll.likelihoods: {spec.name} returned no per-image values")
        name = spec.metric_name()
        per_image[name] = np.asarray(values, dtype=np.float64)
        term = result.pop("terms_bpd", None)
        if term is not None:
            terms[name] = np.asarray(term, dtype=np.float64)
        metrics.update(result)
    names = [spec.metric_name() for spec in likelihoods]
    metrics["nll_likelihoods"] = names
    metrics["nll_differences"] = paired_differences(per_image, names[0])
    return metrics, per_image, terms


def save_arrays(
    directory: str | Path, per_image: Mapping[str, np.ndarray], terms: Mapping[str, np.ndarray]
) -> Path:
    """``<directory>/nll_likelihoods.npz``: ``image_index [n]``, ``<name> [n]`` (bits/dim per
    image) and ``<name>_terms [T]`` (a bound's mean Lₜ, index 0 = decoder)."""
    n = len(next(iter(per_image.values())))
    arrays = {"image_index": np.arange(n), **per_image}
    arrays.update({f"{name}_terms": value for name, value in terms.items()})
    path = Path(directory) / "nll_likelihoods.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def format_differences(metrics: Mapping[str, Any]) -> list[str]:
    """One line per paired difference of a metrics.json (for the console)."""
    lines = []
    for name, d in dict(metrics.get("nll_differences") or {}).items():
        mark = "resolved" if d["resolved"] else "not resolved"
        lines.append(
            f"  {name} − {d['reference']}: {d['mean']:+.4f} bits/dim, {d['level']:.0%} "
            f"[{d['low']:+.4f}, {d['high']:+.4f}] over {d['n']} images ({mark})"
        )
    return lines


# ---------------------------------------------------------------------------- the table
def _label_of(metrics: Mapping[str, Any], path: Path) -> str:
    ckpt = metrics.get("ckpt_path")
    if ckpt:
        parts = Path(str(ckpt)).parts
        if "checkpoints" in parts:
            return parts[parts.index("checkpoints") - 1]
    return path.parent.name


def _number(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _cell(metrics: Mapping[str, Any], name: str) -> str:
    if name not in metrics:
        return "–"
    nfe = metrics.get(f"{name}_nfe")
    cell = (
        f"{_number(metrics[name], 3)} ± {_number(metrics.get(f'{name}_stderr'), 3)} · "
        f"{_number(nfe, 0)} NFE · {_number(metrics.get(f'{name}_seconds'), 1)} s"
    )
    gamma_nfe = metrics.get(f"{name}_gamma_nfe")
    if gamma_nfe is not None:
        cell += (
            f" (+ Γ once: {gamma_nfe:,.0f} NFE, "
            f"{_number(metrics.get(f'{name}_gamma_seconds'), 1)} s)"
        )
    return cell


def render_markdown(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """The likelihoods of several checkpoints as markdown: one row per checkpoint, a column per
    likelihood (bits/dim ± standard error over images · network evaluations per image ·
    seconds), then the paired differences to the first likelihood with their 95% intervals
    (✓: the interval excludes zero), then the images each row was evaluated on.

    Args:
        runs: ``(label, metrics.json contents)`` of ``src/eval.py nll.likelihoods=[...]``.
    """
    names: list[str] = []
    for _, metrics in runs:
        for name in metrics.get("nll_likelihoods", []):
            if name not in names:
                names.append(name)
    labels = {spec.metric_name(): spec.label for spec in LIKELIHOODS.values()}
    head = "| checkpoint | " + " | ".join(f"{labels.get(n, n)} `{n}`" for n in names) + " |"
    lines = [head, "|---" * (len(names) + 1) + "|"]
    for label, metrics in runs:
        lines.append(f"| {label} | " + " | ".join(_cell(metrics, n) for n in names) + " |")
    others = names[1:]
    if others:
        reference = names[0]
        lines += [
            "",
            f"Paired differences to `{reference}` (bits/dim, mean over images and 95% Student-t "
            "interval; ✓ resolved: the interval excludes 0):",
            "",
            "| checkpoint | " + " | ".join(f"`{n}` − `{reference}`" for n in others) + " |",
            "|---" * (len(others) + 1) + "|",
        ]
        for label, metrics in runs:
            diffs = metrics.get("nll_differences", {})
            cells = []
            for n in others:
                d = diffs.get(n)
                if d is None or d.get("reference") != reference:
                    cells.append("–")
                    continue
                mark = " ✓" if d["resolved"] else ""
                cells.append(f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{mark}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    images = {
        (m.get("nll_images_sha256"), m.get(f"{names[0]}_num_images", m.get("nll_num_images")))
        for _, m in runs
    }
    lines.append("")
    if len(images) == 1:
        digest, count = next(iter(images))
        lines.append(
            f"Every row and column on the same {_number(count, 0)} test images "
            f"(`nll_images_sha256` {str(digest)[:16]}…)."
        )
    else:
        lines.append("The rows were evaluated on different images:")
        for label, m in runs:
            lines.append(f"- {label}: `{str(m.get('nll_images_sha256'))[:16]}…`")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ddpm.likelihoods [LABEL=]metrics.json ... [--out table.md]``."""
    parser = argparse.ArgumentParser(
        prog="python -m ddpm.likelihoods",
        description="One markdown table of the likelihoods of several eval.py runs "
        "(nll.likelihoods=[...]): one row per checkpoint, the paired differences to the first "
        "likelihood with their 95%% intervals.",
    )
    parser.add_argument("runs", nargs="+", help="metrics.json files, optionally LABEL=path")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here")
    args = parser.parse_args(argv)
    runs = []
    for item in args.runs:
        label, sep, path_text = item.partition("=")
        path = Path(path_text if sep else label)
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(f"error: cannot read {path}: {err}", file=sys.stderr)
            return 1
        if "nll_likelihoods" not in metrics:
            print(f"error: {path} has no nll_likelihoods (run eval.py nll.likelihoods=[...])",
                  file=sys.stderr)  # fmt: skip
            return 1
        runs.append((label if sep else _label_of(metrics, path), metrics))
    text = render_markdown(runs)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
