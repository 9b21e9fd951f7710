"""Continuous batching: requests join between decode steps, finished ones leave at once.

One thread calls `step()`; any thread may `add()` or `cancel()`. Each step admits waiting requests to free
KV slots, prefills up to a token budget (chunked, so long prompts do not stall running streams), then
decodes one token for every running sequence in a single batched forward.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from trtqwen.errors import UserError
from trtqwen.runtime.model import Qwen2Model
from trtqwen.runtime.sampling import SamplingParams, sample

TokenCallback = Callable[["Request", "int | None", "str | None"], None]


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    on_token: TokenCallback | None = None
    id: int = 0
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop (end_id), stop_word, length, cancelled
    slot: int | None = None
    computed: int = 0  # prompt tokens already in the KV cache
    cancelled: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def length_groups(reqs: list[Request], waste: float = 2.0) -> list[list[Request]]:
    """Prompts of similar length together, so padding to a group's longest at most doubles its work."""
    groups: list[list[Request]] = []
    real = 0  # prompt tokens in the last group
    for r in sorted(reqs, key=lambda r: len(r.prompt)):
        n = len(r.prompt)  # sorted: the longest so far, so the group pads to it
        if groups and n * (len(groups[-1]) + 1) <= waste * (real + n):
            groups[-1].append(r)
            real += n
        else:
            groups.append([r])
            real = n
    return groups


