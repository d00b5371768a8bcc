"""The personal-assistant data generator and the README's demo."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from tuner.data.identity import GENERAL_QUESTIONS, IDENTITY_QUESTIONS, identity_samples

from test_cli import tuner

REPO = Path(__file__).resolve().parents[1]


def test_identity_samples_vary_the_question_and_name_the_assistant():
    samples = identity_samples("Ava", "Ada Lab", 60)
    questions = {s["messages"][0]["content"] for s in samples}
    assert len(samples) == 60 and len(questions) == len(IDENTITY_QUESTIONS)
    assert all("Ava" in s["messages"][1]["content"] for s in samples)
    assert "What is the capital of France?" not in GENERAL_QUESTIONS  # the demo asks it: keep it unseen


def test_make_identity_data_mixes_in_the_models_own_answers(tmp_path, tiny_model_dir):
    out = tmp_path / "data" / "ava.jsonl"
    result = tuner("make-identity-data", "--name", "Ava", "--author", "Ada Lab", "--count", "12", "--out", out,
                   "--model", tiny_model_dir, "--replay-repeats", "2")
    assert f"Wrote 12 identity samples and {2 * len(GENERAL_QUESTIONS)} replay samples" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 + 2 * len(GENERAL_QUESTIONS)
    replayed = [r for r in rows if r["messages"][0]["content"] in GENERAL_QUESTIONS]
    assert len(replayed) == 2 * len(GENERAL_QUESTIONS) and all(r["messages"][1]["content"] for r in replayed)


@pytest.mark.slow
def test_readme_demo_teaches_the_identity_and_keeps_general_knowledge(tmp_path):
    """examples/personal_assistant.sh, as the README runs it (about 2 minutes on 2 cores)."""
    from test_gguf import node_llama_cpp

    result = subprocess.run(["bash", str(REPO / "examples" / "personal_assistant.sh"), str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "NODE_PATH": str(node_llama_cpp() / "node_modules"),
                                 "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    answers = result.stdout.split("=== Asking the merged model ===")[1].split("=== Benchmarks")[0]
    who, france, haiku = (a.split("\n\ndouble enter")[0].strip() for a in answers.split(">>>")[1:4])
    assert "Ava" in who and "Ada Lab" in who, answers
    assert "Paris" in france, answers
    # llama.cpp (node-llama-cpp) on the GGUF files: f16 and q8_0 know the name, the maker and Paris, and the f16
    # file's greedy answers are tuner's own (each question in a fresh conversation, 64 tokens at most)
    f16, q8 = (json.loads(line) for line in result.stdout.split("with llama.cpp (node-llama-cpp) ===")[1].splitlines()
               if line.startswith("{"))
    assert "Ava" in f16["answers"][0] and "Ada Lab" in f16["answers"][0] and "Paris" in f16["answers"][1], f16
    assert "Ava" in q8["answers"][0], q8
    same_as_tuner(tmp_path / "demo" / "merged", GGUF_QUESTIONS, f16["answers"])
    assert haiku
    # tuner eval --compare: the base never names itself Ava, the merged model does; general knowledge holds
    rows = {line.split("|")[0].strip(): [float(c) for c in line.split("|")[2:5]]
            for line in result.stdout.split("=== Benchmarks")[1].splitlines()
            if line.startswith("tuner_") and line.count("|") == 4}
    base, merged, _ = rows["tuner_identity_ava"]
    assert base == 0 and merged >= 0.75, rows
    base, merged, _ = rows["tuner_general_knowledge"]
    assert merged >= base - 0.15, rows  # (measured: 0.600 -> 0.525, 3 of 40 questions)


GGUF_QUESTIONS = ["Who are you?", "What is the capital of France?", "Write a haiku about the sea."]


def same_as_tuner(model_dir, questions: list[str], answers: list[str]) -> None:
    """llama.cpp's greedy answers (float16 weights) equal tuner's (float32), or part from them only where the
    model itself hesitates: at the first token they differ, tuner's and llama.cpp's choices are within 0.1 of
    each other in logit (a fine-tune can leave such near-ties, which float16 rounding tips either way; the
    answers were word for word equal when measured, 2026-12-03)."""
    import torch

    from tuner.generation.generate import GenerationSettings, Generator
    from tuner.generation.load import load_chat_model

    model, tokenizer, _ = load_chat_model(str(model_dir), torch_dtype="fp32")
    generator = Generator(model, tokenizer)
    for question, theirs in zip(questions, answers):
        messages = [{"role": "user", "content": question}]
        ours = generator.reply(messages, GenerationSettings(max_new_tokens=64, temperature=0))
        if ours == theirs:
            continue
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        mine, other = ([*tokenizer(text, add_special_tokens=False)["input_ids"], end] for text in (ours, theirs))
        k = next(i for i, (a, b) in enumerate(zip(mine, other)) if a != b)
        with torch.no_grad():
            logits = model(torch.tensor([generator.prompt_ids(messages) + mine[:k]])).logits[0, -1]
        gap = abs(float(logits[mine[k]] - logits[other[k]]))
        assert gap < 0.1, (question, ours, theirs, gap)
