"""Runs the model for a scheduled step: prefills, the batched decode (from CUDA graphs on a GPU), sampling.

CUDA graphs: one per (batch bucket, KV-length bucket), captured at start.

Replaying a graph launches the whole step (28 layers × a dozen kernels) with one call, which is what bounds
an eager step at small batch. Inputs go through static buffers; a batch pads up to its bucket with slots that
write where their own next write lands anyway (ModelRunner.decode), and attention reads only the KV-length bucket.

Overlap (LLMEngine): decode_next feeds the tokens a step sampled, still on the device, to the next step of the same
batch, so that step is queued before the host has read them (Sampled). A sequence that finished meanwhile has had
one step too many computed in its own slot: harmless, since a sequence only ever reads cache positions it wrote
itself (prefill writes 0..prompt-1, each decode writes its position before attending up to it).
"""

from __future__ import annotations

import bisect

import torch

from trtqwen.runtime.engine.sequence import Request
from trtqwen.runtime.layers.sampler import SamplingParams, on_device, sample
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
        """tokens, positions [b] (host) with b a bucket (see padded) → logits [b, V], valid until the next call."""
        b = tokens.shape[0]
        self.tokens[:b].copy_(tokens, non_blocking=True)
        self.positions[:b].copy_(positions, non_blocking=True)
        return self.replay(b, int(positions.max()) + 1)  # positions arrive from the host: no device sync here

    def replay(self, b: int, kv_needed: int) -> torch.Tensor:
        """The step on what the static buffers hold now (ModelRunner.decode_next advances them on the device)."""
        kv = self.kv_lens[bisect.bisect_left(self.kv_lens, kv_needed)]
        if (b, kv) not in self.graphs:  # not captured (CPU): the same bucketed step, run eagerly
            return self._run(b, kv)
        graph, out = self.graphs[(b, kv)]
        graph.replay()
        return out


class Sampled:
    """Sampled tokens [n]: on the device (the next step's input) and on their way to the host without a stream sync."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens, self.host, self.ready = tokens, tokens, None
        if tokens.is_cuda:
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def wait(self) -> None:
        """Until this step (and all queued before it) has run on the device."""
        if self.ready is not None:
            self.ready.synchronize()  # releases the GIL: the serving thread runs meanwhile

    def tolist(self) -> list[int]:
        self.wait()
        return self.host.tolist()


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
        # the last decode, for decode_next: padded batch, rows (slots) of its sequences, KV positions it needed, and
        # its input buffers when not graphed
        self.batch, self.rows, self.kv_needed, self.inputs = 0, None, 0, None

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

    def sample(self, reqs: list[Request], logits: torch.Tensor, ahead: int = 0) -> Sampled:
        """One token per request, counted for penalties on the device. ahead: tokens already sampled for each
        request but not yet in req.output (the host has not read them)."""
        for r in reqs:  # the test hook (LLMEngine.add's fault_at): this request breaks the whole batched step
            if r.fault_at is not None and len(r.output) + ahead + 1 >= r.fault_at:
                raise RuntimeError(f"injected test fault: request {r.id} breaks the step at its token {r.fault_at}")
        generated = [len(r.output) + ahead for r in reqs]
        counts = out_counts = None
        if self.counts is not None:
            slots = on_device([r.slot for r in reqs], self.device)
            counts, out_counts = self.counts[slots], self.out_counts[slots]
        params: list[SamplingParams] = [r.params for r in reqs]
        tokens = sample(logits, params, torch.tensor(generated), counts, out_counts, generated)
        if self.counts is not None:  # a token dropped later (its sequence had finished) counts in a slot start() resets
            self.counts[slots, tokens] += 1
            self.out_counts[slots, tokens] += 1
        return Sampled(tokens)

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
        # Slots outside this batch write where their own next write lands anyway: an idle slot at 0, a prompt in
        # progress at its next chunk, a sequence that decodes elsewhere (LLMEngine splits a failing batch to find
        # the request at fault) one past the token it feeds now (its next step writes there before it reads it).
        for slot in range(B):
            r = running.get(slot)
            positions[slot] = 0 if r is None else r.length if r.output else r.computed
        for r in decoding:
            tokens[r.slot] = r.output[-1]
            positions[r.slot] = r.length - 1
        self.batch, self.kv_needed = B, int(positions.max()) + 1
        self.rows = on_device([r.slot for r in decoding], self.device)
        if self.graphs is not None:
            logits = self.graphs(tokens, positions)
        else:
            self.inputs = (tokens.to(self.device), positions.to(self.device))
            logits = self.model.decode(*self.inputs, self.cache, self.kv_needed)
        return logits[self.rows]

    def decode_next(self, sampled: torch.Tensor) -> torch.Tensor:
        """The last decode's batch one position on, fed the tokens it sampled [n] (device): launched without the
        host reading them. Padding slots keep their positions. → logits [n, V]"""
        tokens, positions = (self.graphs.tokens, self.graphs.positions) if self.graphs is not None else self.inputs
        tokens.index_copy_(0, self.rows, sampled)
        positions[self.rows] += 1
        self.kv_needed += 1
        if self.graphs is not None:
            logits = self.graphs.replay(self.batch, self.kv_needed)
        else:
            logits = self.model.decode(tokens, positions, self.cache, self.kv_needed)
        return logits[self.rows]
