"""`tuner eval` and `evaluate.tasks`: lm-evaluation-harness on what tuner loads, equal to lm-eval's own `hf` backend."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tuner.errors import TunerError

from conftest import write_config


def test_unknown_tasks_get_lm_evals_message_before_any_model_loads(tmp_path):
    pytest.importorskip("lm_eval")
    from test_cli import tuner

    run = tuner("eval", "no-such-model-folder", "--tasks", "tuner_general_knowledge,nope", check=False)
    assert run.returncode == 1 and "Tasks not found: nope" in run.stderr and "--include-path" in run.stderr


def test_without_lm_eval_one_line_says_how_to_install(monkeypatch):
    from tuner.generation import benchmark

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # (import lm_eval now raises ImportError)
    with pytest.raises(TunerError, match="lm-evaluation-harness, which is not installed") as caught:
        benchmark.require_lm_eval()
    assert 'pip install "tuner[eval]"' in caught.value.hint


@pytest.mark.slow
def test_tuner_eval_equals_lm_evals_hf_backend_and_compares_with_a_base(tmp_path, tiny_model_dir):
    """`tuner eval` on the embedded SmolLM2-135M-Instruct (tuner's loader, the model handed to lm-eval) gives
    lm-eval's own `hf` backend's accuracy on the model's folder, example by example; --compare prints the
    base (here the tiny random model), the model and the difference; --output writes the JSON."""
    lm_eval = pytest.importorskip("lm_eval")
    from test_cli import tuner

    from tuner.generation import benchmark
    from tuner.model.embedded import embedded_model_dir

    run = tuner("eval", "smollm2-135m-instruct", "--tasks", "tuner_general_knowledge", "--limit", "12",
                "--dtype", "fp32", "--compare", str(tiny_model_dir), "--output", str(tmp_path / "out"))
    saved = json.loads(next((tmp_path / "out").glob("results_smollm2*.json")).read_text())
    ours = saved["results"]["tuner_general_knowledge"]["acc,none"]
    base = json.loads(next((tmp_path / "out").glob("results_*_base.json")).read_text())
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={embedded_model_dir()},dtype=float32,"
                                                            "device=cpu", tasks=["tuner_general_knowledge"],
                                     task_manager=benchmark.task_manager(None, tmp_path / "tasks", ["tuner_general_knowledge"]),
                                     limit=12)
    assert ours == theirs["results"]["tuner_general_knowledge"]["acc,none"] >= 0.5
    row = next(line for line in run.stdout.splitlines() if line.startswith("tuner_general_knowledge") and "|" in line
               and "acc,none" in line)
    cells = [c.strip() for c in row.split("|")]
    tiny_acc = base["results"]["tuner_general_knowledge"]["acc,none"]
    assert cells[2:] == [f"{tiny_acc:.4f}", f"{ours:.4f}", f"{ours - tiny_acc:+.4f}"]
    assert "|tuner_general_knowledge|" in run.stdout.replace(" ", "")  # (lm-eval's own table too)
    from tuner.board.server import _eval_results  # (the board's table of a results file in a work dir)

    tables = {t["file"]: t["rows"] for t in _eval_results(tmp_path / "out")}
    (name,) = [n for n in tables if n.startswith("results_smollm2")]
    assert tables[name] == [["tuner_general_knowledge", "acc", ours,
                             saved["results"]["tuner_general_knowledge"]["acc_stderr,none"]]]


@pytest.mark.slow
def test_evaluate_tasks_run_at_the_end_of_training(tmp_path, tiny_model_dir, data_file):
    """A config with evaluate.tasks: after the last step lm-eval runs on the trained model; its table is in
    the log and eval_tasks.txt, its results in eval_tasks.json."""
    pytest.importorskip("lm_eval")
    from test_cli import tuner

    cfg = write_config(tmp_path, tiny_model_dir, data_file, epochs=1)
    run = tuner("train", cfg, "--work-dir", tmp_path / "w", "--cfg-options", "train.max_steps=2",
                "evaluate.tasks=['tuner_general_knowledge']", "evaluate.tasks_limit=4")
    results = json.loads((tmp_path / "w" / "eval_tasks.json").read_text())
    acc = results["results"]["tuner_general_knowledge"]["acc,none"]
    assert 0 <= acc <= 1 and results["n-samples"]["tuner_general_knowledge"]["effective"] == 4
    assert "tuner_general_knowledge" in (tmp_path / "w" / "eval_tasks.txt").read_text()
    assert "lm-eval on the trained model" in run.stderr
    from tuner.board.server import _eval_results

    assert [t["rows"][0][:3] for t in _eval_results(tmp_path / "w")] == [["tuner_general_knowledge", "acc", acc]]


@pytest.mark.slow
def test_tuner_eval_reads_gguf_files_adapters_and_4_and_8_bit_weights_as_lm_eval_does(tmp_path, tiny_model_dir):
    """`tuner eval FILE.gguf` (tuner's loader: the file read once into a cached folder) gives every choice the
    log-likelihood (1e-4) lm-eval's own hf backend gives it reading the same file (gguf_file=); `tuner eval
    BASE --adapter DIR` those of lm-eval's hf backend with peft=DIR; `tuner eval FOLDER --bits 4` those of the
    folder loaded by transformers itself with bitsandbytes' NF4 (double quantization, fp32 compute) and handed
    to lm-eval (its model_args cannot ask transformers 5 for 4-bit weights), `--bits 8` as LLM.int8. --log-samples
    writes them (samples_TASK.jsonl)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from tuner.cli import main
    from tuner.convert.gguf_export import export_gguf
    from tuner.generation import benchmark

    from peft import LoraConfig, get_peft_model

    gguf = export_gguf(str(tiny_model_dir), tmp_path / "tiny.gguf", say=lambda _: None)
    torch.manual_seed(0)  # (an adapter that changes the answers: B not zero)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    task = "tuner_general_knowledge"
    manager = benchmark.task_manager(None, tmp_path / "tasks", [task])
    cases = {"gguf": ([str(gguf)], dict(model="hf", model_args=f"pretrained={tmp_path},gguf_file=tiny.gguf,"
                                                                "dtype=float32,device=cpu")),
             "adapter": ([str(tiny_model_dir), "--adapter", str(tmp_path / "adapter")],
                         dict(model="hf", model_args=f"pretrained={tiny_model_dir},peft={tmp_path / 'adapter'},"
                                                     "dtype=float32,device=cpu")),
             "4bit": ([str(tiny_model_dir), "--bits", "4"], dict(model=HFLM(
                 pretrained=AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=nf4,
                                                                 dtype=torch.float32),
                 tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir)))),
             "8bit": ([str(tiny_model_dir), "--bits", "8"], dict(model=HFLM(
                 pretrained=AutoModelForCausalLM.from_pretrained(
                     tiny_model_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.float32),
                 tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))))}
    for name, (ours, theirs) in cases.items():
        out = tmp_path / name
        assert main(["eval", *ours, "--tasks", task, "--limit", "8", "--dtype", "fp32", "--output", str(out),
                     "--log-samples"]) == 0
        mine = [json.loads(line) for line in (out / f"samples_{task}.jsonl").read_text().splitlines()]
        reference = lm_eval.simple_evaluate(**theirs, tasks=[task], task_manager=manager, limit=8)["samples"][task]
        assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in reference] and len(mine) == 8
        worst = max(abs(float(a[0]) - float(b[0])) for m, r in zip(mine, reference)
                    for a, b in zip(m["filtered_resps"], r["filtered_resps"]))
        assert worst < 1e-4, (name, worst)  # every choice's log-likelihood
