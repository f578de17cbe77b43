"""The Table 2 ablation: experiment configs, the table builder, and a tiny end-to-end sweep."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate

from conftest import TINY  # tests/ is on sys.path under pytest
from ddpm import ablation
from ddpm.builders import build_diffusion
from ddpm.diffusion.sampling import SamplerSpec

ROOT = Path(__file__).resolve().parents[1]

# experiment → (parameterization, variance, loss): what each config must set.
EXPERIMENTS = {
    "table2_mu_vlb_learned": ("mu", "learned", "vlb"),
    "table2_mu_vlb_fixed": ("mu", "fixed_large", "vlb"),
    "table2_mu_simple": ("mu", "fixed_large", "simple"),
    "table2_eps_vlb_learned": ("eps", "learned", "vlb"),
    "table2_eps_vlb_fixed": ("eps", "fixed_large", "vlb"),
    "table2_eps_simple": ("eps", "fixed_large", "simple"),
    "ext_x0_simple": ("x0", "fixed_large", "simple"),
    "ext_v_simple": ("v", "fixed_large", "simple"),
    "ext_eps_hybrid_learned_range": ("eps", "learned_range", "hybrid"),
}
# The objectives-as-weightings rows → (parameterization, weighting, variant); all fixed_large,
# loss=simple (docs/objectives.md).
WEIGHTING_EXPERIMENTS = {
    "obj_eps_min_snr": ("eps", "min_snr", ""),
    "obj_v_min_snr": ("v", "min_snr", ""),
    "obj_eps_p2": ("eps", "p2", ""),
    "obj_v_sigmoid": ("v", "sigmoid", ""),
    "obj_edm": ("edm", "edm", "t~edm_lognormal"),
    "obj_v_zero_snr": ("v", "none", "zero_terminal_snr"),
}


# The VDM rows → (schedule, variant): ε prediction, fixed_large (for the samplers), the bound.
VDM_EXPERIMENTS = {
    "vdm_learned": ("learned", "continuous+learned_schedule"),
    "vdm_cosine": ("cosine", "continuous"),
}


# ---------------------------------------------------------------------------- configs
@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_config_sets_its_objective_and_nothing_else(compose_cfg, experiment):
    parameterization, variance, loss = EXPERIMENTS[experiment]
    cfg = compose_cfg(f"experiment={experiment}", tiny=False)
    assert (cfg.parameterization.name, cfg.variance.name, cfg.loss.name) == EXPERIMENTS[experiment]
    assert cfg.run_name == f"{parameterization}-{variance}-{loss}-linear"
    # Paper-scale defaults are untouched: CIFAR-10, the paper UNet, 800k steps, linear T = 1000.
    assert cfg.data._target_.endswith("CIFAR10DataModule")
    assert cfg.model.base_channels == 128 and cfg.trainer.max_steps == 800_000
    assert cfg.schedule.name == "linear" and cfg.schedule.num_timesteps == 1000
    # A valid combination: the diffusion builds (invalid ones raise ConfigError).
    assert build_diffusion(cfg).name == f"{parameterization}-{variance}-{loss}"
    text = (ROOT / "conf" / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_\n")


@pytest.mark.parametrize("experiment", sorted(WEIGHTING_EXPERIMENTS))
def test_weighting_experiments_set_their_objective(compose_cfg, experiment):
    parameterization, weighting, variant = WEIGHTING_EXPERIMENTS[experiment]
    cfg = compose_cfg(f"experiment={experiment}", "+scale=cpu", tiny=False)
    assert (cfg.parameterization.name, cfg.variance.name, cfg.loss.name) == (
        parameterization,
        "fixed_large",
        "simple",
    )
    assert cfg.weighting.name == weighting and ablation.objective_variant(cfg) == variant
    assert cfg.data._target_.endswith("DigitsDataModule") and cfg.schedule.name == "linear"
    diffusion = build_diffusion(cfg)
    assert diffusion.weighting.name == weighting
    assert (float(diffusion.alphas_cumprod[-1]) == 0.0) == (variant == "zero_terminal_snr")
    paper = compose_cfg(f"experiment={experiment}", "+scale=paper", tiny=False)
    assert paper.data._target_.endswith("CIFAR10DataModule") and paper.model.base_channels == 128
    assert ablation.objective_variant(paper) == variant


@pytest.mark.parametrize("experiment", sorted(VDM_EXPERIMENTS))
def test_vdm_experiments_set_their_schedule_and_continuous_time(compose_cfg, experiment):
    schedule, variant = VDM_EXPERIMENTS[experiment]
    cfg = compose_cfg(f"experiment={experiment}", "+scale=cpu", tiny=False)
    assert cfg.schedule.name == schedule and cfg.time.name == "continuous"
    assert ablation.objective_variant(cfg) == variant
    diffusion = build_diffusion(cfg)
    assert diffusion.time.continuous and diffusion.loss.name == "vlb"
    assert diffusion.schedule.learnable == (schedule == "learned")


def test_the_rows_come_from_the_experiment_configs():
    """Every experiment but the quickstart is a row, in its table_row.order; the Makefile's
    lists name them; the keys are what the composed configs train."""
    files = {
        p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml") if p.stem != "quickstart"
    }
    rows = ablation.objectives()
    assert [o.experiment for o in rows] == [*EXPERIMENTS, *WEIGHTING_EXPERIMENTS, *VDM_EXPERIMENTS]
    assert files == {o.experiment for o in rows}
    assert {o.experiment: o.key for o in rows} == {
        **{name: (*key, "none", "") for name, key in EXPERIMENTS.items()},
        **{
            name: (p, "fixed_large", "simple", w, variant)
            for name, (p, w, variant) in WEIGHTING_EXPERIMENTS.items()
        },
        **{
            name: ("eps", "fixed_large", "vlb", "none", variant)
            for name, (_, variant) in VDM_EXPERIMENTS.items()
        },
    }
    by_name = {o.experiment: o for o in rows}
    assert by_name["table2_eps_simple"].paper_fid == "3.17"
    assert by_name["table2_eps_vlb_fixed"].paper_nll == "≤ 3.70"
    assert by_name["ext_v_simple"].paper_is is None and by_name["obj_edm"].label.startswith("EDM")
    makefile = (ROOT / "Makefile").read_text()
    for variable, names in (
        ("ABLATION_EXPERIMENTS", EXPERIMENTS),
        ("OBJECTIVE_EXPERIMENTS", WEIGHTING_EXPERIMENTS),
        ("VDM_EXPERIMENTS", VDM_EXPERIMENTS),
    ):
        match = re.search(rf"^{variable} := (.+)$", makefile, flags=re.MULTILINE)
        assert match is not None and match.group(1).split(",") == list(names), variable


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_cpu_scale_composes_with_every_experiment(compose_cfg, schedule):
    for experiment, objective in EXPERIMENTS.items():
        cfg = compose_cfg(
            f"experiment={experiment}", "+scale=cpu", f"schedule={schedule}", tiny=False
        )
        assert (cfg.parameterization.name, cfg.variance.name, cfg.loss.name) == objective
        assert cfg.schedule.name == schedule and cfg.schedule.num_timesteps == 1000
        assert cfg.data._target_.endswith("DigitsDataModule") and cfg.model.base_channels == 16
        assert cfg.trainer.accelerator == "cpu" and cfg.task_name == "ablation_cpu"
        # One evaluation protocol for every row: one sampler and N, fixed NLL subset.
        quality = cfg.callbacks.sample_quality
        assert (quality.sampler, quality.steps, quality.num_samples) == ("dpmpp_2m", 15, 5000)
        assert cfg.callbacks.nll.num_images == 100 and cfg.callbacks.nll.split == "test"
        assert cfg.final_eval.range_check_samples > 0
        assert cfg.callbacks.sample_grid.steps is None
        assert cfg.callbacks.sample_grid.sampler == "ancestral"


def test_paper_scale_keeps_the_paper_run_and_adds_the_paper_protocol(compose_cfg):
    cfg = compose_cfg("experiment=table2_eps_simple", "+scale=paper", tiny=False)
    assert cfg.data._target_.endswith("CIFAR10DataModule") and cfg.trainer.max_steps == 800_000
    assert cfg.data.batch_size == 128 and cfg.module.ema_decay == pytest.approx(0.9999)
    # One end-of-training sample-quality evaluation, with the paper's protocol; the periodic
    # DDIM curve stays for monitoring.
    assert "sample_quality_final" not in cfg.callbacks
    final = instantiate(cfg.callbacks.sample_quality)
    assert final.run_on_train_end and final.every_n_steps == 0
    assert final.num_samples == 50_000 and final.sampler == SamplerSpec("ancestral")
    assert final.compute_is and final.is_splits == 10
    periodic = instantiate(cfg.callbacks.sample_quality_periodic)
    assert not periodic.run_on_train_end and periodic.every_n_steps == 50_000
    assert periodic.num_samples == 10_000 and periodic.sampler == SamplerSpec("ddim", 100)
    assert cfg.callbacks.nll.num_images == 10_000 and cfg.final_eval.range_check_samples > 0


# ---------------------------------------------------------------------------- synthetic sweep
def _run(
    root: Path,
    name: str,
    objective: tuple[str, str, str],
    schedule: str,
    seed: int,
    metrics: dict | None,
    config: bool = True,
) -> Path:
    """A run directory like a Hydra multirun job's: .hydra/config.yaml and metrics.json."""
    path = root / name
    path.mkdir(parents=True)
    p, v, loss = objective
    if config:
        (path / ".hydra").mkdir()
        cfg = {
            "parameterization": {"name": p},
            "variance": {"name": v},
            "loss": {"name": loss},
            "schedule": {"name": schedule, "num_timesteps": 1000},
            "seed": seed,
            "callbacks": {"nll": {"num_images": 100, "split": "test", "seed": "${seed}"}},
            "paths": {"output_dir": "${hydra:runtime.output_dir}"},
        }
        (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    if metrics is not None:
        base = {
            "diffusion": f"{p}-{v}-{loss}",
            "schedule": schedule,
            "seed": seed,
            "diverged": False,
            "git_commit": "abc123",
            "wall_time_s": 60.0,
            "samples_finite": True,
            "samples_out_of_range_fraction": 0.0,
        }
        (path / "metrics.json").write_text(json.dumps({**base, **metrics}))
    return path


EPS_SIMPLE = EXPERIMENTS["table2_eps_simple"]
EPS_VLB = EXPERIMENTS["table2_eps_vlb_fixed"]
EPS_LEARNED = EXPERIMENTS["table2_eps_vlb_learned"]
MU_SIMPLE = EXPERIMENTS["table2_mu_simple"]
MU_VLB = EXPERIMENTS["table2_mu_vlb_fixed"]
FD = "fd_digits_400"
DELTA_FD, DELTA_NLL = f"Δ {FD} vs baseline [95% CI]", "Δ NLL vs baseline [95% CI]"


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A sweep with three seeds, a diverged run, out-of-range samples, a missing metric, a crash."""
    root = tmp_path / "sweep"
    linear, cosine = root / "linear", root / "cosine"  # nested: one sub-sweep per schedule
    for seed, (fd, nll) in enumerate([(1.0, 1.10), (2.0, 1.20), (4.0, 1.30)]):
        _run(linear, f"{seed}-eps-simple", EPS_SIMPLE, "linear", seed, {FD: fd, "nll_bpd": nll})
    _run(
        linear,
        "3-mu-simple",
        MU_SIMPLE,
        "linear",
        0,
        {"diverged": True, "diverged_at_step": 123, "final_train_loss": float("nan")},
    )
    _run(
        linear,
        "4-mu-vlb",
        MU_VLB,
        "linear",
        0,
        {FD: 9.0, "nll_bpd": 2.0, "samples_out_of_range_fraction": 0.25},
    )
    _run(linear, "5-eps-vlb", EPS_VLB, "linear", 0, {FD: 3.0})  # no nll_bpd: "n/a"
    _run(linear, "6-eps-learned", EPS_LEARNED, "linear", 0, None)  # crashed: config only
    _run(cosine, "0-eps-simple", EPS_SIMPLE, "cosine", 0, {FD: 5.5, "nll_bpd": 1.25})
    _run(cosine, "1-eps-simple", EPS_SIMPLE, "cosine", 1, {"diverged": True})
    _run(cosine, "2-eps-simple", EPS_SIMPLE, "cosine", 2, {"nll_bpd": 1.35})  # no FD in one seed
    # metrics.json without a saved config (e.g. copied results): the objective comes from it.
    _run(cosine, "3-x0-small-vlb", ("x0", "fixed_small", "vlb"), "cosine", 0, {FD: 7.0}, False)
    (root / "stray").mkdir()  # not a run
    return root


def _cells(table: ablation.Table) -> dict[tuple[str, str], dict[str, str]]:
    headers = ablation.headers(table)
    return {
        (r.experiment or r.label, r.schedule): dict(zip(headers, ablation.display_row(r)))
        for r in table.rows
    }


def test_find_runs_searches_recursively_and_skips_non_runs(sweep):
    runs = ablation.find_runs(sweep)
    assert len(runs) == 11
    assert sweep / "linear" / "6-eps-learned" in runs and sweep / "stray" not in runs
    with pytest.raises(FileNotFoundError):
        ablation.find_runs(sweep / "missing")


def test_classify_run_statuses(sweep):
    linear = sweep / "linear"
    ok = ablation.classify_run(linear / "0-eps-simple")
    assert (ok.status, ok.objective_key, ok.schedule, ok.seed) == (
        "ok",
        (*EPS_SIMPLE, "none", ""),
        "linear",
        0,
    )
    diverged = ablation.classify_run(linear / "3-mu-simple")
    assert diverged.status == "unstable"
    assert diverged.reason == "diverged (non-finite loss at step 123)"
    # Pixels out of range alone do not make a run unstable (the scores decide: build_table).
    assert ablation.classify_run(linear / "4-mu-vlb").status == "ok"
    crashed = ablation.classify_run(linear / "6-eps-learned")
    assert crashed.status == "crashed" and crashed.objective_key == (*EPS_LEARNED, "none", "")
    assert crashed.metrics is None and crashed.seed == 0
    no_config = ablation.classify_run(sweep / "cosine" / "3-x0-small-vlb")
    assert no_config.objective_key == ("x0", "fixed_small", "vlb", "none", "")
    assert no_config.seed == 0


def test_run_record_finds_checkpoint_and_saved_bound_terms(sweep, tmp_path):
    run_dir = sweep / "linear" / "0-eps-simple"
    record = ablation.classify_run(run_dir)
    assert record.checkpoint is None and record.nll_terms is None
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (run_dir / "nll").mkdir()
    for step in (100, 200):
        (run_dir / "nll" / f"terms_step{step:07d}.npy").write_bytes(b"x")
    assert record.checkpoint == run_dir / "checkpoints" / "last.ckpt"
    assert record.nll_terms == run_dir / "nll" / "terms_step0000200.npy"  # newest step
    # The file metrics.json names wins, where the run wrote it or, copied, under <run>/nll/.
    elsewhere = tmp_path / "written" / "terms_step0000100.npy"
    record.metrics = {**(record.metrics or {}), "nll_terms_npy": str(elsewhere)}
    assert record.nll_terms == run_dir / "nll" / "terms_step0000100.npy"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"x")
    assert record.nll_terms == elsewhere


def test_table_cells(sweep):
    runs = [ablation.classify_run(p) for p in ablation.find_runs(sweep)]
    table = ablation.build_table(runs, baseline=8.0)  # the data-Gaussian baseline of FD
    assert table.fd_key == FD and table.is_key is None
    cells = _cells(table)
    # Rows in the paper's order, then unknown objectives; linear before cosine.
    assert [(r.experiment, r.schedule) for r in table.rows] == [
        ("table2_mu_vlb_fixed", "linear"),
        ("table2_mu_simple", "linear"),
        ("table2_eps_vlb_learned", "linear"),
        ("table2_eps_vlb_fixed", "linear"),
        ("table2_eps_simple", "linear"),
        ("table2_eps_simple", "cosine"),
        ("", "cosine"),
    ]
    fd_col, nll_col = f"{FD} ↓", "NLL test (bits/dim) ↓"

    # Three seeds: mean ± the 95% t-interval's half-width t₀.₉₇₅,₂·s/√3 (t₀.₉₇₅,₂ = 4.3027).
    # fd: mean 7/3, s = √(7/3), half-width 3.7947; nll: mean 1.2, s = 0.1, half-width 0.2484.
    row = cells[("table2_eps_simple", "linear")]
    assert row["Seeds"] == "3" and row["IS"] == "n/a"
    assert row[fd_col] == "2.33 ± 3.79 (n=3)" and row[nll_col] == "1.200 ± 0.248 (n=3)"
    assert row[DELTA_FD] == "baseline" and row[DELTA_NLL] == "baseline"
    assert (row["Paper IS"], row["Paper FID"], row["Paper NLL"]) == (
        "9.46 ± 0.11",
        "3.17",
        "≤ 3.75",
    )
    assert row["Status"] == "ok"

    # Diverged (non-finite loss), and a score worse than the data-Gaussian baseline: "–" like
    # the paper; the share of pixels out of range is a column, whatever the status.
    row = cells[("table2_mu_simple", "linear")]
    assert (row["IS"], row[fd_col], row[nll_col]) == ("–", "–", "–")
    assert row["Status"] == "seed 0: unstable, diverged (non-finite loss at step 123)"
    assert (row["Paper IS"], row["Paper FID"]) == ("–", "–")
    row = cells[("table2_mu_vlb_fixed", "linear")]
    assert (row[fd_col], row[nll_col], row["Out of range"]) == ("–", "–", "25.0% (n=1)")
    assert (row[DELTA_FD], row[DELTA_NLL]) == ("n/a", "n/a")  # no stable run to pair
    assert row["Status"] == (
        "seed 0: unstable, fd_digits_400 9.0 worse than the data-Gaussian baseline 8.0"
    )
    assert cells[("table2_eps_simple", "linear")]["Out of range"] == "0.0 ± 0.0% (n=3)"
    # Without a baseline only training and finiteness decide.
    plain = _cells(ablation.build_table(runs))
    assert plain[("table2_mu_vlb_fixed", "linear")][fd_col] == "9.00 (n=1)"
    # Seed 0 of both rows: 9.0 − 1.0 and 2.0 − 1.1, one pair, so no interval.
    assert plain[("table2_mu_vlb_fixed", "linear")][DELTA_FD] == "+8.00 (n=1)"
    assert plain[("table2_mu_vlb_fixed", "linear")][DELTA_NLL] == "+0.900 (n=1)"
    assert plain[("table2_mu_vlb_fixed", "linear")]["Status"] == "ok"

    # A missing metric is "n/a", not "–".
    row = cells[("table2_eps_vlb_fixed", "linear")]
    assert (row["IS"], row[fd_col], row[nll_col]) == ("n/a", "3.00 (n=1)", "n/a")
    assert row["Paper NLL"] == "≤ 3.70"

    # A crashed run (no metrics.json) is listed, with n/a cells, and does not stop the table.
    row = cells[("table2_eps_vlb_learned", "linear")]
    assert row["Seeds"] == "0/1" and (row[fd_col], row[nll_col]) == ("n/a", "n/a")
    assert row["Status"].startswith("seed 0: crashed, no metrics.json")

    # Cosine, seeds 0 ok, 1 diverged, 2 ok without FD: statistics over the stable seeds only.
    row = cells[("table2_eps_simple", "cosine")]
    assert row["Seeds"] == "3"
    # nll over seeds 0, 2: s = 0.0707, t₀.₉₇₅,₁ = 12.706: half-width 0.6353.
    assert row[fd_col] == "5.50 (n=1)" and row[nll_col] == "1.300 ± 0.635 (n=2)"
    assert row["Status"] == "seed 1: unstable, diverged (non-finite loss); 2 ok"
    assert (row["Paper IS"], row["Paper FID"], row["Paper NLL"]) == ("", "", "")  # linear only

    row = cells[("x0 prediction, loss=vlb, variance=fixed_small", "cosine")]
    assert row[fd_col] == "7.00 (n=1)" and row["Experiment"] == ""
    # The cosine baseline has fd in seed 0 only, this row too: one pair, 7.0 − 5.5.
    assert row[DELTA_FD] == "+1.50 (n=1)" and row[DELTA_NLL] == "n/a"


def test_markdown_and_csv_files(sweep, tmp_path):
    out = tmp_path / "out"
    assert ablation.main([str(sweep), "--out", str(out), "--baseline", "8"]) == 0
    md = (out / "ablation.md").read_text()
    header = (
        "| Objective | Experiment | Schedule | Seeds | IS | fd_digits_400 ↓ | NLL test (bits/dim) ↓ "
        "| Δ fd_digits_400 vs baseline [95% CI] | Δ NLL vs baseline [95% CI] "
        "| Out of range | Paper IS | Paper FID | Paper NLL | Status |"
    )
    assert header in md
    assert (
        "| ε prediction, ‖ε̃ − ε_θ‖² (L_simple) | table2_eps_simple | linear | 3 | n/a "
        "| 2.33 ± 3.79 (n=3) | 1.200 ± 0.248 (n=3) | baseline | baseline | 0.0 ± 0.0% (n=3) "
        "| 9.46 ± 0.11 | 3.17 | ≤ 3.75 | ok |"
    ) in md
    assert (
        "| μ̃ prediction, ‖μ̃ − μ̃_θ‖² | table2_mu_simple | linear | 1 | – | – | – | n/a | n/a "
        "| 0.0% (n=1) | – | – |  | seed 0: unstable, diverged (non-finite loss at step 123) |"
    ) in md
    assert "first 100 images of the test split" in md and "`abc123`" in md
    assert "Baseline: `fd_digits_400` = 8.00, given with --baseline." in md
    # The unstable runs' measured values and the reason are listed below the table.
    assert (
        "| 3-mu-simple | 0 | n/a | diverged (non-finite loss at step 123) | n/a | 0 | nan |" in md
    )
    assert (
        "| 4-mu-vlb | 0 | 9 | fd_digits_400 9.0 worse than the data-Gaussian baseline 8.0 "
        "| 2 | 0.25 | n/a | n/a |"
    ) in md
    assert not (sweep / "ablation.md").exists()  # --out was honoured

    with (out / "ablation.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 7
    first = {(r["Experiment"], r["Schedule"]): r for r in rows}[("table2_eps_simple", "linear")]
    assert first[f"{FD} ↓"] == "2.33 ± 3.79 (n=3)" and first["n_ok"] == "3"
    assert float(first["fd_ci_high"]) - 7 / 3 == pytest.approx(
        4.302652730 * (7 / 9) ** 0.5, abs=1e-8
    )
    assert first["delta_fd_mean"] == ""  # the baseline row has no difference to itself
    mu_vlb = {(r["Experiment"], r["Schedule"]): r for r in rows}[("table2_mu_vlb_fixed", "linear")]
    assert mu_vlb["delta_fd_mean"] == ""  # "–": nothing stable to pair
    assert float(first["fd_mean"]) == pytest.approx(7 / 3, abs=1e-12)
    assert float(first["fd_std"]) == pytest.approx((7 / 3) ** 0.5, abs=1e-12)
    assert float(first["nll_bpd_std"]) == pytest.approx(0.1, abs=1e-12)
    assert first["seeds_run"] == "0 1 2" and first["fd_key"] == FD
    crashed = {(r["Experiment"], r["Schedule"]): r for r in rows}[
        ("table2_eps_vlb_learned", "linear")
    ]
    assert crashed["n_crashed"] == "1" and crashed["fd_mean"] == ""
    assert first["fd_baseline"] == "8.0" and float(first["out_of_range_pct_mean"]) == 0.0
    # The samples-against-likelihood figure, written beside the table.
    assert (out / "ablation_tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baseline_option_and_its_note(sweep, tmp_path, capsys):
    """'none' and a run set without data config: the table says why there is no baseline."""
    assert ablation.main([str(sweep), "--out", str(tmp_path / "a"), "--baseline", "none"]) == 0
    assert "No baseline was computed (--baseline none)" in (tmp_path / "a/ablation.md").read_text()
    assert ablation.main([str(sweep), "--out", str(tmp_path / "b")]) == 0  # auto: no data config
    assert (
        "No baseline was computed (could not compute it here"
        in (tmp_path / "b/ablation.md").read_text()
    )
    assert ablation.main([str(sweep), "--baseline", "low"]) == 2
    assert "--baseline 'low'" in capsys.readouterr().err
    assert ablation.protocol_num_samples("fid_10k_ddim100") == 10_000
    assert ablation.protocol_num_samples("fd_digits_400") == 400
    with pytest.raises(ValueError, match="does not name its number of samples"):
        ablation.protocol_num_samples("fd_digits")


def test_fid_50k_is_preferred_and_brings_its_is(tmp_path):
    root = tmp_path / "sweep"
    metrics = {"fid_10k_ddim100": 9.0, "fid_50k": 3.5, "is_50k": 9.25, "is_50k_std": 0.1}
    _run(root, "0-a", EPS_SIMPLE, "linear", 0, metrics)
    _run(root, "1-b", EPS_SIMPLE, "linear", 1, {**metrics, "fid_50k": 4.5, "is_50k": 9.75})
    table = ablation.build_table([ablation.classify_run(p) for p in ablation.find_runs(root)])
    assert (table.fd_key, table.is_key) == ("fid_50k", "is_50k")
    row = _cells(table)[("table2_eps_simple", "linear")]
    # Two seeds: half-width t₀.₉₇₅,₁·s/√2 = 12.706·0.7071/1.4142 = 6.353 (FID), 3.177 (IS).
    assert (
        row["FID (fid_50k) ↓"] == "4.00 ± 6.35 (n=2)" and row["IS (is_50k)"] == "9.50 ± 3.18 (n=2)"
    )


def _evaluation(run: Path, sampler: str, metrics: dict) -> None:
    """What ``python -m ddpm.sweep_eval`` leaves: <run>/evaluations/<sampler>/metrics.json."""
    out = run / "evaluations" / sampler
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps(metrics))


def test_ranking_by_sampler_from_re_evaluations(tmp_path):
    """Re-evaluations add one column group per sampler; ranks are per schedule; stability is the
    run's own, never the re-evaluation's."""
    root = tmp_path / "sweep"
    ddim, fast = "fd_digits_400_ddim50", "fd_digits_400_dpmpp20"
    a = _run(root, "0-eps-simple", EPS_SIMPLE, "linear", 0, {FD: 2.0, "nll_bpd": 1.0})
    b = _run(root, "1-eps-vlb", EPS_VLB, "linear", 0, {FD: 3.0, "nll_bpd": 0.9})
    c = _run(root, "2-mu-simple", MU_SIMPLE, "linear", 0, {"diverged": True})
    _evaluation(a, "ddim50", {ddim: 5.0, "nll_bpd": 99.0})  # nll is not sample quality: ignored
    _evaluation(b, "ddim50", {ddim: 4.0})  # DDIM swaps the order of the two ε rows
    _evaluation(a, "dpmpp_2m20", {fast: 2.5, "nonfinite_frac_400_dpmpp20": 0.5})
    _evaluation(b, "dpmpp_2m20", {fast: 3.5})
    _evaluation(c, "ddim50", {ddim: 1.0})  # a diverged run stays "–" whatever it scores
    runs = [ablation.classify_run(p) for p in ablation.find_runs(root)]
    assert len(runs) == 3  # the evaluations are not runs of their own
    assert {r.path.name: r.status for r in runs}["0-eps-simple"] == "ok"  # nonfinite ignored
    table = ablation.build_table(runs)
    assert table.fd_key == FD  # the table's own column is the runs' own evaluation
    assert ablation.sampler_keys(table) == [FD, ddim, fast]
    ranking = ablation.sampler_ranking(table)
    index = {r.experiment: i for i, r in enumerate(table.rows)}
    eps_simple, eps_vlb, mu = (
        index["table2_eps_simple"],
        index["table2_eps_vlb_fixed"],
        index["table2_mu_simple"],
    )
    assert ranking[FD][eps_simple][1] == 1 and ranking[FD][eps_vlb][1] == 2
    assert ranking[ddim][eps_simple][1] == 2 and ranking[ddim][eps_vlb][1] == 1
    assert ranking[fast][eps_simple][0].text == "2.50 (n=1)" and ranking[fast][eps_simple][1] == 1
    assert ranking[ddim][mu] == (ablation.Cell("–"), None)
    assert ranking[FD][eps_simple][0].mean == 2.0  # NLL 99 of the re-evaluation did not leak

    out = tmp_path / "out"
    assert ablation.main([str(root), "--out", str(out)]) == 0
    md = (out / "ablation.md").read_text()
    assert f"| Objective | Schedule | `{FD}` | `{ddim}` | `{fast}` |" in md
    assert (
        "| ε prediction, ‖ε̃ − ε_θ‖² (L_simple) | linear | 2.00 (n=1) #1 | 5.00 (n=1) #2 "
        "| 2.50 (n=1) #1 |"
    ) in md
    assert "- linear: the order of the rows is **not** the same under every sampler." in md
    with (out / "ablation_samplers.csv").open() as handle:
        rows = {r["experiment"]: r for r in csv.DictReader(handle)}
    assert rows["table2_eps_vlb_fixed"][f"{ddim}_rank"] == "1"
    assert float(rows["table2_eps_vlb_fixed"][f"{ddim}_mean"]) == 4.0


def test_no_sampler_section_without_re_evaluations(sweep, tmp_path):
    assert ablation.main([str(sweep), "--out", str(tmp_path / "out")]) == 0
    assert (
        "Does the ranking depend on the sampler?" not in (tmp_path / "out/ablation.md").read_text()
    )
    assert not (tmp_path / "out" / "ablation_samplers.csv").exists()


def test_cli_errors(tmp_path, capsys):
    assert ablation.main([str(tmp_path / "missing")]) == 1
    (tmp_path / "empty").mkdir()
    assert ablation.main([str(tmp_path / "empty")]) == 1
    assert "no runs" in capsys.readouterr().err


def test_wandb_table_offline(sweep, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    table = ablation.build_table([ablation.classify_run(p) for p in ablation.find_runs(sweep)])
    assert ablation.log_wandb(table, sweep) is True
    assert list((sweep / "wandb").glob("offline-run-*"))
    # The W&B directory is not mistaken for a run.
    assert len(ablation.find_runs(sweep)) == 11


# ---------------------------------------------------------------------------- end to end
def test_mini_sweep_end_to_end(tmp_path):
    """The documented multirun over two Table 2 rows (tiny settings), then the table."""
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "DDPM_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    sweep = tmp_path / "sweep"
    train = subprocess.run(
        [
            sys.executable,
            "src/train.py",
            "-m",
            "experiment=table2_eps_simple,table2_mu_vlb_learned",
            "schedule=linear",
            *TINY,
            f"paths.log_dir={tmp_path / 'logs'}",
            f"paths.data_dir={tmp_path / 'data'}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0-eps-fixed_large-simple-linear", "1-mu-learned-vlb-linear"]
    table = subprocess.run(
        [sys.executable, "-m", "ddpm.ablation", str(sweep)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert table.returncode == 0, table.stderr[-3000:]
    md = (sweep / "ablation.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "prediction" in line]
    assert len(rows) == 2
    assert rows[0].startswith("| μ̃ prediction, L, learned diagonal Σ | table2_mu_vlb_learned")
    assert rows[1].startswith("| ε prediction, ‖ε̃ − ε_θ‖² (L_simple) | table2_eps_simple")
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2] == "linear" and cells[3] == "1"
        # Finite NLL from the NLL callback (4 images in TINY); no sample-quality callback there.
        assert cells[5] == "n/a" and re.fullmatch(r"\d+\.\d{3} \(n=1\)", cells[6]), line
    # Δ NLL of the μ̃ row against the ε + L_simple row, paired on seed 0 (one pair: no interval).
    mu_cells = [c.strip() for c in rows[0].strip("|").split("|")]
    eps_nll = float(rows[1].strip("|").split("|")[6].split()[0])
    delta, n = mu_cells[8].split()
    assert n == "(n=1)"  # the two displayed means are rounded to 1e-3 each
    assert float(delta) == pytest.approx(float(mu_cells[6].split()[0]) - eps_nll, abs=1.5e-3)
    assert "python src/train.py -m experiment=table2_eps_simple,table2_mu_vlb_learned" in md
    with (sweep / "ablation.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 2

    # The same checkpoints under two other samplers (python -m ddpm.sweep_eval), then the table.
    def sweep_eval() -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable, "-m", "ddpm.sweep_eval", str(sweep),
                "--sampler", "ddim:5", "--sampler", "dpmpp_2m:5",
                "--eval-args", "sample_quality.num_samples=20", "sample_quality.batch_size=20",
                f"paths.log_dir={tmp_path / 'logs'}",
            ],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    proc = sweep_eval()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    eps_run = sweep / "0-eps-fixed_large-simple-linear"
    for sampler, key in (("ddim5", "fd_digits_20_ddim5"), ("dpmpp_2m5", "fd_digits_20_dpmpp5")):
        metrics = json.loads((eps_run / "evaluations" / sampler / "metrics.json").read_text())
        assert metrics[key] > 0 and "nll_bpd" not in metrics  # bits/dim switched off
    stamp = (eps_run / "evaluations" / "ddim5" / "metrics.json").stat().st_mtime_ns
    assert sweep_eval().returncode == 0  # resumable: finished evaluations are skipped
    assert (eps_run / "evaluations" / "ddim5" / "metrics.json").stat().st_mtime_ns == stamp
    assert ablation.main([str(sweep)]) == 0
    md = (sweep / "ablation.md").read_text()
    assert "| `fd_digits_20_ddim5` | `fd_digits_20_dpmpp5` |" in md


# ---------------------------------------------------------------------------- paired comparisons
def test_rows_with_one_seed_share_their_initial_weights(compose_cfg):
    """Common random numbers: with the seed train() sets, every row builds the same initial
    network wherever the shapes agree (the learned-variance rows differ only in the output conv),
    so a paired difference compares objectives, not initialisations."""
    import lightning.pytorch as pl

    from ddpm.builders import build_module

    def initial_weights(experiment: str, seed: int) -> dict:
        cfg = compose_cfg(f"experiment={experiment}", f"seed={seed}")
        pl.seed_everything(int(cfg.seed), workers=True)  # as ddpm.tasks.train.run does
        return dict(build_module(cfg, (1, 8, 8)).net.state_dict())

    base = initial_weights("table2_eps_simple", 3)
    for experiment in ("ext_v_simple", "obj_edm", "table2_mu_vlb_fixed", "table2_eps_vlb_learned"):
        other = initial_weights(experiment, 3)
        assert other.keys() == base.keys()
        differ = [k for k in base if other[k].shape != base[k].shape]
        assert differ == (
            [] if "learned" not in experiment else ["conv_out.weight", "conv_out.bias"]
        )
        for key in base.keys() - set(differ):
            assert torch.equal(other[key], base[key]), (experiment, key)
    other_seed = initial_weights("table2_eps_simple", 4)
    assert any(not torch.equal(other_seed[k], base[k]) for k in base)


def test_paired_difference_and_intervals_against_closed_forms():
    """stats: Student-t intervals, computed here from the textbook formula with tabulated
    quantiles (t₀.₉₇₅,₄ = 2.7764451052), and the paired difference over shared seeds only."""
    from ddpm.ablation.stats import mean_interval, paired_difference

    values = [3.0, 5.0, 4.0, 6.0, 2.0]
    interval = mean_interval(values)
    s = (sum((v - 4.0) ** 2 for v in values) / 4) ** 0.5
    half = 2.7764451052 * s / 5**0.5
    assert interval.mean == pytest.approx(4.0, abs=1e-12) and interval.n == 5
    assert (interval.low, interval.high) == (
        pytest.approx(4 - half, abs=1e-9),
        pytest.approx(4 + half, abs=1e-9),
    )
    assert interval.resolved  # 4 ± 1.96 excludes 0
    one = mean_interval([1.0])
    assert one.n == 1 and not one.resolved and one.low != one.low  # NaN bounds
    row = {0: 10.0, 1: 12.0, 2: 11.0, 3: 13.0, 7: 99.0}
    base = {0: 9.0, 1: 10.5, 2: 10.0, 3: 12.5, 5: -1.0}
    delta = paired_difference(row, base)
    diffs = [1.0, 1.5, 1.0, 0.5]  # seeds 0–3 only
    s = (sum((d - 1.0) ** 2 for d in diffs) / 3) ** 0.5
    half = 3.1824463053 * s / 2  # t₀.₉₇₅,₃
    assert delta is not None and delta.n == 4 and delta.mean == pytest.approx(1.0, abs=1e-12)
    assert delta.half_width == pytest.approx(half, abs=1e-9) and delta.resolved
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
    with pytest.raises(ValueError, match="at least one value"):
        mean_interval([])


def test_delta_column_pairs_by_seed_and_marks_resolved(tmp_path):
    """Row − baseline per seed: v's fd is the baseline's + (1.0, 1.2, 0.8) — resolved although
    the seeds' own spread (±5) is far larger; its nll differs by (+0.1, −0.1, 0.0) — not."""
    root = tmp_path / "sweep"
    base_fd, base_nll = [10.0, 20.0, 15.0], [1.0, 1.2, 1.1]
    for seed in range(3):
        _run(
            root,
            f"{seed}-eps",
            EPS_SIMPLE,
            "linear",
            seed,
            {FD: base_fd[seed], "nll_bpd": base_nll[seed]},
        )
        metrics = {
            FD: base_fd[seed] + [1.0, 1.2, 0.8][seed],
            "nll_bpd": base_nll[seed] + [0.1, -0.1, 0.0][seed],
        }
        _run(root, f"{seed}-v", EXPERIMENTS["ext_v_simple"], "linear", seed, metrics)
    table = ablation.build_table([ablation.classify_run(p) for p in ablation.find_runs(root)])
    row = _cells(table)[("ext_v_simple", "linear")]
    # mean 1.0, s = 0.2, half-width t₀.₉₇₅,₂·0.2/√3 = 0.4968; nll: mean 0, s = 0.1, 0.2484.
    assert row[DELTA_FD] == "+1.00 [+0.50, +1.50] ✓ (n=3)"
    assert row[DELTA_NLL] == "+0.000 [-0.248, +0.248] (n=3)"


def test_a_continuous_row_without_its_own_baseline_is_compared_with_the_linear_one(tmp_path):
    """VDM's learned-schedule row has no baseline of its schedule: its Δ is against ε + L_simple
    on the linear schedule, paired by seed (nll −0.5, −0.7, −0.6: mean −0.6, s = 0.1, half-width
    t₀.₉₇₅,₂·0.1/√3 = 0.2484)."""
    root = tmp_path / "sweep"
    for seed in range(3):
        _run(root, f"{seed}-eps", EPS_SIMPLE, "linear", seed, {FD: 10.0, "nll_bpd": 4.6})
        path = _run(
            root,
            f"{seed}-vdm",
            EPS_VLB,
            "learned",
            seed,
            {FD: 50.0, "nll_bpd": 4.6 + [-0.5, -0.7, -0.6][seed]},
        )
        config = yaml.safe_load((path / ".hydra" / "config.yaml").read_text())
        config["time"] = {"name": "continuous"}
        (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    table = ablation.build_table([ablation.classify_run(p) for p in ablation.find_runs(root)])
    row = next(r for r in table.rows if r.schedule == "learned")
    assert row.variant == "continuous+learned_schedule"
    assert row.experiment == "vdm_learned"  # not vdm_cosine, whose key is "continuous"
    nll = row.delta["nll"]
    assert nll.mean == pytest.approx(-0.6) and nll.n == 3 and nll.resolved
    assert nll.high - nll.mean == pytest.approx(0.2484, abs=1e-4)


def test_noise_decomposition_from_re_evaluations(tmp_path):
    """Var_total (own evaluations over training seeds) = Var_training + Var_evaluation (one
    checkpoint over evaluation seeds, its own evaluation included)."""
    from ddpm.ablation.noise import decompose, render

    root = tmp_path / "sweep"
    own = [10.0, 14.0, 12.0, 16.0]  # total sd √(20/3)
    for seed, fd in enumerate(own):
        _run(root, f"{seed}-eps", EPS_SIMPLE, "linear", seed, {FD: fd, "nll_bpd": 1.0 + seed / 10})
    for k, fd in enumerate([11.0, 9.0, 10.0]):  # + the run's own 10.0: sd √(2/3)
        out = root / "0-eps" / "noise" / f"seed{1000 + k}"
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({FD: fd, "nll_bpd": 1.0}))
    runs = [ablation.classify_run(p) for p in ablation.find_runs(root)]
    assert len(runs) == 4  # the noise re-evaluations are not runs of their own
    rows = {r.metric: r for r in decompose(runs, [FD, "nll_bpd"])}
    fd = rows[FD]
    assert (fd.experiment, fd.checkpoint_seed, fd.evaluation_n, fd.total_n) == (
        "table2_eps_simple", 0, 4, 4,
    )  # fmt: skip
    assert fd.evaluation_sd == pytest.approx((2 / 3) ** 0.5, abs=1e-12)
    assert fd.total_sd == pytest.approx((20 / 3) ** 0.5, abs=1e-12)
    assert fd.training_sd == pytest.approx(6**0.5, abs=1e-12)
    assert rows["nll_bpd"].evaluation_sd == 0.0  # four identical bounds
    assert (
        "| table2_eps_simple | `fd_digits_400` | 0.816 (4) | 2.582 (4) | 2.449 | 0.33 |"
        in render(list(rows.values()))
    )
    # The command line on runs without checkpoints (committed results): it decomposes what the
    # runs hold and writes noise.md / noise.csv.
    from ddpm.ablation import noise

    assert noise.main([str(root), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "noise.md").read_text()
    assert "| table2_eps_simple | `fd_digits_400` | 0.816 (4) |" in text
    (tmp_path / "empty").mkdir()
    _run(tmp_path / "empty", "0-eps", EPS_SIMPLE, "linear", 0, {FD: 1.0})
    assert noise.main([str(tmp_path / "empty")]) == 1


def test_re_evaluation_commands_refuse_an_unknown_row(tmp_path, capsys):
    from ddpm import sweep_eval
    from ddpm.ablation import noise

    (tmp_path / "s").mkdir()
    assert (
        sweep_eval.main(
            [str(tmp_path / "s"), "--sampler", "ddim:5", "--experiments", "table2_eps_simpel"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "unknown experiment(s) table2_eps_simpel: choose from" in err and "table2_eps_simple" in err
    )
    assert noise.main([str(tmp_path / "s"), "--experiments", "nope"]) == 2
    assert noise.main([str(tmp_path / "s"), "--eval-seeds", "a,b"]) == 2


def test_sweep_eval_re_evaluates_only_the_rows_asked_for(tmp_path, monkeypatch):
    from ddpm import sweep_eval

    root = tmp_path / "sweep"
    for name, objective in (("0-eps", EPS_SIMPLE), ("1-mu", MU_VLB)):
        run = _run(root, name, objective, "linear", 0, {FD: 1.0})
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    called = []

    def fake_run(command, **kwargs):
        called.append(next(a for a in command if a.startswith("ckpt_path=")))
        out = Path(next(a for a in command if a.startswith("hydra.run.dir="))[14:])
        (out / "metrics.json").write_text(json.dumps({"fd_digits_400": 2.0}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(sweep_eval.subprocess, "run", fake_run)
    argv = [str(root), "--sampler", "ancestral", "--experiments", "table2_mu_vlb_fixed"]
    assert sweep_eval.main(argv) == 0
    assert called == [f"ckpt_path={root / '1-mu' / 'checkpoints' / 'last.ckpt'}"]
    assert sweep_eval.main([str(root), "--sampler", "ddim:5", "--seeds", "1"]) == 0
    assert len(called) == 1  # both runs have seed 0
    assert sweep_eval.main([str(root), "--sampler", "ddim:5", "--seeds", "0,1"]) == 0
    assert len(called) == 3
    assert sweep_eval.main([str(root), "--sampler", "ddim:5", "--seeds", "x"]) == 2


def test_unclipped_bounds_fill_the_nll_column_under_their_own_name(tmp_path):
    """Runs evaluated with metrics.clip_bound=false (or before clipping) report
    nll_bpd_unclipped; the table shows it and names it, and never as the paper's bound."""
    root = tmp_path / "sweep"
    _run(root, "0-eps", EPS_SIMPLE, "linear", 0, {FD: 1.0, "nll_bpd_unclipped": 1.5})
    _run(root, "1-eps", EPS_SIMPLE, "linear", 1, {FD: 2.0, "nll_bpd_unclipped": float("nan")})
    runs = [ablation.classify_run(p) for p in ablation.find_runs(root)]
    assert [r.reason for r in runs] == ["", "non-finite bound (nll_bpd_unclipped)"]
    table = ablation.build_table(runs)
    assert table.nll_key == "nll_bpd_unclipped"
    row = _cells(table)[("table2_eps_simple", "linear")]
    assert row["NLL test (nll_bpd_unclipped) ↓"] == "1.500 (n=1)"
    md = ablation.render_markdown(table)
    assert "x̂₀ unclipped: not the paper's protocol" in md
    assert "| Run | Seed | fd_digits_400 | reason | nll_bpd_unclipped |" in md
