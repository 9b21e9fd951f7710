#!/usr/bin/env bash
# Replicas on one GPU (issue 19): the bf16 7B-shaped model served as one copy, as two instances in one tritonserver
# (`package --replicas 2 --gpus 0,0 --layout instances`) and as two tritonservers behind nginx (`--layout servers`),
# `trtqwen bench` at each LEVELS; one line per level in $RESULTS/summary.txt as it goes.
# Runs on the lent GPU machine from the repository root with gpu_suite.sh's bundle (bench/.wheels, bench/.serve,
# including bench/.serve/nginx: Debian's nginx binary). Usage: bash bench/replicas_gpu.sh
#   env: WORK, RESULTS, LEVELS (default "32 64"), DURATION (s per level, 15), LAYOUTS (default "one instances servers")
set -euo pipefail
WORK=${WORK:-/tmp/trtqwen-gpu} RESULTS=${RESULTS:-${OUT:-bench-results}/replicas}
mkdir -p "$RESULTS"
PRECISIONS=bf16 WORK=$WORK RESULTS=$RESULTS bash bench/gpu_suite.sh build 2>&1 | tail -3
PRECISIONS=bf16 WORK=$WORK RESULTS=$RESULTS bash bench/gpu_suite.sh served-setup 2>&1 | tail -3
export PATH="$PWD/bench/.serve/nginx:$PATH" LD_LIBRARY_PATH="$PWD/bench/.serve/nginx:${LD_LIBRARY_PATH:-}"
export TRTQWEN_TRITONSERVER="$WORK/tritonserver" PYTHONPATH="$WORK/site:$PWD" HF_HUB_OFFLINE=1
TRT="$WORK/venv-serve/bin/python -m trtqwen.cli"
for layout in ${LAYOUTS:-one instances servers}; do
  case $layout in
    one) opts="--replicas 1" ;;
    *) opts="--replicas 2 --gpus 0,0 --layout $layout" ;;
  esac
  # two copies share the GPU: each takes 0.4 of the memory free after its weights (all three rows alike)
  $TRT package "$WORK/build-bf16" --out "$WORK/repo-$layout" --runtime torch --max-batch-size 64 \
    --kv-cache-free-gpu-mem-fraction 0.4 $opts --force | tail -1
  $TRT serve "$WORK/repo-$layout" --background --timeout 600 | tail -4
  for c in ${LEVELS:-32 64}; do
    $TRT bench --model ensemble --concurrency "$c" --input-len 128 --output-len 128 --duration "${DURATION:-15}" \
      --tokenizer "$WORK/build-bf16/tokenizer" --out "$RESULTS/$layout-c$c" 2>&1 | tail -1 || true
    python3 -c "import json,sys; l=json.load(open(sys.argv[1]))['levels'][0]; print(sys.argv[2], sys.argv[3], {k: l[k] for k in (\"total_tok_s\", \"requests\", \"errors\", \"user_tok_s\", \"ttft_s\")})" \
      "$RESULTS/$layout-c$c/bench.json" "$layout" "$c" | tee -a "$RESULTS/summary.txt" || true
  done
  $TRT serve "$WORK/repo-$layout" --stop | tail -1
done
