"""One checkpoint, every likelihood: ``nll.likelihoods`` of eval.py, its per-image values and
the paired differences (src/ddpm/likelihoods.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from conftest import TinyNet  # tests/ is on sys.path under pytest
from ddpm.data.common import UInt8ImageDataset
from ddpm.data.digits import load_digits_split
from ddpm.diffusion import GaussianDiffusion, make_betas
from ddpm.errors import ConfigError
from ddpm.likelihoods import main as table_main
from ddpm.likelihoods import paired_differences, parse_likelihoods
from ddpm.metrics import batch_seed, evaluate_nll
from ddpm.metrics.bound import BitsPerDim
from ddpm.tasks.evaluate import run as evaluate
from ddpm.tasks.train import run as train

T = 20
#: Student's t quantile t₀.₉₇₅ with 3 degrees of freedom (statistical tables: 3.182).
T_975_3 = 3.182446305284263


# ---------------------------------------------------------------------------- the statistics
def test_paired_difference_matches_a_hand_computation() -> None:
    """Four images: differences 0.5, 0.1, 0.9, 0.2 → mean 0.425, s² = 0.3875/3, half-width
    t₀.₉₇₅,₃ · s/√4; the interval contains 0, so not resolved. A difference that is nearly
    constant per image is resolved although both likelihoods spread widely over the images."""
    per_image = {
        "nll_bpd": np.array([4.0, 5.0, 6.0, 5.5]),
        "nll_bpd_ode": np.array([4.5, 5.1, 6.9, 5.7]),
        "nll_bpd_analytic": np.array([4.1, 5.12, 6.11, 5.59]),
    }
    out = paired_differences(per_image, "nll_bpd")
    assert set(out) == {"nll_bpd_ode", "nll_bpd_analytic"}
    ode = out["nll_bpd_ode"]
    sd = math.sqrt(0.3875 / 3)  # deviations 0.075, −0.325, 0.475, −0.225 from 0.425
    half = T_975_3 * sd / 2
    assert ode["reference"] == "nll_bpd" and ode["n"] == 4 and ode["level"] == 0.95
    assert ode["mean"] == pytest.approx(0.425, abs=1e-12)
    assert ode["stderr"] == pytest.approx(sd / 2, rel=1e-12)
    assert ode["low"] == pytest.approx(0.425 - half, rel=1e-9)
    assert ode["high"] == pytest.approx(0.425 + half, rel=1e-9)
    assert ode["low"] < 0 < ode["high"] and ode["resolved"] is False
    # Differences 0.1, 0.12, 0.11, 0.09: mean 0.105, s² = 0.0005/3.
    analytic = out["nll_bpd_analytic"]
    half = T_975_3 * math.sqrt(0.0005 / 3) / 2
    assert analytic["mean"] == pytest.approx(0.105, abs=1e-12)
    assert analytic["low"] == pytest.approx(0.105 - half, rel=1e-9)
    assert analytic["resolved"] is True and analytic["low"] > 0
    # Unpaired, the two means' standard errors (≈ 0.42 each) would swamp a 0.105 difference.
    assert per_image["nll_bpd"].std(ddof=1) / 2 > 4 * analytic["mean"]
    with pytest.raises(ValueError, match="different numbers of images"):
        paired_differences({"a": np.zeros(3), "b": np.zeros(4)}, "a")


def test_per_image_totals_are_each_images_own_in_any_order() -> None:
    """evaluate_nll(per_image=True) returns each image's bound, in dataset order, as the core
    computes it batch by batch (same seeds); the mean is nll_bpd; the cost is T evaluations
    per image. BitsPerDim fed the batches in another order keeps the same array, and refuses to
    compute when an image is missing or was added twice."""
    torch.manual_seed(0)
    net, diffusion = TinyNet(T).eval(), GaussianDiffusion(make_betas("cosine", T))
    dataset = UInt8ImageDataset(load_digits_split("test")[0][:7])
    got = evaluate_nll(
        diffusion, net, dataset, num_images=7, seed=3, batch_size=3, progress=False,
        per_image=True, report_cost=True,
    )  # fmt: skip
    batches = [(0, 3), (3, 6), (6, 7)]
    outs = {}
    for start, stop in batches:
        x0 = torch.stack([dataset[i] for i in range(start, stop)])
        generator = torch.Generator().manual_seed(batch_seed(3, start, "nll"))
        outs[start] = diffusion.nll_bpd(net, x0, generator=generator)
    expected = torch.cat([outs[s]["total"] for s, _ in batches]).double().numpy()
    np.testing.assert_allclose(got["per_image_bpd"], expected, rtol=1e-6)
    assert got["per_image_bpd"].shape == (7,) and got["per_image_bpd"].dtype == np.float64
    assert got["nll_bpd"] == pytest.approx(got["per_image_bpd"].mean(), rel=1e-12)
    assert got["nll_bpd_nfe"] == T and got["nll_bpd_seconds"] > 0
    assert got["nll_bpd_seconds_per_image"] == pytest.approx(got["nll_bpd_seconds"] / 7)

    metric = BitsPerDim(T, num_images=7)
    for start, _ in reversed(batches):
        metric.update(outs[start], start=start)
    np.testing.assert_allclose(metric.compute()["per_image_bpd"], expected, rtol=1e-6)
    missing = BitsPerDim(T, num_images=7)
    missing.update(outs[0], start=0)
    with pytest.raises(RuntimeError, match="4 of 7 images never added"):
        missing.compute()
    with pytest.raises(ValueError, match="start="):
        missing.update(outs[3])


# ---------------------------------------------------------------------------- eval.py
def test_eval_reports_every_likelihood_on_the_same_images(compose_cfg, tmp_path: Path) -> None:
    """A tiny trained checkpoint: eval.py nll.likelihoods=[bound, bound_unclipped, analytic,
    ode] reports each with finite bits/dim, its standard error and cost keys, on the same n
    images (the per-image arrays, the image counts); the differences to the clipped bound carry
    intervals around their means; the clipped bound is exactly the one eval.py reports alone;
    python -m ddpm.likelihoods renders the table."""
    train(compose_cfg())
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    n = 5

    def run_eval(name: str, *overrides: str) -> dict:
        cfg = compose_cfg(
            f"ckpt_path={ckpt}", "sample_quality.enabled=false", f"nll.num_images={n}",
            "nll.batch_size=3", *overrides, config_name="eval",
        )  # fmt: skip
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path / name)
        evaluate(cfg)
        return json.loads((tmp_path / name / "metrics.json").read_text())

    result = run_eval(
        "all", "nll.likelihoods=[bound,bound_unclipped,analytic,ode]", "nll.ode.rtol=1e-3",
        "nll.ode.atol=1e-3", "analytic_variance.num_images=8",
    )  # fmt: skip
    names = ["nll_bpd", "nll_bpd_unclipped", "nll_bpd_analytic", "nll_bpd_ode"]
    assert result["nll_likelihoods"] == names
    for name in names:
        for key in (name, f"{name}_stderr", f"{name}_nfe", f"{name}_seconds"):
            assert math.isfinite(result[key]), key
        assert result[f"{name}_seconds"] > 0
    assert [result[f"{name}_nfe"] for name in names[:3]] == [50, 50, 50]  # T, tiny scale
    assert result["nll_bpd_ode_nfe"] > 10
    assert result["nll_bpd_analytic_gamma_nfe"] == 8 * 50
    assert result["variance"] == "fixed_large" and result["analytic_gamma"]["num_images"] == 8
    assert result["nll_num_images"] == result["nll_bpd_ode_num_images"] == n
    assert len(result["nll_images_sha256"]) == 64

    arrays = np.load(result["nll_likelihoods_npz"])
    np.testing.assert_array_equal(arrays["image_index"], np.arange(n))
    for name in names:
        assert arrays[name].shape == (n,)
        assert arrays[name].mean() == pytest.approx(result[name], rel=1e-12)
    assert arrays["nll_bpd_terms"].shape == (50,) and "nll_bpd_ode_terms" not in arrays

    differences = result["nll_differences"]
    assert set(differences) == set(names[1:])
    for name, d in differences.items():
        assert d["reference"] == "nll_bpd" and d["n"] == n
        assert d["low"] < d["mean"] < d["high"]
        assert d["mean"] == pytest.approx(result[name] - result["nll_bpd"], abs=1e-9)
        assert d["resolved"] == (d["low"] > 0 or d["high"] < 0)

    alone = run_eval("alone")  # today's default: the clipped bound, same images and seeds
    assert alone["nll_bpd"] == result["nll_bpd"]
    assert alone["nll_bpd_stderr"] == result["nll_bpd_stderr"]

    out = tmp_path / "table.md"
    assert table_main([f"tiny={tmp_path / 'all' / 'metrics.json'}", "--out", str(out)]) == 0
    table = out.read_text()
    assert "| tiny | " in table and "`nll_bpd_ode` − `nll_bpd`" in table
    assert f"same {n} test images" in table


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["nll.likelihoods=[bound,elbo]"], r"unknown \['elbo'\]"),
        (["nll.likelihoods=[bound,ode,bound]"], r"\['bound'\] more than once"),
        (["nll.likelihoods=[]"], "list at least one"),
        (["nll.likelihoods=bound"], "give a list"),
        (["nll.likelihoods=[bound]", "variance=analytic"], "Drop variance"),
        (["nll.likelihoods=[bound]", "nll.estimator=ode"], "Leave nll.estimator=full"),
        (["nll.likelihoods=[bound]", "metrics.clip_bound=false"], "list bound_unclipped"),
    ],
)
def test_the_likelihoods_option_is_checked(compose_cfg, overrides, message) -> None:
    cfg = compose_cfg(*overrides, config_name="eval")
    with pytest.raises(ConfigError, match=message):
        parse_likelihoods(cfg)


def test_no_list_is_todays_single_likelihood(compose_cfg) -> None:
    assert parse_likelihoods(compose_cfg(config_name="eval")) is None
