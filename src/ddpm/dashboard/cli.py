"""``python -m ddpm.dashboard --entity E --project P [--dry-run] [overrides ...]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ddpm.dashboard.keys import compose_run_config, group_keys, resolve_sections
from ddpm.dashboard.panels import SectionSpec
from ddpm.dashboard.workspace import build_workspace
from ddpm.wandb_utils import wandb_has_credentials

if TYPE_CHECKING:
    pass

__all__ = ["main"]


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
    parser.add_argument(
        "--entity", default=None, help="W&B entity (user or team); not needed with --dry-run"
    )
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
        "protocol-bearing metric names (fd_digits_5k_dpmpp15, fid_10k_ddim100)",
    )
    args = parser.parse_args(argv)
    if args.entity is None and not args.dry_run:
        parser.error("--entity is required to save a workspace (--dry-run needs none)")

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
        entity=args.entity or "<entity>",  # only a dry run gets here without one
        project=args.project,
        sweep_group=args.sweep_group,
        name=args.name,
    )
    if args.dry_run:
        return 0
    workspace.save()
    print(f"workspace: {workspace.url}")
    return 0
