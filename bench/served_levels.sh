#!/usr/bin/env bash
# One served repository swept level by level, the python models' counters copied after each level (the breakdown of
# docs/PERFORMANCE.md §7; `python bench/gpu_table.py <dir above OUT>` prints it; OUT's name must start with served-).
# Usage: bash bench/served_levels.sh REPO TOKENIZER_DIR OUT
#   env: TRT (the trtqwen command, default trtqwen), LEVELS (default "1 8 32 64"), DURATION (s per level, 15),
#        INPUT_LEN, OUTPUT_LEN (tokens, 128 each)
set -euo pipefail
repo=$1 tok=$2 out=$3
TRT=${TRT:-trtqwen}
prof="$out/.profile"
rm -rf "$prof" && mkdir -p "$prof"
$TRT serve "$repo" --stop >/dev/null 2>&1 || true
TRTQWEN_PROFILE_DIR=$prof $TRT serve "$repo" --background --timeout 600 --log "$out/server.log"
for c in ${LEVELS:-1 8 32 64}; do
  # a failed plot (bench.png, written last) does not lose the level: bench.json is what the tables read
  $TRT bench --model ensemble --concurrency "$c" --input-len "${INPUT_LEN:-128}" --output-len "${OUTPUT_LEN:-128}" \
    --duration "${DURATION:-15}" --tokenizer "$tok" --out "$out/c$c" 2>&1 | tail -2 || [ -f "$out/c$c/bench.json" ]
  sleep 0.5  # the sender rewrites its counters every 0.25 s
  cp "$prof"/*.json "$out/c$c/"
done
$TRT serve "$repo" --stop
