"""The W&B workspace built from the resolved panels (``wandb-workspaces``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from ddpm.dashboard.keys import group_keys, resolve_sections
from ddpm.dashboard.panels import SECTIONS, STEP_KEY, PanelSpec, SectionSpec, chart_table_key

if TYPE_CHECKING:
    from wandb_workspaces.workspaces import Workspace

__all__ = ["build_workspace", "workspace_keys"]


# --------------------------------------------------------------------------- the workspace
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
            query={"summaryTable": {"tableKey": chart_table_key(key)}},
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
