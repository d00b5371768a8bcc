#!/usr/bin/env bash
# GRPO on the embedded SmolLM2-135M-Instruct, CPU only, offline: afterwards it answers "... Answer with
# one word." questions with one word, as it did not before (it wrote a sentence). The rewards (in the
# config): brevity, 1 / words, and the reference answer. Measured figures: docs/rl.md.
# prompts -> the base model's greedy answers to held-out questions -> GRPO (LoRA) -> adapter -> again.
#   bash examples/grpo_one_word.sh [OUT_DIR]          (about 3 minutes on 2 cores)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-work_dirs/grpo_one_word_demo_$(date +%Y%m%d_%H%M%S)}
config=smollm2_135m_instruct_lora_grpo_one_word
mkdir -p "$out"
cd "$out"
started=$(date +%s)

python "$here/make_one_word_prompts.py" --out data/one_word
echo "=== The base model on the held-out questions ==="
python "$here/eval_one_word.py" data/one_word_test.jsonl
tuner train "$config" --work-dir ./train
tuner convert pth_to_hf "$config" "$(cat train/last_checkpoint)" ./adapter
echo "=== After GRPO, on the same held-out questions ==="
python "$here/eval_one_word.py" data/one_word_test.jsonl --adapter ./adapter
echo "=== Done in $(( $(date +%s) - started )) s; everything is in $PWD ==="
