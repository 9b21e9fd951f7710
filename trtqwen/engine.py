"""The engine stage: `trtllm-build` (TensorRT-LLM 1.2.x) from the spec. The one module that touches TensorRT-LLM.

Everything here is a pure function of the spec except `run_engine_build`, which needs TensorRT-LLM and an
NVIDIA GPU; elsewhere the build stops after the checkpoint and leaves `build.sh` for the 4090D box.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from trtqwen.errors import UserError
from trtqwen.hardware import detect_gpus
from trtqwen.spec import BuildSpec, KvDtype, Precision

TRTLLM_VERSION = "1.2.1"
# The last stable release with the engine flow (FACTS §4); build and serve in this same image.
TRTLLM_IMAGE = f"nvcr.io/nvidia/tensorrt-llm/release:{TRTLLM_VERSION}"
ENGINE_RECORD = "engine_versions.json"


class EngineToolsMissing(UserError):
    """TensorRT-LLM or a GPU is missing: the checkpoint is ready, the engine must be built elsewhere."""


def trtllm_versions() -> dict | None:
    """Versions of TensorRT-LLM, TensorRT and CUDA where TensorRT-LLM is installed; None elsewhere."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return None
    versions = {"tensorrt_llm": importlib.metadata.version("tensorrt_llm")}
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"):
        try:
            versions["tensorrt"] = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        import torch

        versions["cuda"] = torch.version.cuda
    except ImportError:
        versions["cuda"] = None
    return versions


def trtllm_build_command(spec: BuildSpec, checkpoint_dir: Path, engine_dir: Path) -> list[str]:
    """The trtllm-build command line for this spec, with 1.x flag names only."""
    cmd = [
        "trtllm-build",
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(engine_dir),
        "--max_batch_size", str(spec.max_batch_size),
        "--max_input_len", str(spec.max_input_len),
        "--max_seq_len", str(spec.max_seq_len),
        "--max_num_tokens", str(spec.max_num_tokens),
        "--max_beam_width", "1",
        "--kv_cache_type", "paged",  # in-flight batching and KV reuse need the paged cache
        "--gpt_attention_plugin", "auto",  # the attention plugin in the checkpoint's dtype
        "--gemm_plugin", "auto",  # cuBLAS-backed GEMM plugin; quantized GEMMs come from the checkpoint's quant_algo
        "--context_fmha", "enable",
        "--use_paged_context_fmha", "enable",  # chunked context and KV-cache reuse in the Triton backend
        "--remove_input_padding", "enable",
        "--tokens_per_block", "32",
        "--multiple_profiles", "enable",  # separate TensorRT profiles for prefill- and decode-shaped batches
        "--workers", str(spec.tp),  # one build process per TP rank
    ]
    if spec.precision is Precision.FP8 and spec.kv_cache_dtype is KvDtype.FP8:
        cmd += ["--use_fp8_context_fmha", "enable"]  # FP8 attention in the context phase needs an FP8 KV cache
    return cmd


def build_script(spec: BuildSpec, checkpoint_dir: Path, engine_dir: Path, image: str = TRTLLM_IMAGE) -> str:
    """build.sh for the 4090D box: runs trtllm-build inside the pinned container (or directly with --host)."""
    tmp = f"{engine_dir}.partial"
    cmd = " ".join(shlex.quote(c) for c in trtllm_build_command(spec, checkpoint_dir, Path(tmp)))
    record = (f"python3 -c 'import json, tensorrt_llm, tensorrt, torch; json.dump({{\"tensorrt_llm\": tensorrt_llm.__version__, "
              f"\"tensorrt\": tensorrt.__version__, \"cuda\": torch.version.cuda, \"compute_capability\": "
              f"\"%d.%d\" % torch.cuda.get_device_capability()}}, open(\"{tmp}/{ENGINE_RECORD}\", \"w\"))'")
    return f"""#!/usr/bin/env bash
# Build TensorRT engines from this checkpoint on the GPU that will serve them (an RTX 4090D: sm_89).
# Engines are tied to the TensorRT-LLM / TensorRT version and GPU architecture: build and serve with {image}.
#   bash build.sh           # runs inside {image} via docker
#   bash build.sh --host    # runs trtllm-build from this machine's TensorRT-LLM {TRTLLM_VERSION}
set -euo pipefail
cd "$(dirname "$0")"
if [ "${{1:-}}" != "--host" ] && [ -z "${{TRTQWEN_IN_CONTAINER:-}}" ]; then
  exec docker run --rm --gpus all --ipc=host --ulimit memlock=-1 -e TRTQWEN_IN_CONTAINER=1 \\
    -v "$PWD":/build -w /build {image} bash build.sh --host
fi
rm -rf {tmp}
{cmd}
{record}
rm -rf {engine_dir}
mv {tmp} {engine_dir}
echo "engines in $PWD/{engine_dir}"
"""


def engine_record(versions: dict, gpu: dict) -> dict:
    return {**versions, "gpu": gpu.get("name"), "compute_capability": gpu.get("compute_capability")}


def check_engine_compatible(recorded: dict, serving: dict) -> None:
    """Refuse to serve an engine built by another TensorRT(-LLM) or for another GPU architecture."""
    for key, what in (("tensorrt_llm", "TensorRT-LLM"), ("tensorrt", "TensorRT"), ("compute_capability", "GPU architecture (sm)")):
        built, now = recorded.get(key), serving.get(key)
        if built and now and built != now:
            raise UserError(
                f"the engine was built with {what} {built} but this machine serves with {now}",
                "engines are tied to the exact version and GPU: rebuild with build.sh on this machine, "
                "or serve in the container that built it",
            )


def run_engine_build(spec: BuildSpec, checkpoint_dir: Path, engine_dir: Path, log: Path) -> dict:
    versions = trtllm_versions()
    gpus = detect_gpus()
    if versions is None or not gpus or shutil.which("trtllm-build") is None:
        missing = "TensorRT-LLM" if versions is None else ("an NVIDIA GPU" if not gpus else "trtllm-build on PATH")
        raise EngineToolsMissing(
            f"{missing} is not available here; building engines needs TensorRT-LLM {TRTLLM_VERSION} and an NVIDIA GPU",
            "run build.sh in the build directory on the 4090D box",
        )
    if versions["tensorrt_llm"] != TRTLLM_VERSION:
        raise UserError(f"TensorRT-LLM {versions['tensorrt_llm']} is installed; trtqwen's engine flow is pinned to {TRTLLM_VERSION}",
                        f"use the {TRTLLM_IMAGE} container")
    tmp = engine_dir.with_name(engine_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with log.open("w") as logf:
        proc = subprocess.run(trtllm_build_command(spec, checkpoint_dir, tmp), stdout=logf, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise UserError(f"trtllm-build failed (exit {proc.returncode})", f"see {log}")
    record = engine_record(versions, gpus[0])
    (tmp / ENGINE_RECORD).write_text(json.dumps(record, indent=2))
    shutil.rmtree(engine_dir, ignore_errors=True)
    os.replace(tmp, engine_dir)
    return record
