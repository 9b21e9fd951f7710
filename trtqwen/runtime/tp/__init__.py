"""Tensor parallelism as TensorRT-LLM runs it: one process per rank, each holding only its rank{i}.safetensors.

Rank 0 lives in the caller's process and hands LLMEngine a `TPModel`, which looks like a Qwen2Model. Before
every forward it broadcasts a small command (op and arguments: tokens, positions, slots, the graph bucket's
inputs) over a CPU gloo group; then every rank runs the same forward on its shard, the collectives inside it
(all-reduce after the row-parallel o/down projections and the vocabulary-parallel embedding, all-gather of the
vocabulary-parallel logits) run over NCCL on GPUs, gloo on CPUs. Sampling stays on rank 0: the tokens it picks
reach the other ranks in the next command. Workers are `python -m trtqwen.runtime.tp.worker` processes; a worker that
dies makes rank 0 raise TPError (watchdog + collective timeouts), never hang.
"""

from trtqwen.runtime.tp.channel import TPError
from trtqwen.runtime.tp.shards import CheckpointShards, HfShards, RandomShards, RankModel
from trtqwen.runtime.tp.tp_model import TPModel, load_tp_model

__all__ = ["CheckpointShards", "HfShards", "RandomShards", "RankModel", "TPError", "TPModel", "load_tp_model"]
