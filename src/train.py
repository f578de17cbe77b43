"""Train a diffusion model: ``python src/train.py parameterization=eps loss=simple``.

Thin Hydra entry point; the work happens in :func:`ddpm.training.train`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ddpm.cli import run_cli
from ddpm.training import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run_cli(train, cfg)
    # Returned for Hydra sweepers (e.g. Optuna): the headline metric when there is one.
    for key in ("fid_50k", "fd_digits", "nll_bpd", "final_train_loss"):
        if key in metrics:
            return float(metrics[key])
    return None


if __name__ == "__main__":
    main()
