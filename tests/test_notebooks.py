"""The notebooks: committed clean, and every one executes end to end on the tiny configuration.

The slow test runs each notebook with nbclient in a fresh kernel of this interpreter (a kernelspec
written to a temporary ``JUPYTER_PATH``, so no installed kernelspec is needed or used), started in
``notebooks/`` as Jupyter starts it, with ``DDPM_NOTEBOOK_TINY=1`` (``+scale=tiny``) and
``DDPM_NOTEBOOK_WORKDIR`` pointing at a temporary directory: nothing is written to the repository.
The fast tests check the committed files, the scale configs the notebooks train with, and the
helpers in ``notebooks/nbhelpers.py`` against independent references.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from ddpm import ablation
from ddpm.configs import compose_config
from ddpm.diffusion import GaussianDiffusion, make_betas, schedule_tables

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = (
    "01_forward_process.ipynb",
    "02_sampling.ipynb",
    "03_ablation.ipynb",
    "04_objectives.ipynb",
)


def _load_notebook_module(name: str):
    """``notebooks/<name>.py`` as a module (the notebooks import it from their own folder)."""
    spec = importlib.util.spec_from_file_location(name, NOTEBOOK_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _load_strip_module():
    return _load_notebook_module("strip_outputs")


nh = _load_notebook_module("nbhelpers")


# --------------------------------------------------------------------------- committed files
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_valid_and_stripped(name: str) -> None:
    path = NOTEBOOK_DIR / name
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells, f"{name} has no code"
    for cell in code_cells:
        assert cell.outputs == [], f"{name}: a cell has stored outputs; run strip_outputs.py"
        assert cell.execution_count is None, f"{name}: execution counts are stored"
    # The first code cell holds the parameters (papermill's tag), and reads the tiny flag.
    assert "parameters" in code_cells[0].metadata.get("tags", [])
    assert "TINY = None" in code_cells[0].source
    assert _load_strip_module().is_stripped(path)


def test_strip_outputs_removes_outputs(tmp_path: Path) -> None:
    strip = _load_strip_module()
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("print(1)"), nbformat.v4.new_markdown_cell("# x")],
        metadata={"kernelspec": {"name": "python3", "display_name": "P", "language": "python"}},
    )
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    nb.cells[0].execution_count = 3
    nb.cells[0].metadata.update(tags=["parameters"], execution={"x": 1})
    nb.metadata["widgets"] = {"state": {}}
    path = tmp_path / "dirty.ipynb"
    nbformat.write(nb, path)

    assert not strip.is_stripped(path)
    assert strip.main(["--check", str(path)]) == 1
    assert strip.main([str(path)]) == 0
    clean = nbformat.read(path, as_version=4)
    assert clean.cells[0].outputs == [] and clean.cells[0].execution_count is None
    assert dict(clean.cells[0].metadata) == {"tags": ["parameters"]}
    assert set(clean.metadata) == {"kernelspec"}
    assert strip.main(["--check", str(path)]) == 0


# --------------------------------------------------------------------------- helpers
def test_notebook_settings_reads_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(nh.ENV_TINY, "1")
    monkeypatch.setenv(nh.ENV_WORKDIR, str(tmp_path))
    settings = nh.notebook_settings()
    assert settings.tiny and settings.workdir == tmp_path.resolve()
    assert settings.device == torch.device("cpu")
    monkeypatch.setenv(nh.ENV_TINY, "0")
    monkeypatch.delenv(nh.ENV_WORKDIR)
    settings = nh.notebook_settings()
    assert not settings.tiny and settings.workdir == ROOT


def test_heldout_digits_match_sklearn_and_pad_with_background() -> None:
    from sklearn.datasets import load_digits

    images, labels = nh.heldout_digits(5, (1, 12, 12), offset=2)
    assert images.shape == (5, 1, 12, 12) and images.dtype == torch.float32
    # Independent reference: the split is RandomState(0).permutation(1797)[1500:].
    index = np.random.RandomState(0).permutation(1797)[1500:][2:7]
    bunch = load_digits()
    expected = np.rint(bunch.images[index] * 255.0 / 16.0) / 127.5 - 1.0
    np.testing.assert_allclose(images[:, 0, 2:10, 2:10].numpy(), expected, atol=1e-6)
    assert labels.tolist() == bunch.target[index].tolist()
    border = torch.ones(12, 12, dtype=torch.bool)
    border[2:10, 2:10] = False
    assert torch.all(images[:, 0][:, border] == -1.0)


def test_find_latest_checkpoint_prefers_newest(tmp_path: Path) -> None:
    assert nh.find_latest_checkpoint(tmp_path) is None
    paths = []
    for i, stamp in enumerate(["2026-01-02_00-00-00", "2026-01-01_00-00-00"]):
        path = tmp_path / "logs/train/runs/quickstart" / stamp / "checkpoints/last.ckpt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
        paths.append(path)
    assert nh.find_latest_checkpoint(tmp_path) == paths[1]  # newest by time written
    assert nh.find_latest_checkpoint(tmp_path, "quickstart_tiny") is None


def test_per_timestep_losses_zero_network_closed_form() -> None:
    """ε-prediction net ≡ 0: L_simple = ‖ε‖², ε̂ = 0 and x̂₀ = x_t/√ᾱ (clipped for x0_mse)."""
    T, seed = 40, 7
    diffusion = GaussianDiffusion(make_betas("linear", T), "eps", "fixed_large", "simple")
    x0, _ = nh.heldout_digits(6)
    steps = [0, 13, 39]
    out = nh.per_timestep_losses(diffusion, lambda x, t: torch.zeros_like(x), x0, steps, seed)

    alpha_bar = schedule_tables(make_betas("linear", T))["alphas_cumprod"].numpy()
    generator = torch.Generator().manual_seed(seed)
    x0_64 = x0.double().numpy()
    for k, t in enumerate(steps):
        eps = torch.randn(x0.shape, generator=generator).double().numpy()
        eps2 = float(np.mean(eps**2))
        x_t = np.sqrt(alpha_bar[t]) * x0_64 + np.sqrt(1.0 - alpha_bar[t]) * eps
        x0_error = float(np.mean((x0_64 - np.clip(x_t / np.sqrt(alpha_bar[t]), -1, 1)) ** 2))
        assert out["loss"][k] == pytest.approx(eps2, rel=1e-5)
        assert out["mse"][k] == pytest.approx(eps2, rel=1e-5)
        assert out["eps_mse"][k] == pytest.approx(eps2, rel=1e-4)
        assert out["x0_mse"][k] == pytest.approx(x0_error, rel=1e-4, abs=1e-7)
        assert np.isfinite(out["bound_bpd"][k]) and out["bound_bpd"][k] > 0
    assert out["t"].tolist() == steps


def _write_run(run_dir: Path, metrics: dict, config: str | None = None) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if config is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "config.yaml").write_text(config)


def test_sweep_runs_bound_terms_and_table(tmp_path: Path) -> None:
    """The notebooks read sweeps with the table builder's reader (ddpm.ablation.classify_run)."""
    sweep = tmp_path / "sweep"
    _write_run(
        sweep / "0-eps",
        {
            "run_name": "eps-run",
            "diffusion": "eps-fixed_large-simple",
            "schedule": "linear",
            "num_timesteps": 10,
            "global_step": 100,
            "diverged": False,
            "final_train_loss": 0.123456,
            "nll_bpd": 3.5,
            "fd_digits_1k_dpmpp15": 12.0,
        },
    )
    terms = np.linspace(1.0, 0.1, 10)
    (sweep / "0-eps" / "nll").mkdir()
    np.save(sweep / "0-eps" / "nll" / "terms_step0000100.npy", terms)
    _write_run(
        sweep / "1-mu",
        {"diverged": True, "global_step": 7, "nll_bpd": 9.0, "schedule": "linear"},
        config="parameterization: {name: mu}\nvariance: {name: learned}\nloss: {name: vlb}\n",
    )
    runs = [ablation.classify_run(path) for path in ablation.find_runs(sweep)]
    assert [r.path.name for r in runs] == ["0-eps", "1-mu"]
    # The objective from metrics.json, else (no "diffusion" key) from .hydra/config.yaml.
    assert [(r.parameterization, r.variance, r.loss) for r in runs] == [
        ("eps", "fixed_large", "simple"),
        ("mu", "learned", "vlb"),
    ]
    assert [r.status for r in runs] == ["ok", "unstable"]
    assert runs[0].checkpoint is None and runs[1].nll_terms is None
    np.testing.assert_array_equal(nh.bound_terms_bpd(runs[0]), terms)
    assert nh.bound_terms_bpd(runs[1]) is None

    # The table comes from ddpm.ablation, rendered without writing into the sweep directory.
    table = nh.ablation_markdown(runs, sweep)
    assert table is not None and not (sweep / "ablation.md").exists()
    rows = {
        line.split("|")[1].strip(): line
        for line in table.splitlines()
        if line.startswith("| ") and "prediction" in line
    }
    assert "3.500" in rows["ε prediction, ‖ε̃ − ε_θ‖² (L_simple)"]
    mu_row = rows["μ̃ prediction, L, learned diagonal Σ"]
    assert "9.000" not in mu_row and "–" in mu_row  # diverged: marked, its numbers hidden
    with pytest.raises(FileNotFoundError):
        ablation.find_runs(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert nh.ablation_markdown([], empty) is None
    (empty / "ablation.md").write_text("| committed |\n")
    assert nh.ablation_markdown([], empty) == "| committed |\n"


# --------------------------------------------------------------------------- scale configs
@pytest.mark.parametrize("experiment", nh.DEMO_SWEEP_RUNS)
def test_demo_scale_is_the_demo_sweep_of_03_ablation(experiment: str) -> None:
    """``+scale=demo``: digits, tiny UNet, T = 200, 400 steps of batch 64, NLL on 64 digits, CSV."""
    cfg = compose_config([f"experiment={experiment}", "+scale=demo", "logger=csv"])
    assert cfg.data._target_ == "ddpm.data.DigitsDataModule" and cfg.data.batch_size == 64
    assert cfg.model.base_channels == 16 and list(cfg.model.channel_mult) == [1, 2]  # model=tiny
    assert cfg.schedule.num_timesteps == 200
    assert (cfg.trainer.accelerator, cfg.trainer.max_steps) == ("cpu", 400)
    assert cfg.callbacks.model_checkpoint.every_n_train_steps == 400
    assert (cfg.module.lr_warmup_steps, cfg.module.ema_decay, cfg.optimizer.lr) == (50, 0.99, 1e-3)
    assert (cfg.callbacks.nll.num_images, cfg.callbacks.nll.estimator) == (64, "full")
    assert cfg.callbacks.nll.on_train_end and not cfg.callbacks.sample_quality.on_train_end
    assert (
        cfg.callbacks.sample_grid.sampler == "ancestral" and cfg.callbacks.sample_grid.steps is None
    )
    assert list(cfg.logger) == ["csv"]
    # The experiment still sets the objective: the scale only sizes the run.
    assert cfg.parameterization.name == experiment.split("_")[1]


def test_tiny_quickstart_of_the_notebooks_composes() -> None:
    """The tiny mode's quickstart: +scale=tiny wins over experiment=quickstart's sizes."""
    cfg = compose_config(
        ["experiment=quickstart", "run_name=quickstart_tiny", "+scale=tiny", "logger=csv"]
    )
    assert cfg.run_name == "quickstart_tiny" and cfg.schedule.num_timesteps == 50
    assert (cfg.trainer.max_steps, cfg.data.batch_size, cfg.model.base_channels) == (3, 16, 16)
    assert cfg.callbacks.model_checkpoint.save_last and list(cfg.logger) == ["csv"]


# --------------------------------------------------------------------------- execution
def _kernelspec(tmp_path: Path) -> str:
    """A kernelspec running this interpreter, in a private JUPYTER_PATH; returns its name."""
    name = "ddpm-lab-test"
    kernel_dir = tmp_path / "jupyter" / "kernels" / name
    kernel_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ddpm-lab (tests)",
        "language": "python",
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(spec))
    return name


