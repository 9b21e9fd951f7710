"""Decode steps replayed from CUDA graphs: one graph per (batch bucket, KV-length bucket), captured at start.

Replaying a graph launches the whole step (28 layers × a dozen kernels) with one call, which is what bounds
an eager step at small batch. Inputs go through static buffers; a batch pads up to its bucket with slots that
write where their own next write lands anyway (see LLMEngine), and attention reads only the KV-length bucket.
"""

from __future__ import annotations

import bisect

import torch

from trtqwen.runtime.model import KVCache, Qwen2Model

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_KV_BUCKET = 256


def kv_buckets(max_seq_len: int) -> list[int]:
    """Powers of two from 256 up to (and always including) max_seq_len."""
    out, n = [], MIN_KV_BUCKET
    while n < max_seq_len:
        out.append(n)
        n *= 2
    return out + [max_seq_len]


def batch_buckets(max_batch: int) -> list[int]:
    return [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]


class GraphedDecode:
    def __init__(self, model: Qwen2Model, cache: KVCache, max_batch: int, max_seq_len: int):
        self.model, self.cache = model, cache
        self.batches, self.kv_lens = batch_buckets(max_batch), kv_buckets(max_seq_len)
        self.tokens = torch.zeros(max_batch, dtype=torch.long, device=model.device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=model.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def padded(self, batch: int) -> int:
        return self.batches[bisect.bisect_left(self.batches, batch)]

    def capture_all(self) -> None:
        """Largest first, so smaller graphs reuse the pool's blocks. Touches only slot positions 0 (empty cache)."""
        for b in reversed(self.batches):
            for kv in reversed(self.kv_lens):
                self._capture(b, kv)
        torch.cuda.synchronize()
        self.positions.zero_()

    def _run(self, b: int, kv: int) -> torch.Tensor:
        return self.model.decode(self.tokens[:b], self.positions[:b], self.cache, kv)

    def _capture(self, b: int, kv: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: compiles, autotunes, allocates workspaces
            for _ in range(2):
                self._run(b, kv)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._run(b, kv)
        self.pool = graph.pool()
        self.graphs[(b, kv)] = (graph, out)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions [b] with b a bucket (see padded) → logits [b, V], valid until the next call."""
        b = tokens.shape[0]
        kv_needed = int(positions.max()) + 1  # positions arrive from the host: no device sync here
        kv = self.kv_lens[bisect.bisect_left(self.kv_lens, kv_needed)]
        self.tokens[:b].copy_(tokens, non_blocking=True)
        self.positions[:b].copy_(positions, non_blocking=True)
        if (b, kv) not in self.graphs:  # not captured (CPU): the same bucketed step, run eagerly
            return self._run(b, kv)
        graph, out = self.graphs[(b, kv)]
        graph.replay()
        return out
