"""Train a diffusion model: ``python src/train.py parameterization=eps loss=simple``.

Thin Hydra entry point; the work happens in :func:`ddpm.tasks.train.run`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ddpm.configs import register_resolvers
from ddpm.tasks.common import exit_on_bad_command_line, run_task
from ddpm.tasks.train import objective_value, run

register_resolvers()  # ${run_stamp:} in conf/hydra/default.yaml


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Train; return ``metrics[cfg.optimized_metric]`` (by its exact name) for Hydra sweepers."""
    return objective_value(run_task(run, cfg))


if __name__ == "__main__":
    exit_on_bad_command_line("train")
    main()