def _snapshot(paths: list[Path]) -> dict[str, float]:
    found = {}
    for base in paths:
        if base.exists():
            for path in base.rglob("*"):
                found[str(path)] = path.stat().st_mtime
    return found


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_in_tiny_mode(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbclient import NotebookClient

    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv(nh.ENV_TINY, "1")
    monkeypatch.setenv(nh.ENV_WORKDIR, str(workdir))
    monkeypatch.delenv("DDPM_NOTEBOOK_SWEEP_DIR", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # modest CPU use; oversubscribed OpenMP crawls
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # no __pycache__ of nbhelpers in notebooks/
    watched = [ROOT / "logs" / "train" / "runs" / "quickstart_tiny", ROOT / "logs" / "notebooks"]
    watched.append(NOTEBOOK_DIR)
    before = _snapshot(watched)

    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name=_kernelspec(tmp_path),
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # the kernel's cwd, as in Jupyter
    )
    client.execute()  # raises CellExecutionError with the cell's traceback on any error

    images = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert images, f"{name} produced no figure"
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    assert _snapshot(watched) == before, "the notebook wrote into the repository"
    if name in ("02_sampling.ipynb", "03_ablation.ipynb"):  # these train (tiny) models there
        assert any(workdir.joinpath("logs").rglob("last.ckpt"))
