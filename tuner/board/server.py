"""`tuner board`: a local web page over folders of work dirs: the runs and how they stand, their curves
(updating while they train, several overlaid), their evaluation answers and benchmark tables, their
configs.

    tuner board [WORK_DIRS ...] [--port 6006] [--host 127.0.0.1] [--api-key KEY]

The page (board.html) and its charting library (uPlot, MIT, in static/) are files of the package: no
build step, nothing fetched. The JSON routes it reads:

    GET /api/runs                       every run's summary, and the folders that are not tuner runs
    GET /api/scalars?run=ID&after=STEP  per-step rows after STEP, where it resumed, lines skipped; for several
                                        runs at once: run=ID&after=STEP repeated
    GET /api/run?run=ID                 its config (resolved_config.py) and how it differs from the built-in
                                        config it came from, evaluation answers, benchmark tables
    GET /api/log?run=ID&offset=N        launch.log from byte N (the output of a run started from the page)

With --allow-launch (board/launch.py), also:

    GET  /api/configs?q=TEXT            the built-in configs whose names hold TEXT (as tuner list-cfg -p)
    GET  /api/form?config=NAME          the form's fields with that config's values
    POST /api/plan    {config, values, deepspeed}   check-config's plan of the edited config, and its problems
    POST /api/launch  {config, values, deepspeed}   the same checks, then tuner train in a new work dir
    POST /api/stop    {run}             SIGTERM to a run this board started (it saves a checkpoint)
    POST /api/resume  {run}             tuner train --resume auto, as the run was started

The HTTP side is `tuner serve`'s (tuner/serve/api.py): the same key rule (Authorization: Bearer KEY;
the page takes it from #key=KEY), the same origin and Host checks, deadlines and connection cap. Only
files inside a served folder are read, and only JSON and text: nothing in a work dir is executed, except the
config copy a Resume trains with (tuner train's own copy, or the one the board wrote).
"""

from __future__ import annotations

import difflib
import json
import re
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tuner.board import launch
from tuner.board.runs import Runs, read_points, read_run, read_state
from tuner.errors import TunerError
from tuner.serve.api import ApiError, Handler, Server, check_bearer

STATIC = {"/static/uPlot.iife.min.js": ("uPlot.iife.min.js", "text/javascript; charset=utf-8"),
          "/static/uPlot.min.css": ("uPlot.min.css", "text/css; charset=utf-8")}
EVAL_OUTPUTS = re.compile(r"^eval_outputs_iter_(\d+)\.txt$")
MAX_RUNS_PER_REQUEST = 200
MAX_TEXT_BYTES = 2 << 20  # (a config or an answers file larger than this is cut: it is for reading)
MAX_CONFIGS = 200


