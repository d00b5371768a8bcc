#!/usr/bin/env bash
# DPO on the embedded SmolLM2-135M-Instruct, CPU only, offline: afterwards its own greedy answers end
# with "Signed, Tuner." (measured: 36 of 40 held-out questions; the base: none).
# its own short answers -> pairs (signed / as written) -> score the base -> DPO with the chosen answer's
# NLL (LoRA) -> adapter -> score again -> ask it held-out questions.
#   bash examples/dpo_signoff.sh [OUT_DIR]          (about 5 minutes on 2 cores)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-work_dirs/dpo_signoff_demo_$(date +%Y%m%d_%H%M%S)}
config=smollm2_135m_instruct_lora_dpo_signoff_e2
system="Answer in one short sentence."
options=(data.path=data/signoff_train.jsonl preference.sft_weight=1.0 optim.lr=5e-4 train.max_epochs=1)
mkdir -p "$out"
cd "$out"
started=$(date +%s)

python "$here/make_signoff_pairs.py" --out data/signoff --on-policy --system "$system" --max-new-tokens 48
echo "=== The base model on the held-out pairs ==="
tuner score smollm2-135m-instruct --data data/signoff_test.jsonl
tuner train "$config" --work-dir ./train --cfg-options "${options[@]}" "evaluate.inputs=[]"
tuner convert pth_to_hf "$config" "$(cat train/last_checkpoint)" ./adapter --cfg-options "${options[@]}"
echo "=== After DPO, on the same held-out pairs ==="
tuner score smollm2-135m-instruct --adapter ./adapter --data data/signoff_test.jsonl
echo "=== Asking it questions it was not trained on ==="
python - <<'PY' > questions.txt
import json
questions = [json.loads(line)["prompt"][-1]["content"] for line in open("data/signoff_test.jsonl")][:6]
print("\n\nRESET\n\n".join(questions) + "\n\nEXIT")
PY
tuner chat smollm2-135m-instruct --adapter ./adapter --system "$system" --temperature 0 --max-new-tokens 64 \
    < questions.txt
echo "=== Done in $(( $(date +%s) - started )) s; everything is in $PWD ==="
