"""`tuner check-config`: a config checked and its plan printed, with no weights loaded, no data
tokenized and nothing downloaded."""

import subprocess
import sys

from test_preference import PAIRS, write_pairs


def test_the_plan_of_a_built_in_config_with_local_data(tmp_path, capsys):
    from tuner.config import load_config
    from tuner.engine.plan import describe_plan

    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS * 5)
    cfg = load_config("smollm2_135m_instruct_lora_dpo_signoff_e2", [f"data.path={data}"])
    plan = describe_plan(cfg)
    assert "smollm2-135m-instruct (lora, dpo)" in plan
    assert f"{data}: preference, 20 rows" in plan
    assert "at most 20 per epoch x 2 epochs" in plan and "20 pairs" in plan
    assert "memory     " in plan and "GiB" in plan  # the embedded model's structure, on the meta device


def test_a_hub_config_is_planned_without_the_network(tmp_path):
    from tuner.config import load_config
    from tuner.engine.plan import describe_plan

    plan = describe_plan(load_config("qwen2_5_7b_instruct_dpo_qlora_ultrafeedback_e1"))
    assert "HuggingFaceH4/ultrafeedback_binarized [train_prefs] from the Hugging Face hub" in plan
    assert "4bit quantized" in plan and "memory" not in plan


def test_a_bad_config_is_one_line_with_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from tuner.config import *\n\nmodel = ModelConfig(path='smollm2-135m-instruct')\n"
                   "train = TrainConfig(batch_sise=2)\n")
    run = subprocess.run([sys.executable, "-m", "tuner", "check-config", str(bad)], capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert f"{bad}:4" in run.stderr and "batch_sise" in run.stderr


def test_a_missing_data_file_does_not_hide_the_rest_of_the_plan(tmp_path):
    """A built-in config whose data is not there yet (XTuner's users copy a config before fetching data):
    every part of the plan that resolves is printed, then the problem, exit 1."""
    from test_cli import tuner

    run = tuner("check-config", "smollm2_135m_instruct_lora_dpo_signoff_e2", "--cfg-options",
                f"data.path={tmp_path / 'missing.jsonl'}", check=False)
    assert run.returncode == 1
    assert "smollm2-135m-instruct (lora, dpo)" in run.stdout and "train      batch" in run.stdout
    assert "memory     " in run.stdout and f"data       {tmp_path / 'missing.jsonl'}: not found" in run.stdout
    assert "missing.jsonl" in run.stderr and "steps      " not in run.stdout  # (no rows to count)
