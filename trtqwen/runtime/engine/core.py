"""The engine core in a process of its own: requests and cancellations in, one message per engine step out.

The shape of vLLM V1's EngineCoreProc and SGLang's Scheduler process: the model, the scheduler and the sampler step
in a busy loop that shares no interpreter (no GIL) with the server that builds and sends responses. The served
`tensorrt_llm` model starts it (`EngineClient`, engine/client.py) and keeps validation, detokenization and sending.
Wire: two pyzmq sockets over ipc in a directory only this user reads (PUSH/PULL, pickled tuples):

    in   ("add", rid, prompt, SamplingParams, fault_at) · ("cancel", rid) · ("stop",)
    out  ("ready", info) · ("step", [Update], step_s) · ("failed", message) · ("broken", message)

    python -m trtqwen.runtime.engine.core <spec json> <ipc dir> <parent pid>
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

from trtqwen.errors import UserError

PR_SET_PDEATHSIG = 1
IDLE_POLL_MS = 50


@dataclass
class EngineSpec:
    """What the served model asks of its engine (config.pbtxt parameters)."""
    path: str
    device: str = "cpu"
    gpus: list[int] | None = None
    tp: int = 1
    max_seq_len: int = 2048
    max_batch_size: int = 8
    max_num_tokens: int = 8192
    kv_fraction: float = 0.9
    compile: bool = True
    overlap: bool | None = None


class Update(NamedTuple):
    """One request's news from one step: tokens, and how it ended (reason, its error when it failed alone). Sent as
    a plain tuple: this module runs as __main__ in the engine process."""
    rid: str
    tokens: list[int]
    reason: str | None = None
    error: str | None = None
    scheduled_ns: int | None = None


def addresses(ipc_dir: str) -> tuple[str, str]:
    return f"ipc://{ipc_dir}/requests", f"ipc://{ipc_dir}/steps"


class Core:
    def __init__(self, spec: EngineSpec):
        import torch

        from trtqwen.runtime import LLMEngine, load_model

        self.spec, self.LLMEngine, self.torch = spec, LLMEngine, torch
        self.model = load_model(spec.path, spec.device, max_positions=spec.max_seq_len, tp_ranks=True,
                                gpu_ids=spec.gpus, tp=spec.tp)
        if spec.device.startswith("cuda") and spec.compile:
            self.model.compile()  # fused decode blocks; the engine then captures CUDA graphs of them
        self.slots = self._slots()
        self.engine = self._new_engine()
        self.requests: dict[str, object] = {}  # rid → the engine's Request, while it runs
        self.updates: dict[str, list] = {}  # this step's news, an Update's fields per request

    def _slots(self) -> int:
        """KV slots: max_batch_size, fewer where the GPU memory left after the weights cannot hold them."""
        spec = self.spec
        if not spec.device.startswith("cuda"):
            return spec.max_batch_size
        c = getattr(self.model, "local", self.model).cfg  # a TP model's cache: this rank's KV heads
        per_slot = 2 * c.num_layers * c.num_kv_heads * c.head_dim * spec.max_seq_len * self.model.dtype.itemsize
        free, _ = self.torch.cuda.mem_get_info(self.torch.device(spec.device))
        return max(1, min(spec.max_batch_size, int(free * spec.kv_fraction // per_slot)))

    def _new_engine(self):
        return self.LLMEngine(self.model, max_slots=self.slots, max_seq_len=self.spec.max_seq_len,
                              prefill_chunk=self.spec.max_num_tokens, overlap=self.spec.overlap)

    def info(self) -> dict:
        return {"vocab": int(self.model.cfg.vocab_size), "slots": self.slots, "device": self.spec.device,
                "tp": getattr(self.model, "tp_size", 1), "pid": os.getpid()}

    def _update(self, rid: str) -> list:
        """This step's [rid, tokens, reason, error, scheduled_ns] of a request (an Update's fields)."""
        u = self.updates.get(rid)
        if u is None:
            u = self.updates[rid] = [rid, [], None, None, None]
        return u

    def handle(self, msg: tuple) -> bool:
        """One message from the frontend; False for a stop."""
        kind = msg[0]
        if kind == "add":
            _, rid, prompt, params, fault_at = msg

            def on_token(req, token, reason, rid=rid):
                u = self._update(rid)
                if token is not None:
                    u[1].append(token)
                u[4] = req.scheduled_ns
                if reason is not None:
                    u[2], u[3] = reason, req.error
                    self.requests.pop(rid, None)

            try:
                self.requests[rid] = self.engine.add(prompt, params, on_token, fault_at=fault_at)
            except UserError as e:  # the client's mistake, found by the engine's own checks
                self.updates[rid] = [rid, [], "rejected", str(e), None]
            except Exception as e:  # noqa: BLE001 - this request's failure, not the engine's
                self.updates[rid] = [rid, [], "error", f"{type(e).__name__}: {e}", None]
        elif kind == "cancel":
            req = self.requests.get(msg[1])
            if req is not None:
                self.engine.cancel(req)
        return kind != "stop"

    def step(self) -> float:
        t0 = time.perf_counter()
        self.engine.step()
        return time.perf_counter() - t0

    def fail_all(self) -> None:
        """A broken engine: its requests are lost (the frontend fails their streams); a fresh one for the next."""
        self.requests.clear()
        self.updates.clear()
        self.engine = self._new_engine()

    def close(self) -> None:
        if hasattr(self.model, "close"):
            self.model.close()  # TP rank processes


def run(spec: EngineSpec, ipc_dir: str) -> int:
    import zmq

    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    outbox.setsockopt(zmq.SNDHWM, 0)  # a step never waits for the frontend
    requests_addr, steps_addr = addresses(ipc_dir)
    inbox.connect(requests_addr)
    outbox.connect(steps_addr)
    try:
        core = Core(spec)
    except Exception as e:  # noqa: BLE001 - the frontend reports it as the model's load error
        outbox.send_pyobj(("broken", f"{type(e).__name__}: {e}"))
        outbox.close(linger=2000)
        return 1
    outbox.send_pyobj(("ready", core.info()))
    poller = zmq.Poller()
    poller.register(inbox, zmq.POLLIN)
    running = True
    try:
        while running:
            timeout = 0 if core.engine.has_work() else IDLE_POLL_MS
            while running and poller.poll(timeout):  # every message that is there, then one step
                running = core.handle(inbox.recv_pyobj())
                timeout = 0
            step_s = 0.0
            if running and core.engine.has_work():
                try:
                    step_s = core.step()
                except Exception as e:  # noqa: BLE001 - LLMEngine isolates requests: what reaches here is the engine's
                    outbox.send_pyobj(("failed", f"generation failed: {e}"))
                    core.fail_all()
                    continue
            if core.updates:
                outbox.send_pyobj(("step", [tuple(u) for u in core.updates.values()], step_s))
                core.updates = {}
    except Exception as e:  # noqa: BLE001
        outbox.send_pyobj(("broken", f"the engine process failed: {type(e).__name__}: {e}"))
        return 1
    finally:
        core.close()
        outbox.close(linger=1000)
        inbox.close(linger=0)
    return 0


def main() -> int:
    # Die with the served model (however it dies): an orphaned engine would hold the GPU's memory.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    spec, ipc_dir, parent = EngineSpec(**json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3])
    if os.getppid() != parent:  # the parent died before the line above took effect
        return 1
    # A stop signals the whole process group; the served model ends this process itself ("stop"), after its streams.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    return run(spec, ipc_dir)


if __name__ == "__main__":
    sys.exit(main())
