"""The panels of the workspace, declared once: sections, panel specs, the keys' regexes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ddpm.diffusion.sampling import SAMPLER_TAGS
from ddpm.diffusion.spacing import SPACINGS

if TYPE_CHECKING:
    pass

__all__ = [
    "FD",
    "FD_CURVE",
    "FD_REGEX",
    "GROUP_ORDER",
    "IS",
    "IS_CURVE",
    "IS_REGEX",
    "LR",
    "SECTIONS",
    "STEP_KEY",
    "PanelSpec",
    "SectionSpec",
    "chart_table_key",
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

#: Placeholders in panel keys, filled from the run config by
#: :func:`ddpm.dashboard.keys.resolve_sections`.
FD, IS, LR = "{fd}", "{is}", "{lr}"
FD_CURVE, IS_CURVE = "{fd_curve}", "{is_curve}"

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
            PanelSpec("bar", "FID / fd (end of training)", (FD,)),
            PanelSpec("bar", "Inception score (end of training)", (IS,)),
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
            PanelSpec("line", "learning rate", (LR,)),
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
            PanelSpec("line", "FID / fd during training", (FD_CURVE,), regex=FD_REGEX),
            PanelSpec("line", "Inception score during training", (IS_CURVE,), regex=IS_REGEX),
        ),
    ),
)


def chart_table_key(key: str) -> str:
    """The history key of the table behind a ``wandb.plot`` chart logged under ``key``."""
    try:
        from wandb.plot.custom_chart import CustomChartSpec
    except ImportError:  # older wandb: the same convention
        return f"{key}_table"
    return CustomChartSpec(spec_name="", fields={}, string_fields={}, key=key).table_key
