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
    if args.allow_launch:  # (where runs started from the page go, made on the first day)
        roots[0].mkdir(parents=True, exist_ok=True)
    missing = [str(p) for p in roots if not p.is_dir()]
    if missing:
        raise TunerError(f"no such folder: {', '.join(missing)}",
                         hint="give the folders of work dirs to show (default ./work_dirs)")
    api_key = args.api_key or os.environ.get("TUNER_API_KEY") or None
    if args.allow_launch and args.host not in LOOPBACK and not api_key:
        raise TunerError(f"--allow-launch on {args.host} without an API key would let anyone who can reach this "
                         "machine run training on it", hint="set --api-key (or $TUNER_API_KEY), or serve on 127.0.0.1")
    if args.host not in LOOPBACK and not api_key:
        print(f"[tuner] warning: listening on {args.host} without an API key: anyone who can reach this machine "
              "can read these runs (set --api-key or $TUNER_API_KEY)", file=sys.stderr, flush=True)
    try:
        server = make_board_server(Board(roots, api_key, allow_launch=args.allow_launch), args.host, args.port)
    except OSError as e:
        raise TunerError(f"cannot listen on {args.host}:{args.port}: {e.strerror}",
                         hint="pick another --port") from None
    host, port = server.server_address[:2]
    fragment = f"#key={quote(api_key)}" if api_key else ""
    launching = f"; runs started from the page go to {roots[0]}" if args.allow_launch else ""
    print(f"Board of {', '.join(str(r) for r in roots)}: http://{host}:{port}/{fragment}  (Ctrl-C to stop)"
          f"{launching}", flush=True)
    serve_forever(server)
    return 0
