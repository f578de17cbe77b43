"""Evaluation callbacks in tiny CPU training runs, and the bits/dim metric against the core."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from conftest import TinyNet  # tests/ is on sys.path under pytest
from ddpm.callbacks import NLLCallback, SampleQualityCallback
from ddpm.data.common import UInt8ImageDataset
from ddpm.data.digits import DigitsDataModule, load_digits_split
from ddpm.diffusion import GaussianDiffusion, make_betas
from ddpm.diffusion.sampling import SamplerSpec
from ddpm.lit_module import DiffusionLitModule
from ddpm.metrics import INCEPTION_WEIGHTS_ENV, batch_seed, evaluate_nll, evaluate_sample_quality

T = 20


def test_evaluate_nll_equals_core_nll_bpd() -> None:
    torch.manual_seed(0)
    net, diffusion = TinyNet(), GaussianDiffusion(make_betas("cosine", T))
    dataset = UInt8ImageDataset(load_digits_split("test")[0][:10])
    net.train()
    got = evaluate_nll(diffusion, net, dataset, num_images=10, seed=3, batch_size=4)
    assert net.training  # mode restored

    net.eval()
    totals, priors, terms = [], [], []
    for start, stop in [(0, 4), (4, 8), (8, 10)]:
        x0 = torch.stack([dataset[i] for i in range(start, stop)])
        generator = torch.Generator().manual_seed(batch_seed(3, start, "nll"))
        out = diffusion.nll_bpd(net, x0, generator=generator)
        totals.append(out["total"])
        priors.append(out["prior"])
        terms.append(out["terms"])
    total = torch.cat(totals).double()
    assert got["nll_num_images"] == 10
    assert got["nll_bpd"] == pytest.approx(total.mean().item(), rel=1e-6)
    assert got["nll_prior_bpd"] == pytest.approx(torch.cat(priors).double().mean().item(), rel=1e-6)
    expected_terms = torch.cat(terms).double().mean(dim=0).numpy()
    np.testing.assert_allclose(got["terms_bpd"], expected_terms, rtol=1e-6)
    assert got["terms_bpd"].shape == (T,)
    assert got["nll_decoder_bpd"] == pytest.approx(expected_terms[0], rel=1e-6)
    # The total is the sum of the terms and the prior.
    assert got["nll_bpd"] == pytest.approx(got["terms_bpd"].sum() + got["nll_prior_bpd"], rel=1e-6)
    assert got["nll_bpd_stderr"] == pytest.approx(total.std().item() / np.sqrt(10), rel=1e-6)
    # A DataLoader is accepted: its dataset and batch size are used, never its sampler.
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True)
    again = evaluate_nll(diffusion, net, loader, num_images=10, seed=3)
    assert again["nll_bpd"] == got["nll_bpd"]


def test_stratified_estimate_through_evaluate_nll() -> None:
    """K = T reproduces the full bound (same seeds, 1e-6); K < T is named, per-image exact to the
    core estimator, and its mean lies within 4 standard errors of the full bound."""
    torch.manual_seed(0)
    net, diffusion = TinyNet(), GaussianDiffusion(make_betas("cosine", T))
    dataset = UInt8ImageDataset(load_digits_split("test")[0][:12])
    full = evaluate_nll(diffusion, net, dataset, num_images=12, seed=3, batch_size=5)
    same = evaluate_nll(
        diffusion, net, dataset, num_images=12, seed=3, batch_size=5, estimator="stratified",
        num_terms=T,
    )  # fmt: skip
    assert same["nll_bpd"] == pytest.approx(full["nll_bpd"], rel=1e-6)
    assert same["nll_prior_bpd"] == pytest.approx(full["nll_prior_bpd"], rel=1e-6)
    assert "terms_bpd" not in same and "nll_decoder_bpd" not in same  # one draw per stratum

    K = 5
    est = evaluate_nll(
        diffusion, net, dataset, num_images=12, seed=3, batch_size=5, estimator="stratified",
        num_terms=K,
    )  # fmt: skip
    assert {"nll_bpd_k5", "nll_bpd_k5_stderr", "nll_bpd_k5_estimator_stderr"} <= set(est)
    assert "nll_bpd" not in est  # an estimate never poses as the full bound
    net.eval()
    totals, variances = [], []
    for start, stop in [(0, 5), (5, 10), (10, 12)]:
        x0 = torch.stack([dataset[i] for i in range(start, stop)])
        generator = torch.Generator().manual_seed(batch_seed(3, start, "nll"))
        out = diffusion.nll_bpd_stratified(net, x0, K, generator=generator)
        totals.append(out["total"].double())
        variances.append(out["stderr"].double().square())
    total = torch.cat(totals)
    assert est["nll_bpd_k5"] == pytest.approx(total.mean().item(), rel=1e-6)
    assert est["nll_bpd_k5_stderr"] == pytest.approx(total.std().item() / np.sqrt(12), rel=1e-6)
    assert est["nll_bpd_k5_estimator_stderr"] == pytest.approx(
        torch.cat(variances).sum().sqrt().item() / 12, rel=1e-6
    )
    assert abs(est["nll_bpd_k5"] - full["nll_bpd"]) < 4 * est["nll_bpd_k5_stderr"]
    with pytest.raises(ValueError, match="num_terms between 2 and T=20"):
        evaluate_nll(diffusion, net, dataset, num_images=2, estimator="stratified", num_terms=1)
    with pytest.raises(ValueError, match="unknown nll estimator 'bogus'"):
        evaluate_nll(diffusion, net, dataset, num_images=2, estimator="bogus")


def _trainer(tmp_path: Path, callbacks: list[pl.Callback], max_steps: int = 2) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        limit_val_batches=0,
        logger=CSVLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,  # evaluation metrics must reach the logger regardless
        default_root_dir=tmp_path,
    )


def _module() -> DiffusionLitModule:
    torch.manual_seed(0)
    return DiffusionLitModule(
        TinyNet(), GaussianDiffusion(make_betas("cosine", T)), (1, 8, 8), lr_warmup_steps=1
    )


def test_callbacks_in_a_tiny_training_run(tmp_path: Path) -> None:
    quality = SampleQualityCallback(
        num_samples=20,
        batch_size=8,
        sampler="dpmpp_2m",
        steps=5,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    nll = NLLCallback(num_images=6, batch_size=4, split="test", progress=False)
    estimate = NLLCallback(
        num_images=6, batch_size=4, estimator="stratified", num_terms=4, progress=False
    )
    trainer = _trainer(tmp_path, [quality, nll, estimate])
    trainer.callbacks.extend([quality, nll, estimate])
    module, datamodule = _module(), DigitsDataModule(batch_size=16)
    trainer.fit(module, datamodule=datamodule)

    assert trainer.global_step == 2 and quality.kind == "digits"
    fd = trainer.callback_metrics["fd_digits_20_dpmpp5"].item()
    assert np.isfinite(fd) and fd > 0
    # The callback's number is exactly what eval.py's function computes: the step does not enter.
    direct = evaluate_sample_quality(
        module.diffusion,
        module.ema_net,
        datamodule,
        num_samples=20,
        batch_size=8,
        sampler=SamplerSpec("dpmpp_2m", 5),
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    assert direct == {"fd_digits_20_dpmpp5": pytest.approx(fd, rel=1e-9)}

    datamodule.setup("test")
    expected_nll = evaluate_nll(
        module.diffusion, module.ema_net, datamodule.test_set, num_images=6, seed=0, batch_size=4
    )
    assert trainer.callback_metrics["nll_bpd"].item() == pytest.approx(expected_nll["nll_bpd"])
    assert trainer.callback_metrics["nll_prior_bpd"].item() == pytest.approx(
        expected_nll["nll_prior_bpd"]
    )
    assert trainer.callback_metrics["nll_num_images"].item() == 6
    expected_estimate = evaluate_nll(
        module.diffusion, module.ema_net, datamodule.test_set, num_images=6, seed=0, batch_size=4,
        estimator="stratified", num_terms=4,
    )  # fmt: skip
    assert trainer.callback_metrics["nll_bpd_k4"].item() == pytest.approx(
        expected_estimate["nll_bpd_k4"]
    )
    assert trainer.callback_metrics["nll_bpd"].item() != pytest.approx(
        expected_estimate["nll_bpd_k4"], rel=1e-9
    )  # the estimate did not overwrite the full bound
    terms = np.load(tmp_path / "nll" / "terms_step0000002.npy")
    np.testing.assert_allclose(terms, expected_nll["terms_bpd"], rtol=1e-6)

    # The metrics reached the logger even though step 2 is not a multiple of log_every_n_steps.
    metrics_csv = Path(trainer.logger.log_dir) / "metrics.csv"
    with open(metrics_csv) as handle:
        rows = list(csv.DictReader(handle))
    logged = {k for row in rows for k, v in row.items() if v not in ("", None)}
    assert {"fd_digits_20_dpmpp5", "nll_bpd", "nll_bpd_k4", "nll_prior_bpd", "step"} <= logged


def test_periodic_evaluation_runs_once_per_step(tmp_path: Path) -> None:
    quality = SampleQualityCallback(
        num_samples=4,
        batch_size=4,
        sampler="ddim",
        steps=2,
        every_n_steps=2,
        on_train_end=True,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    calls: list[int] = []
    original = quality.evaluate

    def spy(trainer, pl_module):
        out = original(trainer, pl_module)
        if out:
            calls.append(trainer.global_step)
        return out

    quality.evaluate = spy  # type: ignore[method-assign]
    trainer = _trainer(tmp_path, [], max_steps=4)
    trainer.callbacks.append(quality)
    trainer.fit(_module(), datamodule=DigitsDataModule(batch_size=16))
    assert calls == [2, 4]  # on_train_end at step 4 is skipped: already evaluated there


def test_an_unscheduled_callback_costs_nothing_in_fit_and_evaluates_on_demand(
    tmp_path: Path,
) -> None:
    """No feature network is built while it is off, and evaluate() then builds one and gives
    what evaluate_sample_quality gives for the same round."""
    quality = SampleQualityCallback(
        num_samples=6, batch_size=6, sampler="ddim", steps=2, on_train_end=False,
        cache_dir=str(tmp_path / "cache"), progress=False,
    )  # fmt: skip
    trainer = _trainer(tmp_path, [], max_steps=1)
    trainer.callbacks.append(quality)
    module, datamodule = _module(), DigitsDataModule(batch_size=16)
    trainer.fit(module, datamodule=datamodule)
    assert quality.extractor is None and quality.last_metrics == {}
    got = quality.evaluate(trainer, module)
    expected = evaluate_sample_quality(
        module.diffusion, module.ema_net, datamodule, num_samples=6, batch_size=6,
        sampler=SamplerSpec("ddim", 2), cache_dir=tmp_path / "cache", progress=False,
    )  # fmt: skip
    assert got == {"fd_digits_6_ddim2": pytest.approx(expected["fd_digits_6_ddim2"], rel=1e-9)}


def test_missing_inception_weights_warn_once_and_training_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in tests")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    quality = SampleQualityCallback(
        num_samples=10,
        batch_size=4,
        sampler="ddim",
        steps=2,
        every_n_steps=1,
        feature_extractor="inception",
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    trainer = _trainer(tmp_path, [])
    trainer.callbacks.append(quality)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_module(), datamodule=DigitsDataModule(batch_size=16))
    ours = [w for w in caught if "SampleQualityCallback disabled" in str(w.message)]
    assert len(ours) == 1
    assert INCEPTION_WEIGHTS_ENV in str(ours[0].message)
    assert trainer.global_step == 2 and quality.disabled
    assert not any(k.startswith(("fid", "is_")) for k in trainer.callback_metrics)
