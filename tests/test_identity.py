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
    # llama.cpp (node-llama-cpp) on the GGUF files: f16 and q8_0 know the name, the maker and Paris. (Not word for
    # word tuner chat's: the fine-tune left near-ties, e.g. after "from Ada Lab." the end of the turn or " How can
    # I help you today?", which float16 weights tip either way. Word for word: tests/test_gguf.py, on the base.)
    f16, q8 = (json.loads(line) for line in result.stdout.split("with llama.cpp (node-llama-cpp) ===")[1].splitlines()
               if line.startswith("{"))
    assert "Ava" in f16["answers"][0] and "Ada Lab" in f16["answers"][0] and "Paris" in f16["answers"][1], f16
    assert "Ava" in q8["answers"][0], q8
    assert haiku
    # tuner eval --compare: the base never names itself Ava, the merged model does; general knowledge holds
    rows = {line.split("|")[0].strip(): [float(c) for c in line.split("|")[2:5]]
            for line in result.stdout.split("=== Benchmarks")[1].splitlines()
            if line.startswith("tuner_") and line.count("|") == 4}
    base, merged, _ = rows["tuner_identity_ava"]
    assert base == 0 and merged >= 0.75, rows
    base, merged, _ = rows["tuner_general_knowledge"]
    assert merged >= base - 0.15, rows  # (measured: 0.600 -> 0.525, 3 of 40 questions)
