#!/usr/bin/env bash
# A calculator agent from the embedded SmolLM2-135M-Instruct, CPU only, offline:
# make tool-call data -> LoRA fine-tune -> convert -> merge -> chat with the calculate plugin
# on questions that are not in the data.
#   bash examples/calculator_agent.sh [OUT_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-work_dirs/calculator_agent_demo_$(date +%Y%m%d_%H%M%S)}
config=smollm2_135m_instruct_lora_personal_assistant_e3
mkdir -p "$out"
cd "$out"
started=$(date +%s)

python "$here/make_calculator_data.py" data/calculator.jsonl --count 120
tuner copy-cfg "$config" .
tuner train "${config}_copy.py" --work-dir ./train --cfg-options data.path=data/calculator.jsonl \
    train.max_epochs=1 "evaluate.inputs=[]"
tuner convert pth_to_hf "${config}_copy.py" "$(cat train/last_checkpoint)" ./hf
tuner convert merge smollm2-135m-instruct ./hf ./merged

echo "=== Asking the merged model, with the calculator ==="
printf 'What is 417 times 23?\n\nHow much is 9081 minus 4567?\n\nHi!\n\nEXIT\n' |
    tuner chat ./merged --with-plugins calculate --temperature 0 --max-new-tokens 80
echo "=== Done in $(( $(date +%s) - started )) s; everything is in $PWD ==="
