"""Pure-torch diffusion maths (no Lightning, no Hydra).

Public façade: :class:`GaussianDiffusion`, composed of a :class:`Schedule` (one class per
schedule, by name in :data:`SCHEDULES`: :func:`make_schedule`, or a β table from
:func:`make_betas`) and the strategies; samplers by name (:data:`SAMPLERS`, :class:`SamplerSpec`).
"""

from ddpm.diffusion.analytic import GammaEstimate, estimate_gamma
from ddpm.diffusion.continuous import continuous_bound
from ddpm.diffusion.gaussian_diffusion import GaussianDiffusion
from ddpm.diffusion.likelihood import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    mean_flat_bpd,
    normal_kl,
)
from ddpm.diffusion.losses import LOSSES, HybridLoss, Loss, SimpleLoss, VLBLoss, make_loss
from ddpm.diffusion.parameterization import (
    PARAMETERIZATIONS,
    EDMParameterization,
    EpsParameterization,
    MuParameterization,
    Parameterization,
    VParameterization,
    X0Parameterization,
    make_parameterization,
)
from ddpm.diffusion.sampling import SAMPLERS, SamplerSpec, get_sampler
from ddpm.diffusion.schedule import (
    SCHEDULES,
    BetaSchedule,
    CosineSchedule,
    LinearSchedule,
    QuadSchedule,
    Schedule,
    SigmoidSchedule,
    ZeroTerminalSNRSchedule,
    make_betas,
    make_schedule,
    schedule_tables,
)
from ddpm.diffusion.spacing import DEFAULT_SPACING, SPACINGS, timestep_spacing
from ddpm.diffusion.time import TIMES, ContinuousTime, DiscreteTime, Time, make_time
from ddpm.diffusion.timesteps import (
    TIMESTEP_SAMPLERS,
    EDMLogNormalSampler,
    LossSecondMomentSampler,
    LowDiscrepancySampler,
    TimestepSampler,
    UniformSampler,
    make_timestep_sampler,
)
from ddpm.diffusion.variance import (
    VARIANCES,
    AnalyticVariance,
    FixedLargeVariance,
    FixedSmallVariance,
    LearnedRangeVariance,
    LearnedVariance,
    Variance,
    analytic_variance,
    make_variance,
)
from ddpm.diffusion.vdm import LearnedSchedule, RescaledSchedule, make_rescaled_schedule
from ddpm.diffusion.weighting import WEIGHTINGS, Weighting, make_weighting

__all__ = [
    "DEFAULT_SPACING",
    "LOSSES",
    "PARAMETERIZATIONS",
    "SAMPLERS",
    "SCHEDULES",
    "SPACINGS",
    "TIMES",
    "TIMESTEP_SAMPLERS",
    "VARIANCES",
    "WEIGHTINGS",
    "AnalyticVariance",
    "BetaSchedule",
    "ContinuousTime",
    "CosineSchedule",
    "DiscreteTime",
    "EDMLogNormalSampler",
    "EDMParameterization",
    "EpsParameterization",
    "FixedLargeVariance",
    "FixedSmallVariance",
    "GammaEstimate",
    "GaussianDiffusion",
    "HybridLoss",
    "LearnedRangeVariance",
    "LearnedSchedule",
    "LearnedVariance",
    "LinearSchedule",
    "Loss",
    "LossSecondMomentSampler",
    "LowDiscrepancySampler",
    "MuParameterization",
    "Parameterization",
    "QuadSchedule",
    "RescaledSchedule",
    "SamplerSpec",
    "Schedule",
    "SigmoidSchedule",
    "SimpleLoss",
    "Time",
    "TimestepSampler",
    "UniformSampler",
    "VLBLoss",
    "VParameterization",
    "Variance",
    "Weighting",
    "X0Parameterization",
    "ZeroTerminalSNRSchedule",
    "analytic_variance",
    "approx_standard_normal_cdf",
    "continuous_bound",
    "discretized_gaussian_log_likelihood",
    "estimate_gamma",
    "get_sampler",
    "make_betas",
    "make_loss",
    "make_parameterization",
    "make_rescaled_schedule",
    "make_schedule",
    "make_time",
    "make_timestep_sampler",
    "make_variance",
    "make_weighting",
    "mean_flat",
    "mean_flat_bpd",
    "normal_kl",
    "schedule_tables",
    "timestep_spacing",
]
