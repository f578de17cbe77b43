"""Running phases (here or in a fresh process), the journal of finished phases, and ``main``."""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import bench
from bench.machine import cpu_name, git_state, loadavg, uptime_text, wait_for_load
from bench.report import markdown_report
from bench.rounds import benchmark_fixed_cost, benchmark_model
from bench.settings import DEFAULT_OUT, ENTRY_SCRIPT, OPTIONS, QUICK, TUNABLE, settings_for


def run_phase_here(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one phase in this process; errors become ``{"error": ...}``."""
    # Imported on first use: the parent of subprocess workers never needs Lightning or the model.
    import torch

    from bench.phases import PHASES

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    before = loadavg()
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp:
        spec = {**spec, "tmp_dir": tmp}
        try:
            result = PHASES[spec["phase"]](spec)
        except Exception as err:  # a failing option must not stop the benchmark
            result = {
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(limit=8),
            }
    result["loadavg_before"], result["loadavg_after"] = before, loadavg()
    return result


def run_phase_subprocess(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one phase in a fresh Python process (own max RSS, own compile state).

    ``timeout`` is in seconds; a phase that runs longer becomes ``{"error": ...}``.
    """
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, str(ENTRY_SCRIPT), "--worker", str(spec_path)]
        command += ["--worker-out", str(out_path)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if out_path.exists():
            return json.loads(out_path.read_text())
        return {
            "error": f"worker exited with code {proc.returncode}",
            "stderr_tail": proc.stderr[-3000:],
        }


class Journal:
    """Every finished phase of a run, appended to ``path`` so an interrupted run can continue.

    A phase is keyed by its spec (without its temporary directory); with ``resume`` the results
    already in the file are reused, otherwise the file starts empty.
    """

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        if resume and path.exists():
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError, KeyError):
                    record = json.loads(line)
                    self.done[record["key"]] = record["result"]
        elif path.exists():
            path.unlink()

    @staticmethod
    def key(spec: dict[str, Any]) -> str:
        """The spec as sorted JSON, without ``tmp_dir``."""
        return json.dumps({k: spec.get(k) for k in sorted(spec) if k != "tmp_dir"}, sort_keys=True)

    def record(self, key: str, result: dict[str, Any]) -> None:
        """Append a finished phase's result (failed phases are not kept: a resume retries them)."""
        if "error" not in result:
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "result": result}) + "\n")

    def remove(self) -> None:
        """Delete the file once the run's results are written."""
        self.path.unlink(missing_ok=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of ``bench/bench.py`` (``--help`` lists every setting)."""
    parser = argparse.ArgumentParser(description=(bench.__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--models", nargs="+", default=["ddpm_cifar10", "small"])
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    parser.add_argument("--quick", action="store_true", help="smoke mode: a few steps of each")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="directory for <device>.json/.md")
    parser.add_argument(
        "--batch",
        action="append",
        default=[],
        metavar="MODEL=N",
        help="batch size for a model (default: 8 for the paper UNet on the CPU, 64 for small)",
    )
    for name in TUNABLE:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="extra Hydra override, e.g. module.ema_decay=0.999",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--in-process", action="store_true", help="run phases in this process")
    parser.add_argument("--no-sync-check", action="store_true")
    parser.add_argument(
        "--no-fixed-cost",
        action="store_true",
        help="skip measuring Lightning's fixed cost per step (model=tiny, batch 1)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the phases an interrupted run with the same arguments already finished",
    )
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per phase")
    parser.add_argument(
        "--max-load",
        type=float,
        default=None,
        help="before each phase, wait until the 1-minute load average is below this",
    )
    parser.add_argument(
        "--max-wait", type=float, default=600.0, help="longest wait before a phase, seconds"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _echo(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _meta(
    args: argparse.Namespace, argv: Sequence[str] | None, device: str, resumed_phases: int
) -> dict[str, Any]:
    """What the report says about the run: command, machine, versions, load, git state."""
    import lightning
    import torch

    commit, dirty = git_state()
    return {
        "started": _utc_now(),
        "command": " ".join(
            ["python bench/bench.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "quick": args.quick,
        "in_process": args.in_process,
        "resumed_phases": resumed_phases,
        "uptime_start": uptime_text(),
        "loadavg_start": loadavg(),
        "cpu": cpu_name(),
        "num_threads": args.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "cuda_device": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        "git_commit": commit,
        "git_dirty": dirty,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the results also written to ``<out>/<device>.json``."""
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        result = run_phase_here(spec)
        Path(args.worker_out).write_text(json.dumps(result))
        return result

    import torch

    device = str(torch.device(args.device))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    batches = {}
    for item in args.batch:
        name, _, value = item.partition("=")
        batches[name] = int(value)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = device.replace(":", "")
    journal = Journal(out / f".{name}.phases.jsonl", args.resume)
    if args.resume and journal.path.exists():
        _echo(f"resuming: {len(journal.done)} finished phases in {journal.path}")

    def run(spec: dict[str, Any]) -> dict[str, Any]:
        key = Journal.key(spec)
        if key in journal.done:
            _echo("  (result taken from the journal)")
            return journal.done[key]
        wait_for_load(args.max_load, args.max_wait, _echo)
        if args.in_process:
            result = run_phase_here(spec)
        else:
            result = run_phase_subprocess(spec, args.timeout)
        journal.record(key, result)
        return result

    meta = _meta(args, argv, device, resumed_phases=len(journal.done))
    results: dict[str, Any] = {"device": device, "meta": meta, "models": {}}
    for model in args.models:
        overrides = {"batch": batches.get(model), **{k: getattr(args, k) for k in TUNABLE}}
        try:
            settings = settings_for(device, model, args.quick, overrides)
            results["models"][model] = benchmark_model(
                model,
                device,
                args.options,
                settings,
                run,
                overrides=args.override,
                seed=args.seed,
                sync_check=not args.no_sync_check,
                echo=_echo,
                threads=args.threads,
            )
        except ValueError as err:
            results["models"][model] = {"error": str(err)}
            _echo(f"[{model}] {err}")
    if not args.no_fixed_cost:
        rounds = args.rounds or (QUICK["rounds"] if args.quick else 3)
        fixed = benchmark_fixed_cost(
            device, run, args.quick, rounds, seed=args.seed, threads=args.threads, echo=_echo
        )
        results["fixed_cost"] = fixed
        _add_fixed_cost_share(results["models"], fixed)
    results["meta"]["finished"] = _utc_now()
    results["meta"]["uptime_end"] = uptime_text()
    results["meta"]["loadavg_end"] = loadavg()

    (out / f"{name}.json").write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    report = markdown_report(results)
    (out / f"{name}.md").write_text(report)
    print(report)
    for model, res in results["models"].items():
        entry = res.get("options", {}).get("default", {})
        if "overhead_ratio" in entry:
            print(f"{model}: overhead ratio Lightning ÷ bare loop = {entry['overhead_ratio']:.3f}")
    journal.remove()
    _echo(f"wrote {out / f'{name}.json'} and {out / f'{name}.md'}")
    return results


def _add_fixed_cost_share(models: dict[str, Any], fixed: dict[str, Any]) -> None:
    """Add to each model's default entry the fixed cost as a percentage of its bare-loop step."""
    for res in models.values():
        entry = res.get("options", {}).get("default", {})
        if "error" not in fixed and "bare" in entry and "step_s" in entry["bare"]:
            step_ms = 1000.0 * entry["bare"]["step_s"]["median"]
            entry["fixed_cost_percent_of_step"] = 100.0 * fixed["fixed_cost_ms"] / step_ms
