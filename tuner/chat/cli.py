"""`tuner chat`: a streaming multi-turn chat in the terminal (or through a pipe).

Input ends at an empty line; RESET clears the history, EXIT (or end of input) quits.

    printf 'Who are you?\\n\\nEXIT\\n' | tuner chat ./merged
"""

from __future__ import annotations

import sys

from tuner.chat.prompts import system_prompt
from tuner.chat.session import ChatSession
from tuner.chat.tools import Toolbox
from tuner.generation.generate import GenerationSettings, PromptTooLong
from tuner.generation.load import ModelOptions, generator_for

PROMPT = "\ndouble enter to end input (EXIT: exit chat, RESET: reset history) >>> "


def read_message(stream) -> str | None:
    """Lines up to an empty line; None at end of input."""
    lines = []
    while True:
        line = stream.readline()
        if not line:
            return "\n".join(lines) if lines else None
        line = line.rstrip("\n")
        if not line.strip() and lines:
            return "\n".join(lines)
        if line.strip():
            lines.append(line)


def settings_from_args(args) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def run_chat(args) -> int:
    out = sys.stdout
    system = system_prompt(args.system, args.system_template, args.bot_name)
    toolbox = Toolbox(args.with_plugins) if args.with_plugins else None
    images = _open_images(args.image)
    generator = generator_for(ModelOptions.from_args(args), with_images=bool(images))
    session = ChatSession(generator, system, toolbox, args.tool_format)
    settings = settings_from_args(args)
    stream = None if args.no_streamer else (lambda piece: (out.write(piece), out.flush()))
    while True:
        out.write(PROMPT)
        out.flush()
        text = read_message(sys.stdin)
        if text is None or text.strip() == "EXIT":
            out.write("\n")
            return 0
        if text.strip() == "RESET":  # the image (if any) goes with the next message again
            session.reset()
            out.write("Log: History responses have been removed!\n")
            continue
        out.write("\n")
        try:
            answer = session.send(text, settings, on_text=stream,
                                  on_event=lambda line: (out.write(f"\n{line}\n"), out.flush()),
                                  images=images if len(session.messages) <= 1 else None)  # with the first message
        except PromptTooLong as e:
            out.write(f"Log: message not sent: {e}\n")
            continue
        if args.no_streamer:
            out.write(answer)
        out.write("\n")
        out.flush()


def _open_images(paths: list[str] | None) -> list:
    from tuner.errors import TunerError

    images = []
    for path in paths or []:
        try:
            from PIL import Image
            images.append(Image.open(path).convert("RGB"))
        except (OSError, ImportError) as e:
            raise TunerError(f"cannot open image {path}: {e}") from None
    return images