class Board:
    def __init__(self, roots: list[Path], api_key: str | None = None, allow_launch: bool = False):
        self.runs = Runs(roots)
        self.api_key = api_key
        self.launcher = launch.Launcher(self.runs.roots[0]) if allow_launch else None

    def work_dir(self, run_id: str) -> Path:
        folder = self.runs.work_dir(run_id)
        if folder is None:
            raise ApiError(404, f"no run {run_id!r} in the served folders", code="not_found", param="run")
        return folder

    def all_runs(self) -> dict:
        runs, others = self.runs.all()
        summaries = [r.summary() for r in runs]
        if self.launcher is not None:
            listed = {r.work_dir for r in runs}
            for s, r in zip(summaries, runs):
                s["launched"] = self.launcher.running(r.work_dir)  # (Stop reaches these)
            for work_dir in self.launcher.children:  # started, but tuner train has not written its run yet
                if work_dir not in listed:
                    summaries.append(self._starting(work_dir))
        return {"roots": [str(r) for r in self.runs.roots], "runs": summaries, "not_runs": others,
                "launch": self.launcher is not None}

    def _starting(self, work_dir: Path) -> dict:
        code = self.launcher.exit_code(work_dir)
        tail = launch.read_log(work_dir, 0)["text"].strip().splitlines()[-3:]
        return {"id": self.runs.id_of(work_dir), "name": work_dir.name, "config": None, "work_dir": str(work_dir),
                "state": "starting" if code is None else "crashed", "steps": 0, "total": None,
                "launched": code is None, "resumes": 0, "elapsed": 0,
                "error": None if code is None else f"tuner train exited {code}: " + " / ".join(tail)}

    def scalars(self, query: dict) -> dict:
        """Several runs' new rows in one answer: run=ID&after=STEP, repeated (the page polls its ticked runs)."""
        ids, afters = query.get("run") or [], query.get("after") or []
        if len(afters) != len(ids) or len(ids) > MAX_RUNS_PER_REQUEST:
            raise ApiError(400, f"give one 'after' per 'run', at most {MAX_RUNS_PER_REQUEST} runs", param="after")
        answer = {}
        for run_id, after in zip(ids, afters):
            folder = self.work_dir(run_id)
            try:
                after = int(after)
            except ValueError:
                raise ApiError(400, "'after' must be a step number", param="after") from None
            points = read_points(folder)
            answer[run_id] = {"rows": [r for r in points.rows if r["step"] > after],
                              "resumed_at": points.resumed_at, "skipped_lines": points.skipped}
        return {"runs": answer}

    def details(self, query: dict) -> dict:
        folder = self._folder((query.get("run") or [""])[0])
        answers = {}
        for file in folder.iterdir():
            match = EVAL_OUTPUTS.match(file.name)
            if match:
                answers[int(match.group(1))] = _text(file)
        config = _text(folder / "resolved_config.py")
        builtin, diff = _diff_from_builtin(folder, config)
        return {"config": config, "builtin": builtin, "diff": diff,
                "answers": [{"step": step, "text": answers[step]} for step in sorted(answers)],
                "benchmarks": _text(folder / "eval_tasks.txt"), "eval_results": _eval_results(folder)}

    def log(self, query: dict) -> dict:
        folder = self._folder((query.get("run") or [""])[0])
        try:
            offset = int((query.get("offset") or ["0"])[0])
        except ValueError:
            raise ApiError(400, "'offset' must be a number of bytes", param="offset") from None
        answer = launch.read_log(folder, offset)
        answer["running"] = self.launcher is not None and self.launcher.running(folder)
        return answer

    def _folder(self, run_id: str) -> Path:
        """A run's work dir, or one this board started whose run is not written yet."""
        if self.launcher is not None:
            for work_dir in self.launcher.children:
                if self.runs.id_of(work_dir) == run_id:
                    return work_dir
        return self.work_dir(run_id)

    # -- launching (--allow-launch) --------------------------------------------------------------------
    def _launcher(self) -> launch.Launcher:
        if self.launcher is None:
            raise ApiError(403, "launching is off: start the board with tuner board --allow-launch",
                           code="launch_disabled")
        return self.launcher

    def configs(self, query: dict) -> dict:
        from tuner.configs_index import builtin_configs

        self._launcher()
        pattern = (query.get("q") or [""])[0].lower()
        names = [n for n in builtin_configs() if pattern in n.lower()]
        return {"configs": names[:MAX_CONFIGS], "more": max(0, len(names) - MAX_CONFIGS)}

    def form(self, query: dict) -> dict:
        self._launcher()
        return _checked(lambda: launch.form_of((query.get("config") or [""])[0]))

    def plan(self, body: dict) -> dict:
        """check-config's plan of the edited config: every part that resolves, then every problem."""
        return self._plan(body)[1]

    def _plan(self, body: dict):
        """(the edited config or None, the plan's answer)."""
        from tuner.engine.plan import check_plan

        self._launcher()
        try:
            cfg = launch.edited_config(body.get("config"), body.get("values") or {})
        except TunerError as e:
            return None, {"lines": [], "problems": [str(e)]}
        lines, problems = check_plan(cfg)
        if body.get("deepspeed"):
            lines.append(f"deepspeed  {body['deepspeed']}")
        return cfg, {"lines": lines, "problems": problems, "changes": launch.changes(cfg.name, cfg)}

    def launch(self, body: dict) -> dict:
        """Nothing starts unless the plan holds (the same checks as /api/plan)."""
        launcher = self._launcher()
        cfg, checked = self._plan(body)
        if checked["problems"]:
            raise ApiError(400, "; ".join(checked["problems"]), code="invalid_config")
        work_dir = _checked(lambda: launcher.start(cfg, checked["changes"], body.get("deepspeed") or None))
        return {"run": self.runs.id_of(work_dir), "work_dir": str(work_dir)}

    def stop(self, body: dict) -> dict:
        launcher, folder = self._launcher(), self._folder(str(body.get("run", "")))
        _checked(lambda: launcher.stop(folder))
        return {"stopping": str(folder)}

    def resume(self, body: dict) -> dict:
        launcher, run_id = self._launcher(), str(body.get("run", ""))
        folder = self.work_dir(run_id)
        run = read_run(folder, run_id)
        if run.state in ("running", "finished"):
            raise ApiError(409, f"this run is {run.state}: nothing to resume", code=run.state)
        _checked(lambda: launcher.resume(folder, run.config))
        return {"run": run_id}


def _checked(action):
    """A TunerError (a bad value, a missing checkpoint) as a 400 answer with its message."""
    try:
        return action()
    except TunerError as e:
        raise ApiError(400, str(e), code="invalid_request") from None


