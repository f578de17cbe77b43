"""The effective weighting of every table row (ddpm.objectives), against closed forms in λ."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm import objectives


@pytest.fixture(scope="module")
def rows() -> dict[str, objectives.RowWeighting]:
    return {r.objective.experiment: r for r in objectives.row_weightings()}


def _inner(row: objectives.RowWeighting, low: float = -7.0, high: float = 7.0) -> np.ndarray:
    return (row.log_snr > low) & (row.log_snr < high)


def test_every_row_has_a_finite_unit_area_curve(rows) -> None:
    assert len(rows) == 17  # Table 2 (9), the weightings (6), VDM (2)
    for row in rows.values():
        finite = np.isfinite(row.log_snr)
        assert np.isfinite(row.per_log_snr).all() and (row.per_log_snr >= 0).all()
        area = -np.trapezoid(row.per_log_snr[finite], row.log_snr[finite])
        assert area == pytest.approx(1.0, rel=1e-9)
    assert "σ² = β" in rows["table2_mu_vlb_learned"].note and not rows["table2_eps_simple"].note


def _spread(values: np.ndarray) -> float:
    return float(values.max() / values.min() - 1.0)


def test_the_bound_is_flat_in_log_snr(rows) -> None:
    """The ELBO puts the same weight on every unit of λ (Kingma & Gao: w(λ) = 1) as Δλ → 0.

    Discretely, with σ² = β̃ its weight on the ε-MSE is ½(SNRₜ₋₁/SNRₜ − 1)/ln 2 (exact, 1e-9),
    which per unit λ is flat up to (e^Δλ − 1)/Δλ: the spread over |λ| < 7 (18% at T = 1000,
    where the first steps jump far in λ) shrinks like Δλ, by 4× at T = 4000. The μ̃- and
    ε-prediction bounds have the same curve: the bound does not depend on the parameterisation.
    """
    from ddpm.diffusion import GaussianDiffusion, make_betas

    spreads = []
    for T in (1000, 4000):
        d = GaussianDiffusion(make_betas("linear", T), "eps", "fixed_small", "vlb")
        eff = d.effective_weighting()
        abar = np.cumprod(1.0 - make_betas("linear", T).double().numpy())
        snr = abar / (1.0 - abar)
        exact = 0.5 * (snr[:-1] / snr[1:] - 1.0) / np.log(2.0)
        np.testing.assert_allclose(eff["weight"].numpy()[1:], exact, rtol=1e-9)
        inner = np.abs(eff["log_snr"].numpy()) < 7
        spreads.append(_spread(eff["effective_log_snr"].numpy()[inner]))
    assert spreads[0] < 0.25 and spreads[1] < spreads[0] / 3, spreads
    np.testing.assert_allclose(
        rows["table2_mu_vlb_fixed"].per_log_snr, rows["table2_eps_vlb_fixed"].per_log_snr
    )
    # σ² = β (the rows' fixed_large) is within 10% of flat here too.
    row = rows["table2_eps_vlb_fixed"]
    assert _spread(row.per_log_snr[_inner(row)]) < 0.1


def test_sigmoid_and_min_snr_follow_their_formulas_in_log_snr(rows) -> None:
    """Per unit λ, uniform t: sigmoid(b − λ)/2 up to a constant (b = 0), to the ratio of the
    weight's one-sided and the density's central differences of λ (measured 6% over |λ| < 7,
    10% allowed; the per-t weight is exact, test_weighting.py); min-SNR is L_simple's curve
    times min(SNR, 5)/SNR exactly."""
    row = rows["obj_v_sigmoid"]
    inner = _inner(row)
    ratio = row.per_log_snr[inner] / (1.0 / (1.0 + np.exp(row.log_snr[inner])))
    assert _spread(ratio) < 0.1
    simple, min_snr = rows["table2_eps_simple"], rows["obj_eps_min_snr"]
    snr = np.exp(simple.log_snr)
    ratio = min_snr.per_log_snr / (simple.per_log_snr * np.minimum(snr, 5.0) / snr)
    assert ratio.max() / ratio.min() < 1.0 + 1e-9
    np.testing.assert_allclose(rows["obj_v_min_snr"].per_log_snr, min_snr.per_log_snr)


def test_the_figure_is_written(rows, tmp_path) -> None:
    fig = objectives.plot_weightings(list(rows.values()), tmp_path / "w.png")
    assert (tmp_path / "w.png").stat().st_size > 10_000
    assert [len(ax.lines) for ax in fig.axes] == [9, 9]  # + ε L_simple and the VDM rows


def test_the_continuous_bound_rows_are_exactly_flat_between_their_endpoints(rows) -> None:
    """VDM's rows: ½γ′ per unit t over |dλ/dt| per unit λ, so a constant, 1/(λ(0) − λ(1)) after
    normalisation (rtol 1e-3: the learned schedule is float32)."""
    for name in ("vdm_learned", "vdm_cosine"):
        row = rows[name]
        width = row.log_snr.max() - row.log_snr.min()
        np.testing.assert_allclose(row.per_log_snr, 1.0 / width, rtol=1e-3)
