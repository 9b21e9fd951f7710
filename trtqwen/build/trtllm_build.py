"""The engine stage: `trtllm-build` (TensorRT-LLM 1.2.x) from the spec. The one module that touches TensorRT-LLM.

Everything here is a pure function of the spec except `trtllm_versions` and `run_engine_build`, which look for
TensorRT-LLM and an NVIDIA GPU; where either is missing the build stops after the checkpoint and leaves `build.sh`
for the 4090D box. The flag set is checked against tests/data/trtllm_build_flags.json (read from TensorRT-LLM's
tensorrt_llm/commands/build.py and tensorrt_llm/plugin/plugin.py, 1.2.x).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from trtqwen.errors import UserError
from trtqwen.build.hardware import compute_capability
from trtqwen.build.spec import BuildSpec, KvDtype, Precision, check_spec
from trtqwen.checkpoint import read_checkpoint
from trtqwen.versions import package_version

TRTLLM_VERSION = "1.2.1"
TRTLLM_SERIES = "1.2."  # every 1.2.x has the same trtllm-build flags; engines still need the exact version to serve
# NVIDIA's NGC release image of TensorRT-LLM 1.2.1 (TensorRT 10.14.1, CUDA 13.1; multi-arch since 1.2.1).
# Build and serve with this same image: engines only load in the TensorRT(-LLM) that built them (FACTS §4).
TRTLLM_IMAGE = f"nvcr.io/nvidia/tensorrt-llm/release:{TRTLLM_VERSION}"
MIN_DRIVER = 580  # CUDA 13 containers on GeForce need host driver R580+ (no forward compatibility on GeForce)
ENGINE_RECORD = "engine_versions.json"  # written into the engine dir; repo/checks.py reads it before serving
BUILD_LOG = "engine_build.log"

# Reports of FP8 KV caches corrupting Qwen2/2.5 output, in TensorRT-LLM and elsewhere.
_KV_FP8_QWEN_ISSUES = "TensorRT-LLM #4218, #2699; QwenLM/Qwen3 #840"


class EngineToolsMissing(UserError):
    """TensorRT-LLM or a GPU is missing: the checkpoint is ready, the engine must be built elsewhere."""


# ── pure: what the build will be ──────────────────────────────────────────────────────────────────────────────


def paged_context_fmha(spec: BuildSpec) -> bool:
    """Whether the engine gets paged context FMHA (needed for chunked context and KV-cache reuse at serve time).

    TensorRT-LLM's builder turns it off for an INT8 KV cache, and for an FP8 KV cache unless the weights are FP8
    ("FP8 Paged Context FMHA only works with fp8 quantization workflow"); the command says so explicitly.
    """
    if spec.kv_cache_dtype is KvDtype.INT8:
        return False
    if spec.kv_cache_dtype is KvDtype.FP8:
        return spec.precision is Precision.FP8
    return True


def fp8_context_fmha(spec: BuildSpec) -> bool:
    """FP8 context attention: only with FP8 weights and an FP8 KV cache (the builder forces it on for that pair)."""
    return spec.precision is Precision.FP8 and spec.kv_cache_dtype is KvDtype.FP8


def engine_features(spec: BuildSpec) -> dict:
    """What the serving side may switch on for this engine (Triton `enable_chunked_context`, `enable_kv_cache_reuse`)."""
    paged = paged_context_fmha(spec)
    return {"paged_context_fmha": paged, "chunked_context": paged, "kv_cache_reuse": paged,
            "fp8_context_fmha": fp8_context_fmha(spec)}


def target_compute_capability(spec: BuildSpec) -> str | None:
    """The compute capability of the GPU profile the spec targets ("8.9" for rtx4090d); None for custom GPUs."""
    from trtqwen.build.hardware import PROFILES

    profile = PROFILES.get(spec.gpu)
    cc = profile.compute_capability if profile else None
    return cc if cc and cc != "?" else None


def build_warnings(spec: BuildSpec) -> list[str]:
    """What a user should know before building this engine: each is a known way for it to disappoint."""
    from trtqwen.build.hardware import PROFILES

    notes = []
    if spec.kv_cache_dtype is KvDtype.FP8:
        notes.append(f"FP8 KV cache on Qwen2/Qwen2.5 is reported to corrupt output ({_KV_FP8_QWEN_ISSUES}): "
                     "check the built engine's accuracy before serving it, or build with a 16-bit KV cache")
    if not paged_context_fmha(spec):
        notes.append(f"{spec.kv_cache_dtype.value.upper()} KV cache with {spec.precision.value} weights turns off paged "
                     "context FMHA: no chunked context and no KV-cache reuse when serving, and every prompt must fit "
                     f"max_num_tokens ({spec.max_num_tokens})")
    profile = PROFILES.get(spec.gpu)
    if spec.tp > 1 and profile is not None and not profile.p2p:
        notes.append(f"TP {spec.tp} on {spec.gpu}: no GPU peer-to-peer, so every all-reduce goes through host memory "
                     "(serve with NCCL_P2P_DISABLE=1); for throughput, TP 1 instances on each card beat one TP "
                     f"{spec.tp} engine")
    return notes


def trtllm_build_command(spec: BuildSpec, checkpoint_dir: Path, engine_dir: Path) -> list[str]:
    """The trtllm-build command line for this spec: TensorRT-LLM 1.2.x flag names only, nothing removed or deprecated."""
    paged = paged_context_fmha(spec)
    if not paged and spec.max_num_tokens < spec.max_input_len:
        raise UserError(
            f"max_num_tokens {spec.max_num_tokens} is below max_input_len {spec.max_input_len}, and a "
            f"{spec.kv_cache_dtype.value} KV cache with {spec.precision.value} weights has no chunked context",
            f"raise --max-num-tokens to at least {spec.max_input_len}, or use a 16-bit KV cache",
        )
    on = {True: "enable", False: "disable"}
    return [
        "trtllm-build",
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(engine_dir),
        "--max_batch_size", str(spec.max_batch_size),
        "--max_input_len", str(spec.max_input_len),  # the runtime refuses longer prompts
        "--max_seq_len", str(spec.max_seq_len),  # prompt + output; sizes the KV cache per sequence
        "--max_num_tokens", str(spec.max_num_tokens),  # tokens per engine step (prefill chunk + decodes)
        "--max_beam_width", "1",  # greedy/sampling only; the Triton config says the same
        "--kv_cache_type", "paged",  # in-flight batching needs the paged cache (--paged_kv_cache is deprecated)
        "--gpt_attention_plugin", "auto",  # fused attention with in-place KV update, in the checkpoint's dtype
        # cuBLASLt plugin for the 16-bit GEMMs (the quantized ones get their own plugins from the checkpoint's
        # quant_algo); NVIDIA's tuning guide: enable for FP16/BF16, disable for FP8 (TensorRT's own FP8 GEMMs).
        "--gemm_plugin", "disable" if spec.precision is Precision.FP8 else "auto",
        "--context_fmha", "enable",  # one fused kernel for prefill attention
        "--use_paged_context_fmha", on[paged],  # chunked context + KV reuse; off for INT8 KV, FP8 KV w/o FP8 weights
        "--use_fp8_context_fmha", on[fp8_context_fmha(spec)],  # 1.x defaults it on; only valid for FP8 + FP8 KV
        "--remove_input_padding", "enable",  # pack requests without padding
        "--tokens_per_block", "32",  # KV block size the planner and the Triton config assume
        "--multiple_profiles", "enable",  # prefill- and decode-shaped TensorRT profiles ("always enable": NVIDIA)
        "--workers", str(spec.tp),  # build the TP ranks in parallel where there are as many GPUs
    ]


def _relative(path: Path, what: str) -> str:
    if Path(path).is_absolute():
        raise ValueError(f"build.sh needs {what} relative to the build directory, got {path}")
    return str(path)


# The record build.sh writes after building: the same keys as engine_record(), from inside the build container.
_RECORD_PY = r"""
import json, sys
from importlib import metadata

