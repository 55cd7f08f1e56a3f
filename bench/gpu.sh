#!/usr/bin/env bash
# posttrain bench on a GPU machine: plain TRL vs posttrain for SFT, DPO and UPO on a Qwen2.5-1.5B-shaped model with
# random weights (no Hub), in under 8 minutes; then the ZeRO/FSDP engine runs of bench/gpu_engines.sh when present.
#
#   bench/gpu.sh [OUT_DIR [BENCH_FLAGS...]]   # OUT_DIR defaults to $OUT (e.g. a job runner's output folder), else
#                                             # outputs/gpu; BENCH_FLAGS override the bench's (e.g. --repeats 2)
#   ENGINES=0 bench/gpu.sh ...                # the bench only
#
# If the bench is cut short (BENCH_TIMEOUT, default 480 s), the runs it finished are copied to OUT_DIR instead
# (*.runs.json; `posttrain bench --from-runs OUT_DIR --out OUT_DIR/bench.json` makes their table).
#
# The GPU machine lacks trl, datasets and liger-kernel and cannot reach a registry: they come as wheels carried in
# the tree (WHEELS, default .whl/; fill it once on a connected machine with
#   ../shared/gpu/fetch-wheels.sh .whl transformers==5.23.0 peft==0.21.2
# and carry `.whl` to the device). They are installed into /tmp/site, never over the machine's own packages, and
# posttrain itself runs from the tree through PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-outputs/gpu}}
shift || true
wheels=${WHEELS:-.whl}
mkdir -p "$out"
if compgen -G "$wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no wheels in $wheels: using the installed trl/datasets (see the comment at the top)" >&2
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } \
  | tee "$out/gpu.txt"
python3 - <<'PY' | tee -a "$out/gpu.txt"
import importlib.metadata as m
for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "liger-kernel", "pyarrow", "triton"):
    try:
        print(name, m.version(name), end="  ")
    except m.PackageNotFoundError:
        print(name, "absent", end="  ")
print()
PY

# The README's table: SFT/DPO 10 steps x 3 repeats x 3 columns, GRPO/UPO 3 steps x 5 runs, batch 32. On one H200
# (2026-12-04) 4 min 53 s with the model built, before each column got its own warm-up step (about a minute more)
work=/tmp/posttrain-bench
rm -f "$work"/*.runs.json "$out"/*.runs.json "$out/bench.json"  # an earlier bench's (the model and data stay cached)
code=0
timeout "${BENCH_TIMEOUT:-480}" python3 -m posttrain bench --model shape:qwen2.5-1.5b --steps 10 --repeats 3 \
  --rl-steps 3 --rl-repeats 1 --batch-size 32 --max-length 512 --num-generations 8 --max-completion-length 128 \
  --work "$work" --out "$out/bench.json" "$@" 2>&1 | tee "$out/bench.log" || code=$?
# cut short: the runs that finished (otherwise bench.json holds them all)
[[ -f "$out/bench.json" ]] || cp "$work"/*.runs.json "$out"/ 2>/dev/null || true

if [[ "${ENGINES:-1}" != 0 && -x bench/gpu_engines.sh ]]; then
  bench/gpu_engines.sh /tmp/posttrain-engines || code=$?
  cp /tmp/posttrain-engines/engines.md /tmp/posttrain-engines/engines.jsonl "$out"/ 2>/dev/null || true
fi
exit "$code"
