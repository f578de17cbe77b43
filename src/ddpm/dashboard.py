"""The W&B workspace of the ablation, as code: ``python -m ddpm.dashboard --entity E --project P``.

The panels are declared once, in :data:`SECTIONS`; every key they plot is a key that training
logs (``tests/test_dashboard.py`` checks this against a real run). Keys whose name carries the
evaluation protocol are written as placeholders and filled in from the run configuration the
dashboard is composed from (the same Hydra overrides as the sweep), with the project's own
naming function (:func:`ddpm.metrics.evaluate.name_sample_quality`):

- ``{fd}``: the Fréchet distance of the end-of-training sample-quality evaluation
  (``fid_10k_ddim100`` on CIFAR-10, ``fid_50k`` with ``+scale=paper``, ``fd_digits_1k_dpmpp15``
  on digits, ``fd_digits_400`` with ``+scale=cpu``);
- ``{is}``: the Inception score next to it (Inception features only);
- ``{fd_curve}``, ``{is_curve}``: the same for every evaluation, periodic ones included;
- ``{lr}``: Lightning's ``LearningRateMonitor`` key for the configured optimiser (``lr-Adam``).

Curves of sample quality also match every protocol by regular expression (:data:`FD_REGEX`,
:data:`IS_REGEX`), so runs evaluated with other sizes still show up.

Runs are grouped by the config groups that define the objective and the schedule
(:data:`GROUP_ORDER`: parameterisation, variance, loss, weighting,
schedule); seeds fall inside a group, so bars and curves show the mean over seeds with the
standard error.

Needs the optional extra ``pip install -e '.[dashboard]'`` (``wandb-workspaces``) and W&B
credentials (``WANDB_API_KEY`` or ``wandb login``); ``--dry-run`` needs neither.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ddpm.diffusion.sampling import SAMPLER_TAGS, SPACINGS
from ddpm.wandb_utils import wandb_has_credentials

if TYPE_CHECKING:
    from wandb_workspaces.workspaces import Workspace

__all__ = [
    "FD_REGEX",
    "GROUP_ORDER",
    "IS_REGEX",
    "SECTIONS",
    "STEP_KEY",
    "PanelSpec",
    "SectionSpec",
    "build_workspace",
    "compose_run_config",
    "group_keys",
    "main",
    "panel_keys",
    "panel_patterns",
    "resolve_sections",
    "sample_quality_keys",
    "workspace_keys",
]

#: Config groups that tell runs apart, outermost first. A group takes part when the run config
#: has ``<group>.name``.
GROUP_ORDER: tuple[str, ...] = ("parameterization", "variance", "loss", "weighting", "schedule")

#: The x axis of every curve: WandbLogger logs each metric with the trainer's global step (W&B's
#: own ``_step`` counts log calls, which differ between metrics logged by callbacks).
STEP_KEY = "trainer/global_step"

# The protocol part of sample-quality names (ddpm.metrics.evaluate.metric_prefix): a sample
# count (``50k`` or ``400``), then optionally the sampler (``ddpm250``, ``ddim100``,
# ``ddim50_eta0p5``, ``dpmpp20``, ``heun9``) and a non-default spacing (``ddim50_uniform``).
# JavaScript-compatible: W&B evaluates panel regexes in the browser.
_PROTOCOL = (
    rf"_\d+k?(_({'|'.join(SAMPLER_TAGS.values())})\d+(_eta[0-9a-z.+-]+)?"
    rf"(_({'|'.join(SPACINGS)}))?)?$"
)
#: Every Fréchet-distance key, whatever the protocol: ``fid_50k``, ``fd_digits_1k_dpmpp15``.
FD_REGEX = r"^(fid|fd_digits)" + _PROTOCOL
#: Every Inception-score key (not its ``_std``): ``is_50k``, ``is_10k_ddim100``.
IS_REGEX = r"^is" + _PROTOCOL

_FD, _IS, _LR = "{fd}", "{is}", "{lr}"
_FD_CURVE, _IS_CURVE = "{fd_curve}", "{is_curve}"

PanelKind = Literal["bar", "line", "media", "table_line"]


@dataclass(frozen=True)
class PanelSpec:
    """One panel, by the keys it plots.

    Attributes:
        kind: ``"bar"`` (the summary value of each run group; mean ± standard error over seeds),
            ``"line"`` (curves against :data:`STEP_KEY`), ``"media"`` (logged images over the
            steps) or ``"table_line"`` (the line plot of a logged ``wandb.plot.line`` chart).
        title: panel title.
        keys: logged keys; the placeholders ``{fd}``, ``{is}``, ``{fd_curve}``, ``{is_curve}``
            and ``{lr}`` are filled in from the run config (see the module docstring). A panel
            whose keys fill in to nothing (no Inception score on digits) is left out.
        regex: line panels: also plot every key matching it (other evaluation protocols).
        log_y: logarithmic y axis.
        fields: table_line panels: the x and y columns of the logged table.
    """

    kind: PanelKind
    title: str
    keys: tuple[str, ...]
    regex: str | None = None
    log_y: bool = False
    fields: tuple[str, str] | None = None


@dataclass(frozen=True)
class SectionSpec:
    """A titled, collapsible section of the workspace.

    Attributes:
        name: section title.
        panels: its panels, in order.
        columns: also show the panels' keys as columns of the runs table.
    """

    name: str
    panels: tuple[PanelSpec, ...]
    columns: bool = False


#: The dashboard: the one place that names the keys its panels plot.
SECTIONS: tuple[SectionSpec, ...] = (
    SectionSpec(
        "Table 2: sample quality and bits/dim (objective × schedule, mean ± s.e. over seeds)",
        (
            PanelSpec("bar", "FID / fd (end of training)", (_FD,)),
            PanelSpec("bar", "Inception score (end of training)", (_IS,)),
            PanelSpec("bar", "NLL (bits/dim, full bound)", ("nll_bpd",)),
            PanelSpec(
                "bar",
                "bits/dim of the prior L_T and the decoder L_0",
                ("nll_prior_bpd", "nll_decoder_bpd"),
            ),
        ),
        columns=True,
    ),
    SectionSpec(
        "Training: loss per quartile of t, learning rate, gradient norm",
        (
            PanelSpec("line", "training loss", ("train/loss",), log_y=True),
            PanelSpec(
                "line",
                "loss per quartile of t (q0: t < T/4 ... q3: t >= 3T/4)",
                tuple(f"train/loss_q{q}" for q in range(4)),
                log_y=True,
            ),
            PanelSpec("line", "learning rate", (_LR,)),
            PanelSpec("line", "gradient norm", ("train/grad_norm",), log_y=True),
            PanelSpec(
                "line", "validation loss (EMA, fixed t and noise)", ("val/loss",), log_y=True
            ),
        ),
    ),
    SectionSpec(
        "Terms of the bound per timestep",
        (
            PanelSpec(
                "table_line",
                "L_t (bits/dim) against t on held-out images, last evaluation",
                ("nll_terms",),
                fields=("t", "bpd"),
            ),
        ),
    ),
    SectionSpec(
        "Sample grids over training (fixed noise)",
        (PanelSpec("media", "samples of the EMA model", ("samples",)),),
    ),
    SectionSpec(
        "Sample quality during training",
        (
            PanelSpec("line", "FID / fd during training", (_FD_CURVE,), regex=FD_REGEX),
            PanelSpec("line", "Inception score during training", (_IS_CURVE,), regex=IS_REGEX),
        ),
    ),
)


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
        _FD: quality["fd"],
        _IS: quality["is"],
        _FD_CURVE: quality["fd_curve"],
        _IS_CURVE: quality["is_curve"],
        _LR: [_lr_key(cfg)],
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
                keys.update(_chart_table_key(key) for key in panel.keys)
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


# --------------------------------------------------------------------------- the workspace
def _chart_table_key(key: str) -> str:
    """The history key of the table behind a ``wandb.plot`` chart logged under ``key``."""
    try:
        from wandb.plot.custom_chart import CustomChartSpec
    except ImportError:  # older wandb: the same convention
        return f"{key}_table"
    return CustomChartSpec(spec_name="", fields={}, string_fields={}, key=key).table_key


def _build_panel(panel: PanelSpec) -> Any:
    import wandb_workspaces.reports.v2 as wr

    if panel.kind == "bar":
        return wr.BarPlot(
            title=panel.title,
            metrics=list(panel.keys),
            orientation="v",
            groupby_aggfunc="mean",
            groupby_rangefunc="stderr",
        )
    if panel.kind == "line":
        return wr.LinePlot(
            title=panel.title,
            x=STEP_KEY,
            y=list(panel.keys),
            metric_regex=panel.regex,
            log_y=panel.log_y or None,
            groupby_aggfunc="mean",
            groupby_rangefunc="stderr",
        )
    if panel.kind == "media":
        return wr.MediaBrowser(title=panel.title, media_keys=list(panel.keys), gallery_axis="step")
    if panel.kind == "table_line":
        (key,) = panel.keys
        x, y = panel.fields or ("x", "y")
        return wr.CustomChart(
            query={"summaryTable": {"tableKey": _chart_table_key(key)}},
            chart_name="wandb/line/v0",  # the spec wandb.plot.line logs with
            chart_fields={"x": x, "y": y},
            chart_strings={"title": panel.title},
        )
    raise ValueError(f"unknown panel kind {panel.kind!r}")


def build_workspace(
    cfg: DictConfig,
    *,
    entity: str,
    project: str,
    sweep_group: str | None = None,
    name: str | None = None,
    sections: Sequence[SectionSpec] = SECTIONS,
) -> Workspace:
    """The workspace object for runs of ``cfg`` (nothing is sent; call ``.save()`` for that).

    Args:
        cfg: a composed training config (:func:`compose_run_config`): fills in the protocol
            names and the config groups.
        entity, project: where the workspace is saved.
        sweep_group: show only runs of this W&B group (the logger's ``group``, by default the
            ``task_name``: ``ablation``, ``ablation_cpu``, ``quickstart_optuna``).
        name: workspace name (default: from project and group).
    """
    import wandb_workspaces.workspaces as ws

    resolved = resolve_sections(cfg, sections)
    columns = [f"summary:{k}" for s in resolved if s.columns for p in s.panels for k in p.keys]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name or f"ddpm-lab: {sweep_group or project}",
        sections=[
            ws.Section(name=s.name, panels=[_build_panel(p) for p in s.panels], is_open=True)
            for s in resolved
        ],
        settings=ws.WorkspaceSettings(x_axis=STEP_KEY, max_runs=100),
        runset_settings=ws.RunsetSettings(
            groupby=[ws.Config(key) for key in group_keys(cfg)],
            filters=ws.And(ws.Metric("Group") == sweep_group) if sweep_group else "",
            # The seed of each run next to its Table 2 values (runs are grouped without it).
            pinned_columns=[_config_column("config.seed"), *columns],
        ),
    )


def _config_column(key: str) -> str:
    """The runs-table column of a nested W&B config key (``config.seed`` → its backend path)."""
    from wandb_workspaces import expr

    backend = expr.groupby_str_to_key(f"config.{key}")
    return f"{backend.section}:{backend.name}"


def workspace_keys(workspace: Workspace) -> tuple[set[str], set[str]]:
    """``(keys, regexes)`` that the panels of a built workspace read, taken from the object."""
    import wandb_workspaces.reports.v2 as wr

    keys: set[str] = set()
    regexes: set[str] = set()
    for section in workspace.sections:
        for panel in section.panels:
            if isinstance(panel, wr.LinePlot):
                keys.update(_metric_name(m) for m in [panel.x, *panel.y])
                if panel.metric_regex:
                    regexes.add(panel.metric_regex)
            elif isinstance(panel, wr.BarPlot):
                keys.update(_metric_name(m) for m in panel.metrics)
            elif isinstance(panel, wr.MediaBrowser):
                keys.update(panel.media_keys)
            elif isinstance(panel, wr.CustomChart):
                keys.add(panel.query["summaryTable"]["tableKey"])
            else:
                raise TypeError(f"workspace_keys does not know {type(panel).__name__}")
    return keys, regexes


def _metric_name(metric: Any) -> str:
    return metric if isinstance(metric, str) else str(metric.name)


# --------------------------------------------------------------------------- command line
def _describe(cfg: DictConfig, sections: Iterable[SectionSpec]) -> str:
    lines = [f"grouped by: {', '.join(group_keys(cfg))}"]
    for section in sections:
        lines.append(f"[{section.name}]")
        for panel in section.panels:
            regex = f"  (and /{panel.regex}/)" if panel.regex else ""
            lines.append(f"  {panel.kind:10s} {panel.title}: {', '.join(panel.keys)}{regex}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ddpm.dashboard --entity E --project P [--sweep-group G] [overrides ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m ddpm.dashboard",
        description="Save the ddpm-lab W&B workspace (Table 2, training curves, bound terms, "
        "sample grids, sample quality) for the runs of a project.",
    )
    parser.add_argument("--entity", required=True, help="W&B entity (user or team)")
    parser.add_argument("--project", default="ddpm-lab", help="W&B project (default ddpm-lab)")
    parser.add_argument(
        "--sweep-group",
        default=None,
        help="only runs of this W&B group: the sweep's task_name (ablation, ablation_cpu, "
        "quickstart_optuna) or its logger.wandb.group=...",
    )
    parser.add_argument("--name", default=None, help="workspace name")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the panels and their keys; save nothing (no credentials needed)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides of the sweep (e.g. data=digits +scale=cpu): they fix the "
        "protocol-bearing metric names (fd_digits_400, fid_10k_ddim100)",
    )
    args = parser.parse_args(argv)

    # Refuse before anything can reach the network: saving a workspace needs an account.
    if not args.dry_run and not wandb_has_credentials():
        print(
            "error: no W&B credentials (set WANDB_API_KEY or run `wandb login`); a workspace "
            "is saved to the W&B server, so it cannot be written offline. "
            "`python -m ddpm.dashboard --dry-run ...` shows the panels without saving.",
            file=sys.stderr,
        )
        return 1
    try:
        cfg = compose_run_config(args.overrides)
        resolved = resolve_sections(cfg)
    except (HydraException, OmegaConfBaseException) as err:  # Hydra's message names the override
        print(f"error: cannot compose the run config: {err}", file=sys.stderr)
        return 1
    print(_describe(cfg, resolved))
    try:
        import wandb_workspaces  # noqa: F401
    except ImportError:
        if args.dry_run:
            return 0
        print(
            "error: the dashboard needs wandb-workspaces: pip install -e '.[dashboard]'",
            file=sys.stderr,
        )
        return 1
    workspace = build_workspace(
        cfg,
        entity=args.entity,
        project=args.project,
        sweep_group=args.sweep_group,
        name=args.name,
    )
    if args.dry_run:
        return 0
    workspace.save()
    print(f"workspace: {workspace.url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
