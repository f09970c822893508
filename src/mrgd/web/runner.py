"""One model on one device, one run at a time: a run works in its own thread, reports its steps and x̂0 previews,
and stops at the next step once cancelled.

Gradio's queue already lets one event of the "device" group run at a time, but cancelling an event frees its slot
at once, while the pipeline is still inside a step; the runner's own lock keeps the next run waiting until the
cancelled one has really left the device.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..errors import InputError


class Cancelled(Exception):
    """Raised from the pipeline's callback when the user cancels; the pipeline restores its hooks in a finally."""


@dataclass
class Update:
    """A step of a run, for the progress bar, with a decoded x̂0 every few steps."""

    phase: str
    step: int
    steps: int
    preview: Image.Image | None = None


class Run:
    """A job in flight: its updates (for an async reader), its result or error, and its cancel switch."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.cancel_requested = threading.Event()
        self.finished = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self._loop = loop
        self._updates: asyncio.Queue | None = asyncio.Queue() if loop is not None else None

    def cancel(self) -> None:
        self.cancel_requested.set()

    def report(self, update: Update | None) -> None:
        """Hand an update to the reader's event loop (None: the run is over); called from the worker thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._updates.put_nowait, update)

    def callback(self, phase: str, steps: int, decode: Callable[[torch.Tensor], Image.Image] | None = None,
                 previews: int = 5) -> Callable[[dict], None]:
        """A pipeline callback: raise :class:`Cancelled` when asked to stop, else report the step, with about
        ``previews`` decoded x̂0 pictures over the run (the target's when there is one)."""
        every = max(1, steps // previews) if decode is not None and previews else 0

        def on_step(state: dict) -> None:
            if self.cancel_requested.is_set():
                raise Cancelled()
            step = state["step"] + 1
            preview = None
            if every and step % every == 0 and step < steps and "x0" in state:
                x0 = state["x0"]
                preview = decode(x0[max(x0)])
            self.report(Update(phase, step, steps, preview))

        return on_step

    async def updates(self) -> AsyncIterator[Update]:
        """The run's updates as they come, until it is over."""
        while (update := await self._updates.get()) is not None:
            yield update


class Runner:
    """The server's pipeline and the lock that gives the device to one run at a time."""

    def __init__(self, model: str | None = None, device: str = "auto", dtype: str = "auto", compile_unet: bool = False):
        from ..models import parse_device

        self.device = parse_device(device)
        self.dtype_name = dtype
        self.compile_unet = compile_unet  # torch.compile each loaded model's UNet blocks (MRGDPipeline.compile)
        self.lock = threading.Lock()
        self.pipe, self.model = self._load(model), model

    def _load(self, model: str | None):
        from ..models import DEFAULT_MODEL, load_pipeline, parse_dtype

        if model is None and not (DEFAULT_MODEL / "model_index.json").exists():
            raise InputError("--model: the embedded model is missing from this install; reinstall mrgd or pass --model")
        from ..runtime import settle_libraries

        settle_libraries(load=True)  # under `mrgd serve`, the libraries' loading bars stay quiet (runtime.py)
        pipe = load_pipeline(model or str(DEFAULT_MODEL), device=self.device,
                             dtype=parse_dtype(self.dtype_name, self.device))
        if self.compile_unet:
            pipe.compile()
        return pipe

    @property
    def model_name(self) -> str:
        from ..models import DEFAULT_MODEL

        return self.model or f"embedded ({DEFAULT_MODEL.name})"

    def switch(self, model: str) -> None:
        """Load another model for every later run; on a bad path the current one stays (InputError)."""
        with self.lock:
            pipe = self._load(model or None)
            self.pipe, self.model = pipe, model or None

    def start(self, work: Callable[[Run], Any], loop: asyncio.AbstractEventLoop | None = None) -> Run:
        """Run ``work(run)`` in a worker thread once the device is free; the run reports through ``loop``."""
        run = Run(loop)

        def main() -> None:
            try:
                if not self.lock.acquire(blocking=False):
                    run.report(Update("waiting for the device", 0, 1))
                    self.lock.acquire()
                try:
                    if run.cancel_requested.is_set():
                        raise Cancelled()
                    run.result = work(run)
                finally:
                    self.lock.release()
            except BaseException as err:  # noqa: BLE001 - handed to the reader, who shows it in the page
                run.error = err
            finally:
                run.finished.set()
                run.report(None)

        threading.Thread(target=main, name="mrgd-run", daemon=True).start()
        return run