def version(dists, module):
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        return __import__(module).__version__
    except Exception:
        return None

import torch
record = {
    "tensorrt_llm": version(["tensorrt_llm", "tensorrt-llm"], "tensorrt_llm"),
    "tensorrt": version(["tensorrt", "tensorrt-cu13", "tensorrt-cu12"], "tensorrt"),
    "cuda": torch.version.cuda,
    "gpu": torch.cuda.get_device_name(0),
    "compute_capability": "%d.%d" % torch.cuda.get_device_capability(0),
}
with open(sys.argv[1], "w") as f:
    json.dump(record, f, indent=2)
print("recorded", json.dumps(record))
"""

# Before building: the right TensorRT-LLM, and a warning when this GPU is not the architecture the build targets.
_PREFLIGHT_PY = r"""
import os, sys
from importlib import metadata
try:
    v = metadata.version("tensorrt_llm")
except metadata.PackageNotFoundError:
    try:
        import tensorrt_llm
        v = tensorrt_llm.__version__
    except ImportError:
        sys.exit("build.sh: TensorRT-LLM is not installed here; run 'bash build.sh' (without --host) to build in "
                 + os.environ["TRTQWEN_IMAGE"])
if not v.startswith(os.environ["TRTQWEN_SERIES"]):
    sys.exit("build.sh: TensorRT-LLM %s found, this build is pinned to %s; run 'bash build.sh' to use %s"
             % (v, os.environ["TRTQWEN_VERSION"], os.environ["TRTQWEN_IMAGE"]))
