"""Which timesteps a respaced or ODE sampler visits: the spacings ``linspace``, ``uniform``,
``trailing``, ``logsnr`` and ``karras`` on a discrete :class:`~ddpm.diffusion.schedule.Schedule`.
"""

from __future__ import annotations

import math

import torch

from ddpm.diffusion.schedule import Schedule

__all__ = ["DEFAULT_SPACING", "SPACINGS", "timestep_spacing"]

#: Timestep spacings; see :func:`timestep_spacing`.
SPACINGS = ("linspace", "uniform", "trailing", "logsnr", "karras")

#: The spacing each sampler uses when ``spacing=None``.
#: ancestral/ddim keep today's ``linspace`` so existing results do not change; DPM-Solver++ takes
#: steps of equal size in λ = log(α/σ), the variable it integrates in (on the linear schedule a
#: linspace grid puts one huge λ-jump at the end, where the multistep extrapolation is worst);
#: Heun uses EDM's ρ = 7 grid in σ, which it was designed with.
DEFAULT_SPACING = {
    "ancestral": "linspace",
    "ddim": "linspace",
    "dpmpp_2m": "logsnr",
    "heun": "karras",
}

_KARRAS_RHO = 7.0
#: EDM's largest σ; the ``karras`` grid starts there at zero terminal SNR, where σ_T = ∞.
_KARRAS_SIGMA_MAX = 80.0


def timestep_spacing(schedule: Schedule, steps: int, spacing: str = "linspace") -> torch.Tensor:
    """The ``steps`` original timestep indices a respaced/ODE sampler visits, ascending, on the host.

    ``schedule`` is the :class:`~ddpm.diffusion.schedule.Schedule` (anything with its
    ``num_timesteps`` and ``betas_float64`` works, e.g. the façade).

    Spacings (T = ``schedule.num_timesteps``, S = ``steps``):

    * ``linspace``: round(linspace(0, T−1, S)) (Improved DDPM's strided respacing; today's default).
    * ``uniform``: DDIM's 0, T/S, 2T/S, … (rounded), never reaching T−1.
    * ``trailing``: T−1, T−1−T/S, … (rounded; Lin et al. 2024), never reaching 0.
    * ``logsnr``: equal steps in λₜ = log(√ᾱₜ/√(1−ᾱₜ)) between λ at T−1 and λ at 0.
    * ``karras``: EDM's σᵢ = (σ_max^{1/ρ} + i/(S−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, ρ = 7, with
      σₜ = √((1−ᾱₜ)/ᾱₜ), σ_max = σ at T−1, σ_min = σ at 0.

    At zero terminal SNR (ᾱ at T−1 is 0: λ = −∞, σ = ∞) the ``logsnr`` and ``karras`` targets
    are placed on the finite range (``karras`` from σ_max = min(σ at T−2, 80), EDM's σ_max) and
    the noisiest visited timestep is T−1.

    ``logsnr`` and ``karras`` targets are snapped to the discrete timestep nearest in λ (= −log σ),
    because the network only knows integer timesteps; where two targets snap to the same timestep
    (near t = 0 the discrete λ-gaps exceed small target steps) they are pushed apart to the
    neighbouring indices so the S timesteps stay distinct.

    Returns:
        LongTensor ``[S]``, strictly increasing, in ``[0, T−1]``.
    """
    T, steps = schedule.num_timesteps, int(steps)
    if not 2 <= steps <= T:
        raise ValueError(f"steps={steps}: choose between 2 and num_timesteps={T}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}: choose one of {list(SPACINGS)}")
    f64 = torch.float64
    if spacing == "linspace":
        kept = torch.linspace(0, T - 1, steps, dtype=f64).round().long()
    elif spacing == "uniform":
        kept = (torch.arange(steps, dtype=f64) * (T / steps)).round().long()
    elif spacing == "trailing":
        kept = ((T - torch.arange(steps, dtype=f64) * (T / steps)).round().long() - 1).flip(0)
    else:
        lam = _log_snr_half(schedule)  # decreasing in t
        zero_snr = bool(torch.isinf(lam[-1]))
        if zero_snr:  # ᾱ_T = 0: λ_T = −∞; place the targets on the finite range, then keep T−1
            lam = torch.cat([lam[:-1], lam[-2:-1]])
        if spacing == "logsnr":
            targets = torch.linspace(float(lam[0]), float(lam[-1]), steps, dtype=f64)
        else:
            sigma_max, sigma_min = math.exp(-float(lam[-1])), math.exp(-float(lam[0]))
            if zero_snr:  # σ_T = ∞: start the ρ-grid at EDM's σ_max (or lower), after t = T−1
                sigma_max = min(sigma_max, _KARRAS_SIGMA_MAX)
            ramp = torch.linspace(0.0, 1.0, steps, dtype=f64)
            inv = 1.0 / _KARRAS_RHO
            sigmas = (sigma_max**inv + ramp * (sigma_min**inv - sigma_max**inv)) ** _KARRAS_RHO
            targets = (-sigmas.log()).flip(0)  # ascending t ↔ descending σ ↔ increasing λ order
        kept = (lam[None, :] - targets[:, None]).abs().argmin(dim=1)
        if zero_snr:
            kept[kept.argmax()] = T - 1
    return _strictly_increasing(kept.tolist(), T)


def _log_snr_half(schedule: Schedule) -> torch.Tensor:
    """λₜ = log(αₜ/σₜ) = ½ log(ᾱₜ/(1−ᾱₜ)) ``[T]`` float64 on the host."""
    abar = torch.cumprod(1.0 - schedule.betas_float64, 0)
    return 0.5 * (abar.log() - torch.log1p(-abar))


def _strictly_increasing(kept: list[int], T: int) -> torch.Tensor:
    """Make sorted indices distinct within [0, T−1] by pushing collisions to neighbours."""
    kept = sorted(kept)
    for i in range(1, len(kept)):
        kept[i] = max(kept[i], kept[i - 1] + 1)
    kept[-1] = min(kept[-1], T - 1)
    for i in range(len(kept) - 2, -1, -1):
        kept[i] = min(kept[i], kept[i + 1] - 1)
    return torch.tensor(kept, dtype=torch.long)
