"""Shared by the web UI's tests: one in-process server per test process, and why a test has to skip."""

from __future__ import annotations

import functools
import importlib.util
import ipaddress
import os
import shutil
import socket
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_NAMES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
# Chromium as root in a container, with nothing fetched from anywhere (no updates, no sync, no QUIC probes).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def gradio_missing() -> str | None:
    if importlib.util.find_spec("gradio") is None or importlib.util.find_spec("gradio_client") is None:
        return "the web extra is not installed (pip install -e '.[web]')"
    return None


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if gradio_missing():
        return gradio_missing()
    if importlib.util.find_spec("playwright") is None:
        return "Playwright's Python package is not installed (pip install -e '.[test,web]')"
    if chromium() is None:
        return ("no Chromium at /usr/bin/chromium (Debian/Ubuntu: apt-get install chromium; "
                "scripts/setup.sh does it when run as root)")
    return None


def chromium() -> str | None:
    return next((name for name in CHROMIUM_NAMES if os.access(name, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ConnectionLog:
    """Every address a socket of this process connects to while installed (offline check)."""

    def __init__(self):
        self.addresses: list[str] = []
        self._original = socket.socket.connect

    def __enter__(self) -> ConnectionLog:
        log, original = self, self._original

        def connect(sock, address):
            log.addresses.append(str(address[0]) if isinstance(address, tuple) else str(address))
            return original(sock, address)

        socket.socket.connect = connect
        return self

    def __exit__(self, *exc) -> None:
        socket.socket.connect = self._original

    def beyond_this_machine(self) -> list[str]:
        def local(address: str) -> bool:
            if address in ("localhost", "") or address.startswith("/"):  # names and unix sockets
                return True
            try:
                return ipaddress.ip_address(address).is_loopback
            except ValueError:
                return False

        return [address for address in self.addresses if not local(address)]


@functools.cache
def shared_server():
    """(page, url, connection log of the start-up) for a server on the embedded model, started once per process."""
    import atexit

    from mrgd.web.app import launch
    from mrgd.web.page import Page
    from mrgd.web.runner import Runner

    with ConnectionLog() as log:
        page = Page(Runner(None, "cpu", "float32"), Path(tempfile.mkdtemp(prefix="mrgd-web-test-")))
        demo, url = launch(page, "127.0.0.1", free_port(), block=False)
    atexit.register(lambda: (demo.close(), shutil.rmtree(page.workdir, ignore_errors=True)))
    return page, url, log
