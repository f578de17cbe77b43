"""The W&B workspace of the ablation, as code: ``python -m ddpm.dashboard --entity E --project P``.

The panels are declared once, in :data:`SECTIONS`; every key they plot is a key that training
logs (``tests/test_dashboard.py`` checks this against a real run). Keys whose name carries the
evaluation protocol are written as placeholders and filled in from the run configuration the
dashboard is composed from (the same Hydra overrides as the sweep), with the project's own
naming function (:func:`ddpm.metrics.evaluate.sample_quality_names`):

- ``{fd}``: the Fréchet distance of the end-of-training sample-quality evaluation
  (``fid_10k_ddim100`` on CIFAR-10, ``fid_50k`` with ``+scale=paper``, ``fd_digits_1k_dpmpp15``
  on digits, ``fd_digits_5k_dpmpp15`` with ``+scale=cpu``);
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

from ddpm.dashboard.cli import main
from ddpm.dashboard.keys import (
    compose_run_config,
    group_keys,
    panel_keys,
    panel_patterns,
    resolve_sections,
    sample_quality_keys,
)
from ddpm.dashboard.panels import (
    FD_REGEX,
    GROUP_ORDER,
    IS_REGEX,
    SECTIONS,
    STEP_KEY,
    PanelSpec,
    SectionSpec,
    chart_table_key,
)
from ddpm.dashboard.workspace import (
    build_workspace,
    workspace_keys,
)

__all__ = [
    "FD_REGEX",
    "GROUP_ORDER",
    "IS_REGEX",
    "SECTIONS",
    "STEP_KEY",
    "PanelSpec",
    "SectionSpec",
    "build_workspace",
    "chart_table_key",
    "compose_run_config",
    "group_keys",
    "main",
    "panel_keys",
    "panel_patterns",
    "resolve_sections",
    "sample_quality_keys",
    "workspace_keys",
]
