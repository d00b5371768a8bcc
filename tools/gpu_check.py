"""What only a GPU can show, in one run, as a table (tools/gpu_check.sh runs it; under 8 minutes on one GPU).

    python tools/gpu_check.py                 # on the GPU: every check
    python tools/gpu_check.py --device cpu    # the same code on CPU (no FlashAttention, no NCCL): a smoke run

  fa2_varlen_b1 / _b2   FlashAttention 2 varlen on packed rows equals sdpa on each sample alone (bf16)
  qlora_grads           QLoRA (bitsandbytes NF4 on the device) gradients equal a dense dequantized reference
  fused_lora_bf16       tuner's fused LoRA linear and SwiGLU MLP under bf16 autocast equal peft's
  deepspeed_zero2       `tuner train --deepspeed deepspeed_zero2`, one process, losses equal a plain run
  nccl_one_process      the cpu:gloo,cuda:nccl group: a device all_reduce, all_gather_object of RNG states
  bench_peers           tools/bench_peers.py (tuner vs TRL vs HF Trainer), its summary lines

Every check prints a line even when it fails; the exit code is the number of failed checks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def tiny_llama(folder: Path) -> Path:
    """A small random Llama (4 query / 2 key-value heads) saved with the embedded SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuner.model.embedded import embedded_model_dir
    from tuner.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(embedded_model_dir()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def fa2_varlen(model_dir: Path, device: str, batch: int) -> str:
    """Packed rows (3 samples in row 0, 2 in row 1) through flash_attention_2 with the varlen starts,
    against each sample alone through sdpa: max |logit difference|, bf16."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from tuner.model.packed_attention import varlen_kwargs

    if device == "cpu" or importlib.util.find_spec("flash_attn") is None:
        return "skipped: " + ("no GPU" if device == "cpu" else "flash-attn is not installed (pip install flash-attn)")
    lengths = [[70, 33, 25], [90, 38]][:batch]
    torch.manual_seed(0)
    rows = [[torch.randint(10, 1000, (n,)) for n in row] for row in lengths]
    width = max(sum(row) for row in lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    positions = torch.zeros(batch, width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :sum(lengths[b])] = torch.cat(row)
        positions[b, :sum(lengths[b])] = torch.cat([torch.arange(n) for n in lengths[b]])
        positions[b, sum(lengths[b]):] = torch.arange(width - sum(lengths[b]))  # padding: a segment of its own
    fa2 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                               attn_implementation="flash_attention_2").to(device)
    sdpa = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").to(device)
    with torch.no_grad():
        packed = fa2(input_ids=ids.to(device), position_ids=positions.to(device), use_cache=False,
                     **varlen_kwargs(positions.to(device))).logits.float()
        worst = 0.0
        for b, row in enumerate(rows):
            start = 0
            for sample in row:
                alone = sdpa(input_ids=sample[None].to(device), use_cache=False).logits.float()[0]
                worst = max(worst, (packed[b, start:start + len(sample)] - alone).abs().max().item())
                start += len(sample)
    assert worst < 0.1, f"max |diff| {worst:.3g}: packed samples see each other"
    return f"max |logit diff| {worst:.2e} (bf16)"


def qlora_grads(model_dir: Path, device: str) -> str:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
    from transformers import AutoModelForCausalLM

    from tuner.config import LoraConfig, ModelConfig
    from tuner.model.adapt import apply_lora
    from tuner.model.load import load_model

    torch.manual_seed(0)
    base = load_model(ModelConfig(path=str(model_dir), dtype="float32", quantization="4bit"), device=device)
    if device != "cpu":
        base.to(device)
    qlora = apply_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0), quantized=True)
    with torch.no_grad():
        for name, param in qlora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    dense = apply_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                       LoraConfig(r=8, alpha=16, dropout=0.0)).to(device)
    quantized = dict(qlora.named_modules())
    with torch.no_grad():
        for name, module in dense.named_modules():
            twin = quantized.get(name)
            if isinstance(twin, bnb.nn.Linear4bit):
                module.weight.copy_(bf.dequantize_4bit(twin.weight.data, twin.weight.quant_state).float())
        dense.load_state_dict({k: v for k, v in qlora.state_dict().items() if "lora_" in k}, strict=False)
    ids = torch.randint(10, 1000, (2, 64), device=device)
    grads = {}
    for label, model in (("qlora", qlora), ("dense", dense)):
        model.train()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads[label] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["qlora"].keys() == grads["dense"].keys() and grads["qlora"]
    worst = max(((g - grads["dense"][n]).abs().max() / (grads["dense"][n].abs().max() + 1e-12)).item()
                for n, g in grads["qlora"].items())
    assert worst < 1e-2, f"relative gradient difference {worst:.3g}"
    return f"{len(grads['qlora'])} adapter gradients, max relative diff {worst:.2e}"


def fused_lora_bf16(model_dir: Path, device: str) -> str:
    """Logits and LoRA gradients of a LoRA Llama with tuner's fused layers vs plain peft, bf16 autocast."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuner.model import fast_lora

    results, counts = [], None
    ids = torch.randint(10, 1000, (2, 96), device=device)
    for fused in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                               LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
        model.to(device)
        if fused:
            counts = fast_lora.enable(model, torch.bfloat16)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            logits = model(input_ids=ids, use_cache=False).logits.float()
        logits.square().mean().backward()
        results.append((logits, {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (fused_logits, fused_grads) = results
    assert counts[0] > 0 and counts[1] > 0, f"fused {counts}"
    logit_diff = (plain - fused_logits).abs().max().item()
    grad_diff = max(((fused_grads[n] - g).abs().max() / (g.abs().max() + 1e-12)).item() for n, g in plain_grads.items())
    assert logit_diff < 0.1 and grad_diff < 0.1, f"logits {logit_diff:.3g}, gradients {grad_diff:.3g}"
    return f"{counts[0]} LoRA layers, {counts[1]} MLPs fused; max |logit diff| {logit_diff:.2e}, grad {grad_diff:.2e}"


def deepspeed_zero2(model_dir: Path, device: str, work: Path) -> str:
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                                     {"role": "assistant", "content": f"It is {2 * i}."}]}) + "\n"
                            for i in range(64)))
    cfg = work / "ds_check.py"
    cfg.write_text(f"from tuner.config import *\nmodel = ModelConfig(path={str(model_dir)!r})\n"
                   f"lora = LoraConfig(r=8, alpha=16)\ndata = DataConfig(path={str(data)!r}, max_length=256)\n"
                   "train = TrainConfig(batch_size=2, accumulative_counts=2, max_steps=4, dtype='fp32')\n"
                   "optim = OptimConfig(lr=1e-3)\n")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29561"}
    losses = {}
    for name, extra in (("plain", []), ("zero2", ["--deepspeed", "deepspeed_zero2"])):
        run = subprocess.run([sys.executable, "-m", "tuner", "train", str(cfg), "--work-dir", str(work / name), *extra],
                             capture_output=True, text=True, timeout=300, env=env if extra else None)
        assert run.returncode == 0, run.stderr[-1500:]
        scalars = next((work / name).glob("*/vis_data/scalars.json"))
        losses[name] = [json.loads(line)["loss"] for line in scalars.read_text().splitlines()]
    diff = max(abs(a - b) / abs(b) for a, b in zip(losses["zero2"], losses["plain"]))
    assert len(losses["zero2"]) == 4 and diff < 1e-3, f"{losses}"
    return f"4 steps, losses equal a plain run to {diff:.1e} (relative)"


