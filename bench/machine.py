"""The machine a benchmark runs on: load, CPU, git state (no torch needed)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.settings import ROOT


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def uptime_text() -> str | None:
    """The output of ``uptime`` (time, users, load), or None without the command."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_state() -> tuple[str | None, bool]:
    """(HEAD commit, whether tracked files have local changes); (None, False) outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            ).stdout.strip()
        )
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return None, False


def cpu_name() -> str:
    """The CPU model and the number of logical CPUs, e.g. ``AMD EPYC ×2 logical CPUs``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ×{os.cpu_count()} logical CPUs"
    return f"{platform.processor() or platform.machine()} ×{os.cpu_count()} logical CPUs"


def wait_for_load(max_load: float | None, max_wait_s: float, echo: Callable[[str], None]) -> None:
    """Wait (at most ``max_wait_s`` seconds) until the 1-minute load average is below ``max_load``.

    Polls every 15 s; ``max_load`` None returns at once.
    """
    if max_load is None:
        return
    deadline = time.monotonic() + max_wait_s
    while (load := loadavg()) and load[0] >= max_load and time.monotonic() < deadline:
        echo(f"load {load[0]:.2f} ≥ {max_load}: waiting")
        time.sleep(15)
