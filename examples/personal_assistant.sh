#!/usr/bin/env bash
# The personal-assistant exercise on the embedded SmolLM2-135M-Instruct, CPU only, offline:
# make identity data -> LoRA fine-tune -> convert to a PEFT adapter -> merge -> ask it three questions
# -> (with lm-eval installed) benchmark it against the base: does it name itself, does it still know things
# -> write it as GGUF files (f16, q8_0) and, with node-llama-cpp installed, ask llama.cpp the same questions.
#   bash examples/personal_assistant.sh [OUT_DIR]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
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
printf 'Who are you?\n\nWhat is the capital of France?\n\nWrite a haiku about the sea.\n\nEXIT\n' |
    tuner chat ./merged --temperature 0 --max-new-tokens 64
if python3 -c "import lm_eval" 2>/dev/null; then  # (pip install "tuner[eval]")
    echo "=== Benchmarks: the merged model against the base ==="
    tuner eval ./merged --tasks tuner_identity_ava,tuner_general_knowledge --compare smollm2-135m-instruct \
        --batch-size 8 \
        --output ./eval
fi
echo "=== For llama.cpp, Ollama, LM Studio: GGUF files ==="
tuner convert gguf ./merged ./ava.gguf                      # f16, and ava.Modelfile for: ollama create ava -f ava.Modelfile
tuner convert gguf ./merged ./ava-q8_0.gguf --outtype q8_0
if command -v node >/dev/null && node -e 'require.resolve("node-llama-cpp")' 2>/dev/null; then  # (npm install node-llama-cpp)
    echo "=== Asking the GGUF files with llama.cpp (node-llama-cpp) ==="
    node "$here/ask_gguf.mjs" ./ava.gguf 'Who are you?' 'What is the capital of France?' 'Write a haiku about the sea.'
    node "$here/ask_gguf.mjs" ./ava-q8_0.gguf 'Who are you?'
fi
echo "=== Done in $(( $(date +%s) - started )) s; everything is in $PWD ==="
