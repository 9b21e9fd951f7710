"""Which requests run this step: KV-slot allocation, prefill chunks under a token budget, the decode batch."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from trtqwen.runtime.engine.sequence import Request


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


@dataclass
class Prefills:
    chunks: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens) continuing or partial
    fresh: list[list[Request]] = field(default_factory=list)  # whole prompts of new sequences, in length groups


class Scheduler:
    """Any thread may add() or cancel(); the stepping thread does the rest (under the lock where they meet)."""

    def __init__(self, max_slots: int, prefill_chunk: int):
        self.prefill_chunk = prefill_chunk
        self.waiting: list[Request] = []
        self.running: dict[int, Request] = {}  # slot → request
        self.free_slots = list(range(max_slots))
        self.lock = threading.Lock()

    def add(self, req: Request) -> None:
        with self.lock:
            self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[Request]:
        """Waiting requests into free KV slots, lowest slots first (the decode batch stays a short dense range)."""
        admitted = []
        with self.lock:
            self.free_slots.sort()
            while self.waiting and self.free_slots:
                req = self.waiting.pop(0)
                req.slot = self.free_slots.pop(0)
                req.scheduled_ns = time.monotonic_ns()
                self.running[req.slot] = req
                admitted.append(req)
        return admitted

    def cancelled(self) -> tuple[list[Request], list[Request]]:
        """(running, waiting) requests cancelled since the last step; the waiting ones leave the queue here."""
        running = [r for r in self.running.values() if r.cancelled]
        with self.lock:
            waiting = [r for r in self.waiting if r.cancelled]
            for req in waiting:
                self.waiting.remove(req)
        return running, waiting

    def release(self, req: Request) -> None:
        if req.slot is not None:
            with self.lock:
                self.running.pop(req.slot, None)
                self.free_slots.append(req.slot)

    def prefills(self) -> Prefills:
        """Prompt tokens to compute this step, up to the chunk budget, oldest requests first."""
        budget, out, fresh = self.prefill_chunk, Prefills(), []
        for req in sorted(self.running.values(), key=lambda r: r.id):
            if req.computed >= len(req.prompt) or budget <= 0:
                continue
            n = min(budget, len(req.prompt) - req.computed)
            budget -= n
            if req.computed == 0 and n == len(req.prompt):
                fresh.append(req)
            else:
                out.chunks.append((req, n))
        out.fresh = length_groups(fresh)
        return out

    def decoding(self, just_prefilled: list[Request]) -> list[Request]:
        """Running sequences past their prompt, except those whose first token was sampled this step."""
        return [r for r in self.running.values() if r.output and r.computed == len(r.prompt)
                and not any(r is f for f in just_prefilled)]
