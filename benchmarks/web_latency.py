"""The web UI measured: click "Edit" to result against `mrgd edit` on the same file, the browser tests' duration,
and the load test; also the page's screenshot for the README.

    python benchmarks/web_latency.py [--edit examples/three_regions.json] [--repeats 3] [--screenshot docs/web-ui.png]

One `mrgd serve` (embedded model, CPU, OMP_NUM_THREADS=1) serves everything. In headless Chromium (Debian's) the
script loads the edit file through the page and times from the click on "Edit" until the result picture has
loaded, ``--repeats`` times (the first includes nothing the others do not: the model is loaded at start-up).
`mrgd edit` runs the same file ``--repeats`` times as a fresh process (what a user of the command line waits for,
model loading included) and reports its own sampling time too. Then `pytest tests/test_web_browser.py` is timed,
and `benchmarks/web_load.py`'s load test runs against the same server. Writes benchmarks/results/web.json and
web.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import web_load  # noqa: E402
from webutil import CHROMIUM_ARGS, chromium  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def ui_latency(url: str, edit_file: Path, repeats: int, screenshot: Path | None) -> list[float]:
    """Seconds from the click on "Edit" to the loaded result picture, per repeat."""
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1480})
        page.goto(url)
        page.wait_for_selector(".mrgd-stage")
        page.set_input_files("#mrgd-load input[type=file]", str(edit_file))
        page.wait_for_function("() => document.querySelector('#mrgd-status').innerText.includes('Loaded')")
        for n in range(repeats):
            t0 = time.perf_counter()
            page.click("#mrgd-edit")
            page.wait_for_function("() => document.querySelector('#mrgd-status').innerText.includes('Editing')",
                                   timeout=60_000, polling=10)  # the page took the click (the old result is shown)
            page.wait_for_function(
                "() => document.querySelector('#mrgd-status').innerText.includes('Edited') && "
                "[...document.querySelectorAll('#mrgd-result img')].some(i => i.complete && i.naturalWidth > 0)",
                timeout=300_000, polling=20)
            times.append(time.perf_counter() - t0)
            if n == 0 and screenshot is not None:
                page.click('.mrgd-box[data-id="kite"]')  # a selected box shows its handles
                page.wait_for_timeout(300)
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot))
        browser.close()
    return times


def cli_latency(edit_file: Path, repeats: int) -> tuple[list[float], list[float]]:
    """(process wall seconds, the edit's own sampling seconds from info.json) of `mrgd edit`, per repeat."""
    walls, sampling = [], []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mrgd", "edit", str(edit_file), "-o", out, "--device", "cpu"],
                           check=True, env=env, capture_output=True)
            walls.append(time.perf_counter() - t0)
            info = json.loads((Path(out) / "info.json").read_text())
            sampling.append(sum(info["seconds"].values()))
    return walls, sampling


def library_latency(edit_file: Path, repeats: int) -> list[float]:
    """Seconds of `MRGDPipeline.edit` on the same file in a warm process (after one warm-up edit)."""
    import torch

    from mrgd import Edit, MRGDPipeline

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pipe = MRGDPipeline.default(device="cpu")
    edit = Edit.load(edit_file)
    pipe.edit(edit)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pipe.edit(edit)
        times.append(time.perf_counter() - t0)
    return times


