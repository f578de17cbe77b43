"""Reverse-process samplers behind one registry: ancestral, DDIM, DPM-Solver++(2M) and EDM's Heun.

Every sampler has the same signature (k-diffusion's shape, adapted to the discrete VP schedule)::

    sampler_fn(d, net, x_T, steps, *, generator, clip_denoised, callback, spacing, **opts) -> x0

A :class:`SamplerSpec` names one sampling protocol (sampler, steps, η, spacing) for the
configs, the evaluation code and the metric names (``spec.tag(T)``: ``ddim50``, ``dpmpp20``).

``x_T`` is the starting noise ``[B, ...]``, ``steps`` the number of network timesteps visited
(None: all T), and ``callback(info)`` is called once per step with at least ``i`` (step number,
0 = noisiest), ``t`` (original timestep index, int), ``x`` (the state x_t entering the step) and
``pred_x0`` (x̂₀ at that step, clipped when ``clip_denoised``). Adding a sampler is one function
plus an entry in :data:`SAMPLERS`.

``d`` is the composed diffusion (any :class:`~ddpm.diffusion.protocols.Diffusion`, e.g. the
:class:`~ddpm.diffusion.GaussianDiffusion` façade); α, σ and the timestep grid come from its
schedule ``d.schedule``. Every sampler reads x̂₀ through ``d.p_mean_variance`` (so it works for
every parameterisation and clips like the others) and ε̂ through the schedule's
``pred_eps_from_x0``. Randomness comes only from the ``torch.Generator`` passed in. The
ancestral/DDIM loop indexes device-resident tables with device-resident timesteps, so a step
makes no host↔device copy; the ODE solvers' coefficients are host float64 scalars computed once
per call. Which timesteps a chain visits is :mod:`ddpm.diffusion.spacing`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ddpm.diffusion.protocols import Diffusion, Net
from ddpm.diffusion.schedule import Schedule
from ddpm.diffusion.spacing import DEFAULT_SPACING, SPACINGS, timestep_spacing

__all__ = [
    "SAMPLERS",
    "SAMPLER_TAGS",
    "SamplerSpec",
    "ancestral",
    "ddim",
    "dpmpp_2m",
    "get_sampler",
    "heun",
    "sample_loop",
]

Callback = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------------------- samplers
def ancestral(
    d: Diffusion,
    net: Net,
    x_T: torch.Tensor,
    steps: int | None = None,
    *,
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
    callback: Callback | None = None,
    spacing: str | None = None,
    t_start: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Algorithm 2 (all T steps) or strided respacing over ``steps`` timesteps: x ← μ_θ + σ z.

    ``steps`` network evaluations; the noise z of each step but the last is drawn from
    ``generator``. ``t_start`` starts at that kept original timestep with ``x_T`` as x_t.
    Default spacing ``linspace``. Returns x₀ ``[B, ...]`` (not clamped).
    """
    return _respaced_chain(
        d, net, x_T, steps, None, generator, clip_denoised, callback, spacing, t_start, progress
    )


