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


def steps_listed(folder: Path) -> int:
    """The steps of the run in `folder` as the board lists it; 0 while it is not listed yet (its folder
    can exist a moment before its run.json)."""
    from tuner.board.runs import Runs

    runs, _ = Runs([folder.parent]).all() if folder.is_dir() else ([], None)
    return next((r.steps for r in runs if r.work_dir == folder.resolve()), 0)


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
    wait_until(lambda: steps_listed(first) >= 5 or training.poll() is not None, what="steps")
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
    wait_until(lambda: steps_listed(killed) >= 3 or training.poll() is not None, what="steps")
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
    board_page(tmp_path, runs, 120 + len(read_points(killed).rows), {"model.path": str(tiny_model_dir),
               "data.path": str(data_file), "data.max_length": "128", "evaluate.inputs": ""})


def board_page(tmp_path: Path, runs: Path, points: int, form: dict) -> None:
    """The page over the runs above, then a run launched from its form (an edited lr), watched while it trains
    (the curve grows without a reload), stopped (a checkpoint), resumed from the page to the end."""
    from playwright.sync_api import expect, sync_playwright

    from tuner.engine.runstate import read_points

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tuner.cli", "board", str(runs), "--port", str(port),
                               "--allow-launch"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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

            page.click("#new-run")
            page.fill("#config-search", "personal_assistant_e3")
            page.locator("#config-list").select_option(PERSONAL)
            expect(page.locator('[data-key="optim.lr"]')).to_have_value("0.0005", timeout=30_000)
            for key, value in {**form, "train.max_steps": "400", "train.max_epochs": "100", "optim.lr": "fast"}.items():
                page.fill(f'[data-key="{key}"]', value)
            page.click("#start")  # an invalid value: the check's message, nothing started
            # (generous waits: the first plan imports transformers and reads the model, beside another worker)
            expect(page.locator("#launch-status")).to_have_text("problems found: nothing started", timeout=60_000)
            expect(page.locator("#plan .error")).to_contain_text("optim.lr")
            page.fill('[data-key="optim.lr"]', "0.001")
            page.click("#check")
            expect(page.locator("#plan")).to_contain_text("memory ", timeout=60_000)
            page.click("#start")
            expect(page.locator("#launch-status")).to_contain_text("started in ", timeout=60_000)
            live = runs / PERSONAL
            row = page.locator(f'tr.run[data-run="0:{PERSONAL}"]')
            expect(row).to_have_count(1)
            expect(row).to_have_attribute("data-state", "running", timeout=60_000)
            wait_until(lambda: len(read_points(live).rows) >= 2, what="the launched run's first steps")
            page.click("#stop")
            expect(row.locator(".state")).to_have_text("stopped with a checkpoint", timeout=60_000)
            expect(page.locator("#log")).to_contain_text("stopped by SIGTERM")  # (focused on start: its log)
            page.click("#resume")
            expect(row).to_have_attribute("data-state", "running", timeout=60_000)
            seen = []
            deadline = time.time() + 60
            while time.time() < deadline and len(set(seen)) < 3:
                seen.append(int(loss.get_attribute("data-points") or 0))
                time.sleep(0.5)
            assert len(set(seen)) >= 3 and seen == sorted(seen), seen  # it grew while the page stayed open
            expect(row.locator(".state")).to_have_text("finished", timeout=120_000)
            expect(row).to_contain_text("resumed 1x")
            expect(row).to_contain_text("400 / 400")
            assert "--resume auto" in (runs / PERSONAL / "launch.log").read_text()
            assert max(r["lr"] for r in read_points(runs / PERSONAL).rows) == pytest.approx(1e-3)
            page.click('.tabs button[data-tab="config"]')
            expect(page.locator("#tab-config .diff")).to_contain_text("+lr = 1e-3")
            page.locator('tr.run[data-state="finished"]').first.click()
            expect(page.locator("#tab-config pre").last).to_contain_text("pretrained_model_name_or_path")
            screenshot = tmp_path / "board.png"
            page.screenshot(path=str(screenshot), full_page=True)
            if os.environ.get("TUNER_KEEP_SCREENSHOT"):
                import shutil
                shutil.copy(screenshot, os.environ["TUNER_KEEP_SCREENSHOT"])
            browser.close()
    finally:
        for state in live.glob("*/run.json") if live else []:  # (runs started from the page outlive the board)
            try:
                os.kill(json.loads(state.read_text())["pid"], signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
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


def _api(server, key=None):
    """get(path) and post(path, body) against an in-process board: (status, decoded JSON)."""
    import urllib.error
    import urllib.request

    base = f"http://127.0.0.1:{server.server_address[1]}"

    def call(path, body=None, headers=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(base + path, data=data, headers={
            **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {}),
            **({"Content-Type": "application/json"} if data else {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
    return call


PERSONAL = "smollm2_135m_instruct_lora_personal_assistant_e3"


def test_launching_from_the_board_checks_the_form_and_writes_the_edited_config(tmp_path, tiny_model_dir, data_file):
    """The launch API on an in-process board: off without --allow-launch; a bad value, an unknown field or a
    config that is not built in is refused with the config check's own message and nothing is started; a good
    form writes the edited built-in config into a new work dir (the edits as literals: a hostile string stays a
    string) and runs tuner train there, which finishes with the edited settings; Stop reaches only runs the
    board started; Resume needs a checkpoint."""
    import threading

    from tuner.board.server import Board, make_board_server
    from tuner.config import load_config

    from tuner.cli import main

    root = tmp_path / "work_dirs"
    root.mkdir()
    # launching on an address others can reach needs a key: refused before anything listens
    assert main(["board", str(root), "--host", "0.0.0.0", "--allow-launch", "--port", str(free_port())]) == 1
    off = make_board_server(Board([root]), "127.0.0.1", 0)
    threading.Thread(target=off.serve_forever, daemon=True).start()
    try:
        assert _api(off)("/api/plan", {"config": PERSONAL})[0] == 403
        assert _api(off)("/api/configs?q=x")[0] == 403
    finally:
        off.shutdown()

    board = Board([root], allow_launch=True)
    server = make_board_server(board, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    call = _api(server)
    try:
        status, found = call("/api/configs?q=personal_assistant")
        assert status == 200 and PERSONAL in found["configs"]
        status, form = call(f"/api/form?config={PERSONAL}")
        fields = {f["key"]: f for f in form["fields"]}
        assert fields["optim.lr"]["value"] == 5e-4 and fields["lora.r"]["value"] == 16
        assert fields["data.format"]["value"] == "openai" and "alpaca" in fields["data.format"]["choices"]
        assert call("/api/form?config=../../etc/passwd")[0] == 400

        hostile = "x'); import os; os.system('touch PWNED') #"
        good = {"model.path": str(tiny_model_dir), "data.path": str(data_file), "optim.lr": "0.001",
                "train.max_steps": "3", "data.max_length": "128", "data.pack": False, "train.max_epochs": "1",
                "evaluate.inputs": ""}
        for values, message in [({**good, "optim.lr": "fast"}, "optim.lr"),
                                ({**good, "train.batch_size": "0"}, "batch_size must be at least 1"),
                                ({**good, "lora.rank": "8"}, "no field 'lora.rank'"),
                                ({**good, "data.path": str(tmp_path / "missing.jsonl")}, "missing.jsonl")]:
            status, plan = call("/api/plan", {"config": PERSONAL, "values": values})
            assert status == 200 and any(message in p for p in plan["problems"]), (values, plan)
            status, refused = call("/api/launch", {"config": PERSONAL, "values": values})
            assert status == 400 and message in refused["error"]["message"], refused
        assert call("/api/launch", {"config": "tiny_config", "values": good})[0] == 400
        assert list(root.iterdir()) == []  # nothing was started

        status, plan = call("/api/plan", {"config": PERSONAL, "values": good, "deepspeed": "deepspeed_zero2"})
        assert plan["problems"] == [] and plan["changes"][0].startswith("model.path")
        assert any(line.startswith("memory ") for line in plan["lines"]) and plan["lines"][-1] == "deepspeed  deepspeed_zero2"
        status, started = call("/api/launch", {"config": PERSONAL, "values": {**good, "evaluate": None}})
        assert status == 400  # (an unknown field: nothing started)
        status, started = call("/api/launch", {"config": PERSONAL, "values": good})
        assert status == 200 and started["run"] == f"0:{PERSONAL}", started
        work = root / PERSONAL
        config = load_config(work / f"{PERSONAL}.py")
        assert config.optim.lr == 1e-3 and config.train.max_steps == 3 and config.data.pack is False
        assert config.evaluate.inputs == [] and config.lora.r == 16  # (what the form did not change stays)
        assert "# Changed: model.path" in (work / f"{PERSONAL}.py").read_text()

        wait_until(lambda: not board.launcher.running(work), 300, "the launched run")
        assert board.launcher.exit_code(work) == 0, (work / "launch.log").read_text()[-3000:]
        run = next(r for r in call("/api/runs")[1]["runs"] if r["id"] == started["run"])
        assert run["state"] == "finished" and run["steps"] == 3 and run["launched"] is False, run
        from tuner.engine.runstate import read_points

        assert max(r["lr"] for r in read_points(work).rows) <= 1e-3
        log = call(f"/api/log?run={started['run']}&offset=0")[1]
        assert log["text"].startswith(f"$ tuner train {work / PERSONAL}.py") and "Training finished" in log["text"]
        assert call(f"/api/log?run={started['run']}&offset={log['next']}")[1]["text"] == ""
        details = call(f"/api/run?run={started['run']}")[1]
        assert details["builtin"] == PERSONAL and "+lr = 1e-3" in details["diff"], details["diff"]

        # Stop reaches only runs this board started; a finished run is not resumed
        assert call("/api/stop", {"run": started["run"]})[0] == 400
        status, refused = call("/api/resume", {"run": started["run"]})
        assert status == 409 and "finished" in refused["error"]["message"]
        assert call("/api/resume", {"run": "0:../.."})[0] == 404
        # a page elsewhere cannot make the board start a run (Origin check), nor a large body
        assert call("/api/launch", {"config": PERSONAL, "values": good},
                    headers={"Origin": "http://evil.example"})[0] == 403
        assert not list(tmp_path.rglob("PWNED"))

        status, started = call("/api/launch", {"config": PERSONAL, "values": {**good, "data.path": hostile}})
        assert status == 400  # (no such file: refused before anything is written)
        text = launch_text(PERSONAL, {**good, "model.path": hostile})
        assert f"pretrained_model_name_or_path = {hostile!r}" in text
    finally:
        server.shutdown()


def launch_text(name, values):
    from tuner.board.launch import changes, config_text, edited_config

    cfg = edited_config(name, values)
    return config_text(cfg, name, changes(name, cfg))
