"""The exact likelihood of the probability-flow ODE (Song et al., ICLR 2021) of a discrete schedule.

**Continuous time.** The trained model knows T discrete noise levels ᾱ₀ > … > ᾱ_{T−1} (index 0 is
the paper's t = 1). The ODE runs in the log SNR λ = log(ᾱ/(1 − ᾱ)) itself, so no derivative of
an interpolated β(t) is needed: along λ the variance-preserving marginals are
x_λ = α_λ x₀ + σ_λ ε with α_λ² = sigmoid(λ), σ_λ² = sigmoid(−λ), exactly for every real λ. The
probability-flow ODE of that family (f = d log α/dλ = σ²/2, g² = dσ²/dλ − 2fσ² = −σ², score
−ε̂/σ) is

    dx/dλ = ½ σ_λ² x − ½ σ_λ ε̂(x, λ),    ∇·(dx/dλ) = ½ σ_λ² D − ½ σ_λ ∇·ε̂,

integrated from λ_max = λ(index 0) (the least noisy level the network was trained on) down to
λ_min = λ(index T−1) (or the last index with ᾱ > 0 on a zero-terminal-SNR schedule), where the
prior N(0, I) is used as in Song et al. The network is asked for ε̂ at a fractional timestep
index: the one that **linear interpolation of the discrete λ table** gives (:class:`LogSNRTime`);
at the T grid points the network sees exactly the (index, ᾱ) pairs it was trained on. Every
parameterisation (ε, x₀, v, μ̃, EDM) gives ε̂ through its own
:meth:`~ddpm.diffusion.parameterization.Parameterization.pred_eps`, read with tables evaluated
at the continuous λ (:class:`ContinuousTables`): functions of ᾱ exactly from λ, the others
(μ̃'s posterior coefficients) linearly interpolated in the fractional index.

**Log-likelihood.** log p_{λ_max}(x) = log N(x(λ_min); 0, I) + ∫_{λ_max}^{λ_min} ∇·(dx/dλ) dλ, the
divergence of ε̂ from Hutchinson's estimator vᵀ(∂ε̂/∂x)v (Rademacher or Gaussian v, drawn once
per solve and held fixed along it; one vector-Jacobian product per evaluation and sample), or
exactly from D products for tiny data. The linear part's divergence ½σ²D is exact.

**Solver.** ``torchdiffeq.odeint`` with an adaptive Runge–Kutta method (``dopri5``, the RK45 pair
of Dormand–Prince, by default; rtol = atol = 1e-5 as in the paper). It was chosen over
``scipy.integrate.solve_ivp(method="RK45")`` (the same pair) for speed: it keeps the state, the
network and the step-size control on the device for a whole batch, where scipy needs a host
copy of the state and of the derivative at every evaluation. The step control is shared by the
images of a batch (one error norm over the batch), so a batch's result depends on its images,
never on the world size (batches are fixed by index, :func:`~ddpm.metrics.sampling.shard_batches`).

**Bits/dim.** Pixel values k ∈ {0..255} are dequantised uniformly, y = k + u ∈ [0, 256), and
mapped to x = y/128 − 1 ∈ [−1, 1) (:func:`ode_nll_bpd`); the Jacobian 1/128 per dimension adds
log₂ 128 = 7 bits/dim: bits/dim = −log p(x)/(D ln 2) + 7.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ddpm.diffusion.protocols import Diffusion, Net
from ddpm.diffusion.schedule import MARGINAL_TABLES, Schedule, ScheduleAt
from ddpm.errors import ConfigError

__all__ = [
    "DIVERGENCES",
    "ODE_METHODS",
    "ContinuousTables",
    "LogSNRTime",
    "ODELikelihoodSettings",
    "dequantize",
    "eps_prediction",
    "ode_nll_bpd",
    "probability_flow_log_likelihood",
    "standard_normal_log_density",
]

#: How the divergence of ε̂ is computed: Hutchinson with Rademacher or Gaussian probes, or
#: exactly (D vector-Jacobian products per evaluation: tiny data only).
DIVERGENCES = ("rademacher", "gaussian", "exact")
#: torchdiffeq's adaptive (error-controlled) methods; dopri5 is RK45.
ODE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")

_LN2 = math.log(2.0)
#: log₂ of the Jacobian of [0, 256) → [−1, 1) per dimension (x = y/128 − 1).
DEQUANTIZATION_BITS = 7.0


@dataclass(frozen=True)
class ODELikelihoodSettings:
    """How the probability-flow ODE likelihood is solved.

    Args:
        rtol, atol: the adaptive solver's relative and absolute tolerances (the paper: 1e-5).
        method: a torchdiffeq adaptive method (:data:`ODE_METHODS`); ``dopri5`` is RK45.
        hutchinson_samples: probe vectors per image (n ≥ 1); each costs one vector-Jacobian
            product per evaluation, and the estimate's variance falls as 1/n.
        divergence: ``rademacher``, ``gaussian`` (Hutchinson) or ``exact`` (D products per
            evaluation; for tests on tiny data).
        max_num_steps: accepted + rejected steps allowed per solve before it stops with an error
            (a diverging network must not run forever).
    """

    rtol: float = 1e-5
    atol: float = 1e-5
    method: str = "dopri5"
    hutchinson_samples: int = 1
    divergence: str = "rademacher"
    max_num_steps: int = 2000

    def __post_init__(self) -> None:
        if not (self.rtol > 0 and self.atol > 0):
            raise ConfigError(f"nll.ode: rtol={self.rtol} and atol={self.atol} must be > 0")
        if self.method not in ODE_METHODS:
            raise ConfigError(f"nll.ode.method={self.method!r}: choose one of {ODE_METHODS}")
        if self.divergence not in DIVERGENCES:
            raise ConfigError(
                f"nll.ode.divergence={self.divergence!r}: choose one of {DIVERGENCES}"
            )
        if int(self.hutchinson_samples) < 1:
            raise ConfigError(f"nll.ode.hutchinson_samples={self.hutchinson_samples}: must be >= 1")
        if int(self.max_num_steps) < 1:
            raise ConfigError(f"nll.ode.max_num_steps={self.max_num_steps}: must be >= 1")

    @property
    def num_probes(self) -> int:
        """Divergence estimates per image: ``hutchinson_samples`` (1 for ``exact``)."""
        return 1 if self.divergence == "exact" else int(self.hutchinson_samples)

    @classmethod
    def from_config(
        cls, node: ODELikelihoodSettings | Mapping[str, Any] | None
    ) -> ODELikelihoodSettings:
        """Settings from a config mapping (``nll.ode``), an instance, or None (the defaults).

        Raises:
            ~ddpm.errors.ConfigError: (a ValueError) an unknown key, naming the known ones, or a
                bad value.
        """
        if isinstance(node, cls):
            return node
        values = dict(node or {})
        known = set(asdict(cls()))
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown nll.ode setting(s) {unknown}: choose from {sorted(known)}")
        types = {"rtol": float, "atol": float, "hutchinson_samples": int, "max_num_steps": int}
        typed = {}
        for key, value in values.items():
            kind = types.get(key, str)
            try:
                typed[key] = kind(value)
            except (TypeError, ValueError):
                raise ConfigError(f"nll.ode.{key}={value!r}: must be {kind.__name__}") from None
        return cls(**typed)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class LogSNRTime:
    """The discrete schedule seen in continuous log SNR λ.

    Holds λᵢ = log(ᾱᵢ/(1 − ᾱᵢ)) (strictly decreasing in the index i) for the indices with
    ᾱ > 0; a fractional index τ and λ are linked by linear interpolation of that table.

    Args:
        alphas_cumprod: ᾱ ``[T]`` (float64 preferred).
        device: where the table lives (float64, except on MPS).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, device: torch.device | str = "cpu") -> None:
        device = torch.device(device)
        dtype = torch.float32 if device.type == "mps" else torch.float64
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        abar = abar[abar > 0]  # a zero-terminal-SNR schedule ends one index early (λ = −∞)
        if abar.numel() < 2:
            raise ValueError("the ODE likelihood needs at least 2 timesteps with ᾱ > 0")
        log_snr = torch.log(abar) - torch.log1p(-abar)
        if not (log_snr[1:] < log_snr[:-1]).all():
            raise ValueError("log SNR must decrease strictly along the schedule")
        self.log_snr = log_snr.to(device=device, dtype=dtype)
        self.num_levels = int(abar.numel())
        self.lambda_max = float(log_snr[0])
        self.lambda_min = float(log_snr[-1])

    @classmethod
    def from_diffusion(cls, diffusion: Diffusion) -> LogSNRTime:
        """The continuous view of ``diffusion``'s schedule (its float64 βs), on its device."""
        abar = torch.cumprod(1.0 - diffusion.schedule.betas_float64, 0)
        return cls(abar, diffusion.schedule.device)

    def timestep(self, lam: torch.Tensor) -> torch.Tensor:
        """Fractional timestep index τ ``[B]`` of log SNRs ``lam`` ``[B]`` (clamped to the table)."""
        table = self.log_snr
        lam = lam.to(table.dtype).clamp(self.lambda_min, self.lambda_max)
        # first j with λⱼ ≤ λ, searched in the ascending −λ table
        j = torch.searchsorted(-table, -lam.contiguous())
        i = (j - 1).clamp(0, self.num_levels - 2)
        left, right = table[i], table[i + 1]
        return i.to(table.dtype) + ((left - lam) / (left - right)).clamp(0.0, 1.0)

    def log_snr_at(self, timestep: torch.Tensor) -> torch.Tensor:
        """λ ``[B]`` at fractional indices τ ``[B]``: the inverse of :meth:`timestep`."""
        table = self.log_snr
        tau = timestep.to(table.dtype).clamp(0, self.num_levels - 1)
        i = tau.floor().long().clamp(0, self.num_levels - 2)
        return torch.lerp(table[i], table[i + 1], tau - i.to(table.dtype))

    def tables(self, schedule: Schedule, lam: torch.Tensor) -> ContinuousTables:
        """``schedule``'s tables at log SNRs ``lam`` ``[B]``, for a parameterisation."""
        return ContinuousTables(schedule, lam, self.timestep(lam))