class LLMEngine:
    def __init__(self, model: Qwen2Model, max_slots: int = 8, max_seq_len: int | None = None, prefill_chunk: int = 512,
                 cuda_graphs: bool | None = None):
        """cuda_graphs: replay decode steps from CUDA graphs (default: on when the model is on a GPU)."""
        self.model = model
        self.max_seq_len = min(max_seq_len or model.max_positions, model.max_positions)
        self.cache = model.new_cache(max_slots, self.max_seq_len)
        self.graphs = None
        if cuda_graphs if cuda_graphs is not None else model.device.type == "cuda":
            from trtqwen.runtime.cuda_graphs import GraphedDecode

            runner = getattr(model, "graphed_decode", None)  # a tensor-parallel model graphs every rank (tp.py)
            self.graphs = (runner(self.cache, max_slots, self.max_seq_len) if runner
                           else GraphedDecode(model, self.cache, max_slots, self.max_seq_len))
            if model.device.type == "cuda":
                self.graphs.capture_all()
        self.prefill_chunk = prefill_chunk
        self.waiting: list[Request] = []
        self.running: dict[int, Request] = {}  # slot → request
        self.free_slots = list(range(max_slots))
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.counts: torch.Tensor | None = None  # [slots, V] token counts, only once penalties are asked for
        self.out_counts: torch.Tensor | None = None

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
        with self.lock:
            self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        req.cancelled = True  # honoured at the next step boundary

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- the stepping thread ---------------------------------------------------------------
    def _admit(self) -> None:
        with self.lock:
            self.free_slots.sort()  # lowest slots first: the decode batch stays a short dense range
            while self.waiting and self.free_slots:
                req = self.waiting.pop(0)
                req.slot = self.free_slots.pop(0)
                self.running[req.slot] = req
                if self._wants_penalties(req.params):
                    self._init_counts(req)

    @staticmethod
    def _wants_penalties(p: SamplingParams) -> bool:
        return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0

    def _init_counts(self, req: Request) -> None:
        if self.counts is None:
            shape = (self.cache.num_slots, self.model.cfg.vocab_size)
            self.counts = torch.zeros(shape, dtype=torch.float32, device=self.model.device)
            self.out_counts = torch.zeros_like(self.counts)
        self.counts[req.slot].zero_()
        self.out_counts[req.slot].zero_()
        self.counts[req.slot].index_add_(0, torch.tensor(req.prompt, device=self.model.device),
                                         torch.ones(len(req.prompt), device=self.model.device))

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        if req.slot is not None:
            with self.lock:
                self.running.pop(req.slot, None)
                self.free_slots.append(req.slot)
        if req.on_token:
            req.on_token(req, None, reason)

    def _accept(self, reqs: list[Request], tokens: list[int]) -> None:
        """Record one sampled token per request; decide who is finished."""
        if self.counts is not None:
            slots = torch.tensor([r.slot for r in reqs], device=self.model.device)
            toks = torch.tensor(tokens, device=self.model.device)
            self.counts[slots, toks] += 1
            self.out_counts[slots, toks] += 1
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

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        steps = torch.tensor([len(r.output) for r in reqs])
        counts = out_counts = None
        if self.counts is not None:
            slots = torch.tensor([r.slot for r in reqs], device=self.model.device)
            counts, out_counts = self.counts[slots], self.out_counts[slots]
        toks = sample(logits, [r.params for r in reqs], steps, counts, out_counts, [len(r.output) for r in reqs])
        return toks.tolist()

    def step(self) -> list[Request]:
        """Admit, prefill a chunk budget, decode one token for every running sequence; return who finished."""
        self._admit()
        for req in [r for r in self.running.values() if r.cancelled]:
            self._finish(req, "cancelled")
        with self.lock:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                req.finish_reason = "cancelled"
                if req.on_token:
                    req.on_token(req, None, "cancelled")
        done: list[Request] = []

        budget = self.prefill_chunk
        first_tokens: list[tuple[Request, torch.Tensor]] = []
        fresh: list[Request] = []  # whole prompts of new sequences: batched into padded forwards
        for req in sorted(self.running.values(), key=lambda r: r.id):
            if req.computed >= len(req.prompt) or budget <= 0:
                continue
            n = min(budget, len(req.prompt) - req.computed)
            budget -= n
            if req.computed == 0 and n == len(req.prompt):
                fresh.append(req)
                continue
            chunk = torch.tensor(req.prompt[req.computed : req.computed + n], device=self.model.device)
            logits = self.model.prefill(chunk, self.cache, req.slot, req.computed)
            req.computed += n
            if req.computed == len(req.prompt):
                first_tokens.append((req, logits[-1:]))
        for group in length_groups(fresh):
            prompts = [torch.tensor(r.prompt, device=self.model.device) for r in group]
            logits = self.model.prefill_fresh(prompts, self.cache, [r.slot for r in group])
            for r, row in zip(group, logits):
                r.computed = len(r.prompt)
                first_tokens.append((r, row[None]))
        if first_tokens:
            reqs = [r for r, _ in first_tokens]
            self._accept(reqs, self._sample(reqs, torch.cat([l for _, l in first_tokens])))
            done += [r for r in reqs if r.finished]

        decoding = [r for r in self.running.values() if r.output and r.computed == len(r.prompt)
                    and not any(r is f for f, _ in first_tokens)]
        if decoding:
            B = max(r.slot for r in decoding) + 1
            if self.graphs is not None:
                B = self.graphs.padded(B)
            tokens = torch.zeros(B, dtype=torch.long)
            positions = torch.zeros(B, dtype=torch.long)
            for slot in range(B):  # idle or prefilling slots write where their next prefill overwrites
                r = self.running.get(slot)
                positions[slot] = r.computed if r is not None else 0
            for r in decoding:
                tokens[r.slot] = r.output[-1]
                positions[r.slot] = r.length - 1
            if self.graphs is not None:
                logits = self.graphs(tokens, positions)
            else:
                logits = self.model.decode(tokens.to(self.model.device), positions.to(self.model.device), self.cache)
            rows = torch.tensor([r.slot for r in decoding], device=logits.device)
            self._accept(decoding, self._sample(decoding, logits[rows]))
            done += [r for r in decoding if r.finished]
        return done

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None) -> list[Request]:
        """Convenience: run these prompts to completion, batched."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        reqs = [self.add(p, sp) for p, sp in zip(prompts, plist)]
        while any(not r.finished for r in reqs):
            self.step()
        return reqs
