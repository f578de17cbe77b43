"""Neural networks: the paper's UNet and a converter for released diffusers checkpoints."""

from ddpm.models.convert import unet_from_diffusers
from ddpm.models.unet import UNet

__all__ = ["UNet", "unet_from_diffusers"]
