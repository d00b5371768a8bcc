#!/usr/bin/env bash
# What only a GPU can show, as one table, in under 8 minutes on one GPU (tools/gpu_check.py says
# what each check compares). Installs flash-attn when it is missing, then runs every check.
#   bash tools/gpu_check.sh            # prints the table; exit code = number of failed checks
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import flash_attn" 2>/dev/null || pip install -q flash-attn --no-build-isolation 2>/dev/null || \
    echo "[gpu_check] flash-attn not installed: the FlashAttention checks will say skipped"
timeout 480 python tools/gpu_check.py "$@"
