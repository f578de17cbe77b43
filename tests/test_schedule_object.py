"""The schedule object: the import graph of ``ddpm.diffusion``, bit-identical tables, log SNR at
continuous time, the schedule classes and the configurations that build them.

References are independent: a verbatim copy of the β formulas and table derivation from before
the schedule object existed (``_old_*``), numpy float64 closed forms, and ``np.interp``.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from ddpm.builders import build_diffusion, build_module, load_module_from_checkpoint
from ddpm.diffusion import (
    SCHEDULES,
    WEIGHTINGS,
    BetaSchedule,
    CosineSchedule,
    GaussianDiffusion,
    LinearSchedule,
    QuadSchedule,
    Schedule,
    SigmoidSchedule,
    ZeroTerminalSNRSchedule,
    make_betas,
    make_schedule,
    make_timestep_sampler,
)
from ddpm.diffusion.schedule import TABLE_NAMES
from ddpm.diffusion.spacing import SPACINGS, timestep_spacing

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
DIFFUSION_DIR = ROOT / "src" / "ddpm" / "diffusion"
PACKAGE = "ddpm.diffusion"
FACADE = f"{PACKAGE}.gaussian_diffusion"
NAMES = ("linear", "cosine", "quad", "sigmoid")


# ---------------------------------------------------------------- the import graph
def _imports(path: Path) -> set[str]:
    """Every module of ``ddpm.diffusion`` that ``path`` imports, anywhere in the file (top level,
    functions, ``if TYPE_CHECKING:``), as dotted names; ``from ddpm.diffusion import x`` counts
    as the submodule ``x`` when there is one, else as the package itself."""
    modules = {p.stem for p in DIFFUSION_DIR.glob("*.py")}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(PACKAGE))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package ddpm.diffusion
                base = f"{PACKAGE}.{base}" if base else PACKAGE
            if base == PACKAGE:
                found.update(
                    f"{PACKAGE}.{a.name}" if a.name in modules else PACKAGE for a in node.names
                )
            elif base.startswith(f"{PACKAGE}."):
                found.add(base)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(DIFFUSION_DIR.glob("*.py")):
        name = PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"
        graph[name] = _imports(path) - {name}
    return graph


def _imported_names(path: Path) -> set[str]:
    """Every name bound by an import statement in ``path`` (``from x import A as B`` gives A)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom | ast.Import):
            names.update(a.name.rsplit(".", 1)[-1] for a in node.names)
    return names


def test_no_module_of_the_package_imports_the_facade() -> None:
    """Only the package's ``__init__`` imports the façade: no strategy, sampler or estimator, not
    even under ``TYPE_CHECKING`` or inside a function, and none imports the package itself
    (which would import the façade)."""
    graph = _graph()
    assert len(graph) >= 15 and FACADE in graph[PACKAGE]
    assert f"{PACKAGE}.schedule" in graph[FACADE]  # the parser sees the façade's own imports
    for module, deps in graph.items():
        if module in (PACKAGE, FACADE):
            continue
        assert FACADE not in deps, f"{module} imports the façade"
        assert PACKAGE not in deps, f"{module} imports the package (and so the façade)"
        path = DIFFUSION_DIR / f"{module.rsplit('.', 1)[-1]}.py"
        assert "GaussianDiffusion" not in _imported_names(path), module


def test_the_import_graph_of_the_package_is_acyclic() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


# ---------------------------------------------------------------- bit-identical tables
def _old_betas(name: str, T: int, zero_terminal_snr: bool = False) -> torch.Tensor:
    """The β formulas of ``make_betas`` before the schedule object, verbatim."""
    if name == "linear":
        scale = 1000.0 / T
        betas = torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=F64)
    elif name == "cosine":
        steps = torch.arange(T + 1, dtype=F64) / T
        f = torch.cos((steps + 0.008) / (1.0 + 0.008) * math.pi / 2.0) ** 2
        betas = (1.0 - f[1:] / f[:-1]).clamp(max=0.999)
    elif name == "quad":
        betas = torch.linspace(1e-4**0.5, 0.02**0.5, T, dtype=F64) ** 2
    else:
        x = torch.linspace(-6.0, 6.0, T, dtype=F64)
        betas = torch.sigmoid(x) * (0.02 - 1e-4) + 1e-4
    if zero_terminal_snr:
        sqrt_abar = torch.cumprod(1.0 - betas, 0).sqrt()
        first, last = sqrt_abar[0], sqrt_abar[-1]
        abar = ((sqrt_abar - last) * first / (first - last)).square()
        abar[-1] = 0.0
        betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    return betas


