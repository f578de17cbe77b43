"""Summaries of the phases' raw timings, and the markdown report written next to the JSON."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def median_and_spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and relative interquartile range of ``values`` (seconds)."""
    values = sorted(values)
    median = statistics.median(values)
    if len(values) >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4)
    else:
        q1, q3 = values[0], values[-1]
    return {
        "median": median,
        "min": values[0],
        "max": values[-1],
        "iqr_rel": (q3 - q1) / median if median > 0 else math.nan,
        "n": len(values),
    }


def train_summary(runs: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """Pooled step time (s), images/s and peak memory (MiB) of one loop's training runs."""
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        return {"error": errors[0], "runs": runs}
    windows = [w for r in runs for w in r["step_s_windows"]]
    stats = median_and_spread(windows)
    between = [x for r in runs for x in r.get("between_batches_s", [])]
    return {
        "step_s": stats,
        "images_per_s": batch / stats["median"],
        "between_batches_ms": 1000 * statistics.median(between) if between else math.nan,
        "first_step_s": [r["first_step_s"] for r in runs],
        "peak_memory_mib": max(r["peak_memory_mib"] for r in runs),
        "peak_memory_kind": runs[0]["peak_memory_kind"],
        "loadavg": [[r["loadavg_before"], r["loadavg_after"]] for r in runs],
        "runs": runs,
    }


def compare_loops(
    lightning_runs: list[dict[str, Any]], bare_runs: list[dict[str, Any]], batch: int
) -> dict[str, Any]:
    """One option's entry: both loops' summaries and, if both ran, the overhead of Lightning.

    ``lightning_runs[k]`` and ``bare_runs[k]`` are round ``k``'s two runs. Ratios are of seconds
    per step (Lightning ÷ bare), ``*_ms`` milliseconds, ``*_percent`` percentages of a bare step.
    """
    entry: dict[str, Any] = {
        "lightning": train_summary(lightning_runs, batch),
        "bare": train_summary(bare_runs, batch),
    }
    light, bare = entry["lightning"], entry["bare"]
    if "error" in light or "error" in bare:
        return entry
    # Each round compares two runs made back to back, so the median over rounds of the
    # per-round ratios is robust to a change of load (or an odd process) in one round.
    entry["overhead_ratio_per_round"] = [
        statistics.median(lr["step_s_windows"]) / statistics.median(br["step_s_windows"])
        for lr, br in zip(lightning_runs, bare_runs)
    ]
    entry["overhead_ratio"] = statistics.median(entry["overhead_ratio_per_round"])
    entry["overhead_ratio_pooled"] = light["step_s"]["median"] / bare["step_s"]["median"]
    # Host time between one batch's end and the next one's start: the data fetch in
    # both loops, plus Lightning's per-step bookkeeping. Small and far less noisy than
    # the step time, so it bounds the overhead from below when the load is high.
    extra_ms = light["between_batches_ms"] - bare["between_batches_ms"]
    entry["between_batches_extra_ms"] = extra_ms
    entry["between_batches_extra_percent"] = 100.0 * extra_ms / (1000.0 * bare["step_s"]["median"])
    ema_s = statistics.median([t for r in bare_runs for t in r["ema_update_s"]])
    entry["ema_update_s"] = ema_s
    entry["ema_percent_of_step"] = 100.0 * ema_s / bare["step_s"]["median"]
    return entry


def eval_summary(result: dict[str, Any]) -> dict[str, Any]:
    """Sampling throughput (image·NFE/s) and bits/dim throughput (image·term/s) of an eval run."""
    if "error" in result:
        return result
    out: dict[str, Any] = {}
    for sampler in ("ancestral", "ddim"):
        r = result[sampler]
        stats = median_and_spread(r["chain_s"])
        out[sampler] = {
            "chain_s": stats,
            "nfe": r["nfe"],
            "batch": r["batch"],
            "image_nfe_per_s": r["batch"] * r["nfe"] / stats["median"],
            "s_per_nfe": stats["median"] / r["nfe"],
        }
    r = result["bpd"]
    stats = median_and_spread(r["eval_s"])
    throughput = r["batch"] * r["terms"] / stats["median"]
    out["bpd"] = {
        "eval_s": stats,
        "terms": r["terms"],
        "batch": r["batch"],
        "image_terms_per_s": throughput,
        "full_bound_s_per_image": r["full_bound_terms"] / throughput,
        "full_bound_terms": r["full_bound_terms"],
    }
    out["peak_memory_mib"] = result["peak_memory_mib"]
    out["peak_memory_kind"] = result["peak_memory_kind"]
    out["loadavg"] = [result["loadavg_before"], result["loadavg_after"]]
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def _header_lines(results: dict[str, Any]) -> list[str]:
    """Title, the run's metadata, and what each column means."""
    meta = results["meta"]
    return [
        f"# Benchmark results: {results['device']}",
        "",
        f"- Date: {meta['started']} → {meta['finished']} (UTC)",
        f"- Command: `{meta['command']}`",
        f"- Machine: {meta['cpu']}, {meta['num_threads']} torch threads; "
        f"torch {meta['torch']}, lightning {meta['lightning']}, Python {meta['python']}",
        f"- Git commit: {meta['git_commit'] or 'unknown'}"
        + (" (+ local changes)" if meta.get("git_dirty") else ""),
        f"- Load at start: `{meta['uptime_start']}`",
        f"- Load at end: `{meta['uptime_end']}`",
        f"- Mode: {'quick (smoke test; numbers are not meaningful)' if meta['quick'] else 'full'}"
        f"; phases {'in one process' if meta['in_process'] else 'each in a fresh process'}"
        + (
            f"; {meta['resumed_phases']} phases reused from an interrupted run (--resume)"
            if meta.get("resumed_phases")
            else ""
        ),
        "",
        "Training: median seconds per step over timed windows after warm-up (all rounds pooled); "
        "images/s = batch ÷ median step. Overhead = Lightning step ÷ bare-loop step (1.00 = none), "
        "the median over rounds of the ratio within each round (two runs back to back). "
        "Between-batch host ms: median host time from the end of one step to the start of the "
        "next (the data fetch in both loops, plus Lightning's per-step bookkeeping); its excess "
        "over the bare loop, as % of a step, is a low-noise measure of Lightning's loop overhead. "
        "EMA % = one EMA update ÷ bare-loop step. Sampling: image·NFE/s = batch × network "
        "evaluations ÷ chain time (a full T-step ancestral chain yields that ÷ T images/s). "
        "Bits/dim: image·term/s of the bound (the full bound has T terms per image). "
        "Memory: peak of the phase "
        + (
            "(CUDA max_memory_allocated)."
            if results["device"].startswith("cuda")
            else "(process max RSS, including Python and the libraries)."
        ),
        "",
    ]


def _training_lines(res: dict[str, Any], fixed: dict[str, Any]) -> list[str]:
    """One model's settings, its training table, parameter count and share of fixed cost."""
    s = res["settings"]
    lines = [
        f"Settings: warm-up {s['warmup']} steps, {s['windows']} windows × {s['window']} steps, "
        f"{s['rounds']} round(s) each of Lightning and bare loop; sampling chains of "
        f"{s['sample_steps']} NFE × {s['sample_repeats']}; bits/dim over {s['bpd_terms']} "
        f"terms × {s['bpd_repeats']}.",
        "",
        "| option | Lightning img/s | bare img/s | overhead L÷bare (per round) "
        "| step spread IQR/median (L, bare) | between-batch host ms L / bare (extra % of step) "
        "| vs default | EMA % of step | first step s (L) | train peak MiB (L / bare) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    params = None
    default = res["options"].get("default", {})
    default_ips = default.get("lightning", {}).get("images_per_s")
    for option, entry in res["options"].items():
        if "skipped" in entry:
            lines.append(f"| {option} | skipped: {entry['skipped']} |||||||||")
            continue
        light, bare = entry["lightning"], entry["bare"]
        if "error" in light or "error" in bare:
            err = light.get("error") or bare.get("error")
            lines.append(f"| {option} | failed: {str(err).splitlines()[0][:150]} |||||||||")
            continue
        for r in light["runs"]:
            params = params or r.get("num_parameters")
        per_round = ", ".join(_fmt(x, 3) for x in entry["overhead_ratio_per_round"])
        speedup = light["images_per_s"] / default_ips if default_ips else None
        lines.append(
            f"| {option} | {_fmt(light['images_per_s'])} | {_fmt(bare['images_per_s'])} "
            f"| {_fmt(entry['overhead_ratio'], 3)} ({per_round}) "
            f"| {_fmt(light['step_s']['iqr_rel'])}, {_fmt(bare['step_s']['iqr_rel'])} "
            f"| {_fmt(light['between_batches_ms'])} / {_fmt(bare['between_batches_ms'])} "
            f"({_fmt(entry['between_batches_extra_percent'], 3)}) "
            f"| ×{_fmt(speedup)} | {_fmt(entry['ema_percent_of_step'])} "
            f"| {', '.join(_fmt(x, 1) for x in light['first_step_s'])} "
            f"| {_fmt(light['peak_memory_mib'], 0)} / {_fmt(bare['peak_memory_mib'], 0)} |"
        )
    if params:
        lines += ["", f"Parameters: {params:,}."]
    if "fixed_cost_percent_of_step" in default:
        lines += [
            "",
            f"Lightning's fixed cost per step ({_fmt(fixed['fixed_cost_ms'])} ms, measured "
            "with model=tiny at batch 1, below) is "
            f"{_fmt(default['fixed_cost_percent_of_step'], 3)}% of this model's "
            "bare-loop step.",
        ]
    return lines


def _eval_lines(res: dict[str, Any]) -> list[str]:
    """One model's sampling and bits/dim table."""
    lines = [
        "",
        "| option | ancestral image·NFE/s | DDIM image·NFE/s | bits/dim image·term/s "
        "| full bound s/image | eval peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for option, entry in res["options"].items():
        ev = entry.get("eval") if isinstance(entry, dict) else None
        if not ev or "skipped" in entry:
            continue
        if "skipped" in ev:
            lines.append(f"| {option} | n/a: {ev['skipped']} |||||")
        elif "error" in ev:
            lines.append(f"| {option} | failed: {str(ev['error'])[:150]} |||||")
        else:
            lines.append(
                f"| {option} | {_fmt(ev['ancestral']['image_nfe_per_s'])} "
                f"| {_fmt(ev['ddim']['image_nfe_per_s'])} "
                f"| {_fmt(ev['bpd']['image_terms_per_s'])} "
                f"| {_fmt(ev['bpd']['full_bound_s_per_image'], 1)} "
                f"| {_fmt(ev['peak_memory_mib'], 0)} |"
            )
    return lines


def _fixed_cost_lines(fixed: dict[str, Any]) -> list[str]:
    """The section on Lightning's fixed cost per training step (model=tiny, batch 1)."""
    lines = ["## Lightning's fixed cost per training step", ""]
    if "error" in fixed:
        lines.append(f"Failed: {fixed['error']}")
        return lines
    return [
        *lines,
        "model=tiny at batch 1, where a step is almost all loop overhead; median over "
        "rounds of (Lightning step − bare-loop step), each round two runs back to back.",
        "",
        f"- Lightning step ms per round: {', '.join(_fmt(x) for x in fixed['lightning_step_ms'])}",
        f"- bare-loop step ms per round: {', '.join(_fmt(x) for x in fixed['bare_step_ms'])}",
        f"- **fixed cost: {_fmt(fixed['fixed_cost_ms'])} ms per step** (per round: "
        f"{', '.join(_fmt(x) for x in fixed['fixed_cost_ms_per_round'])})",
        "",
    ]


def markdown_report(results: dict[str, Any]) -> str:
    """A markdown summary of ``results`` (the JSON written next to it has every number)."""
    lines = _header_lines(results)
    for model, res in results["models"].items():
        if "error" in res:
            lines += [f"## {model}", "", f"Failed: {res['error']}", ""]
            continue
        shape = "×".join(str(x) for x in res["image_shape"])
        lines += [f"## model={model} ({shape}, batch {res['batch_size']})", ""]
        lines += _training_lines(res, results.get("fixed_cost") or {})
        lines += _eval_lines(res)
        sync = res.get("sync_check")
        if sync:
            lines += [
                "",
                "Host↔device synchronisations (default options; every device→host read, with "
                "the source line behind it). Adam's per-parameter `step` counters are not "
                "counted: unless the optimiser is capturable or fused, PyTorch keeps them in host "
                "memory on every device, so reading them does not wait for the device.",
                "",
            ]
            if "error" in sync:
                lines.append(f"- failed: {sync['error']}")
            else:
                lines += sync_check_lines(sync)
        lines.append("")
    fixed = results.get("fixed_cost")
    if fixed:
        lines += _fixed_cost_lines(fixed)
    return "\n".join(lines) + "\n"


def sync_check_lines(sync: dict[str, Any]) -> list[str]:
    """Markdown bullet lines for one synchronisation check."""
    lines = []
    labels = {
        "train": f"training step (Lightning fit, not a logging step; log_every_n_steps="
        f"{sync.get('log_every_n_steps')})",
        "sample_ancestral": "ancestral sampling step",
        "sample_ddim": "DDIM sampling step",
    }
    for key, label in labels.items():
        part = sync[key]
        by_origin = part["device_to_host_per_step_by_origin"]
        text = ", ".join(f"{k} {v:g}" for k, v in by_origin.items()) or "none"
        per_step = part["per_step"]
        lines.append(
            f"- per {label}: device→host reads {per_step.get('device_to_host', 0):g} "
            f"(by origin: {text}); host→device copies {per_step.get('host_to_device', 0):g}; "
            f"tensors from host data {per_step.get('host_tensor', 0):g}"
        )
        for event in part["events"]:
            lines.append(
                f"  - {event['kind']} `{event['op']}` ×{event['count']} over {part['steps']} "
                f"steps at `{event['origin']}`"
            )
    return lines