def browser_tests() -> dict:
    """Wall time of the browser tests, and pytest's own per-test durations."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_web_browser.py", "--durations=0"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    durations = {}
    for seconds, phase, test in re.findall(r"^([\d.]+)s (call|setup|teardown)\s+\S+::(\S+)", done.stdout, re.M):
        durations[f"{test} ({phase})"] = float(seconds)
    summary = next((line.strip("= ") for line in reversed(done.stdout.splitlines()) if re.search(r"\d+ passed|"
                                                                                            r"\d+ failed", line)),
                   done.stdout[-300:])
    return {"wall_seconds": round(wall, 1), "pytest_summary": summary, "durations": durations,
            "returncode": done.returncode}


def write_markdown(figures: dict, path: Path) -> None:
    ui, cli, load, tests = figures["ui"], figures["cli"], figures["load"], figures["browser_tests"]
    lib = figures["library_warm"]
    lines = [
        "# Web UI: latency, browser tests, load", "",
        f"`python benchmarks/web_latency.py` on {figures['machine']}, embedded model, CPU, OMP_NUM_THREADS=1; "
        f"edit file `{figures['edit_file']}` ({figures['method']}, {figures['steps']} steps, 128×128).", "",
        "| what | median s | runs (s) |", "|---|---|---|",
        f"| web UI: click \"Edit\" → result shown | {ui['median']:.2f} | "
        f"{', '.join(f'{t:.2f}' for t in ui['runs'])} |",
        f"| `mrgd edit` (fresh process, model load included) | {cli['median']:.2f} | "
        f"{', '.join(f'{t:.2f}' for t in cli['runs'])} |",
        f"| `mrgd edit`: its own phases (info.json seconds: a cold process's first edit) | "
        f"{cli['sampling_median']:.2f} | {', '.join(f'{t:.2f}' for t in cli['sampling'])} |",
        f"| `MRGDPipeline.edit` in a warm process (after one edit) | {lib['median']:.2f} | "
        f"{', '.join(f'{t:.2f}' for t in lib['runs'])} |", "",
        "The server keeps the model loaded and warm, so an edit in the page costs what the library does in a warm "
        f"process plus the page's round trip ({ui['median'] - lib['median']:+.2f} s: queue, progress and preview "
        "messages, PNG encoding of the files and the result, the browser loading it); the command line pays for "
        "loading the libraries and the model, and for a cold first edit, every time. The machine was shared with "
        "other work while this ran: compare the rows with each other, not with other files.", "",
        f"Browser tests (`pytest tests/test_web_browser.py`): {tests['wall_seconds']} s wall in all, "
        f"{tests['pytest_summary']}.", "",
        "| browser test (phase) | s |", "|---|---|",
        *[f"| {name} | {seconds:.2f} |" for name, seconds in tests["durations"].items()], "",
        f"Load: {load['requests']} concurrent `/run_edit` requests ({load['steps']} steps, multidiffusion) from "
        "gradio_client threads against the same server:", "",
        "| finished | refused (message) | failed | burst s | slowest finished s | queue places told | "
        "RSS before → after | still serving |", "|---|---|---|---|---|---|---|---|",
        f"| {load['finished']} | {load['refused']} ({'; '.join(load['refusal_messages'])}) | {load['failed']} | "
        f"{load['burst_seconds']} | {load['max_finished_seconds']} | {load['queue_places_seen']} | "
        f"{load['rss_start_mb']} → {load['rss_end_mb']} MB ({load['rss_change']:+.1%}) | "
        f"{load['served_after']} |", "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edit", default=str(ROOT / "examples" / "three_regions.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--screenshot", default=str(ROOT / "docs" / "web-ui.png"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "web"))
    parser.add_argument("--load-requests", type=int, default=20)
    args = parser.parse_args()
    edit_file = Path(args.edit)
    edit = json.loads(edit_file.read_text())
    port = web_load.free_port()
    server = web_load.start_server(port)
    try:
        url = f"http://127.0.0.1:{port}/"
        startup = web_load.wait_ready(url, server)
        ui = ui_latency(url, edit_file, args.repeats, Path(args.screenshot) if args.screenshot else None)
        load = web_load.run_load(url, server.pid, args.load_requests)
    finally:
        server.terminate()
        server.wait(timeout=30)
    walls, sampling = cli_latency(edit_file, args.repeats)
    library = library_latency(edit_file, args.repeats)
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "edit_file": str(edit_file.relative_to(ROOT)),
        "method": edit.get("mrgd", {}).get("method", "mrgd"), "steps": edit.get("steps", 20),
        "server_startup_seconds": round(startup, 1),
        "ui": {"runs": [round(t, 3) for t in ui], "median": round(statistics.median(ui), 3)},
        "cli": {"runs": [round(t, 3) for t in walls], "median": round(statistics.median(walls), 3),
                "sampling": [round(t, 3) for t in sampling], "sampling_median": round(statistics.median(sampling), 3)},
        "library_warm": {"runs": [round(t, 3) for t in library], "median": round(statistics.median(library), 3)},
        "load": {**load, "steps": web_load.EDIT["steps"]},
        "browser_tests": browser_tests(),
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    write_markdown(figures, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
