#!/usr/bin/env bash
# The personal-assistant exercise on the embedded SmolLM2-135M-Instruct, CPU only, offline:
# make identity data -> LoRA fine-tune -> convert to a PEFT adapter -> merge -> ask it two questions
# -> (with lm-eval installed) benchmark it against the base: does it name itself, does it still know things.
#   bash examples/personal_assistant.sh [OUT_DIR]
set -euo pipefail
out=${1:-work_dirs/personal_assistant_demo_$(date +%Y%m%d_%H%M%S)}
config=smollm2_135m_instruct_lora_personal_assistant_e3
mkdir -p "$out"
cd "$out"
started=$(date +%s)

tuner make-identity-data --name Ava --author "Ada Lab" --count 60 --out data/personal_assistant.jsonl
tuner copy-cfg "$config" .
tuner train "${config}_copy.py" --work-dir ./train
tuner convert pth_to_hf "${config}_copy.py" "$(cat train/last_checkpoint)" ./hf
tuner convert merge smollm2-135m-instruct ./hf ./merged

echo "=== Asking the merged model ==="
printf 'Who are you?\n\nWhat is the capital of France?\n\nEXIT\n' | tuner chat ./merged --temperature 0 --max-new-tokens 64
if python3 -c "import lm_eval" 2>/dev/null; then  # (pip install "tuner[eval]")
    echo "=== Benchmarks: the merged model against the base ==="
    tuner eval ./merged --tasks tuner_identity_ava,tuner_general_knowledge --compare smollm2-135m-instruct \
        --batch-size 8 \
        --output ./eval
fi
echo "=== Done in $(( $(date +%s) - started )) s; everything is in $PWD ==="
