"""Training speed and memory of each method and each strategy, measured side by side in one run.

    python tools/bench_train.py [--steps 4] [--seq 512] [--batch 4]

Part 1, the embedded SmolLM2-135M-Instruct: LoRA, QLoRA and full fine-tuning, each a real
`tuner train` process on the same packed data; prints tokens/s (real tokens, the median
of the steps after the first), MFU and the peak RSS of the process.
Part 2, a small model (4 layers, hidden 256): one process vs 2 processes with DDP, FSDP2,
DeepSpeed ZeRO-2 and ZeRO-3 on gloo, same global batch; prints the median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

CONFIG = """
from tuner.config import *
model = ModelConfig(path={model!r}, quantization={quantization!r})
lora = {lora}
data = DataConfig(path={data!r}, max_length={seq}, pack=True)
optim = OptimConfig(lr=1e-4)
train = TrainConfig(batch_size={batch}, accumulative_counts=1, max_epochs=100, max_steps={steps}, warmup_ratio=0.0)
checkpoint = CheckpointConfig(save_steps=100000, save_total_limit=1)
evaluate = EvaluateConfig(inputs=[])
"""


def run(command: list[str], env: dict | None = None, stdout=subprocess.DEVNULL) -> tuple[int, float]:
    """Run a command (its output to `stdout`); returns (exit code, peak RSS in bytes of it and its children)."""
    process = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=stdout,
                               stderr=subprocess.PIPE, text=True)
    peak, watched = 0.0, psutil.Process(process.pid)

    def watch():
        nonlocal peak
        while process.poll() is None:
            try:
                rss = watched.memory_info().rss + sum(c.memory_info().rss for c in watched.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=watch)
    thread.start()
    _, stderr = process.communicate()
    thread.join()
    if process.returncode != 0:
        print(stderr[-2000:], file=sys.stderr)
    return process.returncode, peak


def steps_of(work: Path) -> list[dict]:
    return [json.loads(line) for f in work.glob("*/vis_data/scalars.json") for line in f.read_text().splitlines()]


def write_data(path: Path, rows: int = 400) -> None:
    lines = []
    for i in range(rows):
        answer = " ".join(f"This is sentence {j} of answer {i}, about cities, rivers and code." for j in range(8))
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"Tell me something, number {i}."},
                                              {"role": "assistant", "content": answer}]}))
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--strategies-only", action="store_true", help="skip part 1")
    args = parser.parse_args()
    tuner = [sys.executable, "-m", "tuner", "train"]
    lora_cfg = "LoraConfig(r=16, alpha=32, dropout=0.0)"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data.jsonl"
        write_data(data)
        print(f"Embedded SmolLM2-135M-Instruct, {args.batch} x {args.seq} tokens per step, {args.steps} steps")
        print(f"{'method':8}{'tokens/s':>10}{'MFU':>8}{'peak RSS GiB':>14}")
        methods = () if args.strategies_only else (("lora", None, lora_cfg), ("qlora", "4bit", lora_cfg),
                                                   ("full", None, None))
        for method, quantization, lora in methods:
            cfg = tmp / f"{method}.py"
            cfg.write_text(CONFIG.format(model="smollm2-135m-instruct", quantization=quantization, lora=lora,
                                         data=str(data), seq=args.seq, batch=args.batch, steps=args.steps))
            code, peak = run(tuner + [str(cfg), "--work-dir", str(tmp / method)])
            steps = steps_of(tmp / method)[1:]
            if code != 0 or not steps:
                print(f"{method:8}  failed (exit {code})")
                continue
            tps = statistics.median(s["tokens_per_s"] for s in steps)
            mfu = statistics.median(s["mfu"] for s in steps)
            print(f"{method:8}{tps:10.0f}{mfu:8.1%}{peak / 2**30:14.2f}")

        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from tuner.model.embedded import embedded_model_dir

        small = tmp / "small"
        tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024,
                                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                     tie_word_embeddings=True)).save_pretrained(small)
        tokenizer.save_pretrained(small)
        print(f"\nSmall model (4 layers, hidden 256), LoRA, global batch 4 x {args.seq} tokens, "
              f"{args.steps + 2} steps, median step time")
        two = {"NPROC_PER_NODE": "2"}
        runs = (("1 process", 4, {}, []), ("2 x DDP", 2, two, []), ("2 x FSDP2", 2, two, ["--fsdp"]),
                ("2 x ZeRO-2", 2, two, ["--deepspeed", "deepspeed_zero2"]),
                ("2 x ZeRO-3", 2, two, ["--deepspeed", "deepspeed_zero3"]))
        for name, batch, env, flags in runs:
            cfg = tmp / f"small_{batch}.py"
            cfg.write_text(CONFIG.format(model=str(small), quantization=None, lora=lora_cfg, data=str(data),
                                         seq=args.seq, batch=batch, steps=args.steps + 2))
            work = tmp / name.replace(" ", "_")
            code, _ = run(tuner + [str(cfg), "--work-dir", str(work), *flags], env)
            steps = steps_of(work)[1:]
            if code != 0 or not steps:
                print(f"{name:10}  failed (exit {code})")
                continue
            print(f"{name:10}{statistics.median(s['step_time'] for s in steps):8.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
