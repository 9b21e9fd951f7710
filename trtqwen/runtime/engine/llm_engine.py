"""Continuous batching: requests join between decode steps, finished ones leave at once.

One thread calls `step()`; any thread may `add()` or `cancel()`. Each step admits waiting requests to free
KV slots, prefills up to a token budget (chunked, so long prompts do not stall running streams), then
decodes one token for every running sequence in a single batched forward.

Overlap ("one step ahead", on by default on a GPU): while the decode batch stays the same, each step launches the
next decode from the tokens just sampled, still on the device, and only then reads this step's tokens and runs the
host's bookkeeping and callbacks, so the GPU works meanwhile. Any change to the batch (a sequence joins or finishes,
a prompt is in progress) drains the pipeline: the step launched ahead is read, its finished sequences' tokens dropped,
and the next step starts from the host again. Every step accepts exactly the tokens the synchronous step would.

A failure is its request's alone (issue 30): per-request work (a prompt's penalty counts, a prompt chunk, the stop
checks and the token callback) fails only its request; where a batched op (a group's prefill, a decode, the
sampling) raises, the batch is split in halves, and again, until the requests that make it raise are found alone:
they fail (finish reason "error", `Request.error`), the others keep the tokens their half computed, which are the
tokens the whole batch would have given them (the sampler's noise is per request). Only where every request of a
batch fails alone, or the error is the device's or a TP rank's (EngineError), does `step` raise: a broken engine.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch

from trtqwen.errors import UserError
from trtqwen.runtime.engine.model_runner import ModelRunner, Sampled
from trtqwen.runtime.engine.scheduler import Scheduler
from trtqwen.runtime.engine.sequence import Request, TokenCallback
from trtqwen.runtime.layers.sampler import SamplingParams
from trtqwen.runtime.models.qwen2 import Qwen2Model
from trtqwen.runtime.tp.channel import TPError

DEVICE_ERRORS = ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "cuDNN error", "NCCL", "device-side assert")


class EngineError(RuntimeError):
    """The engine cannot step any more (the device, a TP rank, or every request of a batch failing alone)."""


def engine_fault(e: BaseException) -> bool:
    """An error no request can cause: splitting the batch would only repeat it (and a CUDA error is sticky)."""
    return isinstance(e, (EngineError, TPError, MemoryError, torch.cuda.OutOfMemoryError)) or any(
        s in str(e) for s in DEVICE_ERRORS)


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
        self.failed: list[Request] = []  # who failed alone in this step

    # --- called from any thread -------------------------------------------------------------
    def add(self, prompt: list[int], params: SamplingParams | None = None, on_token: TokenCallback | None = None,
            fault_at: int | None = None) -> Request:
        """fault_at: a test hook (the served model passes it only under TRTQWEN_TEST_FAULTS=1): the batched sampling
        raises when this request reaches its fault_at-th output token, as a request that breaks the step would."""
        params = params or SamplingParams()
        if not prompt:
            raise UserError("empty prompt", "send at least one token")
        if len(prompt) >= self.max_seq_len:
            raise UserError(f"prompt of {len(prompt)} tokens does not fit the {self.max_seq_len}-token sequence limit",
                            "shorten the prompt or serve with a larger max_seq_len")
        if params.max_tokens < 1:
            raise UserError(f"max_tokens must be at least 1, got {params.max_tokens}")
        vocab = self.model.cfg.vocab_size
        if max(prompt) >= vocab or min(prompt) < 0:
            raise UserError(f"prompt has token ids outside the vocabulary [0, {vocab})")
        if params.end_id is not None and not 0 <= params.end_id < vocab:  # it indexes the logits (min_tokens)
            raise UserError(f"end_id {params.end_id} is outside the vocabulary [0, {vocab}) (None: no end id)")
        if any(not 0 <= t < vocab for w in params.stop_words for t in w):
            raise UserError(f"stop words have token ids outside the vocabulary [0, {vocab})")
        req = Request(list(prompt), params, on_token, id=next(self.ids), fault_at=fault_at)
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

    def _fail(self, req: Request, e: BaseException, where: str) -> None:
        """This request alone fails (its slot freed, its callback told "error"); an engine fault fails them all."""
        if engine_fault(e):
            raise e
        if req.finished:
            return
        req.error = f"{where} failed: {e}"
        req.finish_reason = "error"
        self.failed.append(req)
        self.scheduler.release(req)
        if req.on_token:
            try:
                req.on_token(req, None, "error")
            except Exception:  # noqa: BLE001 - its callback is its own; the request has ended either way
                pass

    def _each(self, reqs: Sequence[Request], work: Callable[[Request], object], where: str) -> None:
        """Per-request work: an exception fails its request only."""
        for req in reqs:
            try:
                work(req)
            except Exception as e:  # noqa: BLE001
                self._fail(req, e, where)

    def _isolated(self, reqs: list[Request], run: Callable[[list[Request]], list], where: str,
                  error: Exception | None = None, top: bool = True) -> list[tuple]:
        """run(reqs) → one result per request, as [(request, result)]. Where it raises (error: it already did), the
        batch is split in halves until the requests that make it raise are alone: those fail, the others' results
        are kept. Every request of a batch of several failing alone is the engine's failure: EngineError."""
        if error is None:
            try:
                return list(zip(reqs, run(reqs)))
            except Exception as e:  # noqa: BLE001
                if engine_fault(e):
                    raise
                error = e
        if len(reqs) == 1:
            self._fail(reqs[0], error, where)
            return []
        half = len(reqs) // 2
        out = self._isolated(reqs[:half], run, where, top=False) + self._isolated(reqs[half:], run, where, top=False)
        if top and not out:
            raise EngineError(f"{where} failed for each of its {len(reqs)} requests alone: {error}") from error
        return out

    def _accept_one(self, req: Request, tok: int) -> None:
        p = req.params
        if p.end_id is not None and tok == p.end_id:
            self._finish(req, "stop")
            return
        req.output.append(tok)
        if req.on_token:
            req.on_token(req, tok, None)
        if any(sw and req.output[-len(sw):] == sw for sw in p.stop_words):
            self._finish(req, "stop_word")
        elif len(req.output) >= p.max_tokens or req.length >= self.max_seq_len:
            self._finish(req, "length")

    def _accept(self, reqs: list[Request], tokens: list[int]) -> list[Request]:
        """Record one sampled token per request, decide who is finished; return those."""
        live = [(r, t) for r, t in zip(reqs, tokens) if not r.finished]  # finished after a step launched ahead: dropped
        for req, tok in live:
            try:
                self._accept_one(req, tok)
            except Exception as e:  # noqa: BLE001 - its stop check or its callback: its own failure
                self._fail(req, e, "accepting a token")
        return [r for r, _ in live if r.finished]

    def _decode(self, decoding: list[Request], joined: bool) -> list[Request]:
        """This step's token for every decoding sequence; return who finished. joined: sequences got their first
        token this step (they decode from the next one: the batch changes)."""
        if self.ahead is not None:  # launched last step: it is this step's decode
            (reqs, sampled), self.ahead = self.ahead, None
        elif decoding:
            reqs = decoding
            try:
                sampled = self.runner.sample(reqs, self.runner.decode(reqs, self.scheduler.running))
            except Exception as e:  # noqa: BLE001 - find who makes the batch fail; the others keep their tokens
                if engine_fault(e):
                    raise
                rows = self._isolated(reqs, lambda sub: self.runner.sample(
                    sub, self.runner.decode(sub, self.scheduler.running)).tolist(), "the decode step", error=e)
                return self._accept([r for r, _ in rows], [t for _, t in rows])
        else:
            return []
        # the same batch next step: nobody finished since `reqs` was launched, nobody joins, no prompt in progress
        if self.overlap and not joined and len(decoding) == len(reqs) == len(self.scheduler.running):
            try:
                self.ahead = (reqs, self.runner.sample(reqs, self.runner.decode_next(sampled.tokens), ahead=1))
            except Exception as e:  # noqa: BLE001 - not launched: the next step runs from the host (and isolates)
                if engine_fault(e):
                    raise
                self.ahead = None
        return self._accept(reqs, sampled.tolist())

    def step(self) -> list[Request]:
        """Admit, prefill a chunk budget, decode one token for every running sequence; return who finished (those
        that failed alone too: finish reason "error"). Raises only where the engine itself is broken."""
        self.failed = []
        if self.ahead is not None and self.scheduler.waiting and self.scheduler.free_slots:
            self.ahead[1].wait()  # a slot freed under the step in flight is handed out only once that step has run
        self._each(self.scheduler.admit(), self.runner.start, "starting")
        running, waiting = self.scheduler.cancelled()
        self._each(running, lambda req: self._finish(req, "cancelled"), "cancelling")
        for req in waiting:
            req.finish_reason = "cancelled"
            if req.on_token:
                try:
                    req.on_token(req, None, "cancelled")
                except Exception:  # noqa: BLE001 - it has ended either way
                    pass

        plan = self.scheduler.prefills()
        first: list[tuple[Request, torch.Tensor]] = []  # prompts completed this step, with their last logits
        for req, n in plan.chunks:  # one request's prompt chunk: its failure is its own
            try:
                logits = self.runner.prefill(req, n)
            except Exception as e:  # noqa: BLE001
                self._fail(req, e, "the prompt's prefill")
                continue
            if req.computed == len(req.prompt):
                first.append((req, logits))
        for group in plan.fresh:
            rows = self._isolated(group, lambda sub: list(self.runner.prefill_fresh(sub)), "the prompt's prefill")
            first += [(r, row[None]) for r, row in rows]
        joined = [r for r, _ in first]
        done: list[Request] = []
        if first:
            logits = dict((id(r), l) for r, l in first)
            sampled = self._isolated(joined, lambda sub: self.runner.sample(
                sub, torch.cat([logits[id(r)] for r in sub])).tolist(), "sampling the first token")
            done += self._accept([r for r, _ in sampled], [t for _, t in sampled])
            joined = [r for r in joined if r.finish_reason != "error"]
        done += self._decode(self.scheduler.decoding(joined), bool(joined))
        return done + [r for r in self.failed if not any(r is d for d in done)]

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None) -> list[Request]:
        """Convenience: run these prompts to completion, batched."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        reqs = [self.add(p, sp) for p, sp in zip(prompts, plist)]
        while any(not r.finished for r in reqs):
            self.step()
        return reqs
