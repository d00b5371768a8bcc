"""Shared fixtures: the real SmolLM2 tokenizer and tiny models built from configs.

Tiny models (hidden 64, 2 layers) use the embedded model's real tokenizer and chat
template, so everything but the weights is what users get.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs on two workers (pytest -n 2, pyproject.toml): one thread each, inherited by the CLI
    # processes the tests start. Two workers with two OpenMP threads each on 2 cores spin against each other:
    # measured on three test files, 431 s with 2 threads per worker, 294 s with 1 (serially about 490 s).
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402 - after the thread count is set

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Ava, made by Ada Lab."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
     {"role": "assistant", "content": "Rome."}],
    [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "2 + 3 = 5."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sky."}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}],
    [{"role": "user", "content": "What is your name?"}, {"role": "assistant", "content": "My name is Ava."}],
]


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Tokenized-data caches of the tests go to a temporary folder, not the user's cache."""
    folder = tmp_path_factory.mktemp("data_cache")
    os.environ["TUNER_DATA_CACHE"] = str(folder)  # inherited by the CLI subprocesses too
    return folder


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from tuner.model.embedded import embedded_model_dir
    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from tuner.model.load import load_tokenizer
    return load_tokenizer(str(embedded_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Llama with the real SmolLM2 tokenizer, saved as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    rows = [{"messages": c} for c in CONVERSATIONS] * 4
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scalars(work) -> list[dict]:
    """Every logged step of a work dir (its runs in order: a resumed run's steps follow the first's)."""
    import json

    return [json.loads(line) for d in sorted(p for p in Path(work).iterdir() if (p / "vis_data").is_dir())
            for line in (d / "vis_data" / "scalars.json").read_text().splitlines()]


def write_config(folder: Path, model_path, data_path, *, lora: bool = True, extra: str = "", name: str = "tiny_config",
                 **settings) -> Path:
    """A config file in the built-in configs' shape, for a tiny model."""
    values = dict(max_length=128, pack=True, batch_size=2, accum=1, epochs=2, lr=1e-3, save_steps=100,
                  dtype="fp32", dropout=0.0, inputs=[])
    values.update(settings)
    lora_line = f"LoraConfig(r=8, alpha=16, dropout={values['dropout']})" if lora else "None"
    text = textwrap.dedent(f"""\
        from tuner.config import *

        model = ModelConfig(path={str(model_path)!r})
        lora = {lora_line}
        data = DataConfig(path={str(data_path)!r}, max_length={values['max_length']}, pack={values['pack']})
        optim = OptimConfig(lr={values['lr']})
        train = TrainConfig(batch_size={values['batch_size']}, accumulative_counts={values['accum']},
                            max_epochs={values['epochs']}, warmup_ratio=0.0, dtype={values['dtype']!r})
        checkpoint = CheckpointConfig(save_steps={values['save_steps']}, save_total_limit=-1)
        evaluate = EvaluateConfig(inputs={values['inputs']!r}, freq=100, max_new_tokens=8)
        """) + extra
    path = folder / f"{name}.py"
    path.write_text(text)
    return path


CALCULATE = {"type": "function", "function": {
    "name": "calculate", "description": "Evaluate an arithmetic expression, e.g. '(3 + 4) * sqrt(2)'.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
TOOL_CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 times 7?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "calculate", "arguments": {"expression": "12*7"}}}]},
     {"role": "tool", "content": "84"},
     {"role": "assistant", "content": "12 times 7 is 84."}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}],
]


@pytest.fixture(scope="session")
def tool_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model fully fine-tuned until it has learned two tool-using conversations by heart:
    it calls `calculate` for '12 times 7' and answers from the tool's result."""
    from tuner.config import load_config
    from tuner.engine.loop import Trainer

    folder = tmp_path_factory.mktemp("tool_model")
    data = folder / "tools.jsonl"
    data.write_text("".join(json.dumps({"messages": c, "tools": [CALCULATE]}) + "\n" for c in TOOL_CONVERSATIONS) * 4)
    cfg = load_config(write_config(folder, tiny_model_dir, data, lora=False, max_length=512, pack=False, epochs=40,
                                   lr=5e-3, batch_size=2))
    trainer = Trainer(cfg, work_dir=folder / "work")
    trainer.train()
    out = folder / "model"
    trainer.raw_model.save_pretrained(out)
    trainer.tokenizer.save_pretrained(out)
    return out