def _old_tables(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """The façade's table derivation before the schedule object, verbatim (float64)."""
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    fixed_large = torch.cat([post_var[1:2], betas[1:]])
    return {
        "betas": betas,
        "log_betas": torch.log(betas),
        "alphas": alphas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": torch.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": torch.sqrt(1.0 - abar),
        "log_one_minus_alphas_cumprod": torch.log1p(-abar),
        "sqrt_recip_alphas_cumprod": torch.rsqrt(abar),
        "sqrt_recipm1_alphas_cumprod": torch.sqrt(1.0 / abar - 1.0),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
        "posterior_mean_coef1": betas * torch.sqrt(abar_prev) / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * torch.sqrt(alphas) / (1.0 - abar),
        "fixed_large_variance": fixed_large,
        "fixed_large_log_variance": torch.log(fixed_large),
    }


def _assert_tables_equal(got: Schedule | GaussianDiffusion, ref: dict[str, torch.Tensor]) -> None:
    dtype = got.betas.dtype
    for key, value in ref.items():
        table = getattr(got, key)
        assert table.dtype == dtype, key
        # equal_nan: none expected; ±inf (zero terminal SNR) compare equal as values.
        assert torch.equal(table, value.to(dtype)), key


# linear at T < 20 scales β_end beyond 1: not a valid schedule.
CASES = [
    (name, T, zts)
    for name in NAMES
    for T in (1000, 50, 7)
    for zts in (False, True)
    if not (name == "linear" and T < 20)
]


@pytest.mark.parametrize("name,T,zts", CASES)
def test_every_table_is_bit_identical_to_before(name: str, T: int, zts: bool) -> None:
    """make_schedule, the classes, make_betas and the façade all store the old tables exactly
    (float64, and the float32 cast of the float64 table)."""
    old = _old_betas(name, T, zts)
    ref = _old_tables(old)
    assert torch.equal(make_betas(name, T, zero_terminal_snr=zts), old)
    for dtype in (F64, torch.float32):
        schedule = make_schedule(name, T, zero_terminal_snr=zts, dtype=dtype)
        assert isinstance(schedule, ZeroTerminalSNRSchedule if zts else SCHEDULES[name])
        _assert_tables_equal(schedule, ref)
        for source in (schedule, make_betas(name, T, zero_terminal_snr=zts)):
            param = "v" if zts else "eps"
            _assert_tables_equal(GaussianDiffusion(source, param, dtype=dtype), ref)


@pytest.mark.parametrize("name,zts", [(n, z) for n in NAMES for z in (False, True)])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_respaced_tables_are_bit_identical_to_before(name: str, zts: bool, spacing: str) -> None:
    """d.respaced(steps): the old β′ = 1 − ᾱ[k]/ᾱ[k_prev] from the float64 βs, every table."""
    T = 100
    d = GaussianDiffusion(make_schedule(name, T, zero_terminal_snr=zts), "v")
    for steps in (2, 10, 37, T):
        child, kept = d.respaced(steps, spacing)
        assert torch.equal(kept, timestep_spacing(d.schedule, steps, spacing))
        abar = torch.cumprod(1.0 - _old_betas(name, T, zts), 0)[kept]
        betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        _assert_tables_equal(child, _old_tables(betas))
        assert child.schedule.dtype == torch.float32 and child.num_timesteps == steps


def _old_weights(name: str, betas: torch.Tensor) -> torch.Tensor:
    """The weighting tables before the schedule object, verbatim (eps, fixed_large)."""
    abar = torch.cumprod(1.0 - betas, 0)
    snr = abar / (1.0 - abar)
    lam = abar.log() - torch.log1p(-abar)
    if name == "elbo":
        post = _old_tables(betas)["fixed_large_log_variance"]
        return betas.square() / (2.0 * post.exp() * (1.0 - betas) * (1.0 - abar)) / math.log(2.0)
    if name == "min_snr":
        return snr.clamp(max=5.0) / snr
    if name == "p2":
        return (1.0 + snr).pow(-1.0)
    if name == "sigmoid":
        step = torch.cat([lam[:1] - lam[1:2], lam[:-1] - lam[1:]]) * lam.numel()
        return 0.5 * torch.sigmoid(0.0 - lam) * step
    assert name == "edm"
    return 1.0 + 1.0 / (0.5**2 * snr)


@pytest.mark.parametrize("weighting", ["elbo", "min_snr", "p2", "sigmoid", "edm"])
@pytest.mark.parametrize("name", NAMES)
def test_weighting_tables_are_bit_identical_to_before(weighting: str, name: str) -> None:
    assert weighting in WEIGHTINGS
    betas = _old_betas(name, 200)
    d = GaussianDiffusion(make_schedule(name, 200), weighting=weighting, dtype=F64)
    assert torch.equal(d.weights, _old_weights(weighting, betas))
    eff = d.effective_weighting()
    abar = torch.cumprod(1.0 - betas, 0)
    assert torch.equal(eff["log_snr"], abar.log() - torch.log1p(-abar))


def test_the_edm_timestep_sampler_takes_the_schedule() -> None:
    schedule = make_schedule("cosine", 100)
    abar = torch.cumprod(1.0 - _old_betas("cosine", 100), 0)
    from_schedule = make_timestep_sampler("edm_lognormal", schedule, p_std=0.8)
    from_table = make_timestep_sampler("edm_lognormal", 100, alphas_cumprod=abar, p_std=0.8)
    assert torch.equal(from_schedule.p, from_table.p)
    assert make_timestep_sampler("uniform", schedule).num_timesteps == 100


# ---------------------------------------------------------------- α, σ, log SNR at any time
ALL_SCHEDULES = [(name, zts) for name in NAMES for zts in (False, True)]


def _np_log_snr(schedule: Schedule) -> np.ndarray:
    abar = np.cumprod(1.0 - schedule.betas_float64.numpy())
    with np.errstate(divide="ignore"):
        return np.log(abar) - np.log1p(-abar)


@pytest.mark.parametrize("name,zts", ALL_SCHEDULES)
def test_log_snr_at_indices_is_the_table(name: str, zts: bool) -> None:
    s = make_schedule(name, 300, zero_terminal_snr=zts, dtype=F64)
    i = torch.arange(300)
    ref = _np_log_snr(s)
    np.testing.assert_allclose(s.log_snr(i).numpy(), ref, rtol=1e-12, atol=0)
    assert torch.equal(s.log_snr(i), s.log_snr_table) and torch.equal(s.gamma(i), -s.log_snr(i))
    assert torch.equal(s.alpha(i), s.sqrt_alphas_cumprod)
    assert torch.equal(s.sigma(i), s.sqrt_one_minus_alphas_cumprod)
    abar = s.alphas_cumprod.numpy()
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(s.snr(i).numpy(), abar / (1.0 - abar), rtol=1e-12, atol=0)
    assert torch.equal(s.time(i), (i.double() + 1) / 300)


@pytest.mark.parametrize("name,zts", ALL_SCHEDULES)
@pytest.mark.parametrize("T", [1000, 50, 4000, 7])
def test_continuous_log_snr_meets_the_table_exactly_at_grid_points(name, zts, T) -> None:
    if name == "linear" and T < 20:
        pytest.skip("linear at T < 20 scales β_end beyond 1: not a valid schedule")
    for dtype in (F64, torch.float32):
        s = make_schedule(name, T, zero_terminal_snr=zts, dtype=dtype)
        t = torch.arange(1, T + 1, dtype=dtype) / T  # t = (i + 1)/T, rounded
        assert torch.equal(s.log_snr(t), s.log_snr_table), dtype
        assert torch.equal(s.log_snr(s.time(torch.arange(T))), s.log_snr_table), dtype


@pytest.mark.parametrize("name,zts", ALL_SCHEDULES)
def test_continuous_log_snr_is_linear_between_grid_points(name: str, zts: bool) -> None:
    """λ(t) = np.interp over (tᵢ = (i+1)/T, λᵢ); extended linearly below t₀; at zero terminal
    SNR the last segment interpolates ᾱ."""
    T = 64
    s = make_schedule(name, T, zero_terminal_snr=zts, dtype=F64)
    lam = _np_log_snr(s)
    grid = np.arange(1, T + 1) / T
    t = np.random.default_rng(0).uniform(0.0, 1.0, 4000)
    got = s.log_snr(torch.from_numpy(t)).numpy()
    inner = t >= grid[0]
    if zts:
        inner &= t <= grid[-2]
    ref = np.interp(t[inner], grid, lam)
    np.testing.assert_allclose(got[inner], ref, rtol=1e-12, atol=1e-12)
    below = t < grid[0]
    np.testing.assert_allclose(
        got[below], lam[0] + (t[below] * T - 1.0) * (lam[1] - lam[0]), rtol=1e-12, atol=1e-12
    )
    assert s.log_snr(torch.tensor([0.0], dtype=F64)).item() == pytest.approx(2 * lam[0] - lam[1])
    if zts:
        last = t > grid[-2]
        abar = (1.0 - (t[last] * T - (T - 1))) * np.cumprod(1.0 - s.betas_float64.numpy())[-2]
        np.testing.assert_allclose(got[last], np.log(abar / (1.0 - abar)), rtol=1e-10)
        assert s.log_snr(torch.tensor([1.0], dtype=F64)).item() == -math.inf
    # Outside [0, 1]: clamped.
    ends = s.log_snr(torch.tensor([-0.5, 0.0, 1.0, 1.5], dtype=F64))
    assert ends[0] == ends[1] and ends[2] == ends[3]


@pytest.mark.parametrize("name,zts", ALL_SCHEDULES)
def test_continuous_log_snr_is_strictly_decreasing(name: str, zts: bool) -> None:
    for T, dtype in ((1000, F64), (50, F64), (50, torch.float32)):
        s = make_schedule(name, T, zero_terminal_snr=zts, dtype=dtype)
        grid = torch.arange(1, T + 1, dtype=F64) / T
        t = torch.cat([torch.linspace(0, 1, 20_001, dtype=F64), grid]).unique().to(dtype)
        lam = s.log_snr(t)
        assert not torch.isnan(lam).any()
        # Strictly, between times further apart than the snap to a grid point (a few ulps).
        apart = t.diff() > (1e-12 if dtype == F64 else 1e-6)
        assert (lam.diff() <= 0).all() and (lam.diff()[apart] < 0).all(), (T, dtype)
        assert torch.isfinite(lam[:-1]).all() and (lam[-1] == -math.inf) == zts


@pytest.mark.parametrize("name,zts", ALL_SCHEDULES)
def test_gamma_alpha_sigma_snr_identities(name: str, zts: bool) -> None:
    """α² = sigmoid(λ) = sigmoid(−γ), σ² = sigmoid(−λ), SNR = exp(λ) = α²/σ², α² + σ² = 1,
    against numpy float64 closed forms of the same λ."""
    s = make_schedule(name, 500, zero_terminal_snr=zts, dtype=F64)
    t = torch.from_numpy(np.random.default_rng(1).uniform(0.0, 1.0, 2000))
    lam = s.log_snr(t).numpy()
    gamma = s.gamma(t).numpy()
    alpha, sigma, snr = s.alpha(t).numpy(), s.sigma(t).numpy(), s.snr(t).numpy()
    np.testing.assert_array_equal(gamma, -lam)
    np.testing.assert_allclose(alpha**2, 1.0 / (1.0 + np.exp(-lam)), rtol=1e-13)
    np.testing.assert_allclose(alpha**2, 1.0 / (1.0 + np.exp(gamma)), rtol=1e-13)
    np.testing.assert_allclose(sigma**2, 1.0 / (1.0 + np.exp(lam)), rtol=1e-13)
    np.testing.assert_allclose(snr, np.exp(lam), rtol=1e-13)
    np.testing.assert_allclose(snr, alpha**2 / sigma**2, rtol=1e-12)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-14)
    # At the grid points the continuous α² is the table's ᾱ (to rounding).
    grid = s.time(torch.arange(500))
    np.testing.assert_allclose(s.alpha(grid).numpy() ** 2, s.alphas_cumprod.numpy(), rtol=1e-13)


