"""The web UI (`mrgd serve`, the optional extra `pip install mrgd[web]`): a local Gradio page on one pipeline.

`state` (the editor's document <-> Edit, pure), `runner` (one run at a time on the device, progress, cancel),
`jobs` (generate / edit / invert and their files), `page` (the page's server-side functions), `app` (the page's
layout, its events and the server), `editor.js` / `editor.css` (the box editor). Importing this package needs
nothing beyond mrgd; `page` and `app` need Gradio.
"""

from __future__ import annotations

import importlib.util
import os

# Before Gradio is imported (mrgd.web.app imports it): no telemetry and no version check, from Gradio or the hub
# client under it. The page must work with no network at all.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

EXTRA_HINT = "the web UI needs its extra: pip install mrgd[web]"


def missing_extra() -> str | None:
    """None when Gradio is installed, else the one line that says how to get it."""
    return None if importlib.util.find_spec("gradio") is not None else EXTRA_HINT