def nccl_one_process(device: str) -> str:
    import torch.distributed as dist

    from tuner.engine.checkpoint import rng_state
    from tuner.engine.dist import process_group_backend

    backend = process_group_backend(device != "cpu")
    dist.init_process_group(backend, init_method="tcp://127.0.0.1:29563", world_size=1, rank=0)
    try:
        tensor = torch.tensor([1.0, 2.0], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        gathered = [None]
        dist.all_gather_object(gathered, rng_state())
        cpu = torch.ones(1)
        dist.all_reduce(cpu)  # NCCL alone refuses this; the gloo half of the group takes it
        assert tensor.tolist() == [1.0, 2.0] and gathered[0] is not None and cpu.item() == 1.0
    finally:
        dist.destroy_process_group()
    return f"backend {backend}: device all_reduce, CPU all_reduce, all_gather_object"


def bench_peers(device: str) -> str:
    if device == "cpu":
        return "skipped on CPU (docs/training.md has the CPU figures)"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_peers.py"), "--rounds", "1", "--steps", "6"],
                         capture_output=True, text=True, timeout=360)
    print(run.stdout[-4000:], flush=True)
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    return " | ".join(lines[-3:]) if lines else f"no output (exit {run.returncode}): {run.stderr[-300:]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", help="run these checks only")
    args = parser.parse_args()
    device = args.device
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = tiny_llama(work / "tiny")
        checks = {"fa2_varlen_b1": lambda: fa2_varlen(model_dir, device, 1),
                  "fa2_varlen_b2": lambda: fa2_varlen(model_dir, device, 2),
                  "qlora_grads": lambda: qlora_grads(model_dir, device),
                  "fused_lora_bf16": lambda: fused_lora_bf16(model_dir, device),
                  "deepspeed_zero2": lambda: deepspeed_zero2(model_dir, device, work),
                  "nccl_one_process": lambda: nccl_one_process(device),
                  "bench_peers": lambda: bench_peers(device)}
        for name, check in checks.items():
            if args.only and name not in args.only:
                continue
            started = time.perf_counter()
            try:
                detail = check()
                status = "skip" if detail.startswith("skipped") else "ok"
            except Exception as e:  # noqa: BLE001 - every check reports, whatever it raises
                traceback.print_exc()
                status, detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rows.append((name, status, time.perf_counter() - started, detail))
            print(f"[gpu_check] {name}: {status} ({rows[-1][2]:.1f} s) {detail}", flush=True)
    name = torch.cuda.get_device_name(device) if device != "cpu" else "cpu"
    print(f"\n| check | result | seconds | detail |\n|---|---|---|---|  ({name}, torch {torch.__version__})")
    for check, status, seconds, detail in rows:
        print(f"| {check} | {status} | {seconds:.1f} | {detail} |")
    return sum(status == "FAIL" for _, status, _, _ in rows)


if __name__ == "__main__":
    sys.exit(main())
