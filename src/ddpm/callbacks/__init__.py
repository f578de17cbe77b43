"""Lightning callbacks: sample grids, atomic checkpoints, preemption, and evaluation (IS/FID, bits/dim)."""

from ddpm.callbacks.checkpoint_io import AtomicCheckpointIO
from ddpm.callbacks.model_checkpoint import ModelCheckpoint
from ddpm.callbacks.nll import NLLCallback
from ddpm.callbacks.preemption import PreemptionCheckpoint
from ddpm.callbacks.progress import StepProgressBar
from ddpm.callbacks.sample_grid import SampleGridCallback
from ddpm.callbacks.sample_quality import SampleQualityCallback
from ddpm.callbacks.throughput import ThroughputWatch

__all__ = [
    "AtomicCheckpointIO",
    "ModelCheckpoint",
    "NLLCallback",
    "PreemptionCheckpoint",
    "SampleGridCallback",
    "SampleQualityCallback",
    "StepProgressBar",
    "ThroughputWatch",
]
