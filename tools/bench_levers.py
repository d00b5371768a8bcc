"""Each CPU speed lever of a LoRA step, measured alone, side by side in one run.

    python tools/bench_levers.py [--steps 6] [--seq 1024] [--model smollm2-135m-instruct] [--full] [--allocators]

One training set-up (the embedded model, LoRA r=16 on every linear layer or with --full all weights, 1 x SEQ packed tokens,
the compute dtype tuner picks: bf16 where the CPU has it), built in this process as `tuner train`
builds it. For each lever the step alternates between its two settings (off, on, off, on, ...)
so that the machine's drift falls on both; printed: the median tokens/s of each and the ratio.
  attention    each packed sample through PyTorch's CPU flash kernel vs tuner's matmul attention
  loss chunk   the chunked head + cross-entropy in 1024-position chunks vs 256
  threads      1 intra-op thread vs all cores
  onednn       PyTorch's oneDNN (mkldnn) kernels off vs on
  AdamW        torch's foreach implementation vs its fused kernel
  attention    the matmul attention's backward by autograd (as before) vs written out (tuner's)
  SwiGLU       the fused MLP's SiLU derivative from seven bf16 operations (as before) vs PyTorch's kernel (tuner's)
  checkpoint   gradient checkpointing on vs off
--allocators also starts one process per memory allocator setting (glibc as started, glibc with its
heap kept with its tcache and fast bins on and off, jemalloc as installed, jemalloc with freed memory
kept), alternating over two rounds, and
prints tokens/s and peak RSS (a setting can only be made when a process starts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import CONFIG, write_data  # noqa: E402


def trainer_for(tmp: Path, model: str, seq: int, checkpointing: bool, full: bool = False):
    from tuner.config import load_config
    from tuner.engine.loop import Trainer

    data = tmp / "data.jsonl"
    if not data.exists():
        write_data(data, rows=600)
    config = tmp / "levers.py"
    config.write_text(CONFIG.format(model=model, quantization=None,
                                    lora="None" if full else "LoraConfig(r=16, alpha=32, dropout=0.0)",
                                    data=str(data), seq=seq, batch=1, steps=10_000))
    trainer = Trainer(load_config(str(config), [f"train.gradient_checkpointing={checkpointing}"]),
                      work_dir=tmp / "work")
    trainer.setup()
    return trainer


def stepper(trainer):
    """One optimizer step on the next batch, as the loop does it; returns its tokens/s."""
    from tuner.engine.batches import StepBatches, step_batches

    batches = step_batches(StepBatches(trainer.schedule, trainer.sequences, trainer.collate,
                                       trainer.tokenizer.pad_token_id, 0, trainer.objective.units), 0, 10_000, 0,
                           pin=False)

    def step() -> float:
        data = next(batches)
        started = time.perf_counter()
        for weight, batch in zip(data.weights, data.batches):
            (trainer.loss_sum(batch) * (weight / data.trained_tokens)).backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return data.real_tokens / (time.perf_counter() - started)
    return step


def alternate(step, settings: list, apply, steps: int) -> list[float]:
    """Median tokens/s of each setting, the settings taking turns step by step."""
    seen = {i: [] for i in range(len(settings))}
    for i in range(len(settings) if steps > 1 else 0):  # one warm-up step each
        apply(settings[i])
        step()
    for n in range(steps * len(settings)):
        i = n % len(settings)
        apply(settings[i])
        seen[i].append(step())
    return [statistics.median(seen[i]) for i in range(len(settings))]


def autograd_attention_backward(ctx, grad):
    """The matmul attention's backward as it was: the forward again under autograd, then autograd.grad."""
    import torch
    from tuner.model.packed_attention import causal_attention

    q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
    with torch.enable_grad(), torch.autocast("cpu", enabled=False):
        out = causal_attention(q, k, v, ctx.scale)
    return (*torch.autograd.grad(out, (q, k, v), grad), None)


