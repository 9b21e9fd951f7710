"""Continuous batching: requests join between decode steps, finished ones leave at once.

One thread calls `step()`; any thread may `add()` or `cancel()`. Each step admits waiting requests to free
KV slots, prefills up to a token budget (chunked, so long prompts do not stall running streams), then
decodes one token for every running sequence in a single batched forward.

Overlap ("one step ahead", on by default on a GPU): while the decode batch stays the same, each step launches the
next decode from the tokens just sampled, still on the device, and only then reads this step's tokens and runs the
host's bookkeeping and callbacks, so the GPU works meanwhile. Any change to the batch (a sequence joins or finishes,
a prompt is in progress) drains the pipeline: the step launched ahead is read, its finished sequences' tokens dropped,
and the next step starts from the host again. Every step accepts exactly the tokens the synchronous step would.
"""

from __future__ import annotations

import itertools

import torch

from trtqwen.errors import UserError
from trtqwen.runtime.engine.model_runner import ModelRunner, Sampled
from trtqwen.runtime.engine.scheduler import Scheduler
from trtqwen.runtime.engine.sequence import Request, TokenCallback
from trtqwen.runtime.layers.sampler import SamplingParams
from trtqwen.runtime.models.qwen2 import Qwen2Model


class LLMEngine:
    def __init__(self, model: Qwen2Model, max_slots: int = 8, max_seq_len: int | None = None, prefill_chunk: int = 512,
                 cuda_graphs: bool | None = None, overlap: bool | None = None):
        """cuda_graphs: replay decode steps from CUDA graphs (default: on when the model is on a GPU).
        overlap: launch each decode step before the host reads the last one's tokens (default: on when the model is
        on a GPU). A tensor-parallel model always steps synchronously: its ranks get each step's inputs from the host."""
        self.model = model
        self.max_seq_len = min(max_seq_len or model.max_positions, model.max_positions)
        self.runner = ModelRunner(model, max_slots, self.max_seq_len, cuda_graphs)
        self.graphs = self.runner.graphs
        self.scheduler = Scheduler(max_slots, prefill_chunk)
        self.ids = itertools.count(1)
        on_gpu = model.device.type == "cuda"
        self.overlap = isinstance(model, Qwen2Model) and (overlap if overlap is not None else on_gpu)
        self.ahead: tuple[list[Request], Sampled] | None = None  # the next step's decode, launched, not yet read

    # --- called from any thread -------------------------------------------------------------
    def add(self, prompt: list[int], params: SamplingParams | None = None, on_token: TokenCallback | None = None) -> Request:
        params = params or SamplingParams()
        if not prompt:
            raise UserError("empty prompt", "send at least one token")
        if len(prompt) >= self.max_seq_len:
            raise UserError(f"prompt of {len(prompt)} tokens does not fit the {self.max_seq_len}-token sequence limit",
                            "shorten the prompt or serve with a larger max_seq_len")
        if params.max_tokens < 1:
            raise UserError(f"max_tokens must be at least 1, got {params.max_tokens}")
        if max(prompt) >= self.model.cfg.vocab_size or min(prompt) < 0:
            raise UserError("prompt has token ids outside the vocabulary")
        req = Request(list(prompt), params, on_token, id=next(self.ids))
        self.scheduler.add(req)
        return req

    def cancel(self, req: Request) -> None:
        req.cancelled = True  # honoured at the next step boundary

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # --- the stepping thread ---------------------------------------------------------------
    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        self.scheduler.release(req)
        if req.on_token:
            req.on_token(req, None, reason)

    def _accept(self, reqs: list[Request], tokens: list[int]) -> list[Request]:
        """Record one sampled token per request, decide who is finished; return those."""
        live = [(r, t) for r, t in zip(reqs, tokens) if not r.finished]  # finished after a step launched ahead: dropped
        for req, tok in live:
            p = req.params
            if p.end_id is not None and tok == p.end_id:
                self._finish(req, "stop")
                continue
            req.output.append(tok)
            if req.on_token:
                req.on_token(req, tok, None)
            if any(sw and req.output[-len(sw):] == sw for sw in p.stop_words):
                self._finish(req, "stop_word")
            elif len(req.output) >= p.max_tokens or req.length >= self.max_seq_len:
                self._finish(req, "length")
        return [r for r, _ in live if r.finished]

    def _decode(self, decoding: list[Request], joined: bool) -> list[Request]:
        """This step's token for every decoding sequence; return who finished. joined: sequences got their first
        token this step (they decode from the next one: the batch changes)."""
        if self.ahead is not None:  # launched last step: it is this step's decode
            (reqs, sampled), self.ahead = self.ahead, None
        elif decoding:
            reqs = decoding
            sampled = self.runner.sample(reqs, self.runner.decode(reqs, self.scheduler.running))
        else:
            return []
        # the same batch next step: nobody finished since `reqs` was launched, nobody joins, no prompt in progress
        if self.overlap and not joined and len(decoding) == len(reqs) == len(self.scheduler.running):
            self.ahead = (reqs, self.runner.sample(reqs, self.runner.decode_next(sampled.tokens), ahead=1))
        return self._accept(reqs, sampled.tolist())

    def step(self) -> list[Request]:
        """Admit, prefill a chunk budget, decode one token for every running sequence; return who finished."""
        if self.ahead is not None and self.scheduler.waiting and self.scheduler.free_slots:
            self.ahead[1].wait()  # a slot freed under the step in flight is handed out only once that step has run
        for req in self.scheduler.admit():
            self.runner.start(req)
        running, waiting = self.scheduler.cancelled()
        for req in running:
            self._finish(req, "cancelled")
        for req in waiting:
            req.finish_reason = "cancelled"
            if req.on_token:
                req.on_token(req, None, "cancelled")

        done: list[Request] = []
        plan = self.scheduler.prefills()
        first: list[tuple[Request, torch.Tensor]] = []  # prompts completed this step, with their last logits
        for req, n in plan.chunks:
            logits = self.runner.prefill(req, n)
            if req.computed == len(req.prompt):
                first.append((req, logits))
        for group in plan.fresh:
            first += [(r, row[None]) for r, row in zip(group, self.runner.prefill_fresh(group))]
        joined = [r for r, _ in first]
        if first:
            done += self._accept(joined, self.runner.sample(joined, torch.cat([l for _, l in first])).tolist())
        return done + self._decode(self.scheduler.decoding(joined), bool(joined))

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None) -> list[Request]:
        """Convenience: run these prompts to completion, batched."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        reqs = [self.add(p, sp) for p, sp in zip(prompts, plist)]
        while any(not r.finished for r in reqs):
            self.step()
        return reqs
