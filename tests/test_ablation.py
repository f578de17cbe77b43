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


def test_the_rows_come_from_the_experiment_configs():
    """Every experiment but the quickstart is a row, in its table_row.order; the Makefile's
    lists name them; the keys are what the composed configs train."""
    files = {
        p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml") if p.stem != "quickstart"
    }
    rows = ablation.objectives()
    assert [o.experiment for o in rows] == [*EXPERIMENTS, *WEIGHTING_EXPERIMENTS]
    assert files == {o.experiment for o in rows}
    assert {o.experiment: o.key for o in rows} == {
        **{name: (*key, "none", "") for name, key in EXPERIMENTS.items()},
        **{
            name: (p, "fixed_large", "simple", w, variant)
            for name, (p, w, variant) in WEIGHTING_EXPERIMENTS.items()
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
        assert cfg.data._target_.endswith("DigitsDataModule") and cfg.model.base_channels == 32
        assert cfg.trainer.accelerator == "cpu" and cfg.task_name == "ablation_cpu"
        # One evaluation protocol for every row: full ancestral sampler, fixed NLL subset.
        quality = cfg.callbacks.sample_quality
        assert (quality.sampler, quality.steps, quality.num_samples) == ("ancestral", None, 400)
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

    # Three seeds: mean ± sample std. fd: mean 7/3, std sqrt(7/3); nll: mean 1.2, std 0.1.
    row = cells[("table2_eps_simple", "linear")]
    assert row["Seeds"] == "3" and row["IS"] == "n/a"
    assert row[fd_col] == "2.33 ± 1.53" and row[nll_col] == "1.200 ± 0.100"
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
    assert (row[fd_col], row[nll_col], row["Out of range"]) == ("–", "–", "25.0%")
    assert row["Status"] == (
        "seed 0: unstable, fd_digits_400 9.0 worse than the data-Gaussian baseline 8.0"
    )
    assert cells[("table2_eps_simple", "linear")]["Out of range"] == "0.0 ± 0.0%"
    # Without a baseline only training and finiteness decide.
    plain = _cells(ablation.build_table(runs))
    assert plain[("table2_mu_vlb_fixed", "linear")][fd_col] == "9.00"
    assert plain[("table2_mu_vlb_fixed", "linear")]["Status"] == "ok"

    # A missing metric is "n/a", not "–".
    row = cells[("table2_eps_vlb_fixed", "linear")]
    assert (row["IS"], row[fd_col], row[nll_col]) == ("n/a", "3.00", "n/a")
    assert row["Paper NLL"] == "≤ 3.70"

    # A crashed run (no metrics.json) is listed, with n/a cells, and does not stop the table.
    row = cells[("table2_eps_vlb_learned", "linear")]
    assert row["Seeds"] == "0/1" and (row[fd_col], row[nll_col]) == ("n/a", "n/a")
    assert row["Status"].startswith("seed 0: crashed, no metrics.json")

    # Cosine, seeds 0 ok, 1 diverged, 2 ok without FD: statistics over the stable seeds only.
    row = cells[("table2_eps_simple", "cosine")]
    assert row["Seeds"] == "3"
    assert row[fd_col] == "5.50 (n=1)" and row[nll_col] == "1.300 ± 0.071"
    assert row["Status"] == "seed 1: unstable, diverged (non-finite loss); 2 ok"
    assert (row["Paper IS"], row["Paper FID"], row["Paper NLL"]) == ("", "", "")  # linear only

    row = cells[("x0 prediction, loss=vlb, variance=fixed_small", "cosine")]
    assert row[fd_col] == "7.00" and row["Experiment"] == ""


def test_markdown_and_csv_files(sweep, tmp_path):
    out = tmp_path / "out"
    assert ablation.main([str(sweep), "--out", str(out), "--baseline", "8"]) == 0
    md = (out / "ablation.md").read_text()
    header = (
        "| Objective | Experiment | Schedule | Seeds | IS | fd_digits_400 ↓ | NLL test (bits/dim) ↓ "
        "| Out of range | Paper IS | Paper FID | Paper NLL | Status |"
    )
    assert header in md
    assert (
        "| ε prediction, ‖ε̃ − ε_θ‖² (L_simple) | table2_eps_simple | linear | 3 | n/a "
        "| 2.33 ± 1.53 | 1.200 ± 0.100 | 0.0 ± 0.0% | 9.46 ± 0.11 | 3.17 | ≤ 3.75 | ok |"
    ) in md
    assert (
        "| μ̃ prediction, ‖μ̃ − μ̃_θ‖² | table2_mu_simple | linear | 1 | – | – | – | 0.0% | – | – "
        "|  | seed 0: unstable, diverged (non-finite loss at step 123) |"
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
    assert first[f"{FD} ↓"] == "2.33 ± 1.53" and first["n_ok"] == "3"
    assert float(first["fd_mean"]) == pytest.approx(7 / 3, abs=1e-12)
    assert float(first["fd_std"]) == pytest.approx((7 / 3) ** 0.5, abs=1e-12)
    assert float(first["nll_bpd_std"]) == pytest.approx(0.1, abs=1e-12)
    assert first["seeds_run"] == "0 1 2" and first["fd_key"] == FD
    crashed = {(r["Experiment"], r["Schedule"]): r for r in rows}[
        ("table2_eps_vlb_learned", "linear")
    ]
    assert crashed["n_crashed"] == "1" and crashed["fd_mean"] == ""
    assert first["fd_baseline"] == "8.0" and float(first["out_of_range_pct_mean"]) == 0.0


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
    assert row["FID (fid_50k) ↓"] == "4.00 ± 0.71" and row["IS (is_50k)"] == "9.50 ± 0.35"


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
    assert ranking[fast][eps_simple][0].text == "2.50" and ranking[fast][eps_simple][1] == 1
    assert ranking[ddim][mu] == (ablation.Cell("–"), None)
    assert ranking[FD][eps_simple][0].mean == 2.0  # NLL 99 of the re-evaluation did not leak

    out = tmp_path / "out"
    assert ablation.main([str(root), "--out", str(out)]) == 0
    md = (out / "ablation.md").read_text()
    assert f"| Objective | Schedule | `{FD}` | `{ddim}` | `{fast}` |" in md
    assert "| ε prediction, ‖ε̃ − ε_θ‖² (L_simple) | linear | 2.00 (1) | 5.00 (2) | 2.50 (1) |" in md
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
        assert cells[5] == "n/a" and re.fullmatch(r"\d+\.\d{3}", cells[6]), line
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
