"""The speed benchmark (the bench/ package) and the speed options of DiffusionLitModule.

No timing is asserted: the machine is shared. What is asserted: the benchmark runs end to end and
writes its reports; every option gives the default's loss and gradients within a stated
tolerance; a training step and a sampling step make no host↔device synchronisation (and the
detector used for that, :mod:`ddpm.sync_counter`, does see the synchronisations it is meant to
see); the Lightning module and the bare loop train with the same optimiser and warm-up.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ddpm.builders import build_diffusion, build_module, build_net
from ddpm.lit_module import DiffusionLitModule
from ddpm.optim import build_optimizer, warmup_multiplier
from ddpm.sync_counter import host_sync_counter, mark_host_step_counters

ROOT = Path(__file__).resolve().parents[1]
BENCH_PATH = ROOT / "bench" / "bench.py"
IMAGE_SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def bench():
    """The bench/ package's modules (it lives at the repository root and is not installed)."""
    added = str(ROOT) not in sys.path
    if added:
        sys.path.insert(0, str(ROOT))
    yield SimpleNamespace(
        **{
            name: importlib.import_module(f"bench.{name}")
            for name in ("runner", "settings", "phases")
        }
    )
    if added:
        sys.path.remove(str(ROOT))


# --------------------------------------------------------------------------- end to end
def test_benchmark_runs_end_to_end_on_tiny_in_quick_mode(bench, tmp_path):
    options = ["default", "channels_last", "bf16_autocast", "fused_adam"]
    argv = ["--device", "cpu", "--models", "tiny", "--quick", "--in-process"]
    results = bench.runner.main([*argv, "--options", *options, "--out", str(tmp_path)])

    written = json.loads((tmp_path / "cpu.json").read_text())
    assert written["device"] == "cpu" and set(written["models"]) == {"tiny"}
    assert written["meta"]["quick"] is True and written["meta"]["loadavg_start"] is not None
    tiny = results["models"]["tiny"]
    assert tiny["image_shape"] == list(IMAGE_SHAPE)
    assert set(tiny["options"]) == set(options)
    assert "CUDA only" in tiny["options"]["fused_adam"]["skipped"]
    for option in ("default", "channels_last", "bf16_autocast"):
        entry = tiny["options"][option]
        for loop in ("lightning", "bare"):
            assert "error" not in entry[loop], entry[loop]
            settings = tiny["settings"]
            assert entry[loop]["step_s"]["n"] == settings["windows"] * settings["rounds"]
            assert entry[loop]["images_per_s"] > 0 and entry[loop]["peak_memory_mib"] > 0
        assert entry["overhead_ratio"] > 0 and 0 < entry["ema_percent_of_step"] < 100
    for option in ("default", "channels_last", "bf16_autocast"):
        ev = tiny["options"][option]["eval"]
        assert ev["ancestral"]["image_nfe_per_s"] > 0 and ev["ddim"]["image_nfe_per_s"] > 0
        assert ev["bpd"]["image_terms_per_s"] > 0 and ev["bpd"]["full_bound_terms"] == 1000
    fixed = results["fixed_cost"]
    assert fixed["batch"] == 1 and len(fixed["fixed_cost_ms_per_round"]) == 1
    assert math.isfinite(fixed["fixed_cost_ms"])
    assert math.isfinite(tiny["options"]["default"]["fixed_cost_percent_of_step"])
    sync = tiny["sync_check"]
    assert "error" not in sync, sync
    report = (tmp_path / "cpu.md").read_text()
    assert "## model=tiny" in report and "| default |" in report and "overhead" in report
    assert "fixed cost" in report


