"""ddpm-lab: Denoising Diffusion Probabilistic Models, reproduced and ablated."""

__version__ = "0.1.0"
