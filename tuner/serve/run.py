"""`tuner serve` and `tuner web`: load the model once, then answer HTTP requests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tuner.chat.generate import Generator
from tuner.chat.model import load_chat_model
from tuner.config import EMBEDDED_MODEL
from tuner.errors import TunerError
from tuner.multimodal.model import is_llava_folder
from tuner.serve.api import Api, make_server, serve_forever


def served_name(model: str, adapter: str | None) -> str:
    """'./work_dirs/x/merged' -> 'merged'; the embedded model keeps its name."""
    if model == EMBEDDED_MODEL and not adapter:
        return model
    return Path(adapter or model).name or model


def run_server(args, page: bool) -> int:
    if args.llava or is_llava_folder(args.model):
        from tuner.chat.cli import load_llava_model
        model, tokenizer, vision, template, compute = load_llava_model(args)
        generator = Generator(model, tokenizer, args.prompt_template or template, args.stop_words,
                              compute_dtype=compute, context_length=args.context_length)
        generator.vision = vision
    else:
        model, tokenizer, compute = load_chat_model(args.model, args.adapter, args.torch_dtype, args.bits,
                                                    args.offload_folder,
                                                    warn=lambda line: print(line, file=sys.stderr))
        generator = Generator(model, tokenizer, args.prompt_template, args.stop_words, compute_dtype=compute,
                              context_length=args.context_length)
    api_key = getattr(args, "api_key", None) or (os.environ.get("TUNER_API_KEY") if not page else None)
    name = args.served_model_name or served_name(args.model, args.adapter)
    api = Api(generator, name, api_key, max_new_tokens=args.max_new_tokens, max_batch_size=args.max_batch_size)
    try:
        server = make_server(api, args.host, args.port, page=page)
    except OSError as e:
        raise TunerError(f"cannot listen on {args.host}:{args.port}: {e.strerror}",
                         hint="pick another --port") from None
    host, port = server.server_address[:2]
    if page:
        print(f"Chat page for {name!r}: http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
    else:
        print(f"Serving {name!r} (OpenAI API) at http://{host}:{port}/v1"
              f"{' with an API key' if api_key else ''}  (Ctrl-C to stop)", flush=True)
    serve_forever(server)
    return 0
