"""`trtllm-serve` (TensorRT-LLM's own OpenAI server, PyTorch backend) on a build's unified HF checkpoint.

`trtqwen build --target pytorch|both` writes `trtllm-serve.sh` and `trtllm_serve.yaml` beside the checkpoint, as
build.sh is written for the engine; `trtqwen serve <build dir> --engine trtllm-serve` runs it where trtllm-serve is
installed. The flags are TensorRT-LLM 1.2.x's (tensorrt_llm/commands/serve.py; tests/data/trtllm_serve_1.2.1.json);
the YAML's keys are LLM() arguments (--extra_llm_api_options overrides serve's own). Qwen2.5's two stop ids reach the
server through the checkpoint's generation_config.json (quantize.stop_ids_in_generation_config).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from trtqwen.build.spec import BuildSpec
from trtqwen.build.trtllm_build import TRTLLM_IMAGE

SCRIPT = "trtllm-serve.sh"
OPTIONS = "trtllm_serve.yaml"


def llm_api_options(spec: BuildSpec, kv_fraction: float) -> dict:
    """The LLM() arguments that matter for Qwen2.5 on a 24 GB card and that serve has no flag for."""
    return {"kv_cache_config": {"enable_block_reuse": True, "free_gpu_memory_fraction": kv_fraction},
            "enable_chunked_prefill": True}


def serve_command(hf_dir: Path, spec: BuildSpec, kv_fraction: float, options: Path, host: str = "127.0.0.1",
                  port: int = 8000) -> list[str]:
    return ["trtllm-serve", str(hf_dir), "--backend", "pytorch", "--host", host, "--port", str(port),
            "--tp_size", str(spec.tp), "--max_batch_size", str(spec.max_batch_size),
            "--max_num_tokens", str(spec.max_num_tokens), "--max_seq_len", str(spec.max_seq_len),
            "--kv_cache_free_gpu_memory_fraction", str(kv_fraction), "--extra_llm_api_options", str(options)]


def serve_script(spec: BuildSpec, kv_fraction: float) -> str:
    """A script run from the build dir: trtllm-serve where it is installed, else in TensorRT-LLM's container."""
    here = " ".join(shlex.quote(c) for c in serve_command(Path("hf_checkpoint"), spec, kv_fraction, Path(OPTIONS)))
    inner = " ".join(shlex.quote(c) for c in serve_command(Path("/build/hf_checkpoint"), spec, kv_fraction,
                                                           Path(f"/build/{OPTIONS}"), "0.0.0.0", 8000))
    return f"""#!/usr/bin/env bash
# TensorRT-LLM's OpenAI-compatible server (PyTorch backend) on this build's unified HF checkpoint.
# Written by `trtqwen build`; `trtqwen serve <this dir> --engine trtllm-serve` runs it. Needs a GPU and TensorRT-LLM.
set -euo pipefail
cd "$(dirname "$0")"
if command -v trtllm-serve >/dev/null; then
  exec {here}
fi
# no trtllm-serve here: TensorRT-LLM's container (port 8000 on this machine only)
exec docker run --rm --gpus all --ipc=host -p 127.0.0.1:8000:8000 -v "$PWD":/build {TRTLLM_IMAGE} {inner}
"""


def write_serve_files(out: Path, spec: BuildSpec, kv_fraction: float) -> None:
    (out / OPTIONS).write_text(yaml.safe_dump(llm_api_options(spec, kv_fraction), sort_keys=False))
    script = out / SCRIPT
    script.write_text(serve_script(spec, kv_fraction))
    script.chmod(0o755)
