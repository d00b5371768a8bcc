"""`tuner board` and run.json: the run-state reader on work dirs written by real trainings (running, stopped
with a checkpoint, resumed, finished, killed), loss.png, and the page in headless Chromium (live curves,
overlays, a resumed run as one curve)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_config
from test_serve import free_port, wait_for
from test_web import CHROMIUM


def start_training(cfg: Path, work: Path, *options: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tuner", "train", str(cfg), "--work-dir", str(work), *options],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until(condition, seconds: float = 120, what: str = "") -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def run_of(folder: Path):
    from tuner.board.runs import Runs

    runs, _ = Runs([folder.parent]).all()
    return next(r for r in runs if r.work_dir == folder.resolve())


@pytest.mark.slow
def test_run_states_from_real_trainings_and_the_board_page(tmp_path, tiny_model_dir, data_file):
    """Trainings of a tiny model, watched through the reader as they go: running (the process alive, run.json
    says so), stopped by SIGTERM (its checkpoint named), resumed to the end (finished: one curve, every step
    once, the resume's first step kept), killed by SIGKILL (crashed: run.json still says running, the process is
    gone); loss.png written at the end; a half-written scalars line skipped and counted; a folder that is not a
    run listed as such. Then the board in Chromium: the runs with their states, a run that trains while the page
    is open gains points without a reload, two runs overlaid, the resume marked."""
    runs = tmp_path / "work_dirs"
    cfg = write_config(tmp_path, tiny_model_dir, data_file, epochs=1000, save_steps=100000)
    first = runs / "first"
    training = start_training(cfg, first, "--cfg-options", "train.max_steps=120")
    wait_until(lambda: (first.is_dir() and run_of(first).steps >= 5) or training.poll() is not None, what="steps")
    run = run_of(first)
    assert run.state == "running" and run.total == 120 and run.method == "LoRA" and run.config == "tiny_config", run
    training.send_signal(signal.SIGTERM)
    assert training.wait(120) == 128 + signal.SIGTERM, training.stderr.read()[-2000:]
    stopped = run_of(first)
    assert stopped.state == "stopped" and stopped.checkpoint == str(first / f"iter_{stopped.steps}.pth"), stopped
    assert Path(stopped.checkpoint).exists() and (first / "loss.png").exists()

    resumed = start_training(cfg, first, "--resume", "auto", "--cfg-options", "train.max_steps=120")
    assert resumed.wait(300) == 0, resumed.stderr.read()[-2000:]
    finished = run_of(first)
    assert finished.state == "finished" and finished.steps == 120 and finished.resumes == 1, finished
    from tuner.engine.runstate import read_points

    points = read_points(first)
    assert [r["step"] for r in points.rows] == list(range(1, 121)) and points.resumed_at == [stopped.steps + 1]
    assert any("Curves: " in log.read_text() for log in first.glob("*/*.log"))

    killed = runs / "killed"
    training = start_training(cfg, killed, "--cfg-options", "train.max_steps=120")
    wait_until(lambda: (killed.is_dir() and run_of(killed).steps >= 3) or training.poll() is not None, what="steps")
    training.kill()
    training.wait(60)
    crashed = run_of(killed)
    assert crashed.state == "crashed" and "without saying how" in crashed.error, crashed

    (runs / "notes").mkdir()
    scalars = sorted(killed.glob("*/vis_data/scalars.json"))[-1]
    with open(scalars, "a") as f:
        f.write('{"step": 9999, "loss": ')  # (a line cut off mid-write)
    from tuner.board.runs import Runs

    every, others = Runs([runs]).all()
    assert sorted(r.name for r in every) == ["first", "killed"] and others == [str(runs / "notes")]
    assert run_of(killed).skipped == 1

    if not CHROMIUM and not os.environ.get("CI"):
        pytest.skip("no chromium on this machine (apt install chromium)")
    board_page(tmp_path, runs, cfg, 120 + len(read_points(killed).rows))


def board_page(tmp_path: Path, runs: Path, cfg: Path, points: int) -> None:
    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tuner.cli", "board", str(runs), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    live = None
    try:
        wait_for(url, server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url + "/")
            expect(page.locator("tr.run")).to_have_count(2)
            expect(page.locator('tr.run[data-state="finished"] .state')).to_have_text("finished")
            expect(page.locator('tr.run[data-state="crashed"] .state')).to_have_text("crashed")
            loss = page.locator('.chart[data-metric="loss"]')
            expect(loss).to_have_attribute("data-points", str(points), timeout=20_000)  # both runs overlaid
            assert page.locator('.chart[data-metric="loss"] .u-legend .u-series').count() == 3  # step + 2 runs

            live = start_training(cfg, runs / "live", "--cfg-options", "train.max_steps=2000")
            row = page.locator('tr.run[data-run="0:live"]')
            expect(row).to_have_count(1, timeout=60_000)
            row.locator("input.tick").check()
            seen = []
            deadline = time.time() + 60
            while time.time() < deadline and len(set(seen)) < 3:
                seen.append(int(loss.get_attribute("data-points") or 0))
                time.sleep(0.5)
            assert len(set(seen)) >= 3 and seen == sorted(seen), seen  # it grew while the page stayed open
            page.locator('tr.run[data-state="finished"]').click()
            expect(page.locator("#tab-config pre")).to_contain_text("pretrained_model_name_or_path")
            screenshot = tmp_path / "board.png"
            page.screenshot(path=str(screenshot), full_page=True)
            if os.environ.get("TUNER_KEEP_SCREENSHOT"):
                import shutil
                shutil.copy(screenshot, os.environ["TUNER_KEEP_SCREENSHOT"])
            browser.close()
    finally:
        if live is not None:
            live.kill()
            live.wait(30)
        server.terminate()
        server.wait(10)


def test_the_board_refuses_paths_outside_its_folders_and_bad_keys(tmp_path):
    """Run ids come from clients: one that climbs out of the served folder, or names no run, is a 404; with a
    key, the API answers only with it (the page itself loads, as tuner web's)."""
    import threading
    import urllib.error
    import urllib.request

    from tuner.board.server import Board, make_board_server

    run = tmp_path / "served" / "a" / "20261203_120000"
    (run / "vis_data").mkdir(parents=True)
    (run / "vis_data" / "scalars.json").write_text('{"step": 1, "loss": 2.0}\n')
    outside = tmp_path / "outside" / "20261203_120000" / "vis_data"
    outside.mkdir(parents=True)
    (outside / "scalars.json").write_text('{"step": 1, "loss": 1.0}\n')
    server = make_board_server(Board([tmp_path / "served"], api_key="k"), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def get(path, key="k"):
        request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    try:
        status, body = get("/api/runs")
        assert status == 200 and [r["id"] for r in json.loads(body)["runs"]] == ["0:a"]
        assert json.loads(get("/api/scalars?run=0:a&after=-1")[1])["runs"]["0:a"]["rows"] == [{"step": 1, "loss": 2.0}]
        for bad in ("0:../../outside", "0:a/../../outside", "1:a", "x", "0:/etc"):
            assert get(f"/api/scalars?run={bad}&after=-1")[0] == 404, bad
        assert get("/api/scalars?run=0:a")[0] == 400  # (an 'after' for every run)
        assert get("/api/runs", key=None)[0] == 401 and get("/api/runs", key="wrong")[0] == 401
        assert get("/", key=None)[0] == 200 and get("/static/uPlot.iife.min.js", key=None)[0] == 200
    finally:
        server.shutdown()
