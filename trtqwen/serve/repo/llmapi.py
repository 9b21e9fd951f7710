"""The llmapi runtime: TensorRT-LLM's PyTorch-backend Triton model, configured by `tensorrt_llm/1/model.yaml`.

model.yaml's keys are `tensorrt_llm.LLM()` arguments plus `triton_config` (TensorRT-LLM
`triton_backend/all_models/llmapi/tensorrt_llm/1/model.yaml`). The model's code (model.py, helpers.py) is
NVIDIA's and ships with TensorRT-LLM's Triton backend, not with trtqwen: it is copied in from where it is
installed, or the repository's record says where to get it. Nothing here imports TensorRT-LLM.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from trtqwen.serve.repo.settings import RepoSettings

LLMAPI_FILES = ("model.py", "helpers.py")
LLMAPI_MODEL_ENV = "TRTQWEN_LLMAPI_MODEL_DIR"
# Where TensorRT-LLM's containers and source checkouts keep the llmapi model (first one found is used).
LLMAPI_MODEL_PLACES = (
    "/app/tensorrt_llm/triton_backend/all_models/llmapi/tensorrt_llm/1",
    "/opt/tritonserver/tensorrtllm_backend/all_models/llmapi/tensorrt_llm/1",
)
WHERE_TO_GET_IT = ("copy model.py and helpers.py from TensorRT-LLM's triton_backend/all_models/llmapi/tensorrt_llm/1/ "
                   f"into tensorrt_llm/1/ (or set {LLMAPI_MODEL_ENV} to that folder and package again)")


def model_yaml(s: RepoSettings) -> dict:
    """LLM() arguments from the build, and the Triton settings the model reads in auto_complete_config."""
    return {
        "model": s.model_dir,
        "tokenizer": s.tokenizer_dir,
        "backend": "pytorch",
        "tensor_parallel_size": s.tp,
        "pipeline_parallel_size": 1,
        "max_batch_size": s.max_batch_size,
        "max_seq_len": s.max_seq_len,
        "max_input_len": s.max_input_len,
        "max_num_tokens": s.max_num_tokens,
        "trust_remote_code": False,
        "kv_cache_config": {
            "free_gpu_memory_fraction": s.kv_cache_free_gpu_mem_fraction,
            "enable_block_reuse": s.enable_kv_cache_reuse,
        },
        "triton_config": {
            # NVIDIA's model takes one prompt per request (its note: batching is tracked in JIRA-4496);
            # the LLM batches requests in flight itself, up to max_batch_size above.
            "max_batch_size": 0,
            "decoupled": s.streaming,
        },
    }


def dump_model_yaml(s: RepoSettings) -> str:
    header = ("# TensorRT-LLM llmapi model configuration, written by `trtqwen package` from build.json.\n"
              "# Keys other than triton_config are tensorrt_llm.LLM() arguments.\n")
    return header + yaml.safe_dump(model_yaml(s), sort_keys=False)


def find_llmapi_model_code(explicit: Path | None = None) -> Path | None:
    candidates = [explicit] if explicit else []
    if os.environ.get(LLMAPI_MODEL_ENV):
        candidates.append(Path(os.environ[LLMAPI_MODEL_ENV]))
    candidates += [Path(p) for p in LLMAPI_MODEL_PLACES]
    for c in candidates:
        if c is not None and (c / "model.py").is_file():
            return c
    return None


def copy_llmapi_model_code(src: Path, version_dir: Path) -> list[str]:
    copied = []
    for name in LLMAPI_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, version_dir / name)
            copied.append(name)
    return copied
