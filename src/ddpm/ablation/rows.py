"""The rows of the table: one per experiment config with a ``table_row`` block."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from omegaconf import OmegaConf

from ddpm.ablation.runs import ObjectiveKey, _select, objective_variant

__all__ = [
    "PAPER_SCHEDULE",
    "Objective",
    "experiment_of",
    "objectives",
    "parse_experiments",
    "parse_seeds",
]


@dataclass(frozen=True)
class Objective:
    """One objective row: the experiment config, its groups, its label and the paper's numbers.

    Paper numbers (CIFAR-10, linear schedule, T = 1000) are display strings: IS and FID from
    Table 2 of Ho et al. (2020), the test-set NLL bound from their Table 1; None where the paper
    has no number.
    """

    experiment: str
    parameterization: str
    variance: str
    loss: str
    label: str
    paper_is: str | None = None
    paper_fid: str | None = None
    paper_nll: str | None = None
    weighting: str = "none"
    variant: str = ""

    @property
    def key(self) -> ObjectiveKey:
        return (self.parameterization, self.variance, self.loss, self.weighting, self.variant)


@functools.lru_cache(maxsize=1)
def objectives() -> tuple[Objective, ...]:
    """The table's rows, from every ``conf/experiment/*.yaml`` with a ``table_row`` block, in
    their ``table_row.order``: each experiment is composed like ``src/train.py`` would, so the
    key is what the experiment really trains."""
    from ddpm.configs import compose_config, conf_dir

    found = []
    for file in sorted((conf_dir() / "experiment").glob("*.yaml")):
        row = OmegaConf.load(file).get("table_row")
        if row is None:
            continue
        cfg = compose_config([f"experiment={file.stem}"])
        paper = row.get("paper") or {}
        objective = Objective(
            experiment=file.stem,
            parameterization=str(cfg.parameterization.name),
            variance=str(cfg.variance.name),
            loss=str(cfg.loss.name),
            label=str(row.label),
            paper_is=paper.get("is"),
            paper_fid=paper.get("fid"),
            paper_nll=paper.get("nll"),
            weighting=str(_select(cfg, "weighting.name") or "none"),
            variant=objective_variant(cfg),
        )
        found.append((float(row.order), file.stem, objective))
    return tuple(objective for _, _, objective in sorted(found))


def experiment_of(key: ObjectiveKey | None) -> str:
    """The experiment config that trains ``key`` (``table2_eps_simple``), else the key joined
    with ``-`` (an objective no experiment config names), or ``"?"`` for no key."""
    for objective in objectives():
        if objective.key == key:
            return objective.experiment
    return "-".join(str(k) for k in key if k) if key else "?"


def parse_experiments(text: str) -> set[str]:
    """``"a,b"`` → ``{"a", "b"}`` (empty: every row).

    Raises:
        ValueError: a name that is no row of the table, listing the rows.
    """
    wanted = {e.strip() for e in text.split(",") if e.strip()}
    known = [o.experiment for o in objectives()]
    unknown = sorted(wanted - set(known))
    if unknown:
        raise ValueError(
            f"--experiments: unknown experiment(s) {', '.join(unknown)}: "
            f"choose from {', '.join(known)}"
        )
    return wanted


def parse_seeds(text: str, flag: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]`` for the command-line option ``flag`` (empty: none given).

    Raises:
        ValueError: a part that is not an integer, naming the option.
    """
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give integers, e.g. 0,1,2") from None


#: The schedule the paper's numbers were measured with.
PAPER_SCHEDULE = "linear"
