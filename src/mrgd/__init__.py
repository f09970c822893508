"""mrgd: multi-region, text-driven image manipulation with diffusion models."""

__version__ = "0.1.0"