def ddim(
    d: Diffusion,
    net: Net,
    x_T: torch.Tensor,
    steps: int | None = None,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
    callback: Callback | None = None,
    spacing: str | None = None,
    t_start: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (Song et al.) over ``steps`` timesteps; ``eta`` = 0 is the deterministic ODE solver.

    First order in the step size for η = 0 (it is DPM-Solver-1 / Euler in λ on the data
    prediction). ``steps`` network evaluations; default spacing ``linspace``.
    """
    if eta is None or eta < 0:
        raise ValueError(f"eta={eta}: DDIM needs eta >= 0 (0 is deterministic)")
    return _respaced_chain(
        d,
        net,
        x_T,
        steps,
        float(eta),
        generator,
        clip_denoised,
        callback,
        spacing,
        t_start,
        progress,
    )


def dpmpp_2m(
    d: Diffusion,
    net: Net,
    x_T: torch.Tensor,
    steps: int | None = None,
    *,
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
    callback: Callback | None = None,
    spacing: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): multistep exponential integrator on the x̂₀ prediction.

    With αₜ = √ᾱₜ, σₜ = √(1−ᾱₜ), λₜ = log(αₜ/σₜ) at the visited timesteps t₀ > t₁ > … > t_{S−1}
    and h = λ_{i+1} − λᵢ, one step is

        x_{i+1} = (σ_{i+1}/σᵢ) xᵢ − α_{i+1} (e^{−h} − 1) D,
        D = (1 + 1/(2r)) x̂₀ᵢ − 1/(2r) x̂₀ᵢ₋₁,  r = (λᵢ − λᵢ₋₁)/h,

    with D = x̂₀ᵢ (first order) at the first step. The final step, from t_{S−1} to clean data
    (σ = 0, λ = ∞), is first order: it returns x̂₀ at t_{S−1}, exactly as DDIM's last step does.
    ``steps`` network evaluations. Deterministic (``generator`` is unused; it is accepted so all
    samplers share one signature). Default spacing ``logsnr`` (equal h): with ``linspace`` on the
    linear schedule the λ-steps are very uneven and the solver is much less accurate. At zero
    terminal SNR (λ₀ = −∞, σ₀ = 1) the first step is h = ∞, e^{−h} = 0: x₁ = σ₁ x_T + α₁ x̂₀,
    and the next step's r = ∞ makes it first order too; no division by zero.
    """
    ts, abar = _ode_grid(d, steps, spacing or DEFAULT_SPACING["dpmpp_2m"])
    alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
    lam = (alpha.log() - sigma.log()).tolist()
    alpha, sigma = alpha.tolist(), sigma.tolist()
    x = x_T
    prev_x0, h_prev = None, 0.0
    n = len(ts)
    for i in _maybe_progress(range(n), progress):
        pred_x0 = _pred_x0(d, net, x, ts[i], clip_denoised)
        if callback is not None:
            callback({"i": i, "t": ts[i], "x": x, "pred_x0": pred_x0, "sigma": sigma[i]})
        if i == n - 1:
            return pred_x0
        h = lam[i + 1] - lam[i]
        if prev_x0 is None:
            denoised = pred_x0
        else:
            r = h_prev / h
            denoised = (1.0 + 0.5 / r) * pred_x0 - (0.5 / r) * prev_x0
        x = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * math.expm1(-h)) * denoised
        prev_x0, h_prev = pred_x0, h
    raise AssertionError("unreachable")  # pragma: no cover


