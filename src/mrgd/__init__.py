"""mrgd: multi-region, text-driven image manipulation with diffusion models."""

from .errors import InputError
from .layout import Edit, Layout, LayoutRegion, Region, Settings

__version__ = "0.1.0"
__all__ = ["MRGDPipeline", "Edit", "Layout", "Region", "LayoutRegion", "Settings", "InputError"]


def __getattr__(name: str):
    # The pipeline pulls in torch and diffusers; import it only when asked for.
    if name == "MRGDPipeline":
        from .pipeline import MRGDPipeline

        return MRGDPipeline
    raise AttributeError(name)
