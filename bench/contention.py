"""Two training runs on one machine's CPU cores: how much does each slow down, per thread setting?

    python bench/contention.py [--seconds 30] [--settings default passive one_thread]

For each setting, the quickstart model (``experiment=quickstart``: tiny UNet, digits, batch 128)
trains alone, then as two identical processes started together; each process reports its
optimiser steps per second over a fixed wall-clock window after a warm-up. The table goes to
``bench/results/cpu-contention.{json,md}``. Settings are environment variables of the training
processes:

- ``default``: nothing set (torch's own choice: one OpenMP thread per core, spin-waiting);
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep instead of spinning);
- ``one_thread``: ``OMP_NUM_THREADS=1``;
- ``spin_1k`` / ``spin_30k``: ``GOMP_SPINCOUNT=1000`` / ``30000`` (how long an idle thread spins
  before it sleeps; libgomp's default is 300000 without a wait policy);
- ``project``: nothing set, and the project's :class:`~ddpm.cpu_threads.CPUThreadGovernor` (in
  every training run's callbacks), which gives each run its share of the cores other processes
  leave free.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
ROOT = _HERE.parent

SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one_thread": {"OMP_NUM_THREADS": "1"},
    "spin_1k": {"GOMP_SPINCOUNT": "1000"},
    "spin_30k": {"GOMP_SPINCOUNT": "30000"},
    "project": {"DDPM_BENCH_GOVERNOR": "1"},
}


def _worker(seconds: float, warmup: int) -> None:
    """Train the quickstart model for ``seconds`` after ``warmup`` steps; print steps/s as JSON."""
    import lightning.pytorch as pl
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.workload import bench_trainer, compose_config, quiet_lightning, synthetic_loader
    from ddpm.builders import build_module

    quiet_lightning()
    cfg = compose_config("tiny", "default", ["experiment=quickstart"])
    torch.manual_seed(0)
    module = build_module(cfg, (1, 8, 8))

    class Window(pl.Callback):
        def __init__(self) -> None:
            self.start: tuple[int, float] | None = None
            self.rate = float("nan")
            self.threads = 0

        def on_train_batch_end(self, trainer, *args: Any) -> None:
            step, now = trainer.global_step, time.perf_counter()
            if step == warmup:
                self.start = (step, now)
            elif self.start is not None and now - self.start[1] >= seconds:
                self.rate = (step - self.start[0]) / (now - self.start[1])
                self.threads = torch.get_num_threads()  # at the end of the window
                trainer.should_stop = True

    window = Window()
    callbacks: list[pl.Callback] = [window]
    if os.environ.get("DDPM_BENCH_GOVERNOR"):
        from ddpm.cpu_threads import CPUThreadGovernor

        callbacks.insert(0, CPUThreadGovernor())
    trainer = bench_trainer(
        cfg, torch.device("cpu"), 10**9, log_every_n_steps=50, callbacks=callbacks,
        root_dir=str(ROOT / ".bench_tmp"),
    )  # fmt: skip
    loader = synthetic_loader((1, 8, 8), int(cfg.data.batch_size), 512, 0, "cpu")
    trainer.fit(module, train_dataloaders=loader)
    print(json.dumps({"steps_per_s": window.rate, "threads": window.threads}))


def _run(setting: str, copies: int, seconds: float, warmup: int) -> list[dict[str, Any]]:
    chosen = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    env = {k: v for k, v in os.environ.items() if k not in chosen}
    env.update(SETTINGS[setting])
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--seconds",
        str(seconds),
        "--warmup",
        str(warmup),
    ]
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        for _ in range(copies)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed ({setting}, {copies} copies)")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=30.0, help="timed window per process")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu-contention")
    args = parser.parse_args()
    if args.worker:
        _worker(args.seconds, args.warmup)
        return
    rows = []
    for setting in args.settings:
        alone = _run(setting, 1, args.seconds, args.warmup)[0]
        pair = _run(setting, 2, args.seconds, args.warmup)
        row = {
            "setting": setting,
            "env": SETTINGS[setting],
            "threads": alone["threads"],
            "alone_steps_per_s": alone["steps_per_s"],
            "pair_steps_per_s": [p["steps_per_s"] for p in pair],
        }
        row["slowdown"] = alone["steps_per_s"] / min(row["pair_steps_per_s"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    cores = os.cpu_count()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"cpu_count": cores, "rows": rows}, indent=2)
    )
    lines = [
        f"Quickstart model, {args.seconds:.0f} s windows, {cores} CPU cores "
        f"(`python bench/contention.py --seconds {args.seconds:g}`).",
        "",
        "| setting | threads at the end (alone) | alone (steps/s) | each of two together (steps/s) | slowdown |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        pair = " / ".join(f"{v:.2f}" for v in r["pair_steps_per_s"])
        lines.append(
            f"| {r['setting']} | {r['threads']} | {r['alone_steps_per_s']:.2f} | {pair} | "
            f"{r['slowdown']:.1f}× |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
