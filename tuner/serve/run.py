"""`tuner serve` and `tuner web`: load the model once, then answer HTTP requests."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import quote

from tuner.config import EMBEDDED_MODEL
from tuner.errors import TunerError
from tuner.generation.load import ModelOptions, generator_for
from tuner.serve.api import Api, make_server, serve_forever


def served_name(model: str, adapter: str | None) -> str:
    """'./work_dirs/x/merged' -> 'merged'; the embedded model keeps its name."""
    if model == EMBEDDED_MODEL and not adapter:
        return model
    return Path(adapter or model).name or model


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def run_server(args, page: bool) -> int:
    api_key = args.api_key or os.environ.get("TUNER_API_KEY") or None
    if args.host not in LOOPBACK and not api_key:
        print(f"[tuner] warning: listening on {args.host} without an API key: anyone who can reach this machine "
              "can use the model (set --api-key or $TUNER_API_KEY)", file=sys.stderr, flush=True)
    generator = generator_for(ModelOptions.from_args(args))
    name = args.served_model_name or served_name(args.model, args.adapter)
    api = Api(generator, name, api_key, max_new_tokens=args.max_new_tokens, max_batch_size=args.max_batch_size)
    try:
        server = make_server(api, args.host, args.port, page=page, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                             request_seconds=args.request_timeout)
    except OSError as e:
        raise TunerError(f"cannot listen on {args.host}:{args.port}: {e.strerror}",
                         hint="pick another --port") from None
    host, port = server.server_address[:2]
    if page:
        fragment = f"#key={quote(api_key)}" if api_key else ""
        print(f"Chat page for {name!r}: http://{host}:{port}/{fragment}  (Ctrl-C to stop)", flush=True)
    else:
        print(f"Serving {name!r} (OpenAI API) at http://{host}:{port}/v1"
              f"{' with an API key' if api_key else ''}  (Ctrl-C to stop)", flush=True)
    serve_forever(server)
    return 0
