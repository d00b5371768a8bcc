"""tuner's DPO vs TRL's DPOTrainer, side by side in one run.

    pip install -c constraints.txt trl==1.16.0      # (a test dependency)
    python tools/bench_preference.py [--steps 6] [--pairs 4] [--rounds 1] [--model smollm2-135m-instruct]

Both train the same model with LoRA r=16 / alpha 32 on every linear layer (no dropout), DPO sigmoid
beta 0.1 with the reference from the adapter switched off, AdamW lr 1e-4, fp32, `--pairs` pairs per
step (examples/make_signoff_pairs.py), no gradient checkpointing. Each run is its own process;
printed: the median step time (the first step left out), pairs/s, the peak RSS of the process,
and the ratios tuner / TRL. tuner runs unpacked (one answer per row, as TRL) and packed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench_train import run, steps_of  # noqa: E402

TRL = textwrap.dedent('''
    import json, sys, time
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    model_path, data, pairs, steps, out = sys.argv[1:6]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    rows = [json.loads(line) for line in open(data)]
    times, last = [], [None]

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            last[0] = time.perf_counter()
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - last[0])

    args = DPOConfig(output_dir=out + "/trl", per_device_train_batch_size=int(pairs), max_steps=int(steps),
                     learning_rate=1e-4, beta=0.1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                     logging_steps=1000, max_length=512, gradient_checkpointing=False, lr_scheduler_type="constant")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora, callbacks=[Timer()])
    trainer.train()
    json.dump({"times": times}, open(out + "/trl.json", "w"))
''')

CONFIG = '''
from tuner.config import *
model = ModelConfig(path={model!r}, dtype="float32")
lora = LoraConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
preference = PreferenceConfig(method="dpo", loss="sigmoid", beta=0.1, reference="adapter")
data = DataConfig(path={data!r}, format="preference", max_length=512, pack={pack})
optim = OptimConfig(lr=1e-4, weight_decay=0.0)
train = TrainConfig(batch_size={batch}, accumulative_counts=1, max_steps={steps}, max_epochs=100, warmup_ratio=0.0,
                    scheduler="constant", dtype="fp32")
checkpoint = CheckpointConfig(save_steps=100000, save_total_limit=1)
evaluate = EvaluateConfig(inputs=[])
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    from tuner.model.load import resolve_model_path

    model = resolve_model_path(args.model)
    results: dict[str, list[tuple[float, float]]] = {"tuner": [], "tuner packed": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_signoff_pairs.py"), "--out",
                        str(tmp / "signoff")], check=True, capture_output=True)
        data = tmp / "signoff_train.jsonl"
        (tmp / "trl_dpo.py").write_text(TRL)  # (not trl.py: it would shadow the package)
        for r in range(args.rounds):
            for name in results:
                work = tmp / f"{name.replace(' ', '_')}_{r}"
                work.mkdir()
                if name == "trl":
                    code, peak = run([sys.executable, str(tmp / "trl_dpo.py"), model, str(data), str(args.pairs),
                                      str(args.steps), str(work)])
                    times = json.loads((work / "trl.json").read_text())["times"] if code == 0 else []
                else:
                    packed = name.endswith("packed")
                    cfg = work / "cfg.py"
                    # packed: one sequence of about --pairs pairs (each pair ~120 tokens here)
                    cfg.write_text(CONFIG.format(model=model, data=str(data), pack=packed, steps=args.steps,
                                                 batch=1 if packed else args.pairs))
                    code, peak = run([sys.executable, "-m", "tuner", "train", str(cfg), "--work-dir", str(work)])
                    times = [s["step_time"] for s in steps_of(work)] if code == 0 else []
                if code != 0 or len(times) < 2:
                    print(f"{name}: failed (exit {code})", file=sys.stderr)
                    return 1
                results[name].append((statistics.median(times[1:]), peak))
    print(f"DPO, {args.model}, LoRA r=16 all-linear, fp32, {args.pairs} pairs per step (tuner packed: "
          f"one 512-token sequence of pairs), {args.steps} steps, {args.rounds} round(s)")
    print(f"{'system':<14} {'step s':>8} {'pairs/s':>8} {'peak RSS':>10}")
    medians = {}
    for name, runs in results.items():
        step, peak = statistics.median(t for t, _ in runs), statistics.median(p for _, p in runs)
        medians[name] = (step, peak)
        rate = "-" if name.endswith("packed") else f"{args.pairs / step:.2f}"
        print(f"{name:<14} {step:>8.2f} {rate:>8} {peak / 2**30:>8.2f} GiB")
    step, peak = medians["tuner"]
    print(f"tuner / TRL (unpacked, same pairs per step): step time {step / medians['trl'][0]:.2f}x, "
          f"peak RSS {peak / medians['trl'][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
