"""Adding a strategy is one subclass (plus a YAML): registration, and the respaced forms."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from ddpm.diffusion import (
    LOSSES,
    PARAMETERIZATIONS,
    VARIANCES,
    WEIGHTINGS,
    GaussianDiffusion,
    Parameterization,
    Variance,
    Weighting,
    make_betas,
    make_weighting,
)
from ddpm.diffusion.parameterization import RespacedParameterization
from ddpm.diffusion.variance import RespacedLearnedVariance


@pytest.fixture
def clean_registries() -> Iterator[None]:
    saved = [dict(r) for r in (PARAMETERIZATIONS, VARIANCES, LOSSES, WEIGHTINGS)]
    yield
    for registry, before in zip((PARAMETERIZATIONS, VARIANCES, LOSSES, WEIGHTINGS), saved):
        registry.clear()
        registry.update(before)


def test_a_subclass_is_selectable_by_its_name(clean_registries) -> None:
    class NegEps(Parameterization):
        """−ε prediction: a parameterisation written as a user would."""

        name = "neg_eps"

        def pred_x0(self, d, output, x_t, t):
            return (
                d.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                + d.extract("sqrt_recipm1_alphas_cumprod", t, x_t) * output
            )

        def target(self, d, x0, x_t, t, noise):
            return -noise

    class Halved(Weighting):
        name = "halved"

        def table(self, d):
            return torch.full((d.num_timesteps,), 0.5, dtype=torch.float64)

    assert PARAMETERIZATIONS["neg_eps"] is NegEps and WEIGHTINGS["halved"] is Halved
    betas = make_betas("linear", 100)
    d = GaussianDiffusion(betas, "neg_eps", weighting="halved", dtype=torch.float64)
    eps = GaussianDiffusion(betas, "eps", dtype=torch.float64)
    x0 = torch.rand(4, 1, 2, 2, dtype=torch.float64) * 2 - 1
    t, noise = torch.tensor([0, 5, 50, 99]), torch.randn(4, 1, 2, 2, dtype=torch.float64)
    out = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    x_t = d.q_sample(x0, t, noise)
    # −output is ε prediction's output; the weighting halves its ε-MSE.
    torch.testing.assert_close(
        d.loss(d, out, x0, x_t, t, noise)["loss"],
        0.5 * eps.loss(eps, -out, x0, x_t, t, noise)["loss"],
        rtol=1e-12,
        atol=0,
    )
    assert isinstance(make_weighting("halved"), Halved)


def test_registration_errors_name_the_fix(clean_registries) -> None:
    with pytest.raises(TypeError, match=r"'eps' of Mine is taken by EpsParameterization"):

        class Mine(Parameterization):
            name = "eps"

    with pytest.raises(TypeError, match=r"Nameless needs a class attribute `name`"):

        class Nameless(Variance):
            pass

    class Internal(Variance, register=False):
        name = "fixed_large"

    assert VARIANCES["fixed_large"] is not Internal


def test_each_strategy_gives_its_own_respaced_form() -> None:
    """No name checks in respaced(): the child asks the strategies."""
    betas = make_betas("linear", 100)
    learned = GaussianDiffusion(betas, "eps", "learned", "vlb")
    child, kept = learned.respaced(10)
    assert isinstance(child.variance, RespacedLearnedVariance)
    assert isinstance(child.parameterization, RespacedParameterization)
    assert torch.equal(child.variance.timestep_map, kept)
    fixed = GaussianDiffusion(betas, "v", "fixed_small")
    child, _ = fixed.respaced(10)
    assert child.variance is fixed.variance

    class StepAware(Variance, register=False):
        """A fixed variance whose respaced form is another object (a user's extension)."""

        name = "step_aware"

        def __call__(self, d, var_output, x_t, t):
            return d.extract("posterior_variance", t, x_t), d.extract(
                "posterior_log_variance_clipped", t, x_t
            )

        def respaced(self, parent, timestep_map):
            return marker

    marker = StepAware()
    d = GaussianDiffusion(betas, "eps", StepAware())
    child, _ = d.respaced(10)
    assert child.variance is marker


def test_the_elbo_weighting_asks_the_variance_for_its_table() -> None:
    class Learned(Variance, register=False):
        name = "learned_mine"
        learned = True

    d = GaussianDiffusion(make_betas("linear", 100), "eps", Learned(), "hybrid")
    with pytest.raises(ValueError, match=r"weighting=elbo needs a fixed variance.*learned_mine"):
        make_weighting("elbo").table(d)
