#!/usr/bin/env bash
# ORPO on the embedded SmolLM2-135M-Instruct's own answers, CPU only, offline: afterwards its greedy
# answers end with "Signed, Tuner." (measured: 6 of 6 held-out questions; the base: none).
# own answers -> pairs (signed / as written) -> ORPO (LoRA) -> adapter -> ask it held-out questions.
#   bash examples/orpo_signoff.sh [OUT_DIR]          (about 8 minutes on 2 cores)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-work_dirs/orpo_signoff_demo_$(date +%Y%m%d_%H%M%S)}
config=smollm2_135m_instruct_lora_orpo_signoff_e2
mkdir -p "$out"
cd "$out"
started=$(date +%s)

python "$here/make_signoff_pairs.py" --out data/signoff --on-policy     # the model's own greedy answers
tuner train "$config" --work-dir ./train --cfg-options data.path=data/signoff_train.jsonl "evaluate.inputs=[]"
tuner convert pth_to_hf "$config" "$(cat train/last_checkpoint)" ./adapter --cfg-options data.path=data/signoff_train.jsonl
echo "=== Asking it questions it was not trained on ==="
python - <<'PY' > questions.txt
import json
questions = [json.loads(line)["prompt"][-1]["content"] for line in open("data/signoff_test.jsonl")][:6]
print("\n\nRESET\n\n".join(questions) + "\n\nEXIT")
PY
tuner chat smollm2-135m-instruct --adapter ./adapter --temperature 0 --max-new-tokens 100 < questions.txt
echo "=== Done in $(( $(date +%s) - started )) s; everything is in $PWD ==="