def _diff_from_builtin(folder: Path, resolved: str | None) -> tuple[str | None, str | None]:
    """(the built-in config the run came from, the lines where its resolved config differs from that one's).
    The run's config is found by its name in run.json (a copy-cfg copy is NAME_copy)."""
    from tuner.config import load_config
    from tuner.configs_index import builtin_configs
    from tuner.engine.runstate import run_folders

    folders = run_folders(folder)
    name = read_state(folders[0]).get("config") if folders else None
    configs = builtin_configs()
    name = next((n for n in (name, str(name).removesuffix("_copy")) if n in configs), None)
    if name is None or resolved is None:
        return None, None
    try:
        base = load_config(configs[name]).resolved_text()
    except TunerError:
        return name, None
    body = lambda text: [line for line in text.splitlines() if not line.startswith("# ")]  # noqa: E731 (headers)
    diff = difflib.unified_diff(body(base), body(resolved), f"built-in {name}", "this run", lineterm="", n=1)
    return name, "\n".join(diff)


def _eval_results(folder: Path) -> list[dict]:
    """lm-eval results files in the work dir or one folder below it (tuner eval --output, evaluate.tasks'
    eval_tasks.json): {file, rows: [task, metric, value, stderr]}."""
    found = []
    for file in sorted([*folder.glob("*.json"), *folder.glob("*/*.json")]):
        if file.stat().st_size > MAX_TEXT_BYTES:
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not (isinstance(data, dict) and isinstance(data.get("results"), dict) and "versions" in data):
            continue
        rows = []
        for task, metrics in data["results"].items():
            for key, value in (metrics.items() if isinstance(metrics, dict) else []):
                metric, comma, _filter = key.partition(",")  # ('acc,none': a metric and its filter)
                if comma and isinstance(value, (int, float)) and not metric.endswith("_stderr"):
                    stderr = metrics.get(f"{metric}_stderr,{_filter}")
                    rows.append([task, metric, value, stderr if isinstance(stderr, (int, float)) else None])
        found.append({"file": file.relative_to(folder).as_posix(), "rows": rows})
    return found


def _text(file: Path) -> str | None:
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_TEXT_BYTES)
    except OSError:
        return None
    return data.decode("utf-8", errors="replace")


class BoardHandler(Handler):
    board: Board
    max_body_bytes = 64 << 10  # (a launch form is a few hundred bytes)

    def do_GET(self):  # noqa: N802 - the base class's name
        self.server.clear_deadline(self.connection)
        try:
            self._check_origin()
            url = urlsplit(self.path)
            if url.path in ("/", "/index.html"):
                self._send_bytes(resources.files("tuner.board").joinpath("board.html").read_bytes(),
                                 "text/html; charset=utf-8", "no-cache")
            elif url.path == "/health":
                self._send_json(200, {"status": "ok"})
            elif url.path in STATIC:
                name, kind = STATIC[url.path]
                self._send_bytes(resources.files("tuner.board").joinpath("static", name).read_bytes(), kind,
                                 "no-cache")
            elif url.path.startswith("/api/"):
                check_bearer(self.board.api_key, self.headers.get("Authorization"))
                query = parse_qs(url.query)
                routes = {"/api/runs": lambda: self.board.all_runs(), "/api/scalars": lambda: self.board.scalars(query),
                          "/api/run": lambda: self.board.details(query), "/api/log": lambda: self.board.log(query),
                          "/api/configs": lambda: self.board.configs(query),
                          "/api/form": lambda: self.board.form(query)}
                if url.path not in routes:
                    raise ApiError(404, f"no route GET {url.path}", code="not_found")
                self._send_json(200, routes[url.path]())
            else:
                raise ApiError(404, f"no route GET {url.path}", code="not_found")
        except ApiError as e:
            self._send_error(e)

    def do_POST(self):  # noqa: N802
        routes = {"/api/plan": self.board.plan, "/api/launch": self.board.launch, "/api/stop": self.board.stop,
                  "/api/resume": self.board.resume}
        path = urlsplit(self.path).path

        def admit():
            if path not in routes:
                raise ApiError(404, f"no route POST {self.path}", code="not_found")
            check_bearer(self.board.api_key, self.headers.get("Authorization"))
            self.board._launcher()

        try:
            body = self._json_body(admit)  # (before the route is looked up: an unknown one is refused in admit)
            self._send_json(200, routes[path](body))
        except ApiError as e:
            self._send_error(e)


def make_board_server(board: Board, host: str, port: int) -> Server:
    handler = type("BoardHandler", (BoardHandler,), {"board": board})
    return type("BoardServer", (Server,), {})((host, port), handler)
