"""Evaluate a trained run or a released model: ``python src/eval.py ckpt_path=…``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ddpm.configs import register_resolvers
from ddpm.tasks.common import exit_on_bad_command_line, run_task
from ddpm.tasks.evaluate import run

register_resolvers()  # ${run_stamp:} in conf/hydra/default.yaml


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_task(run, cfg)


if __name__ == "__main__":
    exit_on_bad_command_line("eval")
    main()