def composed_swiglu_backward(ctx, grad):
    """The fused SwiGLU MLP's backward as it was: SiLU's derivative built from bf16 operations."""
    import torch
    from tuner.model import fast_lora

    g, u, keep, xa, weight, lora_a, lora_b = ctx.saved_tensors
    dtype, s, p = ctx.dtype, ctx.scaling, ctx.p
    big_g = grad.reshape(-1, grad.shape[-1]).to(dtype)
    sig = torch.sigmoid(g)
    silu = g * sig
    hd = silu * u if keep is None else fast_lora._dropped(silu * u, keep, p)
    gxa, grad_a, grad_b = fast_lora._adapter_gradients(big_g, hd, xa, lora_a, lora_b, s, dtype)
    dh = big_g @ weight.to(dtype)
    a = lora_a.to(dtype)
    if keep is None:
        dh.addmm_(gxa, a)
    else:
        dh.add_(fast_lora._dropped(gxa @ a, keep, p))
    grad_up = (dh * silu).view(*grad.shape[:-1], -1).to(ctx.in_dtypes[1])
    grad_gate = dh.mul_(u).mul_(sig.mul_(g.neg().mul_(sig).add_(g).add_(1)))
    return (grad_gate.view(*grad.shape[:-1], -1).to(ctx.in_dtypes[0]), grad_up, None, None, grad_a, grad_b,
            None, None, None)


