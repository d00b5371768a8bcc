"""tools/gpu_check.py runs on a GPU machine only when one is lent: its checks run here on CPU, so the
script is known to work (the FlashAttention and NCCL halves need the GPU and say so)."""

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_gpu_check_script_runs_its_checks_on_cpu():
    tool = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
    run = subprocess.run([sys.executable, str(tool), "--device", "cpu", "--only", "fa2_varlen_b1", "qlora_grads",
                          "fused_lora_bf16", "nccl_one_process"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = run.stdout[run.stdout.index("| check |"):]
    assert "| fa2_varlen_b1 | skip |" in table and "| qlora_grads | ok |" in table
    assert "| fused_lora_bf16 | ok |" in table and "| nccl_one_process | ok |" in table
