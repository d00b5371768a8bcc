"""tuner's GRPO step vs TRL's GRPOTrainer, side by side in one run.

    pip install -c constraints.txt trl==1.16.0      # (a test dependency)
    python tools/bench_grpo.py [--steps 10] [--rounds 1] [--model smollm2-135m-instruct]

Both train the same model with LoRA r=16 / alpha 32 on every linear layer (no dropout), loss dapo,
beta 0, AdamW lr 5e-4 constant, fp32, one prompt per step with 8 completions (TRL's
per_device_train_batch_size=8, num_generations=8; tuner's batch_size=8), at most 24 new tokens,
temperature 1, on the one-word questions of examples/make_one_word_prompts.py with the demo config's two
reward functions (brevity and the reference answer). TRL generates with transformers' `generate`
(use_vllm=False). Each run is its own process; printed: the median step time (the first step left
out), tuner's split into rollout / reward / the rest (log-probs, forward, backward, update), the mean
reward of the first and last steps, the peak RSS of the process, and the ratios tuner / TRL.
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

# The demo config's own reward functions, for both (read from the config file, which is ordinary Python)
REWARDS = f"""import runpy
_config = runpy.run_path({str(ROOT / "configs" / "smollm2" / "smollm2_135m_instruct_lora_grpo_one_word.py")!r})
one_word, correct = _config["one_word"], _config["correct"]
"""

TRL = textwrap.dedent('''
    import json, sys, time
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from bench_rewards import correct, one_word
    model_path, data, steps, tokens, out = sys.argv[1:6]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    rows = [json.loads(line) for line in open(data)]
    times, last, rewards = [], [None], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            last[0] = time.perf_counter()
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - last[0])
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                rewards.append(logs["reward"])

    args = GRPOConfig(output_dir=out + "/trl", per_device_train_batch_size=8, num_generations=8,
                      gradient_accumulation_steps=1, max_completion_length=int(tokens), max_steps=int(steps),
                      learning_rate=5e-4, beta=0.0, loss_type="dapo", temperature=1.0, report_to=[], use_cpu=True,
                      bf16=False, save_strategy="no", logging_steps=1, lr_scheduler_type="constant", warmup_steps=0,
                      gradient_checkpointing=False, use_vllm=False, seed=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=[one_word, correct], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora,
                          callbacks=[Timer()])
    trainer.train()
    json.dump({"times": times, "rewards": rewards}, open(out + "/trl.json", "w"))
''')

CONFIG = '''
from tuner.config import *
from bench_rewards import correct, one_word
model = ModelConfig(path={model!r}, dtype="float32")
lora = LoraConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
rl = RLConfig(loss="dapo", num_generations=8, max_completion_length={tokens}, temperature=1.0, beta=0.0,
              rewards=[one_word, correct], log_completions=0)
data = DataConfig(path={data!r})
optim = OptimConfig(lr=5e-4, weight_decay=0.0)
train = TrainConfig(batch_size=8, accumulative_counts=1, max_steps={steps}, max_epochs=100, warmup_ratio=0.0,
                    scheduler="constant", dtype="fp32")
checkpoint = CheckpointConfig(save_steps=100000, save_total_limit=1)
evaluate = EvaluateConfig(inputs=[])
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=24, help="max new tokens per completion")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    from tuner.model.load import resolve_model_path

    model = resolve_model_path(args.model)
    results: dict[str, list[dict]] = {"tuner": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_one_word_prompts.py"), "--out",
                        str(tmp / "one_word")], check=True, capture_output=True)
        data = tmp / "one_word_train.jsonl"
        (tmp / "bench_rewards.py").write_text(REWARDS)
        (tmp / "trl_grpo.py").write_text(TRL)  # (not trl.py: it would shadow the package)
        env = {"PYTHONPATH": str(tmp)}
        for r in range(args.rounds):
            for name in results:
                work = tmp / f"{name}_{r}"
                work.mkdir()
                if name == "trl":
                    code, peak = run([sys.executable, str(tmp / "trl_grpo.py"), model, str(data), str(args.steps),
                                      str(args.tokens), str(work)], env=env)
                    saved = json.loads((work / "trl.json").read_text()) if code == 0 else {}
                    times, rewards, split = saved.get("times", []), saved.get("rewards", []), {}
                else:
                    cfg = work / "cfg.py"
                    cfg.write_text(CONFIG.format(model=model, data=str(data), steps=args.steps, tokens=args.tokens))
                    code, peak = run([sys.executable, "-m", "tuner", "train", str(cfg), "--work-dir", str(work)],
                                     env=env)
                    steps = steps_of(work) if code == 0 else []
                    times, rewards = [s["step_time"] for s in steps], [s["reward"] for s in steps]
                    split = {k: statistics.median(s[f"time/{k}"] for s in steps[1:]) for k in ("rollout", "reward")}
                if code != 0 or len(times) < 2:
                    print(f"{name}: failed (exit {code})", file=sys.stderr)
                    return 1
                results[name].append({"step": statistics.median(times[1:]), "peak": peak, "split": split,
                                      "first": statistics.mean(rewards[:3]), "last": statistics.mean(rewards[-3:])})
    print(f"GRPO, {args.model}, LoRA r=16 all-linear, fp32, 1 prompt x 8 completions per step, at most "
          f"{args.tokens} new tokens, {args.steps} steps, {args.rounds} round(s)")
    print(f"{'system':<8} {'step s':>8} {'reward first 3 / last 3':>24} {'peak RSS':>10}")
    medians = {}
    for name, runs in results.items():
        step, peak = statistics.median(x["step"] for x in runs), statistics.median(x["peak"] for x in runs)
        first, last = statistics.mean(x["first"] for x in runs), statistics.mean(x["last"] for x in runs)
        medians[name] = (step, peak)
        print(f"{name:<8} {step:>8.2f} {first:>11.3f} / {last:<10.3f} {peak / 2**30:>8.2f} GiB")
    split = {k: statistics.median(x["split"][k] for x in results["tuner"]) for k in ("rollout", "reward")}
    step = medians["tuner"][0]
    print(f"tuner's step: rollout {split['rollout']:.2f} s, reward {split['reward']:.3f} s, "
          f"log-probs + forward + backward + update {step - split['rollout'] - split['reward']:.2f} s")
    print(f"tuner / TRL: step time {step / medians['trl'][0]:.2f}x, peak RSS {medians['tuner'][1] / medians['trl'][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
