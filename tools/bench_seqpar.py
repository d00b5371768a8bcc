"""Sequence parallelism: peak memory per process and tokens/s of one row at 8k and 16k tokens, N=1 on one
process against N=2 on two, side by side in one run.

    python tools/bench_seqpar.py [--lengths 8192 16384] [--steps 2]

The model is a random Llama with heads that divide by 2 (by default hidden 1024, MLP 4096, 2 layers,
16 query / 4 key/value heads, the SmolLM2 tokenizer's 49k vocabulary: wide enough that a row's
activations, which N divides, outweigh the weights), LoRA r=16 on every linear layer, gradient
checkpointing, fp32, one pretraining row of the given length per step. Each run is its own process
tree (torchrun for N=2); printed: the peak RSS of rank 0 (getrusage, the whole run), the same less the
RSS of a process that only imported torch, transformers and tuner (the runtime, which a GPU's memory
does not hold: the part that compares with a GPU's peak), the median step time after the first,
tokens/s, and the ratios N=2 / N=1. With two lengths, the longest row that fits 24 GiB per process is
extrapolated from them (memory is linear in the length: the attention is tiled, never length^2).
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


RUNTIME = """
import resource, torch, transformers, tuner.engine.loop
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def make_model(folder: Path, hidden: int, mlp: int, layers: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tuner.model.embedded import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=32768,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    rows = []
    runtime = int(subprocess.run([sys.executable, "-c", RUNTIME], capture_output=True, text=True, check=True).stdout)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model", args.hidden, args.mlp, args.layers)
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
    gib = 2**30
    print(f"One LoRA step (r=16, gradient checkpointing, fp32) on one row; a random Llama (hidden {args.hidden}, "
          f"MLP {args.mlp}, {args.layers} layers, 16/4 heads, 49k vocabulary); {args.steps} steps; the runtime alone "
          f"(torch + transformers + tuner imported): {runtime / gib:.2f} GiB")
    print(f"{'tokens':>7} {'N':>3} {'peak RSS rank 0':>16} {'less runtime':>13} {'s per step':>11} {'tokens/s':>9}")
    for length, size, peak, step, rate in rows:
        print(f"{length:>7} {size:>3} {peak / gib:>12.2f} GiB {(peak - runtime) / gib:>9.2f} GiB {step:>11.2f} "
              f"{rate:>9.0f}")
    for length in args.lengths:
        one = next(r for r in rows if r[0] == length and r[1] == 1)
        two = next(r for r in rows if r[0] == length and r[1] == 2)
        print(f"{length} tokens: N=2 / N=1 peak per process {two[2] / one[2]:.2f}x (less the runtime "
              f"{(two[2] - runtime) / (one[2] - runtime):.2f}x), step time {two[3] / one[3]:.2f}x")
    if len(args.lengths) >= 2:
        short, long = sorted(args.lengths)[:1] + sorted(args.lengths)[-1:]
        fits = {}
        for size in (1, 2):
            (_, _, low, *_), (_, _, high, *_) = (next(r for r in rows if r[0] == n and r[1] == size)
                                                 for n in (short, long))
            per_token = (high - low) / (long - short)  # (bytes per token of the row, from the two lengths)
            fits[size] = long + (24 * gib - high) / per_token
            print(f"N={size}: {per_token / 1024:.0f} KiB per token of the row; the longest row in 24 GiB per process "
                  f"(extrapolated): {fits[size] / 1024:.0f}k tokens")
        print(f"longest row, N=2 / N=1: {fits[2] / fits[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