import torch
if not torch.cuda.is_available():
    sys.exit("build.sh: no CUDA GPU visible; engines are built on the GPU that will serve them")
cc = "%d.%d" % torch.cuda.get_device_capability(0)
want = os.environ.get("TRTQWEN_TARGET_CC")
if want and cc != want:
    print("build.sh: WARNING: this GPU (%s) is sm_%s but the build targets sm_%s: engines built here only load on "
          "sm_%s GPUs" % (torch.cuda.get_device_name(0), cc.replace(".", ""), want.replace(".", ""), cc.replace(".", "")),
          file=sys.stderr)
print("build.sh: TensorRT-LLM %s on %s (sm_%s)" % (v, torch.cuda.get_device_name(0), cc.replace(".", "")))
"""


def build_script(spec: BuildSpec, checkpoint_dir: Path, engine_dir: Path, image: str = TRTLLM_IMAGE) -> str:
    """build.sh for the 4090D box: trtllm-build inside the pinned container (or on the host with --host).

    Paths are relative to the build directory so it can be moved; engines appear under `engine_dir` only complete
    (built into `<engine_dir>.partial`, version-recorded, then renamed).
    """
    ckpt, final = _relative(checkpoint_dir, "the checkpoint"), _relative(engine_dir, "the engine directory")
    partial = f"{final}.partial"
    cmd = trtllm_build_command(spec, Path(ckpt), Path(partial))
    pairs = [cmd[0] + " " + shlex.join(cmd[1:3])] + [shlex.join(cmd[i:i + 2]) for i in range(3, len(cmd), 2)]
    command = " \\\n  ".join(pairs)
    ranks = " ".join(f"rank{r}.engine" for r in range(spec.tp))
    target = target_compute_capability(spec) or ""
    notes = "".join(f"#   - {w}\n" for w in build_warnings(spec))
    notes = f"# Before you build:\n{notes}" if notes else ""
    arch = f"{spec.gpu}, sm_{target.replace('.', '')}" if target else spec.gpu
    q = shlex.quote
    return f"""#!/usr/bin/env bash
# trtqwen: TensorRT engines for {spec.model} ({spec.precision.value}, KV {spec.kv_cache_dtype.value}, TP {spec.tp}).
# Build on the GPU that will serve them ({arch}): an engine only
# loads on the GPU architecture, TensorRT and TensorRT-LLM it was built with. Serve it with the same image.
#   bash build.sh           build inside {image} (docker + NVIDIA Container Toolkit, driver R{MIN_DRIVER}+)
#   bash build.sh --host    build with this machine's own TensorRT-LLM {TRTLLM_SERIES}x
{notes}set -euo pipefail
cd "$(dirname "$0")"
IMAGE={q(image)}
CHECKPOINT={q(ckpt)}
ENGINE={q(final)}
PARTIAL={q(partial)}
LOG={BUILD_LOG}

