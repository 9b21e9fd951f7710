#!/usr/bin/env bash
# One served repository swept level by level, the python models' counters copied after each level (the breakdown of
# docs/PERFORMANCE.md §7; `python bench/gpu_table.py <dir above OUT>` prints it; OUT's name must start with served-).
# The torch runtime's tensorrt_llm model runs its engine in a process of its own (pyzmq, started with the serving
# Python): its counters are the receiving side's (engine step wall per step message, the hand-off, detok, send).
# Usage: bash bench/served_levels.sh REPO TOKENIZER_DIR OUT
#   env: TRT (the trtqwen command, default trtqwen), LEVELS (default "1 8 32 64"), DURATION (s per level, 15),
#        INPUT_LEN, OUTPUT_LEN (tokens, 128 each), OPENAI (set: the levels again through `trtqwen openai`)
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
if [ -n "${OPENAI:-}" ]; then  # the same levels through the OpenAI-compatible proxy (what most users call)
  $TRT openai --url 127.0.0.1:8001 --port 9000 --tokenizer "$tok" >"$out/openai.log" 2>&1 & oai=$!
  for _ in $(seq 60); do curl -sf http://127.0.0.1:9000/health >/dev/null && break; sleep 0.5; done
  for c in ${LEVELS:-1 8 32 64}; do
    $TRT bench --openai http://127.0.0.1:9000 --concurrency "$c" --input-len "${INPUT_LEN:-128}" \
      --output-len "${OUTPUT_LEN:-128}" --duration "${DURATION:-15}" --tokenizer "$tok" --out "$out/openai-c$c" 2>&1 \
      | tail -2 || [ -f "$out/openai-c$c/bench.json" ]
  done
  kill $oai
fi
$TRT serve "$repo" --stop
# The model's engine process (trtqwen/runtime/engine/core.py) dies with its stub; the next repository's engine sizes
# its KV cache from the GPU memory left free, so wait until this repository's (its checkpoint in the command) is gone.
ckpt=$(sed -n 's/.*string_value: "\(.*\/checkpoint[^"]*\)".*/\1/p' "$repo"/tensorrt_llm/config.pbtxt 2>/dev/null | head -1)
engine="trtqwen.runtime.engine.core .*$ckpt"
for _ in $(seq 60); do pgrep -f -- "$engine" >/dev/null || break; sleep 0.5; done
if pgrep -f -- "$engine" >/dev/null; then
  echo "warning: an engine process outlived the server: $(pgrep -af -- "$engine" | cut -c1-160)" >&2
fi
