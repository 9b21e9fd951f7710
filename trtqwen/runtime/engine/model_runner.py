"""Runs the model for a scheduled step: prefills, the batched decode (from CUDA graphs on a GPU), sampling.

CUDA graphs: one per (batch bucket, KV-length bucket), captured at start.

Replaying a graph launches the whole step (28 layers × a dozen kernels) with one call, which is what bounds
an eager step at small batch. Inputs go through static buffers; a batch pads up to its bucket with slots that
write where their own next write lands anyway (ModelRunner.decode), and attention reads only the KV-length bucket.
"""

from __future__ import annotations

import bisect

import torch

from trtqwen.runtime.engine.sequence import Request
from trtqwen.runtime.layers.sampler import SamplingParams, sample
from trtqwen.runtime.models.qwen2 import KVCache, Qwen2Model

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


class ModelRunner:
    """The KV cache, the decode graphs and the penalty counts of one engine; tokens in, sampled tokens out."""

    def __init__(self, model: Qwen2Model, max_slots: int, max_seq_len: int, cuda_graphs: bool | None = None):
        self.model, self.device = model, model.device
        self.cache = model.new_cache(max_slots, max_seq_len)
        self.graphs = None
        if cuda_graphs if cuda_graphs is not None else model.device.type == "cuda":
            runner = getattr(model, "graphed_decode", None)  # a tensor-parallel model graphs every rank (tp/)
            self.graphs = (runner(self.cache, max_slots, max_seq_len) if runner
                           else GraphedDecode(model, self.cache, max_slots, max_seq_len))
            if model.device.type == "cuda":
                self.graphs.capture_all()
        self.counts: torch.Tensor | None = None  # [slots, V] token counts, only once penalties are asked for
        self.out_counts: torch.Tensor | None = None

    def start(self, req: Request) -> None:
        """A request took its slot: count its prompt tokens if it asks for penalties."""
        p = req.params
        if p.repetition_penalty == 1 and p.presence_penalty == 0 and p.frequency_penalty == 0:
            return
        if self.counts is None:
            shape = (self.cache.num_slots, self.model.cfg.vocab_size)
            self.counts = torch.zeros(shape, dtype=torch.float32, device=self.device)
            self.out_counts = torch.zeros_like(self.counts)
        self.counts[req.slot].zero_()
        self.out_counts[req.slot].zero_()
        self.counts[req.slot].index_add_(0, torch.tensor(req.prompt, device=self.device),
                                         torch.ones(len(req.prompt), device=self.device))

    def count(self, reqs: list[Request], tokens: list[int]) -> None:
        if self.counts is not None:
            slots = torch.tensor([r.slot for r in reqs], device=self.device)
            toks = torch.tensor(tokens, device=self.device)
            self.counts[slots, toks] += 1
            self.out_counts[slots, toks] += 1

    def sample(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        steps = torch.tensor([len(r.output) for r in reqs])
        counts = out_counts = None
        if self.counts is not None:
            slots = torch.tensor([r.slot for r in reqs], device=self.device)
            counts, out_counts = self.counts[slots], self.out_counts[slots]
        params: list[SamplingParams] = [r.params for r in reqs]
        return sample(logits, params, steps, counts, out_counts, [len(r.output) for r in reqs]).tolist()

    def prefill(self, req: Request, n: int) -> torch.Tensor:
        """The next n prompt tokens of req → logits [1, V] of the last one."""
        chunk = torch.tensor(req.prompt[req.computed : req.computed + n], device=self.device)
        logits = self.model.prefill(chunk, self.cache, req.slot, req.computed)
        req.computed += n
        return logits[-1:]

    def prefill_fresh(self, group: list[Request]) -> torch.Tensor:
        """Whole prompts in one padded forward → last-token logits [n, V]."""
        prompts = [torch.tensor(r.prompt, device=self.device) for r in group]
        logits = self.model.prefill_fresh(prompts, self.cache, [r.slot for r in group])
        for r in group:
            r.computed = len(r.prompt)
        return logits

    def decode(self, decoding: list[Request], running: dict[int, Request]) -> torch.Tensor:
        """One token for every decoding request, batched over slots 0..B-1 → logits [len(decoding), V]."""
        B = max(r.slot for r in decoding) + 1
        if self.graphs is not None:
            B = self.graphs.padded(B)
        tokens = torch.zeros(B, dtype=torch.long)
        positions = torch.zeros(B, dtype=torch.long)
        for slot in range(B):  # idle or prefilling slots write where their next prefill overwrites
            r = running.get(slot)
            positions[slot] = r.computed if r is not None else 0
        for r in decoding:
            tokens[r.slot] = r.output[-1]
            positions[r.slot] = r.length - 1
        if self.graphs is not None:
            logits = self.graphs(tokens, positions)
        else:
            logits = self.model.decode(tokens.to(self.device), positions.to(self.device), self.cache)
        return logits[torch.tensor([r.slot for r in decoding], device=logits.device)]
