"""`tuner chat`: a streaming multi-turn chat in the terminal (or through a pipe).

Input ends at an empty line; RESET clears the history, EXIT (or end of input) quits.

    printf 'Who are you?\\n\\nEXIT\\n' | tuner chat ./merged
"""

from __future__ import annotations

import sys

import torch

from tuner.chat.generate import GenerationSettings, Generator
from tuner.engine.device import default_device, resolve_compute_dtype
from tuner.errors import TunerError
from tuner.model.load import load_tokenizer, resolve_model_path

PROMPT = "\ndouble enter to end input (EXIT: exit chat, RESET: reset history) >>> "


def load_chat_model(model_path: str, adapter: str | None, torch_dtype: str = "auto"):
    from transformers import AutoModelForCausalLM

    device = default_device()
    dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[torch_dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_path), dtype=dtype).to(device)
    except OSError as e:
        raise TunerError(f"could not load model {model_path!r}: {str(e).splitlines()[0]}") from None
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, device


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


def run_chat(args) -> int:
    tokenizer = load_tokenizer(args.adapter if args.adapter and _has_tokenizer(args.adapter) else args.model)
    model, device = load_chat_model(args.model, args.adapter, args.torch_dtype)
    compute = torch.float32 if args.torch_dtype == "fp32" else resolve_compute_dtype("auto", device)
    generator = Generator(model, tokenizer, args.prompt_template, args.stop_words, compute_dtype=compute)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                  seed=args.seed)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    base_history = list(history)
    out = sys.stdout
    while True:
        out.write(PROMPT)
        out.flush()
        text = read_message(sys.stdin)
        if text is None or text.strip() == "EXIT":
            out.write("\n")
            return 0
        if text.strip() == "RESET":
            history = list(base_history)
            out.write("Log: History responses have been removed!\n")
            continue
        history.append({"role": "user", "content": text})
        out.write("\n")
        if args.no_streamer:
            answer = generator.reply(history, settings)
            out.write(answer)
        else:
            answer = generator.reply(history, settings, on_text=lambda piece: (out.write(piece), out.flush()))
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": answer})


def _has_tokenizer(folder: str) -> bool:
    from pathlib import Path
    return (Path(folder) / "tokenizer_config.json").exists()
