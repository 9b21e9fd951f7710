"""Continuous batching: requests join between decode steps, finished ones leave at once.

One thread calls `step()`; any thread may `add()` or `cancel()`. Each step admits waiting requests to free
KV slots, prefills up to a token budget (chunked, so long prompts do not stall running streams), then
decodes one token for every running sequence in a single batched forward.
"""

from __future__ import annotations

import itertools

import torch

from trtqwen.errors import UserError
from trtqwen.runtime.engine.model_runner import ModelRunner
from trtqwen.runtime.engine.scheduler import Scheduler
from trtqwen.runtime.engine.sequence import Request, TokenCallback
from trtqwen.runtime.layers.sampler import SamplingParams
from trtqwen.runtime.models.qwen2 import Qwen2Model


class LLMEngine:
    def __init__(self, model: Qwen2Model, max_slots: int = 8, max_seq_len: int | None = None, prefill_chunk: int = 512,
                 cuda_graphs: bool | None = None):
        """cuda_graphs: replay decode steps from CUDA graphs (default: on when the model is on a GPU)."""
        self.model = model
        self.max_seq_len = min(max_seq_len or model.max_positions, model.max_positions)
        self.runner = ModelRunner(model, max_slots, self.max_seq_len, cuda_graphs)
        self.graphs = self.runner.graphs
        self.scheduler = Scheduler(max_slots, prefill_chunk)
        self.ids = itertools.count(1)

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

    def _accept(self, reqs: list[Request], logits: torch.Tensor) -> list[Request]:
        """Sample one token per request, record it, decide who is finished; return those."""
        tokens = self.runner.sample(reqs, logits)
        self.runner.count(reqs, tokens)
        for req, tok in zip(reqs, tokens):
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
        return [r for r in reqs if r.finished]

    def step(self) -> list[Request]:
        """Admit, prefill a chunk budget, decode one token for every running sequence; return who finished."""
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
        if first:
            done += self._accept([r for r, _ in first], torch.cat([l for _, l in first]))

        decoding = self.scheduler.decoding([r for r, _ in first])
        if decoding:
            done += self._accept(decoding, self.runner.decode(decoding, self.scheduler.running))
        return done

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None) -> list[Request]:
        """Convenience: run these prompts to completion, batched."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        reqs = [self.add(p, sp) for p, sp in zip(prompts, plist)]
        while any(not r.finished for r in reqs):
            self.step()
        return reqs
