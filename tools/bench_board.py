"""`tuner board` at size: how long the page takes to show 50 runs of 1,000 steps each, and how long a new
step takes to reach the page while a run trains.

    python tools/bench_board.py [--runs 50] [--steps 1000]

Writes that many work dirs (run.json and scalars.json as tuner train writes them: loss, lr, grad_norm,
tokens/s, step time) into a temporary folder, serves them with `tuner board`, and prints:
- the API's times: /api/runs (every run's summary) and /api/scalars of every run (what the page fetches
  when all are ticked), median of 5;
- in headless Chromium (needs Playwright and Debian's chromium): from navigation to the runs table filled,
  and to the loss chart holding the first three runs' points (the page ticks three at first), then to every
  run ticked and drawn;
- update latency: a line appended to one run's scalars.json, until the page's loss chart has it (the page
  polls every 2 s: 0-2 s plus the fetch and the redraw).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def write_runs(root: Path, runs: int, steps: int) -> None:
    for r in range(runs):
        folder = root / f"run{r:03d}" / "20261203_120000"
        (folder / "vis_data").mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({
            "state": "finished", "config": f"run{r:03d}", "model": "smollm2-135m-instruct", "method": "LoRA",
            "total_steps": steps, "start_step": 0, "pid": 1, "host": "elsewhere", "started": 1.7e9,
            "ended": 1.7e9 + steps, "checkpoint": None, "error": None}))
        rows = [{"step": s, "loss": 2.0 * math.exp(-s / (200 + r)) + 0.1, "lr": 1e-4, "grad_norm": 1.0 / s ** 0.5,
                 "tokens_per_s": 900.0 + r, "step_time": 0.5, "mfu": 0.1} for s in range(1, steps + 1)]
        (folder / "vis_data" / "scalars.json").write_text("".join(json.dumps(x) + "\n" for x in rows))


def timed(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        response.read()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tuner-board-bench-"))
    write_runs(root, args.runs, args.steps)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_serve import free_port, wait_for

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tuner", "board", str(root), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, server)
        listing = statistics.median(timed(url + "/api/runs") for _ in range(5))
        query = "&".join(f"run=0:run{r:03d}&after=-1" for r in range(args.runs))
        every = statistics.median(timed(f"{url}/api/scalars?{query}") for _ in range(5))
        print(f"{args.runs} runs x {args.steps} steps: /api/runs {listing * 1000:.0f} ms; /api/scalars of every run "
              f"(one request) {every * 1000:.0f} ms")
        browser_figures(url, root, args.runs, args.steps)
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def browser_figures(url: str, root: Path, runs: int, steps: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("no chromium: the page's figures are not measured")
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        started = time.perf_counter()
        page.goto(url + "/")
        page.wait_for_function(f"document.querySelectorAll('tr.run').length === {runs}")
        table = time.perf_counter() - started
        page.wait_for_function(f"document.querySelector('.chart[data-metric=loss]')?.dataset.points === '{3 * steps}'",
                               timeout=120_000)
        first = time.perf_counter() - started
        started = time.perf_counter()
        page.evaluate("""async () => { for (const box of document.querySelectorAll('input.tick'))
                                           if (!box.checked) box.click(); }""")
        page.wait_for_function(f"document.querySelector('.chart[data-metric=loss]')?.dataset.points === "
                               f"'{runs * steps}'", timeout=300_000)
        all_runs = time.perf_counter() - started
        scalars = next((root / "run000").glob("*/vis_data/scalars.json"))
        latencies = []
        for extra in range(1, 6):
            with open(scalars, "a") as f:
                f.write(json.dumps({"step": steps + extra, "loss": 0.05, "lr": 1e-4, "grad_norm": 0.1,
                                    "tokens_per_s": 900.0, "step_time": 0.5}) + "\n")
            started = time.perf_counter()
            page.wait_for_function(f"document.querySelector('.chart[data-metric=loss]').dataset.points === "
                                   f"'{runs * steps + extra}'", timeout=60_000)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.7)  # (so the appends do not line up with the polls)
        print(f"page: runs table {table:.2f} s, loss chart with 3 runs {first:.2f} s; all {runs} runs ticked and "
              f"drawn {all_runs:.2f} s; a new step on the page after {statistics.median(latencies):.2f} s "
              f"(median of 5, max {max(latencies):.2f} s; the page polls every 2 s)")
        browser.close()


if __name__ == "__main__":
    main()
