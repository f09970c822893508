"""Process-wide settings the command line applies at its edge: how much the libraries say, and determinism; and
the constants a run keeps on its device.

The libraries under mrgd talk on stderr: logging warnings (transformers' torchvision fallbacks, diffusers' "modules
that should be kept in float32"), loading bars, Python warnings (deprecations). A command prints our lines only;
``mrgd --verbose`` or ``MRGD_DEBUG=1`` lets the libraries speak again. Nothing here is needed from Python: a
program that imports mrgd keeps its own logging and warnings settings.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

# Read by the libraries when they are imported, which happens lazily, inside a command.
_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also transformers' "Loading weights" bars
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
_LIBRARIES = ("transformers", "diffusers")  # each has utils.logging with verbosity and progress-bar switches

_verbose = True  # library defaults, until a command says otherwise
_quietened: set[str] = set()  # libraries this process made quiet, to undo for a --verbose run in the same process


@contextmanager
def library_output(verbose: bool) -> Iterator[None]:
    """For the duration of a command: the libraries' warnings, log lines and loading bars only when ``verbose``.

    Errors (logging.ERROR and above) still show. Environment, warning filters and logging are restored afterwards,
    so commands run in-process (tests) leave the interpreter as they found it.
    """
    global _verbose
    saved_env = {name: os.environ.get(name) for name in _QUIET_ENV}
    saved_verbose, saved_disable = _verbose, logging.root.manager.disable
    _verbose = verbose
    with warnings.catch_warnings():
        if not verbose:
            for name, value in _QUIET_ENV.items():
                os.environ.setdefault(name, value)  # a value the user set stays theirs
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
        settle_libraries()
        try:
            yield
        finally:
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            logging.disable(saved_disable)
            _verbose = saved_verbose


def settle_libraries(load: bool = False) -> None:
    """Apply the current setting to transformers and diffusers (imported ones; with ``load``, import them).

    Call it right before loading models: diffusers reads no environment variable for its loading bars.
    """
    for name in _LIBRARIES:
        if not load and name not in sys.modules:
            continue
        library_logging = importlib.import_module(f"{name}.utils.logging")
        if not _verbose:
            library_logging.set_verbosity_error()
            library_logging.disable_progress_bar()
            _quietened.add(name)
        elif name in _quietened:
            library_logging.set_verbosity_warning()
            library_logging.enable_progress_bar()
            _quietened.discard(name)


@contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """Bit-identical runs on CUDA too: deterministic kernels only, cuBLAS with a fixed workspace.

    Guidance's backward passes use atomic adds on CUDA, whose order varies between runs. An operation with no
    deterministic kernel then fails loudly instead of drifting. ``CUBLAS_WORKSPACE_CONFIG`` is read when cuBLAS
    starts, so this must be entered before the first CUDA computation (the commands enter it before loading).
    """
    if not enabled:
        yield
        return
    import torch

    saved = (os.environ.get("CUBLAS_WORKSPACE_CONFIG"), torch.are_deterministic_algorithms_enabled(),
             torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False  # benchmarking may pick a different convolution kernel each run
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        torch.use_deterministic_algorithms(saved[1])
        torch.backends.cudnn.benchmark = saved[2]


@lru_cache(maxsize=512)
def device_constant(values: tuple, device, dtype=None):
    """`torch.tensor(values)` on `device`, made once per process: indices (long) by default. A tensor made from Python
    values for a CUDA op is copied to the GPU at every call, and each such copy waits for the GPU to catch up (the
    UNet's timestep, rows picked by index, SDXL's time ids). Shared: not to be written to."""
    import torch

    return torch.tensor(values, dtype=dtype or torch.long, device=device)