def levers(args, tmp: Path) -> None:
    import torch
    import tuner.engine.objective as objective
    from tuner.engine import fused_loss
    from tuner.model import fast_lora, packed_attention

    trainer = trainer_for(tmp, args.model, args.seq, checkpointing=False, full=args.full)
    step = stepper(trainer)
    cores = torch.get_num_threads()
    plain_loss = objective.chunked_linear_cross_entropy

    def chunk(size):
        objective.chunked_linear_cross_entropy = (
            lambda *a, **k: plain_loss(*a, **{**k, "chunk_size": size}))

    def fused_adamw(on):  # (both keep their state in the same tensors)
        for group in trainer.optimizer.param_groups:
            group["fused"], group["foreach"] = on, not on

    rows = [("attention: flash kernel -> matmuls", [0, packed_attention.MATMUL_LONGEST],
             lambda v: setattr(packed_attention, "MATMUL_LONGEST", v)),
            ("loss chunk: 1024 -> 256 positions", [1024, fused_loss.CPU_CHUNK], chunk),
            (f"threads: 1 -> {cores}", [1, cores], torch.set_num_threads),
            ("oneDNN kernels: off -> on (1 step each)", [False, True], lambda v: torch._C._set_mkldnn_enabled(v)),
            ("AdamW: foreach -> fused", [False, True], fused_adamw),
            ("attention backward: autograd -> written", [autograd_attention_backward,
                                                         packed_attention._MatmulAttention.backward],
             lambda f: setattr(packed_attention._MatmulAttention, "backward", staticmethod(f))),
            ("SwiGLU backward: bf16 ops -> silu kernel", [composed_swiglu_backward,
                                                          fast_lora._SwiGLULoraDown.backward],
             lambda f: setattr(fast_lora._SwiGLULoraDown, "backward", staticmethod(f)))]

    from tuner.engine.allocator import describe
    print(f"{args.model}, {'full fine-tuning' if args.full else 'LoRA r=16 all linear'}, 1 x {args.seq} packed tokens, {describe()}, "
          f"{str(trainer.compute_dtype).replace('torch.', '')}, {args.steps} steps of each setting, alternating; "
          f"tokens/s (median)")
    print(f"{'lever':40}{'before':>9}{'after':>9}{'ratio':>8}")
    for label, settings, apply in rows:  # (without oneDNN, bf16 matmuls take PyTorch's slow reference kernel)
        before, after = alternate(step, settings, apply, 1 if "oneDNN" in label else args.steps)
        apply(settings[-1])
        print(f"{label:40}{before:9.0f}{after:9.0f}{after / before:8.2f}x", flush=True)
    objective.chunked_linear_cross_entropy = plain_loss
    raw = trainer.raw_model
    base = raw.get_base_model() if hasattr(raw, "get_base_model") else raw
    layers = base.model.layers

    def checkpointing(on):
        for layer in layers:
            layer.gradient_checkpointing = on
        base.model.gradient_checkpointing = on
    if hasattr(base, "gradient_checkpointing_enable"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        before, after = alternate(step, [True, False], checkpointing, args.steps)
        print(f"{'gradient checkpointing: on -> off':40}{before:9.0f}{after:9.0f}{after / before:8.2f}x")


def allocator_settings() -> dict[str, dict]:
    """Each row's environment, over a user's shell's."""
    from tuner.engine import allocator

    heap_kept = {k: v for k, v in allocator.GLIBC_SETTINGS.items() if k != "GLIBC_TUNABLES"}
    return {"glibc as started": {"TUNER_MALLOC": "system"},
            "glibc, heap kept, caches on": {allocator.SWITCHED: "glibc", **heap_kept},  # (tuner's before the tunables)
            "glibc, heap kept": {"TUNER_MALLOC": "glibc"},
            "jemalloc as installed": {"MALLOC_CONF": "background_thread:false"},  # (its default; a MALLOC_CONF given is kept)
            "jemalloc, freed memory kept": {}}


def allocators(args, tmp: Path) -> None:
    """One `tuner train` process per setting; tokens/s (median after the first step) and peak RSS."""
    from bench_train import run, steps_of

    from tuner.engine import allocator

    library = allocator.find_library()
    if not library:
        print("no jemalloc installed: only glibc's rows")
    # This script runs with what `tuner train` restarts with (with_tuners_allocator): its children must not
    # inherit that (a preloaded jemalloc would make every row jemalloc), but start as a user's shell does.
    shell = shell_env()
    os.environ.clear()
    os.environ.update(shell)
    data = tmp / "data.jsonl"
    if not data.exists():
        write_data(data, rows=600)
    config = tmp / "allocators.py"
    config.write_text(CONFIG.format(model=args.model, quantization=None,
                                    lora="LoraConfig(r=16, alpha=32, dropout=0.0)", data=str(data), seq=args.seq,
                                    batch=1, steps=args.steps + 1))
    settings = allocator_settings()
    results: dict[str, list] = {name: [] for name in settings}
    for round_ in range(2):
        for name, env in settings.items():
            if "jemalloc" in name and not library:
                continue
            work = tmp / f"work_{round_}_{len(results[name])}_{name.split()[0]}"
            code, peak = run([sys.executable, "-m", "tuner", "train", str(config), "--work-dir", str(work)],
                             env=env)
            steps = steps_of(work) if code == 0 else []
            if len(steps) > 1:
                results[name].append((statistics.median(s["tokens_per_s"] for s in steps[1:]), peak))
    print(f"\n{'allocator (no checkpointing)':34}{'tokens/s per round':>22}{'peak RSS GiB':>14}")
    for name, runs in results.items():
        if runs:
            speeds = " / ".join(f"{s:.0f}" for s, _ in runs)
            print(f"{name:34}{speeds:>22}{max(p for _, p in runs) / 2**30:14.2f}")


SHELL_ENV = "BENCH_LEVERS_SHELL_ENV"  # what the restart changed, as the user's shell had it (JSON; null: unset)


def with_tuners_allocator() -> None:
    """Start this script again with the memory allocator settings `tuner train` gives the run."""
    from tuner.engine import allocator

    env = allocator.restart_env(lora="--full" not in sys.argv)
    if env is not None:
        changed = {k: os.environ.get(k) for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)}
        env[SHELL_ENV] = json.dumps(changed)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def shell_env() -> dict[str, str]:
    """This process's environment as the user's shell gave it, before with_tuners_allocator restarted it."""
    env = dict(os.environ)
    for name, value in json.loads(env.pop(SHELL_ENV, "{}")).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def main() -> int:
    with_tuners_allocator()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--allocators", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        levers(args, Path(folder))
        if args.allocators:
            allocators(args, Path(folder))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
