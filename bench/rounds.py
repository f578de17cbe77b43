"""The measurement plan: rounds of Lightning and bare-loop runs, then evaluation and checks.

Every function takes ``run(spec) -> result``, which executes one phase (in this process or a
fresh one, see :mod:`bench.runner`), so the plan does not depend on how phases are run.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from bench.report import compare_loops, eval_summary
from bench.settings import MODEL_SHAPES, option_skip_reason, settings_for

RunPhase = Callable[[dict[str, Any]], dict[str, Any]]


def round_order(round_index: int) -> tuple[tuple[str, str], tuple[str, str]]:
    """The two training runs of a round as ``(loop, phase)``, the first loop alternating.

    Alternating which loop goes first cancels a steady drift of machine load between them.
    """
    bare, lightning = ("bare", "train_bare"), ("lightning", "train_lightning")
    return (bare, lightning) if round_index % 2 == 0 else (lightning, bare)


def _base_spec(
    model: str,
    device: str,
    settings: dict[str, int],
    overrides: Sequence[str],
    seed: int,
    threads: int | None,
) -> dict[str, Any]:
    return {
        "model": model,
        "device": device,
        "image_shape": list(MODEL_SHAPES[model]),
        "settings": settings,
        "overrides": list(overrides),
        "seed": seed,
        "threads": threads,
    }


def benchmark_model(
    model: str,
    device: str,
    options: Sequence[str],
    settings: dict[str, int],
    run: RunPhase,
    overrides: Sequence[str] = (),
    seed: int = 0,
    sync_check: bool = True,
    echo: Callable[[str], None] = print,
    threads: int | None = None,
) -> dict[str, Any]:
    """Every measurement for one model; ``run(spec)`` executes a phase and returns its result."""
    image_shape = MODEL_SHAPES.get(model)
    if image_shape is None:
        raise ValueError(
            f"no image shape known for model={model}; known: {', '.join(MODEL_SHAPES)}"
        )
    base = _base_spec(model, device, settings, overrides, seed, threads)
    result: dict[str, Any] = {
        "image_shape": list(image_shape),
        "batch_size": settings["batch"],
        "settings": settings,
        "options": {},
    }
    active = []
    for option in options:
        reason = option_skip_reason(option, device)
        if reason:
            result["options"][option] = {"skipped": reason}
            echo(f"[{model}] {option}: skipped ({reason})")
        else:
            active.append(option)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        option: {"lightning": [], "bare": []} for option in active
    }
    failed: set[str] = set()
    # Rounds outermost, options inside, Lightning and bare loop alternating first: a change of
    # machine load during the benchmark affects every option and both loops alike.
    for round_index in range(settings["rounds"]):
        for option in active:
            if option in failed:
                continue
            for which, phase in round_order(round_index):
                echo(f"[{model}] {option}: {which} training, round {round_index + 1}")
                out = run({**base, "option": option, "phase": phase, "round": round_index})
                runs[option][which].append(out)
                if "error" in out:
                    echo(f"[{model}] {option}: failed: {out['error']}")
                    failed.add(option)
                    break

    for option in active:
        entry = compare_loops(runs[option]["lightning"], runs[option]["bare"], settings["batch"])
        light, bare = entry["lightning"], entry["bare"]
        if "overhead_ratio" in entry:
            echo(
                f"[{model}] {option}: Lightning {light['images_per_s']:.2f} img/s, bare "
                f"{bare['images_per_s']:.2f} img/s, overhead ratio Lightning ÷ bare = "
                f"{entry['overhead_ratio']:.3f}; EMA {entry['ema_percent_of_step']:.2f}% of a step"
            )
        if option == "fused_adam":
            entry["eval"] = {"skipped": "fused Adam changes the optimiser only"}
        elif "error" not in light:
            echo(f"[{model}] {option}: sampling and bits/dim")
            entry["eval"] = eval_summary(run({**base, "option": option, "phase": "eval"}))
        result["options"][option] = entry
    result["options"] = {option: result["options"][option] for option in options}
    if sync_check:
        echo(f"[{model}] host↔device synchronisation check")
        result["sync_check"] = run({**base, "option": "default", "phase": "sync_check"})
    return result


def benchmark_fixed_cost(
    device: str,
    run: RunPhase,
    quick: bool,
    rounds: int,
    seed: int = 0,
    threads: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Lightning's fixed cost per training step (ms), measured where a step is almost all overhead.

    ``model=tiny`` at batch 1: Lightning's step time minus the bare loop's (median of the
    per-round differences) is the time Lightning adds per step whatever the network; divided by
    a model's step time it bounds that model's overhead with far less noise than the ratio of two
    long, load-sensitive step times.
    """
    overrides: dict[str, int | None] = {"batch": 1, "rounds": rounds}
    if not quick:
        overrides.update(warmup=20, window=50, windows=5)
    settings = settings_for(device, "tiny", quick, overrides)
    spec = {**_base_spec("tiny", device, settings, [], seed, threads), "option": "default"}
    light, bare = [], []
    for round_index in range(rounds):
        for which, phase in round_order(round_index):
            echo(f"[fixed cost] model=tiny batch 1: {which} training, round {round_index + 1}")
            out = run({**spec, "phase": phase, "round": round_index})
            if "error" in out:
                return {"error": out["error"]}
            step_ms = 1000.0 * statistics.median(out["step_s_windows"])
            (bare if which == "bare" else light).append(step_ms)
    per_round = [lm - bm for lm, bm in zip(light, bare)]
    result = {
        "model": "tiny",
        "batch": 1,
        "settings": settings,
        "lightning_step_ms": light,
        "bare_step_ms": bare,
        "fixed_cost_ms_per_round": per_round,
        "fixed_cost_ms": statistics.median(per_round),
    }
    echo(f"[fixed cost] Lightning adds {result['fixed_cost_ms']:.2f} ms per training step")
    return result
