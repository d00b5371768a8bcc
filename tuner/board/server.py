"""`tuner board`: a local web page over folders of work dirs: the runs and how they stand, their curves
(updating while they train, several overlaid), their evaluation answers and benchmark tables, their
configs.

    tuner board [WORK_DIRS ...] [--port 6006] [--host 127.0.0.1] [--api-key KEY]

The page (board.html) and its charting library (uPlot, MIT, in static/) are files of the package: no
build step, nothing fetched. The JSON routes it reads:

    GET /api/runs                       every run's summary, and the folders that are not tuner runs
    GET /api/scalars?run=ID&after=STEP  per-step rows after STEP, where it resumed, lines skipped; for several
                                        runs at once: run=ID&after=STEP repeated
    GET /api/run?run=ID                 its config (resolved_config.py), evaluation answers, benchmark table

The HTTP side is `tuner serve`'s (tuner/serve/api.py): the same key rule (Authorization: Bearer KEY;
the page takes it from #key=KEY), the same origin and Host checks, deadlines and connection cap. Only
files inside a served folder are read, and only JSON and text: nothing in a work dir is executed.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from tuner.board.runs import Runs, read_points
from tuner.serve.api import ApiError, Handler, Server, check_bearer

STATIC = {"/static/uPlot.iife.min.js": ("uPlot.iife.min.js", "text/javascript; charset=utf-8"),
          "/static/uPlot.min.css": ("uPlot.min.css", "text/css; charset=utf-8")}
EVAL_OUTPUTS = re.compile(r"^eval_outputs_iter_(\d+)\.txt$")
MAX_RUNS_PER_REQUEST = 200
MAX_TEXT_BYTES = 2 << 20  # (a config or an answers file larger than this is cut: it is for reading)


class Board:
    def __init__(self, roots: list[Path], api_key: str | None = None):
        self.runs = Runs(roots)
        self.api_key = api_key

    def work_dir(self, run_id: str) -> Path:
        folder = self.runs.work_dir(run_id)
        if folder is None:
            raise ApiError(404, f"no run {run_id!r} in the served folders", code="not_found", param="run")
        return folder

    def all_runs(self) -> dict:
        runs, others = self.runs.all()
        return {"roots": [str(r) for r in self.runs.roots], "runs": [r.summary() for r in runs],
                "not_runs": others}

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
        folder = self.work_dir((query.get("run") or [""])[0])
        answers = {}
        for file in folder.iterdir():
            match = EVAL_OUTPUTS.match(file.name)
            if match:
                answers[int(match.group(1))] = _text(file)
        return {"config": _text(folder / "resolved_config.py"),
                "answers": [{"step": step, "text": answers[step]} for step in sorted(answers)],
                "benchmarks": _text(folder / "eval_tasks.txt")}


def _text(file: Path) -> str | None:
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_TEXT_BYTES)
    except OSError:
        return None
    return data.decode("utf-8", errors="replace")


class BoardHandler(Handler):
    board: Board

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
                          "/api/run": lambda: self.board.details(query)}
                if url.path not in routes:
                    raise ApiError(404, f"no route GET {url.path}", code="not_found")
                self._send_json(200, routes[url.path]())
            else:
                raise ApiError(404, f"no route GET {url.path}", code="not_found")
        except ApiError as e:
            self._send_error(e)

    def do_POST(self):  # noqa: N802
        self.close_connection = self.body_unread = True
        self._send_error(ApiError(405, "the board only answers GET requests", code="method_not_allowed"))


def make_board_server(board: Board, host: str, port: int) -> Server:
    handler = type("BoardHandler", (BoardHandler,), {"board": board})
    return type("BoardServer", (Server,), {})((host, port), handler)
