"""tuner's trainer vs TRL's SFTTrainer vs HF Trainer, side by side in one run.

    pip install -c constraints.txt trl==1.16.0      # only for this benchmark
    python tools/bench_peers.py [--steps 6] [--seq 1024] [--batch 1] [--rounds 2] [--model smollm2-135m-instruct]

Every system trains the same model on the same conversations, packed to `--seq` tokens,
LoRA r=16 / alpha 32 on every linear layer, no dropout, bf16 autocast (where the CPU has
bf16; fp32 otherwise), AdamW. Each run is its own process; the systems alternate for
`--rounds` rounds and the medians are printed: tokens/s (real tokens: padding does not
count), peak memory (RSS of the process on CPU, max allocated on GPU), MFU against this
machine's measured matmul peak (LoRA: 4 N FLOPs per token, as tuner counts), and the
ratios tuner / peer. Each peer runs at its own defaults and meets tuner at the same setting:
TRL checkpoints activations (gradient checkpointing), so it is compared with tuner doing
the same; HF Trainer does not, so it is compared with tuner without. tuner picks its own
attention and memory allocator, as a user's run does. tuner's full fine-tuning and QLoRA
rows follow.

Targets (issue 30): tokens/s >= 2.2x TRL (both checkpointing) and >= 1.8x HF Trainer (neither),
peak memory <= 60% of TRL's, MFU >= 55% (tuner without checkpointing). A missed target prints a
warning and the exit code is 1. TUNER_MALLOC=glibc gives tuner what a machine without jemalloc gets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import CONFIG, run, steps_of, write_data  # noqa: E402

# The peers run in their own process: a script that trains and writes one JSON line per step.
PEER = textwrap.dedent('''
    import json, sys, time
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
    system, model_path, data, seq, batch, steps, bf16, out = sys.argv[1:9]
    seq, batch, steps, bf16 = int(seq), int(batch), int(steps), bf16 == "1"
    checkpointing = {"trl": True, "hf": False}[system]  # each library's default
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    rows = [json.loads(line) for line in open(data)]
    steps_seen, last = [], [None]

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            last[0] = time.perf_counter()
        def on_step_end(self, args, state, control, **kw):
            steps_seen.append({"time": time.perf_counter() - last[0], "tokens": tokens[0]})

    tokens = [0]
    def count(inputs):  # real tokens of the step: padding does not count
        if "attention_mask" in inputs:
            tokens[0] = int(inputs["attention_mask"].sum())
        else:
            ids = inputs["input_ids"]
            tokens[0] = int((ids != tokenizer.pad_token_id).sum()) if "position_ids" not in inputs else ids.numel()

    common = dict(output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=steps,
                  learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1000,
                  save_strategy="no", report_to=[], bf16=bf16, use_cpu=not torch.cuda.is_available(),
                  dataloader_num_workers=0, disable_tqdm=True, seed=0, gradient_checkpointing=checkpointing)
    if system == "trl":
        from trl import SFTConfig, SFTTrainer
        class Counting(SFTTrainer):
            def training_step(self, model, inputs, *a, **k):
                count(inputs)
                return super().training_step(model, inputs, *a, **k)
        dataset = Dataset.from_list([{"messages": r["messages"]} for r in rows])
        args = SFTConfig(**common, max_length=seq, packing=True, assistant_only_loss=False,
                         completion_only_loss=False)
        trainer = Counting(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                           peft_config=lora, callbacks=[Timer()])
    else:  # HF Trainer on the same packed sequences tuner builds (position ids keep samples apart)
        from peft import get_peft_model
        from tuner.config import DataConfig
        from tuner.data.dataset import build_sequences
        sequences, _ = build_sequences(DataConfig(path=data, max_length=seq, pack=True), tokenizer, say=lambda _: None)
        dataset = Dataset.from_list([{"input_ids": s.input_ids, "labels": s.labels, "position_ids": s.position_ids}
                                     for s in (sequences[i] for i in range(len(sequences)))])
        def collate(batch_rows):
            width = max(len(r["input_ids"]) for r in batch_rows)
            pad = lambda key, value: torch.tensor([r[key] + [value] * (width - len(r[key])) for r in batch_rows])
            return {"input_ids": pad("input_ids", tokenizer.pad_token_id), "labels": pad("labels", -100),
                    "position_ids": pad("position_ids", 0)}
        class Counting(Trainer):
            def training_step(self, model, inputs, *a, **k):
                count(inputs)
                return super().training_step(model, inputs, *a, **k)
        trainer = Counting(model=get_peft_model(model, lora), args=TrainingArguments(**common), train_dataset=dataset,
                           data_collator=collate, callbacks=[Timer()])
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print(json.dumps({"steps": steps_seen, "gpu_peak": peak}))
''')


LORA = "LoraConfig(r=16, alpha=32, dropout=0.0)"


def tuner_steps(tmp: Path, name: str, data: Path, model: str, seq: int, batch: int, steps: int,
                quantization=None, lora=True, options=()) -> tuple[int, list[dict], float]:
    """One `tuner train` process: (exit code, its per-step metrics, peak RSS)."""
    cfg = tmp / f"{name}.py"
    cfg.write_text(CONFIG.format(model=model, quantization=quantization, lora=LORA if lora else "None",
                                 data=str(data), seq=seq, batch=batch, steps=steps))
    work = tmp / f"work_{name}"
    code, peak = run([sys.executable, "-m", "tuner", "train", str(cfg), "--work-dir", str(work),
                      "--cfg-options", *options])
    return code, steps_of(work) if code == 0 else [], peak


def peer_steps(tmp: Path, system: str, data: Path, model: str, seq: int, batch: int, steps: int,
               bf16: bool) -> tuple[int, list[dict], float]:
    """One peer process (PEER): (exit code, its per-step times and tokens, peak RSS watched from outside)."""
    from tuner.model.load import resolve_model_path

    script = tmp / "peer.py"
    script.write_text(PEER)
    result_file = tmp / f"{system}_{seq}.json"
    command = [sys.executable, str(script), system, resolve_model_path(model), str(data), str(seq),
               str(batch), str(steps), "1" if bf16 else "0", str(tmp / f"out_{system}_{seq}")]
    with open(result_file, "w") as out:
        code, peak = run(command, stdout=out)  # prints the peer's stderr when it fails
    lines = [line for line in result_file.read_text().splitlines() if line.startswith("{")]
    return code, json.loads(lines[-1])["steps"] if code == 0 and lines else [], peak


def run_tuner(tmp: Path, name: str, data: Path, args, quantization=None, lora=True, checkpointing=False) -> dict:
    """Medians over the steps after the first (it warms up)."""
    _, steps, peak = tuner_steps(tmp, name, data, args.model, args.seq, args.batch, args.steps + 1, quantization,
                                 lora, [f"train.gradient_checkpointing={checkpointing}"])
    if len(steps) < 2:
        print(f"tuner ({name}) failed", file=sys.stderr)
        return {}
    return {"tokens_per_s": statistics.median(s["tokens_per_s"] for s in steps[1:]),
            "mfu": statistics.median(s["mfu"] for s in steps[1:]), "peak": peak}


def run_peer(tmp: Path, system: str, data: Path, args, bf16: bool, flops_per_token: float, peak_flops: float) -> dict:
    """Medians over the steps after the first, as for tuner; MFU counted as tuner counts it."""
    code, steps, peak = peer_steps(tmp, system, data, args.model, args.seq, args.batch, args.steps + 1, bf16)
    if len(steps) < 2:
        print(f"{system} failed (exit {code})", file=sys.stderr)
        return {}
    tokens_per_s = statistics.median(s["tokens"] / s["time"] for s in steps[1:])
    return {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak_flops, "peak": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ceiling", type=lambda v: [int(x) for x in v.split(",")], metavar="LEN,LEN,...",
                        help="instead: one step of batch 1 at each packed length, LoRA with gradient "
                             "checkpointing, tuner and TRL; prints whether it trained and the peak memory")
    args = parser.parse_args()
    import torch

    from tuner.engine.budget import flops_per_token, matmul_peak_flops
    from tuner.model.device import default_device, resolve_compute_dtype
    from tuner.model.load import load_tokenizer

    device = default_device()
    compute = resolve_compute_dtype("auto", device)
    peak_flops = matmul_peak_flops(device, compute)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        data = tmp / "data.jsonl"
        write_data(data, rows=600)
        from transformers import AutoModelForCausalLM

        from tuner.config import LoraConfig
        from tuner.model.adapt import apply_lora
        from tuner.model.load import resolve_model_path
        model = apply_lora(AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model)),
                           LoraConfig(r=16, alpha=32, dropout=0.0), quantized=False)
        fpt = flops_per_token(model, lora=True)
        del model
        load_tokenizer(args.model)
        bf16 = compute != torch.float32
        if args.ceiling:
            return ceiling(tmp, args, bf16)
        # TRL checkpoints activations by default, HF Trainer does not: each peer is compared with
        # tuner at its own setting.
        systems = {"tuner_ckpt": lambda: run_tuner(tmp, "tuner_ckpt", data, args, checkpointing=True),
                   "trl": lambda: run_peer(tmp, "trl", data, args, bf16, fpt, peak_flops),
                   "tuner": lambda: run_tuner(tmp, "tuner_plain", data, args),
                   "hf": lambda: run_peer(tmp, "hf", data, args, bf16, fpt, peak_flops)}
        results: dict[str, list[dict]] = {name: [] for name in systems}
        for _ in range(args.rounds):
            for name, measure in systems.items():
                results[name].append(measure())
        summary = {name: _median(runs) for name, runs in results.items()}
        print(f"{args.model}, LoRA r=16 all linear, {args.batch} x {args.seq} packed tokens per step, "
              f"{str(compute).replace('torch.', '')} compute, {args.steps} steps after 1 warm-up, "
              f"median of {args.rounds} alternating rounds; matmul peak {peak_flops / 1e9:.0f} GFLOP/s")
        print(f"{'system':34}{'tokens/s':>10}{'MFU':>8}{'peak GiB':>10}")
        labels = {"tuner_ckpt": "tuner, gradient checkpointing", "trl": "TRL SFTTrainer (its defaults: idem)",
                  "tuner": "tuner, no checkpointing", "hf": "HF Trainer (its default: idem)"}
        for name, label in labels.items():
            row = summary[name]
            print(f"{label:34}{row.get('tokens_per_s', float('nan')):10.0f}{row.get('mfu', float('nan')):8.1%}"
                  f"{row.get('peak', float('nan')) / 2**30:10.2f}")
        missed = []
        if all(summary.values()):
            t, trl, plain, hf = (summary[n] for n in ("tuner_ckpt", "trl", "tuner", "hf"))
            speed_trl, memory = t["tokens_per_s"] / trl["tokens_per_s"], t["peak"] / trl["peak"]
            speed_hf = plain["tokens_per_s"] / hf["tokens_per_s"]
            print(f"tuner / TRL: {speed_trl:.2f}x tokens/s, {memory:.0%} of its peak memory; "
                  f"tuner / HF Trainer: {speed_hf:.2f}x tokens/s")
            missed += [f"tokens/s {speed_trl:.2f}x TRL (target 2.2x)"] if speed_trl < 2.2 else []
            missed += [f"tokens/s {speed_hf:.2f}x HF Trainer (target 1.8x)"] if speed_hf < 1.8 else []
            missed += [f"peak memory {memory:.0%} of TRL's (target <= 60%)"] if memory > 0.6 else []
            missed += [f"MFU {plain['mfu']:.1%} (target >= 55%)"] if plain["mfu"] < 0.55 else []
        else:
            missed.append("a system failed to run")
        for name, quantization, lora in (("full", None, False), ("qlora", "4bit", True)):
            row = run_tuner(tmp, name, data, args, quantization=quantization, lora=lora)
            if row:
                print(f"{'tuner ' + name + ', no checkpointing':34}{row['tokens_per_s']:10.0f}{row['mfu']:8.1%}"
                      f"{row['peak'] / 2**30:10.2f}")
        for line in missed:
            print(f"WARNING: target missed: {line}")
        return 1 if missed else 0


def ceiling(tmp: Path, args, bf16: bool) -> int:
    """The memory ceiling: one optimizer step at each length; a run killed for memory shows its exit code."""
    print(f"{args.model}, LoRA r=16 all linear, batch 1, gradient checkpointing, one step; peak memory in GiB")
    print(f"{'length':>8}{'tuner':>20}{'TRL SFTTrainer':>20}")
    for length in args.ceiling:
        data = tmp / f"ceiling_{length}.jsonl"
        write_data(data, rows=4 * length // 100)  # ~130 tokens a conversation: about 5 full rows
        runs = [tuner_steps(tmp, f"ceiling_{length}", data, args.model, length, 1, 1,
                            options=["train.gradient_checkpointing=True", "data.shuffle=False"]),
                peer_steps(tmp, "trl", data, args.model, length, 1, 1, bf16)]
        cells = [f"{steps[0]['tokens']} tok, {peak / 2**30:.2f}" if steps else f"failed ({code})"
                 for code, steps, peak in runs]
        print(f"{length:8}{cells[0]:>20}{cells[1]:>20}", flush=True)
    return 0


def _median(runs: list[dict]) -> dict:
    runs = [r for r in runs if r]
    if not runs:
        return {}
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


if __name__ == "__main__":
    sys.exit(main())