def test_the_derivative_of_log_snr_is_the_segment_slope_even_at_grid_points() -> None:
    """Autograd through the interpolation (also where t snaps to a grid point): dλ/dt on
    [tᵢ, tᵢ₊₁) is T(λᵢ₊₁ − λᵢ)."""
    T = 40
    s = make_schedule("cosine", T, dtype=F64)
    lam = s.log_snr_float64
    i = torch.arange(T - 1)
    for offset in (0.0, 0.3):
        t = ((i.double() + 1 + offset) / T).requires_grad_()
        (grad,) = torch.autograd.grad(s.log_snr(t).sum(), t)
        torch.testing.assert_close(grad, T * (lam[1:] - lam[:-1]), rtol=1e-9, atol=0)


# ---------------------------------------------------------------- the classes and the factory
def test_each_named_schedule_is_a_registered_class() -> None:
    assert {n: SCHEDULES[n] for n in NAMES} == {
        "linear": LinearSchedule,
        "cosine": CosineSchedule,
        "quad": QuadSchedule,
        "sigmoid": SigmoidSchedule,
    }
    s = LinearSchedule(100, beta_start=2e-4)
    assert s.params == {"beta_start": 2e-4, "beta_end": 0.02} and s.name == "linear"
    assert torch.equal(s.betas_float64, make_betas("linear", 100, beta_start=2e-4))
    assert "beta_start=0.0002" in repr(s)
    zero = ZeroTerminalSNRSchedule(CosineSchedule(30))
    assert zero.zero_terminal_snr and zero.base_name == "cosine" and zero.betas[-1] == 1
    assert not CosineSchedule(30).zero_terminal_snr


