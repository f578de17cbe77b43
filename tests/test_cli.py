"""The documented commands, run as a user runs them (subprocesses, tiny settings, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY  # tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]


def run(
    args: list[str], tmp_path: Path, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        **(env or {}),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
        "DDPM_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("WANDB_API_KEY", None)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    return [
        *TINY,
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={tmp_path / 'data'}",
        *extra,
    ]


def test_train_with_wandb_offline_then_sample_and_eval(tmp_path):
    """The quickstart path: train (W&B offline, no credentials), then sample.py and eval.py."""
    out = tmp_path / "run"
    proc = run(
        [
            "src/train.py",
            "experiment=quickstart",
            *tiny(tmp_path, "logger=wandb"),
            f"hydra.run.dir={out}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wandb sync" in proc.stdout, proc.stdout[-2000:]
    # Third-party notices that are not the user's business are silenced.
    assert "litlogger" not in proc.stdout + proc.stderr
    assert "LeafSpec" not in proc.stdout + proc.stderr
    assert "anonymous setting" not in proc.stdout + proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run_name"] == "quickstart" and metrics["diverged"] is False
    assert (out / "samples" / "final.png").is_file()
    assert list((out / "wandb").glob("offline-run-*")), "the W&B offline run must be kept"
    # Without W&B too: the curves as CSV and as plots, beside metrics.json.
    assert list((out / "csv").glob("version_*/metrics.csv"))
    assert (out / "plots" / "training.png").is_file() and (
        out / "plots" / "bound_terms.png"
    ).is_file()
    ckpt = out / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert (out / ".hydra" / "config.yaml").is_file()

    sample_dir = tmp_path / "samples"
    proc = run(
        [
            "src/sample.py",
            f"ckpt_path={ckpt}",
            "num_samples=6",
            "sampler=dpmpp_2m",
            "steps=10",
            f"hydra.run.dir={sample_dir}",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = np.load(sample_dir / "samples.npz")["images"]
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
    # The grid is scaled for reading: 6 digits of 8×8 in 3 columns (3·9 + 1 = 28 px wide, 19 tall
    # with 1-px padding) at ⌈32/8⌉ = 4.
    from PIL import Image

    assert Image.open(sample_dir / "samples.png").size == (28 * 4, 19 * 4)
    assert "sampler: dpmpp_2m, 10 network evaluations per image" in proc.stdout

    eval_dir = tmp_path / "eval"
    proc = run(
        [
            "src/eval.py",
            f"ckpt_path={ckpt}",
            "sample_quality.num_samples=20",
            "sample_quality.sampler=heun",
            "sample_quality.steps=3",
            "nll.num_images=3",
            "nll.estimator=stratified",
            "nll.num_terms=4",
            "speed.channels_last=true",  # the speed options reach the evaluated network
            "speed.bf16_autocast=true",
            f"hydra.run.dir={eval_dir}",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((eval_dir / "metrics.json").read_text())
    assert result["nll_bpd_k4"] > 0 and result["nll_num_images"] == 3
    assert result["nll_bpd_k4_stderr"] > 0 and "nll_bpd" not in result
    assert result["fd_digits_20_heun3"] >= 0  # the metric name carries the sampler
    assert result["speed"] == {"channels_last": True, "bf16_autocast": True, "compile": False}

    # The sampler table (make sampler-table) on the same checkpoint, tiny sizes.
    stem = tmp_path / "samplers"
    proc = run(
        [
            "bench/samplers.py", f"--ckpt={ckpt}", "--settings", "ddim:5", "dpmpp_2m:5",
            "heun:3", "--num-samples=10", "--batch-size=10", "--seeds", "0", "1",
            "--nll-images=2", "--bound-terms", "4", f"--out={stem}",
            f"--cache-dir={tmp_path / 'cache'}",
        ],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(stem.with_suffix(".json").read_text())
    assert [r["metric"] for r in report["samplers"]] == [
        "fd_digits_10_ddim5", "fd_digits_10_dpmpp5", "fd_digits_10_heun3",
    ]  # fmt: skip
    assert [r["nfe"] for r in report["samplers"]] == [5, 5, 5]
    assert all(len(r["fd_per_seed"]) == 2 for r in report["samplers"])
    assert [b["metric"] for b in report["bound"]] == ["nll_bpd", "nll_bpd_k4"]
    assert "| `fd_digits_10_heun3` | heun | 3 | karras | 5 |" in stem.with_suffix(".md").read_text()

    # A sampler option that does not apply is one clear line naming the keys and the fix.
    proc = run(
        [
            "src/eval.py",
            f"ckpt_path={ckpt}",
            "sample_quality.sampler=heun",
            "sample_quality.eta=0.5",
            f"hydra.run.dir={tmp_path / 'eval_bad'}",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        tmp_path,
    )
    assert proc.returncode == 1
    assert "error: sample_quality.sampler/steps/eta/spacing: eta=0.5 only applies to" in (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_eval_reproduces_the_end_of_training_evaluation_exactly(tmp_path):
    """The evaluation's x_T depend on (seed, sample index), not on the global step: eval.py on
    the final checkpoint, with the run's seed (eval's default) and sizes, gives the run's own
    fd and bits/dim to the last bit; another seed gives another fd."""
    out = tmp_path / "run"
    args = ["src/train.py", *tiny(tmp_path, "callbacks.sample_quality.on_train_end=true")]
    proc = run([*args, "seed=3", f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = json.loads((out / "metrics.json").read_text())

    def evaluate(name: str, *extra: str) -> dict:
        proc = run(
            [
                "src/eval.py", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
                "nll.num_images=4", "nll.batch_size=4", *extra,
                f"hydra.run.dir={tmp_path / name}", f"paths.log_dir={tmp_path / 'logs'}",
            ],
            tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / name / "metrics.json").read_text())

    again = evaluate("eval")
    assert again["seed"] == 3
    for key in ("fd_digits_8_dpmpp2", "nll_bpd"):
        assert again[key] == trained[key], key
    other = evaluate("eval_seed0", "seed=0")
    assert other["fd_digits_8_dpmpp2"] != trained["fd_digits_8_dpmpp2"]


def test_multirun_sweep_gives_each_job_its_own_directory_and_name(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(
        [
            "src/train.py",
            "-m",
            "schedule=linear,cosine",
            *tiny(tmp_path),
            "trainer.max_steps=1",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert names == ["0-eps-fixed_large-simple-linear", "1-eps-fixed_large-simple-cosine"]
    for name in names:
        metrics = json.loads((sweep / name / "metrics.json").read_text())
        assert metrics["run_name"] == name.split("-", 1)[1]
        assert metrics["schedule"] == name.rsplit("-", 1)[1]


def test_ddp_on_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    proc = run(
        [
            "src/train.py",
            *tiny(
                tmp_path,
                "trainer=ddp",
                "trainer.accelerator=cpu",
                "trainer.devices=2",
                "trainer.max_steps=2",
            ),
            f"hydra.run.dir={out}",
        ],
        tmp_path,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["diverged"] is False
    assert metrics["nll_bpd"] > 0


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (
            ["variance=learned", "loss=simple"],
            "loss=simple with variance=learned: L_simple has no term that trains the variance",
        ),
        (["variance=fixed_small", "loss=hybrid"], "Use loss=simple, or a learned variance"),
        (
            ["experiment=obj_v_zero_snr", "weighting=p2"],
            "invalid diffusion configuration: weighting=p2 with a zero-terminal-SNR "
            "schedule: at SNR = 0 the ε̂ implied by any network output is x_T = ε, so the "
            "ε-space MSE, and every weighting of it, is zero at the last step, where sampling "
            "starts: that step would never be trained. Use weighting=none with "
            "parameterization=v or parameterization=x0",
        ),
        (["parameterization=epsilon"], "Available options"),
        (["trainer.max_stpes=3"], "did you mean trainer.max_steps"),
        (["optimizer.lr=-1e-3"], "invalid optimizer settings (optimizer.lr=-0.001, "),
        (
            ["data=cifar10", "data.download=false", "model.attn_resolutions=[16]"],
            "cifar-10-python.tar.gz",
        ),
    ],
)
def test_bad_input_stops_with_one_clear_message(tmp_path, overrides, expected):
    proc = run(
        ["src/train.py", *tiny(tmp_path), *overrides, f"hydra.run.dir={tmp_path / 'r'}"], tmp_path
    )
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # A run directory that exists (Hydra made it before our checks ran; a composition error
    # stops before) says in its log why it holds no results.
    run_dir = tmp_path / "r"
    hydra_composed = not any(o.startswith(("parameterization=", "trainer.max_")) for o in overrides)
    assert run_dir.is_dir() == hydra_composed
    if hydra_composed:
        log = (run_dir / "train.log").read_text()
        assert "error: " in log and expected in log.split("error: ", 1)[1], log[-2000:]


@pytest.mark.parametrize(
    "script,override,expected",
    [
        ("train", "trainer.max_step=5", "did you mean trainer.max_steps or trainer.max_epochs?"),
        ("train", "trainr.max_steps=5", "did you mean trainer.max_steps?"),
        ("train", "parameterisation=eps", "did you mean parameterization?"),
        ("train", "module.nope.deeper=1", "`python src/train.py --cfg job --package module`"),
        ("eval", "ckpt_pth=x.ckpt", "did you mean ckpt_path?"),
        ("train", "hydra.run.dir={file}", "{file} is a file, not a directory"),
        ("train", "paths.log_dir={file}", "{file} is a file, not a directory"),
    ],
)
def test_command_line_mistakes_get_one_line_and_no_run_directory(
    tmp_path, script, override, expected
):
    """Misspelt keys and run directories below a file stop before Hydra creates anything, with one
    line that names the fix; Hydra's own advice (``+key=value``) would fail again later."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    logs = tmp_path / "logs"
    override, expected = (t.replace("{file}", str(blocker)) for t in (override, expected))
    proc = run([f"src/{script}.py", f"paths.log_dir={logs}", override], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert "+" not in lines[0]
    assert not logs.exists()  # no stub run directory


def test_a_run_without_its_data_leaves_no_wandb_run(tmp_path):
    """The config is logged once the data are ready: missing CIFAR-10 stops the run before any
    W&B run exists, so there is nothing for `wandb sync` to upload."""
    out = tmp_path / "r"
    proc = run(
        [
            "src/train.py", *tiny(tmp_path, "logger=wandb"), "data=cifar10", "data.download=false",
            "model.attn_resolutions=[16]", f"hydra.run.dir={out}",
        ],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0 and "cifar-10-python.tar.gz" in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.rglob("offline-run-*")), sorted(map(str, tmp_path.rglob("*run-*")))


def test_paper_command_composes_exactly_as_written(tmp_path):
    proc = run(
        [
            "src/train.py",
            "parameterization=eps",
            "loss=simple",
            "--cfg",
            "job",
            "--resolve",
            f"paths.log_dir={tmp_path}",
        ],
        tmp_path,
    )
    # --resolve needs the Hydra runtime for paths.output_dir; without it, print unresolved.
    if proc.returncode != 0:
        proc = run(
            ["src/train.py", "parameterization=eps", "loss=simple", "--cfg", "job"], tmp_path
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ddpm.models.UNet" in proc.stdout and "CIFAR10DataModule" in proc.stdout
    assert "max_steps: 800000" in proc.stdout