if [ "${{1:-}}" != "--host" ]; then
  if ! command -v docker >/dev/null 2>&1; then
    echo "build.sh: docker not found: install docker and the NVIDIA Container Toolkit, or run 'bash build.sh --host' where TensorRT-LLM {TRTLLM_VERSION} is installed" >&2
    exit 1
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -n 1)"
    if [ "${{driver%%.*}}" -lt {MIN_DRIVER} ] 2>/dev/null; then
      echo "build.sh: NVIDIA driver $driver is too old for $IMAGE (CUDA 13): install driver R{MIN_DRIVER} or newer" >&2
      exit 1
    fi
  fi
  exec docker run --rm --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \\
    -e HOST_UID="$(id -u)" -e HOST_GID="$(id -g)" \\
    -v "$PWD":/build -w /build "$IMAGE" bash build.sh --host
fi

[ -f "$CHECKPOINT/config.json" ] || {{ echo "build.sh: no TensorRT-LLM checkpoint at $PWD/$CHECKPOINT" >&2; exit 1; }}
TRTQWEN_IMAGE="$IMAGE" TRTQWEN_VERSION={TRTLLM_VERSION} TRTQWEN_SERIES={TRTLLM_SERIES} TRTQWEN_TARGET_CC={q(target)} \\
  python3 - <<'PY'
{_PREFLIGHT_PY.strip()}
PY

cleanup() {{
  rm -rf "$PARTIAL"
  if [ -n "${{HOST_UID:-}}" ]; then chown -R "$HOST_UID:${{HOST_GID:-$HOST_UID}}" "$LOG" "$ENGINE" 2>/dev/null || true; fi
}}
trap cleanup EXIT
rm -rf "$PARTIAL"

{command} \\
  2>&1 | tee "$LOG"

for f in config.json {ranks}; do
  [ -f "$PARTIAL/$f" ] || {{ echo "build.sh: trtllm-build left no $f (see $LOG)" >&2; exit 1; }}
