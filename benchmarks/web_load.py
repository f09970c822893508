"""Load on `mrgd serve`: many client requests at once against one server.

    python benchmarks/web_load.py [--requests 20] [--steps 4] [--out benchmarks/results/web-load]

Starts `mrgd serve` on a free local port (embedded model, CPU, one thread), sends one warm-up edit and reads the
server's resident memory, then sends ``--requests`` edits at once, one thread each (gradio_client, the `/run_edit`
endpoint), and records for each: finished, or refused with a message, or failed, the queue places it was told,
and its latency. Then it waits for the server to settle and reads its memory again. tests/test_web.py runs
`run_load` as the load test; `benchmarks/web_latency.py` puts its figures in benchmarks/results/web.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EDIT = {"size": [128, 128], "prompt": "masterpiece", "seed": 3, "steps": 4,
        "regions": [{"id": "ground", "kind": "background", "box": [0, 0, 1, 1], "prompt": "grass"},
                    {"id": "ball", "box": [0.1, 0.5, 0.4, 0.4], "prompt": "a red circle",
                     "target_prompt": "a blue circle"}],
        "mrgd": {"method": "multidiffusion"}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, *args: str) -> subprocess.Popen:
    """`mrgd serve` in a child process, on 127.0.0.1 only."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "mrgd", "serve", "--port", str(port), "--device", "cpu", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 180) -> float:
    """Seconds until the page answers; raises if the server exits or does not answer in time."""
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"mrgd serve exited with {server.returncode}: {server.stdout.read()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def rss(pid: int) -> int:
    """Resident memory of a process in bytes (from /proc, so it works without psutil)."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settled_rss(pid: int, seconds: float = 3.0) -> int:
    time.sleep(seconds)
    return rss(pid)


def run_load(url: str, pid: int, requests: int = 20, edit: dict | None = None) -> dict:
    """Send one warm-up edit, then ``requests`` at once; the figures of the load test."""
    from gradio_client import Client

    config = json.dumps(edit or EDIT)
    client = Client(url, verbose=False)
    t0 = time.perf_counter()
    client.predict(config, api_name="/run_edit")
    warmup = time.perf_counter() - t0
    rss_start = settled_rss(pid, 1.0)
    records: list[dict] = [{} for _ in range(requests)]
    start = threading.Barrier(requests)

    def one(n: int) -> None:
        record = records[n]
        start.wait()
        t = time.perf_counter()
        try:
            job = client.submit(config, api_name="/run_edit")
            places = set()
            while not job.done():
                status = job.status()
                if status.rank is not None and status.code.name == "IN_QUEUE":
                    places.add(status.rank)
                time.sleep(0.05)
            result = job.result()
            record.update(outcome="finished", pngs=sorted(result["png"]))
            record["places"] = sorted(places)
        except Exception as err:  # noqa: BLE001 - the server's answer is what is measured
            message = str(err)
            record.update(outcome="refused" if "queue is full" in message.lower() else "failed",
                          message=f"{type(err).__name__}: {message}"[:200])
        record["seconds"] = round(time.perf_counter() - t, 3)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(requests)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    burst = time.perf_counter() - t0
    rss_end = settled_rss(pid)
    after = client.predict(config, api_name="/run_edit")  # still serving
    counts = {kind: sum(r.get("outcome") == kind for r in records) for kind in ("finished", "refused", "failed")}
    finished = [r["seconds"] for r in records if r.get("outcome") == "finished"]
    return {
        "requests": requests, **counts, "warmup_seconds": round(warmup, 3), "burst_seconds": round(burst, 3),
        "max_finished_seconds": max(finished, default=None),
        "queue_places_seen": sorted({p for r in records for p in r.get("places", [])}),
        "refusal_messages": sorted({r["message"] for r in records if r.get("outcome") == "refused"}),
        "failures": [r["message"] for r in records if r.get("outcome") == "failed"],
        "rss_start_mb": round(rss_start / 2**20, 1), "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_change": round(rss_end / rss_start - 1, 4), "served_after": "target.png" in after["png"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "web-load"))
    args = parser.parse_args()
    port = free_port()
    server = start_server(port)
    try:
        url = f"http://127.0.0.1:{port}/"
        ready = wait_ready(url, server)
        figures = {"startup_seconds": round(ready, 1), **run_load(url, server.pid, args.requests,
                                                                  {**EDIT, "steps": args.steps})}
    finally:
        server.terminate()
        server.wait(timeout=30)
    Path(args.out).with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
