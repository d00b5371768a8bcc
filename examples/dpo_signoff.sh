#!/usr/bin/env bash
# DPO on the embedded SmolLM2-135M-Instruct, CPU only, offline: it learns to sign its answers
# "Signed, Tuner." (which it does not prefer to begin with).
# make pairs -> score the base on held-out pairs -> DPO (LoRA) -> adapter -> score again -> ask it.
#   bash examples/dpo_signoff.sh [OUT_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-work_dirs/dpo_signoff_demo_$(date +%Y%m%d_%H%M%S)}
config=smollm2_135m_instruct_lora_dpo_signoff_e2
mkdir -p "$out"
cd "$out"
started=$(date +%s)

python "$here/make_signoff_pairs.py" --out data/signoff
echo "=== The base model on the held-out pairs ==="
tuner score smollm2-135m-instruct --data data/signoff_test.jsonl
tuner copy-cfg "$config" .
tuner train "${config}_copy.py" --work-dir ./train
tuner convert pth_to_hf "${config}_copy.py" "$(cat train/last_checkpoint)" ./adapter
echo "=== After DPO, on the same held-out pairs ==="
tuner score smollm2-135m-instruct --adapter ./adapter --data data/signoff_test.jsonl
echo "=== Asking it ==="
printf 'What is the capital of Sweden?\n\nWhat is 17 plus 25?\n\nEXIT\n' | \
    tuner chat smollm2-135m-instruct --adapter ./adapter --temperature 0 --max-new-tokens 32
echo "=== Done in $(( $(date +%s) - started )) s; everything is in $PWD ==="