done
python3 - "$PARTIAL/{ENGINE_RECORD}" <<'PY'
{_RECORD_PY.strip()}
PY
rm -rf "$ENGINE"
mv "$PARTIAL" "$ENGINE"
echo "build.sh: engines in $PWD/$ENGINE (versions in $ENGINE/{ENGINE_RECORD})"
"""


# ── what an engine was built with (the serve gate, serve/repo/checks.py, compares it) ──────────────────────────


def engine_record(versions: dict, gpu: dict) -> dict:
    """What an engine was built with, as written to `engine_dir/engine_versions.json` (build.sh writes the same keys)."""
    return {
        "tensorrt_llm": versions.get("tensorrt_llm"),
        "tensorrt": versions.get("tensorrt"),
        "cuda": versions.get("cuda"),
        "gpu": gpu.get("name"),
        "compute_capability": compute_capability(gpu.get("compute_capability")),
    }


# ── the shell: find TensorRT-LLM and a GPU, run trtllm-build ──────────────────────────────────────────────────


def _module_version(module: str) -> str | None:
    try:
        return str(__import__(module).__version__)
    except Exception:  # a broken install is as good as none
        return None


def trtllm_versions() -> dict | None:
    """Versions of TensorRT-LLM, TensorRT and CUDA (torch's) where TensorRT-LLM is installed; None elsewhere."""
    try:
        if importlib.util.find_spec("tensorrt_llm") is None:
            return None
    except (ImportError, ValueError):
        return None
    trtllm = package_version("tensorrt_llm", "tensorrt-llm") or _module_version("tensorrt_llm")
    if trtllm is None:
        return None
    try:
        import torch

        cuda = torch.version.cuda
    except Exception:
        cuda = None
    return {
        "tensorrt_llm": trtllm,
        "tensorrt": package_version("tensorrt", "tensorrt-cu13", "tensorrt-cu12") or _module_version("tensorrt"),
        "cuda": cuda,
    }


def _gpus() -> list[dict]:
    """NVIDIA GPUs here: NVML first, torch.cuda as a fallback."""
    from trtqwen.build.hardware import detect_gpus

    gpus = detect_gpus()
    if gpus:
        return gpus
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [{"index": i, "name": torch.cuda.get_device_name(i),
                 "compute_capability": "%d.%d" % torch.cuda.get_device_capability(i)}
                for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def arch_warning(spec: BuildSpec, gpu: dict) -> str | None:
    """Engines built on one SM (an sm_90 H100) do not load on another (the sm_89 4090D)."""
    want, have = target_compute_capability(spec), compute_capability(gpu.get("compute_capability"))
    if not want or not have or want == have:
        return None
    return (f"this machine's GPU ({gpu.get('name')}) is sm_{have.replace('.', '')} but the build targets {spec.gpu} "
            f"(sm_{want.replace('.', '')}): the engines will load only on sm_{have.replace('.', '')} GPUs; build on the "
            "target box with build.sh to serve there")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_engine_build(spec: BuildSpec, checkpoint_dir: Path, engine_dir: Path, log: Path) -> dict:
    """Run trtllm-build where TensorRT-LLM 1.2.x and an NVIDIA GPU are present; record versions next to the engines.

    Builds into `<engine_dir>.partial`, checks every rank's engine is there, writes ENGINE_RECORD, then renames, so
    `engine_dir` never looks complete when it is not. Returns the record plus the build's warnings.
    Raises EngineToolsMissing where TensorRT-LLM, trtllm-build or a GPU is missing (build.sh is the way then).
    """
    versions = trtllm_versions()
    gpus = _gpus()
    trtllm_build = shutil.which("trtllm-build")
    missing = [what for what, ok in (("TensorRT-LLM", versions is not None), ("an NVIDIA GPU", bool(gpus)),
                                     ("the trtllm-build command", trtllm_build is not None)) if not ok]
    if missing:
        raise EngineToolsMissing(
            f"engines are not built here: {' and '.join(missing)} not found; building needs TensorRT-LLM "
            f"{TRTLLM_VERSION} and an NVIDIA GPU",
            f"run build.sh from the build directory on the 4090D box (it builds inside {TRTLLM_IMAGE})",
        )
    if not str(versions["tensorrt_llm"]).startswith(TRTLLM_SERIES):
        raise UserError(f"TensorRT-LLM {versions['tensorrt_llm']} is installed, but trtqwen's engine flow is pinned "
                        f"to {TRTLLM_VERSION}", f"build and serve inside {TRTLLM_IMAGE} (bash build.sh)")
    if not (checkpoint_dir / "config.json").is_file():
        raise UserError(f"no TensorRT-LLM checkpoint at {checkpoint_dir} (config.json missing)",
                        "run the checkpoint stage first: trtqwen build")
    ck = read_checkpoint(checkpoint_dir)  # the one reader: shape, TP rule and rank files
    check_spec(spec, ck.shape)
    if ck.tp != spec.tp:
        raise UserError(f"the checkpoint at {checkpoint_dir} is sharded for TP {ck.tp}, the spec says TP {spec.tp}",
                        f"rebuild the checkpoint with --tp {spec.tp} --force")

    warnings = build_warnings(spec)
    arch = arch_warning(spec, gpus[0])
    if arch:
        warnings.append(arch)
    tmp = engine_dir.with_name(engine_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = trtllm_build_command(spec, checkpoint_dir, tmp)
    cmd[0] = trtllm_build
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        out.writelines(f"# warning: {w}\n" for w in warnings)
        out.write(f"# {shlex.join(cmd)}\n")
        out.flush()
        returncode = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"trtllm-build failed (exit {returncode}); the last lines of {log}:\n{_tail(log)}",
                        f"the full log is {log}")
    absent = [f for f in ["config.json", *(f"rank{r}.engine" for r in range(spec.tp))] if not (tmp / f).is_file()]
    if absent:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"trtllm-build exited 0 but wrote no {', '.join(absent)}", f"see {log}")
    record = engine_record(versions, gpus[0])
    (tmp / ENGINE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(engine_dir, ignore_errors=True)
    os.replace(tmp, engine_dir)
    return {**record, "warnings": warnings, "features": engine_features(spec)}