class ContinuousTables(ScheduleAt):
    """A schedule's tables at continuous log SNRs, shaped as a parameterisation reads them.

    Parameterisations read the schedule through ``schedule.extract(table, t, like)``,
    ``schedule.pred_eps_from_x0`` and ``schedule.q_posterior_mean``; this object answers them in
    the schedule's place for a batch at log SNRs ``lam`` ``[B]`` and fractional indices
    ``timestep`` ``[B]`` (the ``t`` they are called with). Functions of ᾱ are exact in λ
    (:class:`~ddpm.diffusion.schedule.ScheduleAt`); any other table is linearly interpolated in
    the fractional index.
    """

    def __init__(self, schedule: Schedule, lam: torch.Tensor, timestep: torch.Tensor) -> None:
        super().__init__(lam, torch.full_like(lam, math.nan), schedule)  # dλ/dt is not used
        self.schedule = schedule
        self.timestep = timestep

    def extract(self, table: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table`` at this batch's λ, ``[B, 1, …, 1]`` in ``like``'s dtype (``t`` is ignored:
        it is this object's ``timestep``)."""
        if table in MARGINAL_TABLES:
            return super().extract(table, t, like)
        values = getattr(self.schedule, table)
        tau = self.timestep.to(torch.float64 if values.dtype == torch.float64 else torch.float32)
        i = tau.floor().long().clamp(0, values.numel() - 2)
        frac = (tau - i.to(tau.dtype)).to(values.dtype)
        left = values[i]
        values = torch.where(frac > 0, torch.lerp(left, values[i + 1], frac), left)
        return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def eps_prediction(diffusion: Diffusion, net: Net, snr_time: LogSNRTime | None = None) -> EpsFn:
    """ε̂(x, λ) of ``net`` under ``diffusion``'s parameterisation, at continuous log SNR.

    The network receives the parameterisation's input (x itself, EDM's c_in x) and the
    fractional timestep index τ(λ) as a float tensor ``[B]`` (the UNet's sinusoidal embedding
    takes fractional timesteps); a learned variance's channels are dropped.

    Returns:
        ``eps_fn(x [B, C, …], lam [B]) -> ε̂ [B, C, …]``.

    Raises:
        ValueError: for a respaced diffusion (its network reads the parent's timesteps: pass the
            parent).
    """
    if hasattr(diffusion, "timestep_map"):
        raise ValueError("the ODE likelihood needs the full diffusion, not a respaced child")
    snr_time = snr_time or LogSNRTime.from_diffusion(diffusion)
    parameterization = diffusion.parameterization

    def eps_fn(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        tables = snr_time.tables(diffusion.schedule, lam)
        t = tables.timestep.to(x.dtype)
        output = net(parameterization.net_input(tables, x, t), t)  # type: ignore[arg-type]
        output, _ = diffusion.split_output(output.to(x.dtype))
        return parameterization.pred_eps(tables, output, x, t)  # type: ignore[arg-type]

    return eps_fn


def _probes(
    settings: ODELikelihoodSettings,
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Hutchinson probe vectors ``[n, B, …]`` (None for the exact divergence)."""
    if settings.divergence == "exact":
        return None
    full = (settings.num_probes, *shape)
    if settings.divergence == "gaussian":
        return torch.randn(full, generator=generator, device=device, dtype=dtype)
    bits = torch.randint(0, 2, full, generator=generator, device=device)
    return (2 * bits - 1).to(dtype)


def _vjp(eps: torch.Tensor, x: torch.Tensor, vector: torch.Tensor, retain: bool) -> torch.Tensor:
    """vᵀ ∂ε̂/∂x ``[B, …]`` (zeros if x is in ε̂'s graph but unused).

    Raises:
        RuntimeError: ε̂ has no autograd graph at all (autograd off around the network).
    """
    if not eps.requires_grad:
        raise RuntimeError(
            "ε̂ carries no autograd graph back to x, so its divergence cannot be computed (a "
            "network without x in its graph, or autograd switched off around the network)"
        )
    (grad,) = torch.autograd.grad(eps, x, vector, retain_graph=retain, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def _divergence(eps: torch.Tensor, x: torch.Tensor, probes: torch.Tensor | None) -> torch.Tensor:
    """∇·ε̂ per image and probe ``[B, n]``: Hutchinson vᵀ(∂ε̂/∂x)v, or exact (``probes=None``)."""
    batch = x.shape[0]
    if probes is None:
        dims = x[0].numel()
        total = x.new_zeros(batch)
        basis = torch.zeros_like(x).reshape(batch, dims)
        for i in range(dims):
            basis.zero_()
            basis[:, i] = 1.0
            grad = _vjp(eps, x, basis.reshape(x.shape), retain=i < dims - 1)
            total = total + grad.reshape(batch, dims)[:, i]
        return total[:, None]
    estimates = []
    for k, probe in enumerate(probes):
        grad = _vjp(eps, x, probe, retain=k < probes.shape[0] - 1)
        estimates.append((grad * probe).reshape(batch, -1).sum(dim=1))
    return torch.stack(estimates, dim=1)


def standard_normal_log_density(x: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, I) per image ``[B]`` in nats."""
    flat = x.reshape(x.shape[0], -1)
    return -0.5 * flat.square().sum(dim=1) - 0.5 * flat.shape[1] * math.log(2.0 * math.pi)


def probability_flow_log_likelihood(
    eps_fn: EpsFn,
    x: torch.Tensor,
    lambda_start: float,
    lambda_end: float,
    settings: ODELikelihoodSettings | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Solve the probability-flow ODE from ``x`` at log SNR ``lambda_start`` to ``lambda_end``.

    dx/dλ = ½σ²x − ½σ ε̂(x, λ), integrated by ``torchdiffeq.odeint`` with the ``settings``'
    method and tolerances, together with ∫ ∇·(dx/dλ) dλ per image and probe. No collective
    operation happens inside: a rank may take any number of steps.

    Args:
        eps_fn: ``(x [B, …], lam [B]) -> ε̂ [B, …]`` (e.g. :func:`eps_prediction`).
        x: the points ``[B, …]`` whose log-density at ``lambda_start`` is wanted.
        lambda_start, lambda_end: log SNRs of the data end and the prior end
            (``lambda_start > lambda_end``).
        settings: solver and divergence settings (default :class:`ODELikelihoodSettings`).
        generator: the probes' source of randomness (on ``x``'s device).
        progress: a tqdm bar over the λ range, with the evaluation count.

    Returns:
        ``x_end [B, …]`` (x at ``lambda_end``), ``prior [B]`` (log N(x_end; 0, I), nats),
        ``delta [B, n]`` (∫_{λ_start}^{λ_end} ∇·(dx/dλ) dλ per probe, nats; so
        log p_{λ_start}(x) ≈ prior + delta, or with the exact p_{λ_end} in place of N(0, I)),
        ``nfe`` (evaluations of ε̂, each one forward and n vector-Jacobian products of the batch)
        and ``seconds`` (wall-clock of the solve).

    Raises:
        RuntimeError: the solver stopped (more than ``settings.max_num_steps`` steps, or a step
            size underflow: a network that returns NaN/Inf), or ε̂ has no autograd graph.
    """
    settings = settings or ODELikelihoodSettings()
    if not lambda_start > lambda_end:
        raise ValueError(f"need lambda_start > lambda_end, got {lambda_start}, {lambda_end}")
    # Lightning's test loop runs under torch.inference_mode, where enable_grad alone records
    # nothing: leave it for the solve, with x copied out of any inference tensor.
    with torch.inference_mode(False):
        return _solve(eps_fn, x.clone(), lambda_start, lambda_end, settings, generator, progress)


def _solve(
    eps_fn: EpsFn,
    x: torch.Tensor,
    lambda_start: float,
    lambda_end: float,
    settings: ODELikelihoodSettings,
    generator: torch.Generator | None,
    progress: bool,
) -> dict[str, Any]:
    """:func:`probability_flow_log_likelihood` outside inference mode."""
    import torchdiffeq

    shape = tuple(x.shape)
    batch, dims = shape[0], x[0].numel()
    probes = _probes(settings, shape, generator, x.device, x.dtype)
    nfe = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=100, desc="probability-flow ODE", unit="% of λ", leave=False)
    span = lambda_start - lambda_end
    reached = 0

    def func(lam: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple:
        nonlocal nfe, reached
        nfe += 1
        lam64 = lam.to(torch.float64)
        sigma2 = torch.sigmoid(-lam64).to(x.dtype)
        sigma = sigma2.sqrt()
        with torch.enable_grad():
            xt = state[0].detach().requires_grad_(True)
            eps = eps_fn(xt, lam.to(x.dtype).expand(batch))
            div_eps = _divergence(eps, xt, probes)
        drift = 0.5 * sigma2 * xt.detach() - 0.5 * sigma * eps.detach()
        div = 0.5 * sigma2 * dims - 0.5 * sigma * div_eps.detach()
        if bar is not None:
            done = int(100 * min(max((lambda_start - float(lam)) / span, 0.0), 1.0))
            if done > reached:
                bar.update(done - reached)
                reached = done
            bar.set_postfix(nfe=nfe, refresh=False)
        return drift, div

    grid = torch.tensor([lambda_start, lambda_end], dtype=torch.float64, device=x.device)
    state0 = (x.detach(), x.new_zeros(batch, settings.num_probes))
    options = {"max_num_steps": int(settings.max_num_steps), "step_t": grid[1:]}
    start = time.perf_counter()
    try:
        solution = torchdiffeq.odeint(
            func, state0, grid, rtol=settings.rtol, atol=settings.atol,
            method=settings.method, options=options,
        )  # fmt: skip
    except AssertionError as err:  # torchdiffeq's max_num_steps and dt-underflow checks
        raise RuntimeError(
            f"the probability-flow ODE solver stopped after {nfe} evaluations ({err}): a network "
            "that returns NaN/Inf, tolerances too tight for it, or too small "
            f"nll.ode.max_num_steps={settings.max_num_steps}"
        ) from None
    finally:
        if bar is not None:
            bar.close()
    x_end, delta = solution[0][-1], solution[1][-1]
    prior = standard_normal_log_density(x_end)
    # odeint's step control waits for each step's error norm, so this includes the device's time
    seconds = time.perf_counter() - start
    return {"x_end": x_end, "prior": prior, "delta": delta, "nfe": nfe, "seconds": seconds}


def dequantize(x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantisation of images on the 256-level grid k/127.5 − 1 ∈ [−1, 1]:
    k + u with u ~ U[0, 1), mapped from [0, 256) to [−1, 1) as (k + u)/128 − 1."""
    levels = torch.round((x0 + 1.0) * 127.5).clamp(0, 255)
    noise = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return (levels + noise) / 128.0 - 1.0


def ode_nll_bpd(
    diffusion: Diffusion,
    net: Net,
    x0: torch.Tensor,
    settings: ODELikelihoodSettings | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    snr_time: LogSNRTime | None = None,
) -> dict[str, Any]:
    """−log p(x₀) of the probability-flow ODE in bits/dim, per image.

    Args:
        diffusion: the (full, not respaced) diffusion whose schedule and parameterisation the
            network was trained with.
        net: the (EMA, unwrapped) network, in eval mode.
        x0: images ``[B, C, H, W]`` on the 256-level grid in [−1, 1].
        settings: solver and divergence settings.
        generator: dequantisation noise first, then the Hutchinson probes (on ``x0``'s device).
        progress: a progress bar over the solve.
        snr_time: the continuous view of the schedule (built from ``diffusion`` when None).

    Returns:
        ``total [B]`` (bits/dim: −(prior + mean over probes of delta)/(D ln 2) + 7),
        ``prior [B]`` (the prior's part, −log N(x(λ_min); 0, I)/(D ln 2)), ``stderr [B]`` (the
        Hutchinson estimate's standard error in bits/dim, from the spread of the n probes; NaN for
        n = 1, 0 for the exact divergence), ``nfe`` and ``seconds`` (of the solve).
    """
    if getattr(getattr(diffusion, "time", None), "continuous", False):
        raise ConfigError(
            "nll.estimator=ode on a continuous-time model: the ODE feeds the network "
            "fractional timestep indices, which a continuous-time network was not trained on. "
            "Use nll.estimator=full (VDM's continuous bound) or stratified"
        )
    settings = settings or ODELikelihoodSettings()
    snr_time = snr_time or LogSNRTime.from_diffusion(diffusion)
    x = dequantize(x0, generator)
    out = probability_flow_log_likelihood(
        eps_prediction(diffusion, net, snr_time), x, snr_time.lambda_max, snr_time.lambda_min,
        settings=settings, generator=generator, progress=progress,
    )  # fmt: skip
    scale = 1.0 / (x[0].numel() * _LN2)  # nats per image → bits per dim
    delta = out["delta"].to(torch.float64)
    prior = out["prior"].to(torch.float64)
    total = -(prior + delta.mean(dim=1)) * scale + DEQUANTIZATION_BITS
    n = delta.shape[1]
    if settings.divergence == "exact":
        stderr = torch.zeros_like(total)
    elif n > 1:
        stderr = delta.std(dim=1) / math.sqrt(n) * scale
    else:
        stderr = torch.full_like(total, float("nan"))
    return {
        "total": total,
        "prior": -prior * scale,
        "stderr": stderr,
        "nfe": out["nfe"],
        "seconds": out["seconds"],
    }