def test_factory_errors_name_the_choices_and_the_schedule() -> None:
    with pytest.raises(ValueError, match=r"unknown schedule 'bogus'.*cosine.*linear"):
        make_schedule("bogus", 100)
    with pytest.raises(ValueError, match=r"bad parameters .* schedule 'cosine'"):
        make_schedule("cosine", 100, beta_start=1e-4)
    with pytest.raises(ValueError, match="at least 2 steps"):
        make_schedule("linear", 1)
    with pytest.raises(ValueError):  # β_end = 2 at T = 10
        make_schedule("linear", 10)


@pytest.fixture
def clean_schedules() -> Iterator[None]:
    saved = dict(SCHEDULES)
    yield
    SCHEDULES.clear()
    SCHEDULES.update(saved)


def test_adding_a_schedule_is_one_class(clean_schedules) -> None:
    class ConstantSchedule(BetaSchedule):
        """β constant: a schedule written as a user would."""

        name = "constant"

        @staticmethod
        def beta_table(num_timesteps: int, beta: float = 0.01) -> torch.Tensor:
            return torch.full((num_timesteps,), beta, dtype=torch.float64)

    assert SCHEDULES["constant"] is ConstantSchedule
    d = GaussianDiffusion(make_schedule("constant", 20, beta=0.05), "v", dtype=F64)
    assert torch.equal(d.betas, torch.full((20,), 0.05, dtype=F64))
    assert torch.equal(make_betas("constant", 20), torch.full((20,), 0.01, dtype=F64))
    x0 = torch.zeros(3, 1, 2, 2, dtype=F64)
    losses = d.training_losses(lambda x, t: x, x0, torch.tensor([0, 7, 19]))
    assert losses["loss"].shape == (3,) and torch.isfinite(losses["loss"]).all()


