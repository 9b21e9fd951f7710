"""Reference runtime: Qwen2 inference in PyTorch over TensorRT-LLM or HF checkpoints, with continuous batching.

Stands in for the TensorRT-LLM engine where it cannot run, and checks checkpoints (`trtqwen verify`).
layers/ (one idea a file) → models/qwen2.py → loader.py → engine/ (scheduler, model runner, LLMEngine); tp/ runs
a TP checkpoint as one process per rank.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trtqwen.checkpoint import is_trtllm_checkpoint, read_checkpoint
from trtqwen.runtime.engine.llm_engine import LLMEngine
from trtqwen.runtime.engine.sequence import Request
from trtqwen.runtime.layers.sampler import SamplingParams
from trtqwen.runtime.loader import load_merged

__all__ = ["LLMEngine", "Request", "SamplingParams", "load_model"]


def load_model(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               max_positions: int | None = None, int4_kernels: bool | None = None, tp_ranks: bool = False,
               gpu_ids: list[int] | None = None, tp: int = 1):
    """HF dir or TensorRT-LLM checkpoint → Qwen2Model on device (float32 on CPU, bf16 on CUDA by default).

    int4_kernels (default: on a GPU in bf16) runs INT4-AWQ linears on packed int4 weights instead of
    dequantized 16-bit copies: the speed and the memory a 4-bit checkpoint is for.
    tp_ranks: run a TP > 1 checkpoint as one process per rank (runtime/tp/; on GPUs gpu_ids, default 0..tp-1)
    instead of merging its shards; the returned proxy must be close()d. A TensorRT-LLM checkpoint's TP is its
    rank files'; an HF checkpoint runs at `tp`, each rank splitting it at load (as TensorRT-LLM's PyTorch backend).
    """
    path = Path(path)
    trtllm = is_trtllm_checkpoint(path)
    if tp_ranks and (read_checkpoint(path).tp if trtllm else tp) > 1:
        from trtqwen.runtime.tp import load_tp_model  # here: the loader knows nothing of processes

        return load_tp_model(path, str(device), gpu_ids, dtype, max_positions, int4_kernels, tp)
    return load_merged(path, device, dtype, max_positions, int4_kernels)
