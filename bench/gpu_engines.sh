#!/usr/bin/env bash
# Each accelerate engine config (FSDP, ZeRO-2, ZeRO-3) runs a few steps of SFT -> DPO -> UPO of the tiny recipe on one
# GPU, through `posttrain run` as a user runs it; every stage's adapter is verified by the stage itself (non-empty,
# every LoRA tensor present and non-zero, reloads equal to the gathered trained weights) or the stage fails. UPO also
# runs with vLLM in colocate mode when vLLM is installed.
#
#   bench/gpu_engines.sh [OUT_DIR]      # default: outputs/gpu-engines; writes OUT_DIR/engines.md and engines.json
#
# Called by bench/gpu.sh; runs alone too. Needs CUDA; ZeRO needs `pip install deepspeed`. Nothing here is claimed in
# the README until a run of this script says it passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-outputs/gpu-engines}"
mkdir -p "$OUT"
RESULTS="$OUT/engines.jsonl"
PYTHON=${PYTHON:-python3}  # the GPU machine has python3 only
: > "$RESULTS"
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_engines: no CUDA device; nothing run" | tee "$OUT/engines.md"
  exit 0
fi
STEPS="stages.sft.max_steps=3 stages.dpo.max_steps=3 stages.upo.max_steps=2 eval.limit=4"

record() {  # engine, variant, exit code, run folder
  "$PYTHON" - "$@" >> "$RESULTS" <<'PY'
import json, sys
from pathlib import Path
engine, variant, code, run = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
stages = {}
for stage in ("sft", "dpo", "upo"):
    metrics = run / stage / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        stages[stage] = {"status": "passed", "wall_time_s": m["wall_time_s"], "world_size": m["world_size"],
                         "adapter_tensors": m["adapter"].get("adapter_tensors"),
                         "reloads_equal": m["adapter"].get("reloads_equal")}
    else:
        stages[stage] = {"status": "failed" if code else "not run"}
print(json.dumps({"engine": engine, "variant": variant, "exit_code": code, "stages": stages}))
PY
}

run_engine() {  # engine, variant, extra overrides...
  local engine="$1" variant="$2"; shift 2
  local name="engine-${engine}-${variant}"
  echo "== $engine ($variant)"
  "$PYTHON" -m posttrain run recipes/tiny/text.yaml "name=$name" $STEPS "$@" \
      --accelerate-config "recipes/accelerate/${engine}.yaml" --num-processes 1 --output-dir "$OUT" \
      > "$OUT/$name.log" 2>&1
  local code=$?
  record "$engine" "$variant" "$code" "$OUT/$name"
  tail -n 3 "$OUT/$name.log"
}

for engine in fsdp zero2 zero3; do
  if [[ "$engine" == zero* ]] && ! "$PYTHON" -c "import deepspeed" 2>/dev/null; then
    echo "{\"engine\": \"$engine\", \"variant\": \"hf\", \"skipped\": \"deepspeed not installed\"}" >> "$RESULTS"
    continue
  fi
  run_engine "$engine" hf
  if "$PYTHON" -c "import vllm" 2>/dev/null; then
    run_engine "$engine" vllm-colocate stages.upo.use_vllm=true stages.upo.vllm_mode=colocate
  fi
done

"$PYTHON" - "$RESULTS" > "$OUT/engines.md" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("| engine | variant | sft | dpo | upo | adapter tensors |\n|---|---|---|---|---|---|")
for r in rows:
    if "skipped" in r:
        print(f"| {r['engine']} | {r['variant']} | skipped: {r['skipped']} | | | |")
        continue
    s = r["stages"]
    print(f"| {r['engine']} | {r['variant']} | " + " | ".join(s[k]["status"] for k in ("sft", "dpo", "upo"))
          + f" | {', '.join(str(s[k].get('adapter_tensors')) for k in ('sft', 'dpo', 'upo'))} |")
PY
cat "$OUT/engines.md"
