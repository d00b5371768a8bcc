"""LLaVA step times and the synthetic colour task, measured in one run.

    python tools/bench_llava.py [--steps 6]

Part 1, tiny towers (CLIP 32 px / 16 tokens per image, a 2-layer LLM), the synthetic task
of the tests (name the colour of a shape; only the image tells): pretrain (projector only),
then finetune (projector + the whole LLM); prints the median step time of each stage and
the held-out accuracy of the pretrained and the finetuned model.
Part 2, the embedded SmolLM2-135M-Instruct with a CLIP ViT-B/16-sized tower (224 px, 196
tokens per image; random weights, as no encoder can be downloaded here, which does not
change the time): pretrain and LoRA-finetune step time at 2 x 1024 packed tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_llava import accuracy, colour_rows  # noqa: E402  (the tests' synthetic task)

from tuner.config import load_config  # noqa: E402
from tuner.convert.hf import pth_to_hf  # noqa: E402
from tuner.engine.loop import Trainer  # noqa: E402
from tuner.model.load import load_tokenizer  # noqa: E402


def towers(root: Path, llm: str | None, image_size: int, patch: int, width: int, layers: int) -> tuple[str, str]:
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                              num_attention_heads=max(2, width // 64), image_size=image_size, patch_size=patch)
    CLIPVisionModel(config).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(root / "clip")
    if llm is None:
        tokenizer = load_tokenizer("smollm2-135m-instruct")
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     tie_word_embeddings=True, initializer_range=0.5)).save_pretrained(root / "llm")
        tokenizer.save_pretrained(root / "llm")
        llm = str(root / "llm")
    return llm, str(root / "clip")


def config(root: Path, name: str, llm: str, clip: str, data: Path, *, pretrain: bool, lora: bool, max_length: int,
           batch: int, epochs: int, pretrained: str | None = None) -> Path:
    path = root / f"{name}.py"
    path.write_text(textwrap.dedent(f"""\
        from tuner.config import *
        model = ModelConfig(path={llm!r})
        lora = {"LoraConfig(r=64, alpha=16, dropout=0.0)" if lora else "None"}
        llava = LlavaConfig(visual_encoder={clip!r}, freeze_llm={pretrain}, pretrained_pth={pretrained!r})
        data = DataConfig(path={str(data)!r}, max_length={max_length}, pack=True)
        optim = OptimConfig(lr=1e-2)
        train = TrainConfig(batch_size={batch}, accumulative_counts=1, max_epochs={epochs}, warmup_ratio=0.0)
        checkpoint = CheckpointConfig(save_steps=100000)
        evaluate = EvaluateConfig(inputs=[])
        """))
    return path


def run(path: Path, work: Path, steps: int | None = None) -> tuple[Trainer, list[float], float]:
    """Train; returns the trainer, the losses and the median step time after the first step."""
    options = [f"train.max_steps={steps}"] if steps else []
    trainer = Trainer(load_config(path, options), work_dir=work)
    times = []
    trainer.cfg.custom_hooks.append(lambda _, step, metrics: times.append(metrics["step_time"]))
    losses = trainer.train()
    return trainer, losses, statistics.median(times[1:] or times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per stage in part 2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
        llm, clip = towers(root / "tiny", None, 32, 8, 32, 2)
        data = root / "tiny" / "train.json"
        data.write_text(json.dumps(colour_rows(root / "tiny", 64, seed=1, text_only=8)))
        held_out = colour_rows(root / "tiny", 24, seed=2)
        pre = config(root, "tiny_pre", llm, clip, data, pretrain=True, lora=False, max_length=256, batch=4, epochs=8)
        trainer, losses, pre_time = run(pre, root / "tiny_pre")
        last = root / "tiny_pre" / f"iter_{len(losses)}.pth"
        pth_to_hf(trainer.cfg, last, root / "tiny_pre_hf", save_format="hf")
        fine = config(root, "tiny_fine", llm, clip, data, pretrain=False, lora=False, max_length=256, batch=4,
                      epochs=20, pretrained=str(last))
        trainer, fine_losses, fine_time = run(fine, root / "tiny_fine")
        pth_to_hf(trainer.cfg, root / "tiny_fine" / f"iter_{len(fine_losses)}.pth", root / "tiny_fine_hf",
                  save_format="hf")
        before = accuracy(str(root / "tiny_pre_hf"), held_out, root / "tiny")
        after = accuracy(str(root / "tiny_fine_hf"), held_out, root / "tiny")
        print("Tiny towers, 4 x 256 packed tokens (16 per image), fp32 weights:")
        print(f"  pretrain  {pre_time * 1000:7.0f} ms/step  loss {losses[0]:.2f} -> {losses[-1]:.2f}")
        print(f"  finetune  {fine_time * 1000:7.0f} ms/step  loss {fine_losses[0]:.2f} -> {fine_losses[-1]:.4f}")
        print(f"  held-out colour accuracy ({len(held_out)} images): after pretrain {before:.0%}, "
              f"after finetune {after:.0%}\n", flush=True)

        llm, clip = towers(root / "base", "smollm2-135m-instruct", 224, 16, 768, 12)
        data = root / "base" / "train.json"
        data.write_text(json.dumps(colour_rows(root / "base", 64, seed=1)))
        pre = config(root, "base_pre", llm, clip, data, pretrain=True, lora=False, max_length=1024, batch=2, epochs=9)
        _, _, base_pre = run(pre, root / "base_pre", args.steps)
        fine = config(root, "base_fine", llm, clip, data, pretrain=False, lora=True, max_length=1024, batch=2,
                      epochs=9)
        trainer, _, base_fine = run(fine, root / "base_fine", args.steps)
        print("SmolLM2-135M-Instruct + CLIP ViT-B/16 size (86M), 2 x 1024 packed tokens (196 per image), "
              f"compute {str(trainer.compute_dtype).replace('torch.', '')}:")
        print(f"  pretrain (projector)         {base_pre:6.2f} s/step")
        print(f"  finetune (projector + LoRA)  {base_fine:6.2f} s/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