def heun(
    d: Diffusion,
    net: Net,
    x_T: torch.Tensor,
    steps: int | None = None,
    *,
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
    callback: Callback | None = None,
    spacing: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """EDM's (Karras et al. 2022, Algorithm 1 without churn) Heun solver of the probability-flow ODE.

    In the VE view x̃ = x/√ᾱ = x₀ + σ ε, σ = √((1−ᾱ)/ᾱ), the ODE is dx̃/dσ = (x̃ − D(x̃; σ))/σ with
    D the x̂₀ of the network evaluated at x = x̃/√(1+σ²). The grid is σ₀ > … > σ_{S−1} (default
    ``karras`` spacing, ρ = 7) followed by σ_S = 0; every step is Heun (Euler predictor, trapezoid
    corrector) except the last, to σ = 0, which is Euler (it returns x̂₀ at σ_{S−1}).

    Discrete schedule: the EDM σ targets are snapped to the timestep with the nearest σ (in log σ)
    and the solver integrates between the *snapped* σ values, so every network evaluation is at
    the exact σ of the integer timestep it is given (no interpolation of t; the snapping only
    perturbs the step sizes). ``steps = S`` costs 2S − 1 network evaluations. Deterministic.
    At zero terminal SNR (σ₀ = ∞) the first step is the σ → ∞ limit of Euler, x̃₁ = D + σ₁ x_T,
    without a corrector (2S − 2 evaluations); the ``karras`` grid is then built on the finite σ
    range and starts at t = T−1.
    """
    ts, abar = _ode_grid(d, steps, spacing or DEFAULT_SPACING["heun"])
    sig = ((1.0 - abar) / abar).sqrt().tolist()  # σ = ∞ at zero terminal SNR (ᾱ = 0)
    scale = abar.sqrt().tolist()  # x = √ᾱ x̃
    n = len(ts)
    x_tilde = None if scale[0] == 0 else x_T / scale[0]
    for i in _maybe_progress(range(n), progress):
        x = x_T if x_tilde is None else x_tilde * scale[i]
        pred_x0 = _pred_x0(d, net, x, ts[i], clip_denoised)
        if callback is not None:
            callback({"i": i, "t": ts[i], "x": x, "pred_x0": pred_x0, "sigma": sig[i]})
        if i == n - 1:
            return pred_x0  # Euler to σ = 0: x̃ + (0 − σ)(x̃ − D)/σ = D
        if x_tilde is None:
            # From σ = ∞ (x_T = ε exactly) the Euler step is the limit x̃ = D + σ_{i+1} x_T; one
            # evaluation, no corrector (it would need the slope at σ = ∞ a second time).
            x_tilde = pred_x0 + sig[i + 1] * x_T
            continue
        slope = (x_tilde - pred_x0) / sig[i]
        dsig = sig[i + 1] - sig[i]
        x_euler = x_tilde + dsig * slope
        pred_x0_next = _pred_x0(d, net, x_euler * scale[i + 1], ts[i + 1], clip_denoised)
        slope_next = (x_euler - pred_x0_next) / sig[i + 1]
        x_tilde = x_tilde + (0.5 * dsig) * (slope + slope_next)
    raise AssertionError("unreachable")  # pragma: no cover


#: name → sampler function (one signature, see the module docstring).
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ancestral": ancestral,
    "ddim": ddim,
    "dpmpp_2m": dpmpp_2m,
    "heun": heun,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler registered as ``name``; ValueError naming the choices otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


#: Short names of the samplers in metric keys (``fd_digits_1k_dpmpp20``).
SAMPLER_TAGS = {"ancestral": "ddpm", "ddim": "ddim", "dpmpp_2m": "dpmpp", "heun": "heun"}


@dataclass(frozen=True)
class SamplerSpec:
    """One sampling protocol: which sampler, how many steps, DDIM's η and the timestep spacing.

    Attributes:
        name: a key of :data:`SAMPLERS`.
        steps: timesteps visited (None: all T). Heun's S steps cost 2S − 1 network evaluations.
        eta: DDIM's η (None → 0, deterministic); refused for the other samplers.
        spacing: one of :data:`SPACINGS`; None is the sampler's :data:`DEFAULT_SPACING`.

    Raises:
        ValueError: unknown sampler or spacing, ``eta`` without ``ddim``, ``steps`` < 2.
    """

    name: str = "ancestral"
    steps: int | None = None
    eta: float | None = None
    spacing: str | None = None

    def __post_init__(self) -> None:
        get_sampler(self.name)
        if self.steps is not None:
            if int(self.steps) < 2:
                raise ValueError(f"steps={self.steps}: a sampler needs at least 2 steps (or null)")
            object.__setattr__(self, "steps", int(self.steps))
        if self.eta is not None:
            if self.name != "ddim":
                raise ValueError(
                    f"eta={self.eta} only applies to sampler='ddim', not sampler={self.name!r}; "
                    "drop eta or set sampler=ddim"
                )
            if float(self.eta) < 0:
                raise ValueError(f"eta={self.eta}: DDIM needs eta >= 0 (0 is deterministic)")
            object.__setattr__(self, "eta", float(self.eta))
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}: choose one of {list(SPACINGS)}")

    @classmethod
    def from_config(cls, node: Mapping[str, Any]) -> SamplerSpec:
        """From a mapping (e.g. a config node) with ``sampler`` and optional ``steps``, ``eta``,
        ``spacing`` keys."""
        return cls(
            name=str(node.get("sampler") or "ancestral"),
            steps=node.get("steps"),
            eta=node.get("eta"),
            spacing=node.get("spacing") or None,
        )

    @classmethod
    def parse(cls, text: str) -> SamplerSpec:
        """``name:steps`` (``ddim:50``, ``dpmpp_2m:20``); ``name`` alone visits all T steps.

        Raises:
            ValueError: an unknown sampler, a step count that is not an integer ≥ 2.
        """
        name, _, steps = text.partition(":")
        try:
            return cls(name, int(steps) if steps else None)
        except ValueError as err:
            raise ValueError(f"{text!r}: {err}") from None

    def effective_spacing(self) -> str:
        """The spacing the sampler uses (the default when ``spacing`` is None)."""
        return self.spacing or DEFAULT_SPACING[self.name]

    def nfe(self, num_timesteps: int, zero_terminal_snr: bool = False) -> int:
        """Network evaluations per sample: S, or for Heun 2S − 1 (2S − 2 at zero terminal SNR,
        whose first step from σ = ∞ has no corrector)."""
        steps = int(num_timesteps) if self.steps is None else self.steps
        if self.name == "heun":
            return 2 * steps - (2 if zero_terminal_snr else 1)
        return steps

    def tag(self, num_timesteps: int) -> str:
        """The protocol part of a metric name.

        ``""`` for the full ancestral sampler (all T steps, the paper's protocol); otherwise a
        short sampler name and the step count, ``ddpm{S}`` (respaced ancestral), ``ddim{S}``,
        ``dpmpp{S}``, ``heun{S}``; then ``_eta{η}`` for DDIM with η ≠ 0 (``.`` written ``p``),
        and ``_{spacing}`` when a respaced run uses a spacing other than the sampler's default.
        """
        T = int(num_timesteps)
        steps = T if self.steps is None else self.steps
        if self.name == "ancestral" and steps == T:
            return ""
        tag = f"{SAMPLER_TAGS[self.name]}{steps}"
        if self.eta:
            tag += f"_eta{self.eta:g}".replace(".", "p")
        if steps < T and self.effective_spacing() != DEFAULT_SPACING[self.name]:
            tag += f"_{self.spacing}"
        return tag

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`GaussianDiffusion.sample` for this protocol."""
        return {"sampler": self.name, "steps": self.steps, "eta": self.eta, "spacing": self.spacing}


# ---------------------------------------------------------------------------- façade entry
def sample_loop(
    d: Diffusion,
    net: Net,
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    steps: int | None = None,
    eta: float | None = None,
    clip_denoised: bool = True,
    return_pred_x0: bool = False,
    x_T: torch.Tensor | None = None,
    t_start: int | None = None,
    progress: bool = False,
    sampler: str | None = None,
    spacing: str | None = None,
    callback: Callback | None = None,
    **sampler_opts: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """See :meth:`GaussianDiffusion.sample`; returns samples ``[B, C, H, W]`` (not clamped)."""
    spec = SamplerSpec(sampler or "ancestral", steps, eta, spacing)  # validates every argument
    fn = get_sampler(spec.name)
    if spec.eta is not None:
        sampler_opts["eta"] = spec.eta
    if t_start is not None:
        if spec.name not in ("ancestral", "ddim"):
            raise ValueError(f"t_start is supported by 'ancestral' and 'ddim', not {spec.name!r}")
        sampler_opts["t_start"] = t_start
    device, dtype = d.schedule.device, d.schedule.dtype
    shape = tuple(int(s) for s in shape)
    if t_start is not None and x_T is None:
        raise ValueError("t_start needs x_T, the x_t to start from")
    if x_T is None:
        x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    else:
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
        x = x_T.to(device=device, dtype=dtype)

    chain: list[torch.Tensor] = []

    def record(info: dict[str, Any]) -> None:
        if return_pred_x0:
            chain.append(info["pred_x0"])
        if callback is not None:
            callback(info)

    use_callback = return_pred_x0 or callback is not None
    x = fn(
        d,
        net,
        x,
        steps,
        generator=generator,
        clip_denoised=clip_denoised,
        callback=record if use_callback else None,
        spacing=spacing,
        progress=progress,
        **sampler_opts,
    )
    if return_pred_x0:
        return x, torch.stack(chain)
    return x


# ---------------------------------------------------------------------------- internals
def _respaced_chain(
    d: Diffusion,
    net: Net,
    x: torch.Tensor,
    steps: int | None,
    eta: float | None,
    generator: torch.Generator | None,
    clip_denoised: bool,
    callback: Callback | None,
    spacing: str | None,
    t_start: int | None,
    progress: bool,
) -> torch.Tensor:
    """The ancestral (``eta=None``) / DDIM loop over a respaced child of ``d``."""
    spacing = spacing or "linspace"
    if steps is None or int(steps) == d.num_timesteps:
        sched, model_timesteps = d, torch.arange(d.num_timesteps, device=d.schedule.device)
    else:
        sched, model_timesteps = d.respaced(int(steps), spacing=spacing)
    device, dtype = d.schedule.device, d.schedule.dtype
    x = x.to(device=device, dtype=dtype)
    shape, batch = tuple(x.shape), x.shape[0]

    first = sched.num_timesteps - 1
    if t_start is not None:
        matches = (model_timesteps == int(t_start)).nonzero()
        if matches.numel() == 0:
            raise ValueError(
                f"t_start={t_start} is not one of the {sched.num_timesteps} kept timesteps; "
                "use steps=None or a t_start from diffusion.respaced(steps)[1]"
            )
        first = int(matches[0, 0])
    # Only the callback needs host ints; one copy up front, none per step.
    host_timesteps = model_timesteps.tolist() if callback is not None else None

    table_timesteps = torch.arange(sched.num_timesteps, device=device)
    for step, i in enumerate(_maybe_progress(range(first, -1, -1), progress)):
        t = table_timesteps[i].expand(batch)
        # The network is called at the original timestep, so through the parent.
        output = d.model_output(net, x, model_timesteps[i].expand(batch))
        out = sched.p_mean_variance(output, x, t, clip_denoised=clip_denoised)
        if callback is not None:
            callback({"i": step, "t": host_timesteps[i], "x": x, "pred_x0": out["pred_x0"]})
        if eta is None:
            x = out["mean"]
            if i > 0:
                noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
                x = x + torch.exp(0.5 * out["log_variance"]) * noise
        else:
            x = _ddim_step(sched.schedule, x, t, out["pred_x0"], eta, i, generator)
    return x


def _ddim_step(
    schedule: Schedule,
    x: torch.Tensor,
    t: torch.Tensor,
    pred_x0: torch.Tensor,
    eta: float,
    i: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """x_{t−1} = √ᾱ_{t−1} x̂₀ + √(1−ᾱ_{t−1}−σ²) ε̂ + σ z, σ = η √((1−ᾱ_{t−1})/(1−ᾱₜ)) √(1−ᾱₜ/ᾱ_{t−1})."""
    eps = schedule.pred_eps_from_x0(x, t, pred_x0)
    alpha_bar = schedule.extract("alphas_cumprod", t, x)
    alpha_bar_prev = schedule.extract("alphas_cumprod_prev", t, x)
    sigma = (
        eta
        * torch.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar))
        * torch.sqrt(1.0 - alpha_bar / alpha_bar_prev)
    )
    x_prev = (
        alpha_bar_prev.sqrt() * pred_x0
        + torch.sqrt((1.0 - alpha_bar_prev - sigma.square()).clamp(min=0.0)) * eps
    )
    if i > 0 and eta > 0:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_prev = x_prev + sigma * noise
    return x_prev


def _ode_grid(d: Diffusion, steps: int | None, spacing: str) -> tuple[list[int], torch.Tensor]:
    """Visited original timesteps, descending (host ints), and their ᾱ ``[S]`` (host float64)."""
    steps = d.num_timesteps if steps is None else int(steps)
    kept = timestep_spacing(d.schedule, steps, spacing).flip(0)
    abar = torch.cumprod(1.0 - d.schedule.betas_float64, 0)[kept]
    return kept.tolist(), abar


def _pred_x0(d: Diffusion, net: Net, x: torch.Tensor, t: int, clip_denoised: bool) -> torch.Tensor:
    """x̂₀ ``[B, ...]`` of the network at original timestep ``t`` via ``p_mean_variance``."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    output = d.model_output(net, x, tt)
    return d.p_mean_variance(output, x, tt, clip_denoised=clip_denoised)["pred_x0"]


def _maybe_progress(indices: range, progress: bool):
    if not progress:
        return indices
    from tqdm.auto import tqdm

    return tqdm(indices, desc="sampling", leave=False)
