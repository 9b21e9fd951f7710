"""One rank: its model (with the collectives), where its weights come from (a rank file or a random preset), and what
it does with a command."""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from trtqwen.checkpoint import read_checkpoint, read_hf_checkpoint
from trtqwen.runtime.engine.model_runner import GraphedDecode
from trtqwen.runtime.loader import load_hf, load_rank, place
from trtqwen.runtime.models.qwen2 import KVCache, Qwen2Model
from trtqwen.runtime.random_model import PRESETS, random_model
from trtqwen.runtime.tp.channel import all_gather
from trtqwen.shape import ModelShape, check_tp


class RankModel(Qwen2Model):
    """One rank's shard: all-reduce after the row-parallel layers, vocabulary-parallel embedding and lm_head."""

    def bind(self, group, vocab_size: int) -> "RankModel":
        self.group, self.vocab_size = group, vocab_size
        self.tp_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.reduce = self._all_reduce
        self.vocab_start = self.rank * self.embed.shape[0]
        self.parallel_embed = self.embed.shape[0] < vocab_size  # else every rank holds the whole table
        return self

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.parallel_embed:
            return self.embed[tokens]
        local = tokens - self.vocab_start
        inside = (local >= 0) & (local < self.embed.shape[0])
        x = self.embed[local.clamp(0, self.embed.shape[0] - 1)] * inside.unsqueeze(-1).to(self.embed.dtype)
        return self._all_reduce(x)  # each token's row comes from the one rank that holds it

    def head(self, x: torch.Tensor) -> torch.Tensor:
        local = self.lm_head(x).contiguous()  # [..., V/tp]
        parts = torch.empty((self.tp_size * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
        all_gather(parts, local, group=self.group)  # the ranks' logits one after another along dim 0
        full = torch.cat(parts.chunk(self.tp_size), dim=-1)
        return full[..., : self.vocab_size]  # TensorRT-LLM pads the vocabulary to a multiple of TP


@dataclass(frozen=True)
class CheckpointShards:
    """Rank i's weights: rank{i}.safetensors of a TensorRT-LLM checkpoint, and nothing else of it."""

    path: str

    def config(self) -> tuple[ModelShape, int]:
        """(the full model's shape, TP size); read_checkpoint refuses a TP that does not divide the model."""
        ck = read_checkpoint(Path(self.path))
        return ck.shape, ck.tp

    def load(self, rank: int, device: str, dtype: torch.dtype, max_positions: int | None) -> RankModel:
        return load_rank(Path(self.path), rank, max_positions, cls=RankModel)


@dataclass(frozen=True)
class HfShards:
    """Rank i's slice of an HF checkpoint (plain or ModelOpt-quantized), cut at load: the PyTorch backend's way."""

    path: str
    tp: int

    def config(self) -> tuple[ModelShape, int]:
        ck = read_hf_checkpoint(Path(self.path))
        check_tp(ck.shape, self.tp, ck.precision, ck.group_size)
        return ck.shape, self.tp

    def load(self, rank: int, device: str, dtype: torch.dtype, max_positions: int | None) -> RankModel:
        return load_hf(Path(self.path), max_positions, self.tp, rank, cls=RankModel)


@dataclass(frozen=True)
class RandomShards:
    """Rank i's shard of a random model (random_model.PRESETS), made on its device: benchmarks without a checkpoint."""

    preset: str
    tp: int

    def config(self) -> tuple[ModelShape, int]:
        PRESETS[self.preset].shard(self.tp)  # the one TP rule refuses a TP that does not divide the model
        return PRESETS[self.preset], self.tp

    def load(self, rank: int, device: str, dtype: torch.dtype, max_positions: int | None) -> RankModel:
        return random_model(PRESETS[self.preset], device=device, dtype=dtype, max_positions=max_positions or 4096,
                            tp=self.tp, rank=rank, cls=RankModel)


SOURCES = {"checkpoint": CheckpointShards, "hf": HfShards, "random": RandomShards}


def source_arg(source) -> str:
    kind = next(k for k, c in SOURCES.items() if isinstance(source, c))
    return json.dumps({"kind": kind, **asdict(source)})


def source_from_arg(arg: str):
    d = json.loads(arg)
    return SOURCES[d.pop("kind")](**d)


def load_shard(source, rank: int, device: str, dtype, max_positions, int4_kernels) -> RankModel:
    return place(source.load(rank, device, dtype, max_positions), device, dtype, int4_kernels)


class Rank:
    """What every rank does with a command; rank 0 runs it right after broadcasting it."""

    def __init__(self, model: RankModel):
        self.model = model
        self.cache: KVCache | None = None
        self.graphs: GraphedDecode | None = None

    def run(self, cmd: dict):
        op, m = cmd["op"], self.model
        dev = m.device
        if op == "new_cache":
            self.graphs, self.cache = None, None  # the old engine's memory goes before the new cache comes
            self.cache = m.new_cache(cmd["slots"], cmd["max_seq_len"])
            return self.cache
        if op == "graphs":
            self.graphs = GraphedDecode(m, self.cache, cmd["max_batch"], cmd["max_seq_len"])
            return self.graphs
        if op == "capture":
            return self.graphs.capture_all()
        if op == "graph_step":
            return self.graphs(torch.as_tensor(cmd["tokens"]), torch.as_tensor(cmd["positions"]))
        if op == "prefill":
            return m.prefill(torch.tensor(cmd["tokens"], device=dev), self.cache, cmd["slot"], cmd["start"],
                             cmd["all_logits"])
        if op == "prefill_fresh":
            return m.prefill_fresh([torch.tensor(p, device=dev) for p in cmd["prompts"]], self.cache, cmd["slots"])
        if op == "decode":
            return m.decode(torch.tensor(cmd["tokens"], device=dev), torch.tensor(cmd["positions"], device=dev),
                            self.cache, cmd["kv_len"])
        if op == "compile":
            return m.compile()
        if op == "call":  # a function run on every rank's shard at once (benchmarks: bench/tp_gpu.py)
            module, name = cmd["fn"].split(":")
            return getattr(importlib.import_module(module), name)(m, **cmd.get("kwargs", {}))
        raise ValueError(f"unknown TP command {op!r}")