# ---------------------------------------------------------------- the façade holds the schedule
def test_the_facade_shares_the_schedule_tensors_across_moves_and_casts() -> None:
    schedule = make_schedule("linear", 100)
    d = GaussianDiffusion(schedule, "eps")
    assert d.schedule is schedule and d.alphas_cumprod is schedule.alphas_cumprod
    assert d.state_dict() == {} and d.betas_float64 is schedule.betas_float64
    d.double()
    assert d.schedule.dtype == F64 and d.alphas_cumprod is d.schedule.alphas_cumprod
    names = [name for name, _ in d.named_buffers()]
    assert names[: len(TABLE_NAMES)] == list(TABLE_NAMES)


def test_a_schedule_given_with_another_dtype_is_cast_from_float64() -> None:
    schedule = make_schedule("cosine", 100)  # float32 tables
    d = GaussianDiffusion(schedule, dtype=F64)
    assert d.schedule is not schedule and schedule.dtype == torch.float32
    _assert_tables_equal(d, _old_tables(_old_betas("cosine", 100)))  # not a float32 upcast
    assert GaussianDiffusion(schedule).schedule is schedule


def test_strategies_receive_the_schedule(clean_schedules) -> None:
    """The façade hands the parameterisation and the variance its schedule, not itself."""
    readers = []

    class Spy(LinearSchedule):
        name = "spy_linear"

        def extract(self, table, t, like):
            readers.append(self)
            return super().extract(table, t, like)

    schedule = Spy(50)
    d = GaussianDiffusion(schedule, "mu", "fixed_small", dtype=F64)
    x = torch.zeros(2, 1, 2, 2, dtype=F64)
    d.p_mean_variance(torch.zeros_like(x), x, torch.tensor([3, 4]))
    d.training_losses(lambda x, t: x, x, torch.tensor([3, 4]))
    assert readers and all(reader is d.schedule for reader in readers)