@pytest.mark.slow
def test_benchmark_script_runs_phases_in_worker_processes(tmp_path):
    """The command `make bench` runs: each phase in a fresh process (timeout-bounded)."""
    command = [sys.executable, str(BENCH_PATH), "--device", "cpu", "--models", "tiny", "--quick"]
    command += [
        "--options",
        "default",
        "--no-sync-check",
        "--no-fixed-cost",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "overhead ratio Lightning ÷ bare loop" in proc.stdout
    entry = json.loads((tmp_path / "cpu.json").read_text())["models"]["tiny"]["options"]
    assert "error" not in entry["default"]["lightning"], entry["default"]["lightning"]
    assert entry["default"]["eval"]["ddim"]["image_nfe_per_s"] > 0


def test_settings_validate_and_skip_reasons(bench):
    settings = bench.settings
    quick = settings.settings_for("cpu", "ddpm_cifar10", True, {"batch": 2})
    assert quick["batch"] == 2 and quick["windows"] == 2
    assert settings.settings_for("cpu", "ddpm_cifar10", False, {})["batch"] == 8
    with pytest.raises(ValueError, match=">= 1"):
        settings.settings_for("cpu", "small", False, {"windows": 0})
    assert settings.option_skip_reason("fused_adam", "cpu") is not None
    assert settings.option_skip_reason("channels_last", "cpu") is None
    with pytest.raises(ValueError, match="unknown option"):
        settings.option_overrides("fast")


# --------------------------------------------------------------------------- synchronisations
def test_sync_counter_sees_reads_copies_and_host_snapshots():
    counter = host_sync_counter("cpu")
    x = torch.randn(5)
    with counter:
        loss = x.square().mean()
        float(loss)  # a read: synchronises on an accelerator
        bool(loss > 0)
        (x > 0).nonzero()  # data-dependent shape
        snapshot = loss.detach().to("cpu", copy=True)  # one device→host copy ...
        snapshot.clone().item()  # ... whose reads do not wait for the device
        torch.tensor([1.0, 2.0])  # a tensor from Python data
    events = counter.summary(steps=1)
    assert events["per_step"]["device_to_host"] == 4  # float, bool, nonzero, the copy
    assert events["per_step"]["host_tensor"] == 1
    origins = {e["origin"].split(":")[0] for e in events["events"]}
    assert origins == {"tests/test_bench.py"}


def test_adam_step_counters_are_marked_as_host_tensors_unless_capturable():
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    host, captured = (torch.optim.Adam(params[i : i + 1], lr=0.1) for i in (0, 1))
    sum(p.square().sum() for p in params).backward()
    host.step()
    captured.step()
    # capturable=True (CUDA only) keeps the counter on the device, where reading it syncs.
    captured.param_groups[0]["capturable"] = True
    counter = host_sync_counter("cpu")
    assert mark_host_step_counters([host, captured], counter) == 1
    with counter:
        host.state[params[0]]["step"].item()  # a host counter: no wait for the device
        captured.state[params[1]]["step"].item()  # would live on the device: counted
    assert counter.summary(steps=1)["per_step"] == {"device_to_host": 1}


def _run_sync_check(bench) -> dict:
    """The benchmark's synchronisation-check phase on ``model=tiny``, in this process."""
    spec = {
        "model": "tiny",
        "device": "cpu",
        "image_shape": list(IMAGE_SHAPE),
        "settings": bench.settings.settings_for("cpu", "tiny", True, {}),
        "seed": 0,
        "option": "default",
        "phase": "sync_check",
    }
    return bench.runner.run_phase_here(spec)


def test_training_step_and_sampling_make_no_host_sync(bench):
    """A non-logging training step (Lightning fit) and a sampling step: no device→host read.

    Adam's per-parameter ``step`` counters are host tensors on every device (torch.optim keeps
    them on the CPU unless capturable/fused), so their reads are not counted.
    """
    result = _run_sync_check(bench)
    assert "error" not in result, result.get("traceback")
    train = result["train"]
    assert train["device_to_host_per_step_by_origin"] == {}, train["events"]
    assert train["per_step"].get("host_to_device", 0) == 0
    assert train["per_step"].get("host_tensor", 0) == 0
    for name in ("sample_ancestral", "sample_ddim"):
        assert result[name]["per_step"] == {}, result[name]["events"]


def test_sync_check_catches_a_per_step_item(bench, monkeypatch):
    """The check can fail: a `.item()` added to the training step is reported with its line."""
    original = DiffusionLitModule.training_step

    def training_step_with_item(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        self.seen_loss = loss.item()
        return loss

    monkeypatch.setattr(DiffusionLitModule, "training_step", training_step_with_item)
    result = _run_sync_check(bench)
    assert "error" not in result, result.get("traceback")
    events = [e for e in result["train"]["events"] if "training_step_with_item" in e["origin"]]
    assert len(events) == 1 and events[0]["count"] == bench.settings.SYNC_CHECK_STEPS


# --------------------------------------------------------------------------- optimiser
WARMUP_STEPS = 4


def _lr_sequence(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[float]:
    """The learning rate of the first group before each of ``steps`` optimiser steps."""
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: a no-op, but keeps the step/scheduler order a loop has
        scheduler.step()
    return lrs


@pytest.mark.parametrize(
    ("overrides", "base_lr"),
    [
        ([], 2e-4),
        (["optimizer.lr=1e-3", "optimizer.weight_decay=0.01"], 1e-3),
        (["~optimizer"], 2e-4),
    ],
    ids=["configured-adam", "changed-adam", "no-optimizer-config"],
)
def test_lightning_module_and_bare_loop_build_the_same_optimiser(bench, overrides, base_lr):
    """``configure_optimizers`` and the bare loop: same class, groups and warm-up multipliers."""
    cfg = bench.phases.compose_config(
        "tiny", "default", [f"module.lr_warmup_steps={WARMUP_STEPS}", *overrides]
    )
    torch.manual_seed(0)
    module = build_module(cfg, IMAGE_SHAPE)
    configured = module.configure_optimizers()
    assert configured["lr_scheduler"]["interval"] == "step"
    lit_opt, lit_sched = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    torch.manual_seed(0)
    net = build_net(cfg, build_diffusion(cfg), IMAGE_SHAPE)
    bare_opt, bare_sched = bench.phases.bare_optimizer(cfg, net.parameters(), "cpu")

    assert type(lit_opt) is type(bare_opt) is torch.optim.Adam
    assert len(lit_opt.param_groups) == len(bare_opt.param_groups) == 1
    for lit_group, bare_group in zip(lit_opt.param_groups, bare_opt.param_groups, strict=True):
        assert {k: v for k, v in lit_group.items() if k != "params"} == {
            k: v for k, v in bare_group.items() if k != "params"
        }
        assert [p.shape for p in lit_group["params"]] == [p.shape for p in bare_group["params"]]
    assert [p.shape for p in lit_opt.param_groups[0]["params"]] == [
        p.shape for p in module.net.parameters()
    ]
    assert lit_opt.param_groups[0]["initial_lr"] == pytest.approx(base_lr, rel=1e-12)

    steps = WARMUP_STEPS + 3
    lit_lrs = _lr_sequence(lit_opt, lit_sched, steps)
    bare_lrs = _lr_sequence(bare_opt, bare_sched, steps)
    expected = [base_lr * min(1.0, (k + 1) / WARMUP_STEPS) for k in range(steps)]
    assert lit_lrs == pytest.approx(expected, rel=1e-12, abs=0)
    assert bare_lrs == pytest.approx(expected, rel=1e-12, abs=0)
    assert lit_lrs[0] == pytest.approx(base_lr / WARMUP_STEPS) and lit_lrs[-1] == base_lr


def test_build_optimizer_fused_on_cuda_only_and_warmup_edges():
    calls = []

    def factory(params, **kwargs):
        calls.append(kwargs)
        return torch.optim.SGD(params, lr=0.5)

    param = torch.nn.Parameter(torch.zeros(2))
    for device, fused in (("cpu", True), ("cuda:0", True), ("cuda:0", False)):
        build_optimizer([param], factory, lr_warmup_steps=1, fused=fused, device=device)
    assert calls == [{}, {"fused": True}, {}]  # CUDA and asked for, else not passed at all

    optimizer, scheduler = build_optimizer([param], lr_warmup_steps=0)
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults["lr"] == 2e-4
    assert optimizer.param_groups[0]["lr"] == 2e-4  # no warm-up: the full rate from step 0
    # The schedule is a plain function, so a checkpoint stores None for it (as it always has).
    assert scheduler.state_dict()["lr_lambdas"] == [None]
    assert [warmup_multiplier(k, 3) for k in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert warmup_multiplier(0, 0) == warmup_multiplier(0, 1) == 1.0


# --------------------------------------------------------------------------- option numerics
def _module(compose_cfg, option: str | None) -> DiffusionLitModule:
    overrides = [f"speed.{option}=true"] if option else []
    cfg = compose_cfg(*overrides, "schedule.num_timesteps=1000")
    torch.manual_seed(0)
    return build_module(cfg, IMAGE_SHAPE)


def _loss_and_grad(module: DiffusionLitModule, x0, t, noise) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step's loss (through ``module.forward``) and the flattened gradient."""
    module.net.zero_grad(set_to_none=True)
    loss = module.diffusion.training_losses(module, x0, t, noise)["loss"].mean()
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in module.net.parameters()])
    return loss.detach(), grad


def _compare_with_default(compose_cfg, option: str) -> tuple[float, float, DiffusionLitModule]:
    """Relative |Δloss| and ‖Δgrad‖/‖grad‖ of ``option`` against the default, same batch/t/noise.

    The weights are perturbed first: the UNet's last convolution is zero-initialised, so at
    initialisation every option would output exactly zero and the comparison would be vacuous.
    """
    reference = _module(compose_cfg, None)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reference.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    candidate = _module(compose_cfg, option)
    candidate.load_state_dict(reference.state_dict())
    x0 = torch.randint(0, 256, (8, *IMAGE_SHAPE), generator=generator).float() / 127.5 - 1
    t = torch.randint(0, 1000, (8,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    ref_loss, ref_grad = _loss_and_grad(reference, x0, t, noise)
    loss, grad = _loss_and_grad(candidate, x0, t, noise)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    rel_loss = ((loss - ref_loss).abs() / ref_loss.abs()).item()
    rel_grad = ((grad - ref_grad).norm() / ref_grad.norm()).item()
    return rel_loss, rel_grad, candidate


def test_channels_last_gives_the_default_loss(compose_cfg):
    rel_loss, rel_grad, module = _compare_with_default(compose_cfg, "channels_last")
    assert module.net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert rel_loss < 1e-5  # float32, another summation order inside the convolutions
    assert rel_grad < 1e-4


def test_bf16_autocast_gives_the_default_loss_within_bf16_precision(compose_cfg):
    rel_loss, rel_grad, module = _compare_with_default(compose_cfg, "bf16_autocast")
    assert rel_loss < 2e-2  # bfloat16 has an 8-bit mantissa (relative precision ~4e-3)
    assert rel_grad < 5e-2
    assert rel_loss > 0 or rel_grad > 0  # autocast really ran: bf16 is not bit-identical
    x = torch.zeros(2, *IMAGE_SHAPE)
    assert module(x, torch.tensor([0, 1])).dtype == torch.float32  # losses stay float32


@pytest.mark.slow
def test_compile_gives_the_default_loss(compose_cfg):
    try:
        rel_loss, rel_grad, module = _compare_with_default(compose_cfg, "compile")
    except Exception as err:  # no C++ compiler or an unsupported platform
        pytest.skip(f"torch.compile does not work on this machine: {type(err).__name__}: {err}")
    assert not any(k.startswith("_compiled_net") for k in module.state_dict())
    assert rel_loss < 1e-5  # float32; inductor fuses and reorders elementwise ops
    assert rel_grad < 1e-4


def test_fused_adam_is_requested_on_cuda_only(compose_cfg):
    """``speed.fused_adam`` reaches the optimiser factory as ``fused=True`` on CUDA, not elsewhere.

    No GPU is needed: the module's device is set by hand and the factory records its arguments.
    """
    module = _module(compose_cfg, "fused_adam")
    calls = []

    def factory(params, **kwargs):
        calls.append(kwargs)
        return torch.optim.Adam(params, lr=2e-4)

    module.optimizer_factory = factory
    module.configure_optimizers()  # on the CPU: the flag is ignored
    module._device = torch.device("cuda", 0)  # what Lightning sets when it moves the module
    module.configure_optimizers()
    assert calls == [{}, {"fused": True}]
    default = _module(compose_cfg, None)
    default.optimizer_factory = factory
    default._device = torch.device("cuda", 0)
    default.configure_optimizers()
    assert calls[-1] == {}  # off by default
