"""The reverse variance a loaded model is evaluated or sampled with (``variance=`` of ``src/eval.py``
and ``src/sample.py``).

Not given (the default), the checkpoint's own. ``fixed_large``/``fixed_small`` evaluate a fixed-variance
checkpoint with the other fixed variance. ``analytic`` is Analytic-DPM (Bao et al. 2022): the
optimal σₜ² of a fixed-variance model (:class:`~ddpm.diffusion.variance.AnalyticVariance`) from
Γₜ = E‖ε̂(xₜ, t)‖²/d, estimated by Monte Carlo over training images
(:func:`~ddpm.diffusion.analytic.estimate_gamma`) once per network and cached: beside the
checkpoint as ``<ckpt>.analytic_gamma.pt``, or for a released model under
``<paths.cache_dir>/analytic_gamma/``. The cache is reused while it matches the network (a hash of
its weights, the schedule and the parameterisation), the training data, the number of images and
the seed; otherwise Γ is estimated again and the file replaced.

A learned variance is part of the network's output and is never swapped (:class:`ConfigError`).
Metrics computed with a variance other than the checkpoint's carry its name
(:func:`tag_metrics`): ``nll_bpd_analytic``, ``fd_digits_1k_analytic``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.data import Dataset

from ddpm.diffusion import AnalyticVariance, GaussianDiffusion, estimate_gamma
from ddpm.errors import ConfigError

__all__ = [
    "CACHE_SUFFIX",
    "VARIANCE_CHOICES",
    "AnalyticSettings",
    "VarianceChoice",
    "apply_configured_variance",
    "apply_inference_variance",
    "gamma_cache_path",
    "model_fingerprint",
    "tag_metrics",
    "tag_nll_metrics",
]

#: What ``variance=`` accepts (not given: the checkpoint's own).
VARIANCE_CHOICES = ("analytic", "fixed_large", "fixed_small")
#: The Γ cache of a checkpoint ``c`` is ``c`` + this.
CACHE_SUFFIX = ".analytic_gamma.pt"
_CACHE_FORMAT = 1
#: Trailing parts of a metric key that name a statistic or the cost of the metric, not the
#: metric itself (``nll_bpd_nfe`` → ``nll_bpd_analytic_nfe``).
_STATISTIC_TAILS = (
    "_estimator_stderr",
    "_stderr",
    "_std",
    "_seconds_per_image",
    "_seconds",
    "_nfe",
)
#: Bits/dim results that no reverse variance enters: the prior term L_T and the image count.
_VARIANCE_FREE_NLL_KEYS = frozenset({"nll_prior_bpd", "nll_num_images"})


@dataclass(frozen=True)
class AnalyticSettings:
    """How Γ is estimated (``analytic_variance`` in ``conf/eval.yaml`` and ``conf/sample.yaml``).

    Attributes:
        num_images: training images per timestep (one noise draw each); capped at the set's size.
        batch_size: (timestep, image) pairs per forward pass.
        seed: seeds the choice of images and the noise.
        data_half_range: (b − a)/2 for data in [a, b]: the paper's bound Var(x₀|xₜ) ≤ it²;
            None: no data bound.
        device: where Γ is estimated (``auto``: CUDA when available).
        progress: show a progress bar.
    """

    num_images: int = 256
    batch_size: int = 500
    seed: int = 0
    data_half_range: float | None = 1.0
    device: str = "auto"
    progress: bool = True

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> AnalyticSettings:
        """From a config node; missing keys take the defaults.

        Raises:
            ConfigError: a size below 2 (images) or 1 (batch), naming the key.
        """
        node = dict(node or {})
        unknown = sorted(set(node) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(
                f"unknown analytic_variance keys {unknown}: choose from "
                f"{sorted(cls.__dataclass_fields__)}"
            )
        settings = cls(**node)
        if int(settings.num_images) < 2:
            raise ConfigError(
                f"analytic_variance.num_images={settings.num_images}: Γ needs at least 2 images "
                "(and its standard error shrinks as 1/√num_images)"
            )
        if int(settings.batch_size) < 1:
            raise ConfigError(
                f"analytic_variance.batch_size={settings.batch_size}: give a positive integer"
            )
        return settings


@dataclass(frozen=True)
class VarianceChoice:
    """The variance a model is used with, as :func:`apply_inference_variance` set it.

    Attributes:
        name: the variance now in use (``fixed_large``, ``fixed_small``, ``analytic``, ...).
        trained: the checkpoint's own variance.
        suffix: ``""`` when they are the same, else ``"_" + name``: appended to the names of
            metrics that depend on the variance (:func:`tag_metrics`).
        gamma: for ``analytic``: ``path`` (cache file or None), ``reused``, ``num_images``,
            ``seed``, ``stderr_max`` and ``stderr_median`` (of Γ over the timesteps).
        gamma_table: for ``analytic``: Γₜ ``[T]`` float64 (unclipped).
        gamma_stderr: for ``analytic``: its standard error ``[T]`` float64.
    """

    name: str
    trained: str
    suffix: str = ""
    gamma: dict[str, Any] = field(default_factory=dict)
    gamma_table: torch.Tensor | None = None
    gamma_stderr: torch.Tensor | None = None

    def summary(self) -> dict[str, Any]:
        """What metrics.json records: ``variance`` (and ``analytic_gamma`` for analytic)."""
        out: dict[str, Any] = {"variance": self.name}
        if self.gamma:
            out["analytic_gamma"] = dict(self.gamma)
        return out

    def tag(self, metrics: Mapping[str, Any], uses_variance: bool = True) -> dict[str, Any]:
        """``metrics`` named for this variance (:func:`tag_metrics`) when they depend on it."""
        return tag_metrics(metrics, self.suffix if uses_variance else "")

    def tag_nll(self, result: Mapping[str, Any], estimator: str) -> dict[str, Any]:
        """The bound's results named for this variance: not the prior term L_T nor the image
        count (no variance in them), nor the ODE likelihood (it reads only ε̂)."""
        return tag_nll_metrics(result, self.suffix, estimator)

    def save_gamma(self, directory: str | Path) -> Path | None:
        """Write ``analytic_gamma.npz`` (``gamma``, ``stderr``: float64 ``[T]``, index 0 = the
        paper's t = 1) into ``directory``; None when the variance is not analytic."""
        if self.gamma_table is None or self.gamma_stderr is None:
            return None
        import numpy as np

        path = Path(directory) / "analytic_gamma.npz"
        np.savez(path, gamma=self.gamma_table.numpy(), stderr=self.gamma_stderr.numpy())
        return path


def tag_metrics(metrics: Mapping[str, Any], suffix: str) -> dict[str, Any]:
    """``metrics`` with ``suffix`` after each metric's name, before a trailing statistic.

    ``nll_bpd`` → ``nll_bpd_analytic``, ``nll_bpd_k8_stderr`` → ``nll_bpd_k8_analytic_stderr``,
    ``is_10k_std`` → ``is_10k_analytic_std``, ``test/loss`` → ``test/loss_analytic``; an empty
    suffix returns a copy.
    """
    if not suffix:
        return dict(metrics)
    tagged = {}
    for key, value in metrics.items():
        tail = next((t for t in _STATISTIC_TAILS if key.endswith(t)), "")
        tagged[f"{key[: len(key) - len(tail)]}{suffix}{tail}"] = value
    return tagged


def tag_nll_metrics(result: Mapping[str, Any], suffix: str, estimator: str) -> dict[str, Any]:
    """Bits/dim results (:meth:`~ddpm.metrics.bound.BitsPerDim.compute`) named for a variance
    (``suffix``, e.g. ``"_analytic"``): every key but the prior term L_T and the image count (no
    variance in them); nothing for ``estimator="ode"`` (the ODE reads only ε̂)."""
    if estimator == "ode":
        return dict(result)
    depends = {k: v for k, v in result.items() if k not in _VARIANCE_FREE_NLL_KEYS}
    fixed = {k: v for k, v in result.items() if k in _VARIANCE_FREE_NLL_KEYS}
    return {**fixed, **tag_metrics(depends, suffix)}


def model_fingerprint(diffusion: GaussianDiffusion, net: nn.Module) -> str:
    """sha256 (hex) of what ε̂ depends on: the βs (float64), the parameterisation and every
    tensor of ``net.state_dict()`` (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    digest.update(diffusion.betas_float64.cpu().contiguous().numpy().tobytes())
    digest.update(repr(diffusion.parameterization).encode())
    for name, tensor in sorted(net.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gamma_cache_path(
    ckpt_path: str | Path | None, cache_dir: str | Path | None, fingerprint: str
) -> Path | None:
    """``<ckpt>.analytic_gamma.pt`` beside a checkpoint, else
    ``<cache_dir>/analytic_gamma/<fingerprint[:16]>.pt``; None when neither is given."""
    if ckpt_path:
        return Path(str(ckpt_path) + CACHE_SUFFIX)
    if cache_dir:
        return Path(cache_dir) / "analytic_gamma" / f"{fingerprint[:16]}.pt"
    return None


def apply_inference_variance(
    diffusion: GaussianDiffusion,
    net: nn.Module,
    variance: str | None,
    settings: AnalyticSettings,
    *,
    dataset: Callable[[], Dataset],
    data_name: str,
    cache_path: Callable[[str], Path | None] | Path | None = None,
    log: Callable[[str], None] = print,
) -> VarianceChoice:
    """Swap ``diffusion``'s variance for ``variance`` (in place) and say what was done.

    Args:
        diffusion: the loaded model's diffusion (full T steps).
        net: its (EMA) network, in eval mode.
        variance: None (keep the checkpoint's own) or one of :data:`VARIANCE_CHOICES`.
        settings: how Γ is estimated (``analytic`` only).
        dataset: returns the training images without flips (float ``[C, H, W]`` items in
            [-1, 1]); called only when Γ has to be estimated.
        data_name: names that data set in the cache key (e.g. the datamodule's class).
        cache_path: the Γ cache file, or a function of the model's fingerprint that returns it
            (:func:`gamma_cache_path`); None: no cache.
        log: where progress lines go.

    Returns:
        :class:`VarianceChoice`.

    Raises:
        ConfigError: an unknown variance, or a learned-variance checkpoint (its network predicts
            its own variance), naming the fix.
    """
    trained = diffusion.variance.name
    if variance is None:
        return VarianceChoice(trained, trained)
    variance = str(variance)
    if variance not in VARIANCE_CHOICES:
        raise ConfigError(
            f"unknown variance={variance}: choose one of {list(VARIANCE_CHOICES)}, or leave "
            "variance out for the checkpoint's own"
        )
    if diffusion.variance.learned:
        raise ConfigError(
            f"variance={variance} needs a model trained with a fixed variance (fixed_large or "
            f"fixed_small); this one was trained with variance={trained}, whose network predicts "
            "its own σₜ², so there is nothing to replace. Leave variance=... out to use the "
            "learned variance"
        )
    if variance == trained:
        return VarianceChoice(trained, trained)
    if variance != AnalyticVariance.name:
        diffusion.use_variance(variance)
        return VarianceChoice(variance, trained, f"_{variance}")
    gamma, stderr, info = _gamma(diffusion, net, settings, dataset, data_name, cache_path, log)
    try:
        diffusion.use_variance(AnalyticVariance(gamma, settings.data_half_range))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    log(
        f"analytic variance: Γ on {info['num_images']} training images per step, standard error "
        f"≤ {info['stderr_max']:.2g} (median {info['stderr_median']:.2g})"
    )
    name = AnalyticVariance.name
    return VarianceChoice(name, trained, f"_{name}", info, gamma, stderr)


def apply_configured_variance(
    cfg: DictConfig,
    diffusion: GaussianDiffusion,
    net: nn.Module,
    run_cfg: DictConfig | None,
    sampler: str | None = None,
    log: Callable[[str], None] = print,
    override: str | None = None,
) -> VarianceChoice:
    """:func:`apply_inference_variance` as ``src/eval.py`` and ``src/sample.py`` configure it.

    Reads ``cfg.variance`` (a ``conf/variance/`` node, or absent/None for the checkpoint's
    own) and ``cfg.analytic_variance``; the Γ cache lies beside
    ``cfg.ckpt_path`` (a released model: under ``cfg.paths.cache_dir``); the training images
    are the ``reference_dataset()`` (training set, no flips) of the run's data config
    (``cfg.pretrained_data`` for a released model), at ``cfg.data_dir`` when given.

    Args:
        sampler: the one sampler the caller samples with, when it does nothing else: a variance
            given with a sampler that ignores it (all but ``ancestral``) is then refused.
        override: this variance in place of ``cfg.variance`` (``nll.likelihoods``'s
            ``analytic``); None: read ``cfg.variance``.

    Raises:
        ConfigError: see :func:`apply_inference_variance`; a sampler that ignores the variance.
    """
    node = cfg.get("variance")
    variance = node.get("name") if isinstance(node, DictConfig) else node
    if override is not None:
        variance = override
    if variance is not None and sampler is not None and sampler != "ancestral":
        raise ConfigError(
            f"variance={variance} sets the noise of the ancestral sampler; sampler={sampler} "
            "does not use the variance. Use sampler=ancestral (steps=... respaces it), or drop "
            "variance=..."
        )
    if variance is None:  # nothing to change: read the name only (stand-ins may have none)
        own = str(getattr(getattr(diffusion, "variance", None), "name", "unknown"))
        return VarianceChoice(own, own)
    data_node = run_cfg.data if run_cfg is not None else cfg.get("pretrained_data")

    def training_images() -> Dataset:
        from ddpm.builders import build_datamodule

        if data_node is None:
            raise ConfigError("variance=analytic needs the model's training data: none configured")
        data_cfg = OmegaConf.create(OmegaConf.to_container(data_node, resolve=True))
        if cfg.get("data_dir"):
            with open_dict(data_cfg):
                data_cfg.data_dir = str(cfg.data_dir)
        return build_datamodule(DictConfig({"data": data_cfg})).reference_dataset()

    cache_dir = OmegaConf.select(cfg, "paths.cache_dir", default=None)
    return apply_inference_variance(
        diffusion,
        net,
        variance,
        AnalyticSettings.from_config(_plain(cfg.get("analytic_variance"))),
        dataset=training_images,
        data_name=str(data_node.get("_target_", "data")) if data_node is not None else "none",
        cache_path=lambda fingerprint: gamma_cache_path(
            cfg.get("ckpt_path"), cache_dir, fingerprint
        ),
        log=log,
    )


# ---------------------------------------------------------------------------- Γ and its cache
def _gamma(
    diffusion: GaussianDiffusion,
    net: nn.Module,
    settings: AnalyticSettings,
    dataset: Callable[[], Dataset],
    data_name: str,
    cache_path: Callable[[str], Path | None] | Path | None,
    log: Callable[[str], None],
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Γ ``[T]`` and its standard error ``[T]`` (float64, CPU) from the cache or estimated now,
    and the summary for :attr:`VarianceChoice.gamma`."""
    fingerprint = model_fingerprint(diffusion, net)
    path = cache_path(fingerprint) if callable(cache_path) else cache_path
    key = {
        "format": _CACHE_FORMAT,
        "model": fingerprint,
        "data": str(data_name),
        "num_images": int(settings.num_images),
        "seed": int(settings.seed),
    }
    cached = _read_cache(path, key, diffusion.num_timesteps, log) if path else None
    if cached is not None:
        gamma, stderr, num_images = cached
        reused = True
        log(f"analytic variance: Γ from {path}")
    else:
        gamma, stderr, num_images = _estimate(diffusion, net, settings, dataset(), log)
        reused = False
        if path is not None and not _write_cache(
            path, key, gamma, stderr, num_images, settings, log
        ):
            path = None
    info = {
        "path": str(path) if path is not None else None,
        "reused": reused,
        "num_images": int(num_images),
        "seed": int(settings.seed),
        "stderr_max": float(stderr.max()),
        "stderr_median": float(stderr.median()),
    }
    return gamma, stderr, info


def _estimate(
    diffusion: GaussianDiffusion,
    net: nn.Module,
    settings: AnalyticSettings,
    dataset: Dataset,
    log: Callable[[str], None],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Γ on ``settings.num_images`` images of ``dataset`` (a seeded choice without replacement,
    all of them when it has no more), on ``settings.device``; the model is moved there for the
    estimate and back afterwards."""
    from ddpm.metrics.sampling import EvalMode

    size = len(dataset)  # type: ignore[arg-type]
    n = min(int(settings.num_images), size)
    if n < 2:
        raise ConfigError(f"variance=analytic needs at least 2 training images; the set has {size}")
    chooser = torch.Generator().manual_seed(int(settings.seed))
    indices = torch.randperm(size, generator=chooser)[:n].sort().values.tolist()
    x0 = torch.stack([_image(dataset[i]) for i in indices])
    device = _resolve_device(settings.device)
    home = diffusion.betas.device
    log(
        f"analytic variance: estimating Γ on {n} training images × {diffusion.num_timesteps} "
        f"steps ({n * diffusion.num_timesteps} network evaluations, {device})"
    )
    start = time.time()
    diffusion.to(device)
    net.to(device)
    try:
        generator = torch.Generator(device=device).manual_seed(int(settings.seed))
        with EvalMode(net):
            estimate = estimate_gamma(
                diffusion,
                net,
                x0,
                batch_size=int(settings.batch_size),
                generator=generator,
                progress=bool(settings.progress),
            )
    finally:
        diffusion.to(home)
        net.to(home)
    log(f"analytic variance: Γ estimated in {time.time() - start:.1f} s")
    return estimate.gamma, estimate.stderr, estimate.num_images


def _read_cache(
    path: Path, key: dict[str, Any], num_timesteps: int, log: Callable[[str], None]
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """The cached (Γ, stderr, images) when ``path`` holds an estimate for ``key``, else None
    (saying why, when a file is there)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        stored = dict(data["key"])
        gamma = data["gamma"].to(torch.float64)
        stderr = data["stderr"].to(torch.float64)
        num_images = int(data["num_images"])
    except Exception as err:  # a damaged or foreign file is replaced, never trusted
        log(f"analytic variance: ignoring unreadable cache {path} ({type(err).__name__})")
        return None
    differs = sorted(k for k in key if stored.get(k) != key[k])
    if differs or gamma.shape != (num_timesteps,) or stderr.shape != (num_timesteps,):
        what = ", ".join(differs) or "its length"
        log(f"analytic variance: cache {path} does not match ({what}); estimating again")
        return None
    return gamma, stderr, num_images


def _write_cache(
    path: Path,
    key: dict[str, Any],
    gamma: torch.Tensor,
    stderr: torch.Tensor,
    num_images: int,
    settings: AnalyticSettings,
    log: Callable[[str], None],
) -> bool:
    """Write the estimate atomically (temporary file, then rename); False when it could not be
    written (a read-only place only costs the cache, with a warning)."""
    record = {
        "key": key,
        "gamma": gamma,
        "stderr": stderr,
        "num_images": int(num_images),
        "batch_size": int(settings.batch_size),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(record, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports an unopenable file as Runtime
        log(f"analytic variance: could not cache Γ at {path} ({err}); not cached")
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return False
    log(f"analytic variance: Γ cached at {path}")
    return True


def _plain(node: Any) -> dict[str, Any]:
    """A config node (or None) as a plain dict."""
    if isinstance(node, DictConfig):
        return dict(OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]
    return dict(node or {})


def _image(item: Any) -> torch.Tensor:
    """A dataset item as float ``[C, H, W]`` in [-1, 1] (first element of a tuple; uint8 scaled)."""
    if isinstance(item, (list, tuple)):
        item = item[0]
    if item.dtype == torch.uint8:
        item = item.float() / 127.5 - 1.0
    return item


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