# ---------------------------------------------------------------- configurations
@pytest.mark.parametrize("name", NAMES)
def test_configs_build_the_schedule_classes_and_old_configs_the_same_tables(
    compose_cfg, name: str
) -> None:
    """conf/schedule/*.yaml build a Schedule; a run config from before (``_target_:
    ddpm.diffusion.make_betas``, as every stored run and checkpoint config has) builds a
    diffusion with the same tables."""
    overrides = [f"schedule={name}", "schedule.num_timesteps=1000"]
    cfg = compose_cfg(*overrides)
    assert cfg.schedule._target_ == "ddpm.diffusion.make_schedule"
    new = build_diffusion(cfg)
    assert isinstance(new.schedule, SCHEDULES[name])
    old_cfg = compose_cfg(*overrides)
    with open_dict(old_cfg):
        old_cfg.schedule._target_ = "ddpm.diffusion.make_betas"
    old = build_diffusion(old_cfg)
    assert type(old.schedule) is Schedule
    _assert_tables_equal(old, _old_tables(_old_betas(name, 1000)))
    _assert_tables_equal(new, _old_tables(_old_betas(name, 1000)))
    zero = build_diffusion(
        compose_cfg(*overrides, "schedule.zero_terminal_snr=true", "parameterization=v")
    )
    _assert_tables_equal(zero, _old_tables(_old_betas(name, 1000, True)))


def test_a_stored_run_config_still_builds() -> None:
    path = ROOT / "docs/results/ablation-digits/runs/linear/5-eps-fixed_large-simple-linear"
    path = path / ".hydra" / "config.yaml"
    if not path.exists():
        pytest.skip("stored run config not in this checkout")
    cfg = OmegaConf.load(path)
    assert cfg.schedule._target_ == "ddpm.diffusion.make_betas"
    d = build_diffusion(cfg)
    _assert_tables_equal(d, _old_tables(_old_betas("linear", int(cfg.schedule.num_timesteps))))


def test_a_checkpoint_with_a_config_from_before_loads(compose_cfg, tmp_path: Path) -> None:
    """A checkpoint whose stored run config builds its schedule with ``make_betas`` loads with
    every state-dict key matched (the schedule adds none), and its state dict is the one a
    module built from today's config has."""
    cfg = compose_cfg("schedule=cosine")
    with open_dict(cfg):
        cfg.schedule._target_ = "ddpm.diffusion.make_betas"
    old = build_module(cfg, (1, 8, 8))
    path = tmp_path / "old.ckpt"
    torch.save(
        {
            "state_dict": old.state_dict(),
            "run_config": OmegaConf.to_container(cfg, resolve=False),
            "image_shape": [1, 8, 8],
        },
        path,
    )
    module, loaded_cfg = load_module_from_checkpoint(path)
    assert loaded_cfg.schedule._target_ == "ddpm.diffusion.make_betas"
    T = int(cfg.schedule.num_timesteps)
    _assert_tables_equal(module.diffusion, _old_tables(_old_betas("cosine", T)))
    new = build_module(compose_cfg("schedule=cosine"), (1, 8, 8))
    assert isinstance(new.diffusion.schedule, CosineSchedule)
    assert new.state_dict().keys() == old.state_dict().keys()
    assert not any("schedule" in key or "alphas" in key for key in new.state_dict())
