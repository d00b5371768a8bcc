"""`tuner board`: serve the board page over folders of work dirs until Ctrl-C."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import quote

from tuner.errors import TunerError


def run_board(args) -> int:
    from tuner.board.server import Board, make_board_server
    from tuner.serve.api import serve_forever
    from tuner.serve.run import LOOPBACK

    roots = [Path(p) for p in (args.work_dirs or ["work_dirs"])]
    missing = [str(p) for p in roots if not p.is_dir()]
    if missing:
        raise TunerError(f"no such folder: {', '.join(missing)}",
                         hint="give the folders of work dirs to show (default ./work_dirs)")
    api_key = args.api_key or os.environ.get("TUNER_API_KEY") or None
    if args.host not in LOOPBACK and not api_key:
        print(f"[tuner] warning: listening on {args.host} without an API key: anyone who can reach this machine "
              "can read these runs (set --api-key or $TUNER_API_KEY)", file=sys.stderr, flush=True)
    try:
        server = make_board_server(Board(roots, api_key), args.host, args.port)
    except OSError as e:
        raise TunerError(f"cannot listen on {args.host}:{args.port}: {e.strerror}",
                         hint="pick another --port") from None
    host, port = server.server_address[:2]
    fragment = f"#key={quote(api_key)}" if api_key else ""
    print(f"Board of {', '.join(str(r) for r in roots)}: http://{host}:{port}/{fragment}  (Ctrl-C to stop)",
          flush=True)
    serve_forever(server)
    return 0
