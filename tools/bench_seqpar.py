"""Sequence parallelism: peak memory per process and tokens/s of one row at 8k and 16k tokens, N=1 on one
process against N=2 on two, side by side in one run.

    python tools/bench_seqpar.py [--lengths 8192 16384] [--steps 2]

The model is a small random Llama with heads that divide by 2 (8 query, 2 key/value heads, hidden 256,
4 layers, the SmolLM2 tokenizer's 49k vocabulary), LoRA r=16 on every linear layer, gradient
checkpointing, fp32, one pretraining row of the given length per step. Each run is its own process
tree (torchrun for N=2); printed: the peak RSS of rank 0 (getrusage, the whole run), the median step
time after the first, tokens/s, and the ratios N=2 / N=1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench_train import steps_of  # noqa: E402

CONFIG = '''
import json, resource
from tuner.config import *

def peak(trainer, step, metrics):  # (rank 0: the hooks run there) its peak RSS so far, in bytes
    open({peak_file!r}, "w").write(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))

model = ModelConfig(path={model!r}, dtype="float32")
lora = LoraConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
data = DataConfig(path={data!r}, format="pretrain", max_length={length}, pack=True, pack_split=True)
optim = OptimConfig(lr=1e-4)
train = TrainConfig(batch_size=1, accumulative_counts=1, max_steps={steps}, max_epochs=100, warmup_ratio=0.0,
                    scheduler="constant", dtype="fp32", gradient_checkpointing=True,
                    sequence_parallel_size={size})
checkpoint = CheckpointConfig(save_steps=100000, save_total_limit=1)
evaluate = EvaluateConfig(inputs=[])
custom_hooks = [peak]
'''


def make_model(folder: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tuner.model.embedded import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model")
        words = " ".join(f"word{i % 997} is followed by word{(i * 7) % 991}." for i in range(6000))
        (tmp / "text.jsonl").write_text("".join(json.dumps({"text": words}) + "\n" for _ in range(8)))
        for length in args.lengths:
            for size in (1, 2):
                work = tmp / f"w{length}_{size}"
                cfg = tmp / f"c{length}_{size}.py"
                cfg.write_text(CONFIG.format(model=str(tmp / "model"), data=str(tmp / "text.jsonl"), length=length,
                                             steps=args.steps, size=size, peak_file=str(tmp / f"peak{length}_{size}")))
                env = {**os.environ, "NPROC_PER_NODE": str(size), "PORT": str(29700 + size)}
                if size == 1:
                    env.pop("NPROC_PER_NODE")
                run = subprocess.run([sys.executable, "-m", "tuner", "train", str(cfg), "--work-dir", str(work)],
                                     env=env, capture_output=True, text=True)
                if run.returncode != 0:
                    print(run.stderr[-2000:], file=sys.stderr)
                    return 1
                steps = steps_of(work)
                step = statistics.median(s["step_time"] for s in steps[1:])
                peak = json.loads((tmp / f"peak{length}_{size}").read_text())
                rows.append((length, size, peak, step, length / step))
    print(f"One LoRA step (r=16, gradient checkpointing, fp32) on one row; a random Llama (hidden 256, 4 layers, "
          f"8/2 heads, 49k vocabulary); {args.steps} steps")
    print(f"{'tokens':>7} {'N':>3} {'peak RSS rank 0':>16} {'s per step':>11} {'tokens/s':>9}")
    for length, size, peak, step, rate in rows:
        print(f"{length:>7} {size:>3} {peak / 2**30:>13.2f} GiB {step:>11.2f} {rate:>9.0f}")
    for length in args.lengths:
        one = next(r for r in rows if r[0] == length and r[1] == 1)
        two = next(r for r in rows if r[0] == length and r[1] == 2)
        print(f"{length} tokens: N=2 / N=1 peak per process {two[2] / one[2]:.2f}x, step time {two[3] / one[3]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
