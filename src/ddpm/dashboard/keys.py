"""The keys a workspace plots, from the run configuration of the sweep it is for."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ddpm.dashboard.panels import (
    FD,
    FD_CURVE,
    GROUP_ORDER,
    IS,
    IS_CURVE,
    LR,
    SECTIONS,
    STEP_KEY,
    SectionSpec,
    chart_table_key,
)

__all__ = [
    "compose_run_config",
    "group_keys",
    "panel_keys",
    "panel_patterns",
    "resolve_sections",
    "sample_quality_keys",
]


# --------------------------------------------------------------------------- keys from the config
def group_keys(cfg: DictConfig | Mapping[str, Any]) -> list[str]:
    """The W&B config keys runs are grouped by, e.g. ``["config.parameterization.name", ...]``.

    Training logs the resolved run config under the W&B config key ``config`` (see
    :func:`ddpm.tasks.train.run`), so a group's choice is ``config.<group>.name``. Groups of
    :data:`GROUP_ORDER` missing from ``cfg`` are skipped.
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    return [
        f"config.{group}.name"
        for group in GROUP_ORDER
        if OmegaConf.select(cfg, f"{group}.name", default=None) is not None
    ]


def sample_quality_keys(cfg: DictConfig) -> dict[str, list[str]]:
    """The sample-quality keys the run of ``cfg`` logs, named as the callbacks name them.

    Returns:
        ``{"fd": [...], "is": [...], "fd_curve": [...], "is_curve": [...]}``: Fréchet distance
        and Inception score (its ``_std`` left out) of the end-of-training evaluations of
        ``cfg.callbacks`` (:class:`~ddpm.callbacks.SampleQualityCallback` with
        ``on_train_end``), and ``*_curve`` of every scheduled one, periodic included. Duplicates
        are merged, callback order is kept.
    """
    from hydra.utils import get_class, instantiate

    from ddpm.callbacks import SampleQualityCallback
    from ddpm.metrics.evaluate import sample_quality_names

    num_timesteps = int(cfg.schedule.num_timesteps)
    keys: dict[str, list[str]] = {"fd": [], "is": [], "fd_curve": [], "is_curve": []}
    for node in (cfg.get("callbacks") or {}).values():
        if not node or "_target_" not in node:
            continue
        if not issubclass(get_class(node._target_), SampleQualityCallback):
            continue
        callback = instantiate(node)  # cheap: the feature network is built in setup()
        if not callback.scheduled:
            continue
        kind = _extractor_kind(callback.feature_extractor, cfg)
        # The callback's own naming function, so a renamed metric renames the panel too.
        names = sample_quality_names(kind, callback.num_samples, callback.sampler, num_timesteps)
        fd_name = names["fd"]
        is_names = [names["is"]] if callback.compute_is and _has_logits(kind) else []
        for suffix in ("_curve", "") if callback.run_on_train_end else ("_curve",):
            keys[f"fd{suffix}"].append(fd_name)
            keys[f"is{suffix}"].extend(is_names)
    return {k: list(dict.fromkeys(v)) for k, v in keys.items()}


def _extractor_kind(kind: str, cfg: DictConfig) -> str:
    """The callback's feature extractor; ``"auto"`` as in ``resolve_extractor_kind``."""
    if kind != "auto":
        return kind
    from hydra.utils import get_class

    from ddpm.data.digits import DigitsDataModule

    target = OmegaConf.select(cfg, "data._target_", default=None)
    return "digits" if target and issubclass(get_class(target), DigitsDataModule) else "inception"


def _has_logits(kind: str) -> bool:
    """Whether the feature extractor yields class logits (needed for the Inception score)."""
    if kind == "digits":
        from ddpm.metrics.digits_classifier import DigitsFeatureExtractor

        return bool(DigitsFeatureExtractor.has_logits)
    from ddpm.metrics.inception import InceptionFeatureExtractor

    return bool(InceptionFeatureExtractor.has_logits)


def _lr_key(cfg: DictConfig) -> str:
    """LearningRateMonitor's key: ``lr-<optimiser class>`` for the single parameter group."""
    target = str(OmegaConf.select(cfg, "optimizer._target_", default="torch.optim.Adam"))
    return f"lr-{target.rsplit('.', 1)[-1]}"


def resolve_sections(
    cfg: DictConfig, sections: Sequence[SectionSpec] = SECTIONS
) -> list[SectionSpec]:
    """``sections`` with the placeholders filled in from ``cfg``; empty panels and sections dropped."""
    quality = sample_quality_keys(cfg)
    fill = {
        FD: quality["fd"],
        IS: quality["is"],
        FD_CURVE: quality["fd_curve"],
        IS_CURVE: quality["is_curve"],
        LR: [_lr_key(cfg)],
    }
    resolved = []
    for section in sections:
        panels = []
        for panel in section.panels:
            keys = [k for key in panel.keys for k in fill.get(key, [key])]
            if keys:
                panels.append(replace(panel, keys=tuple(dict.fromkeys(keys))))
        if panels:
            resolved.append(replace(section, panels=tuple(panels)))
    return resolved


def panel_keys(cfg: DictConfig, sections: Sequence[SectionSpec] = SECTIONS) -> set[str]:
    """Every key of the W&B run history that a panel plots for runs of ``cfg``.

    That is the panels' keys with the placeholders filled in, the x axis of the curves, and for
    a chart logged with ``wandb.plot`` (``nll_terms``) the table W&B stores it as
    (``nll_terms_table``).
    """
    keys: set[str] = set()
    for section in resolve_sections(cfg, sections):
        for panel in section.panels:
            if panel.kind == "table_line":
                keys.update(chart_table_key(key) for key in panel.keys)
            else:
                keys.update(panel.keys)
            if panel.kind == "line":
                keys.add(STEP_KEY)
    return keys


def panel_patterns(cfg: DictConfig, sections: Sequence[SectionSpec] = SECTIONS) -> set[str]:
    """Every regular expression a line panel plots matching keys of."""
    return {
        p.regex for s in resolve_sections(cfg, sections) for p in s.panels if p.regex is not None
    }


def compose_run_config(overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides`` (the sweep's), as the runs were."""
    from ddpm.configs import compose_config

    return compose_config(overrides)
