"""The frontend's handle on an engine core process (engine/core.py): start it, send it requests and cancellations,
receive one message per step in a thread of its own, and notice when it dies or hangs.

A dead engine process (killed, out of memory) ends every open request with an error at once (the receiver polls
its process every 0.1 s) and a new one is started; a hung one (SIGSTOP, a stuck device) that sends nothing for
hang_timeout_s while requests are open is killed, and the same follows. While a new one loads, `add` raises
EngineUnavailable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict
from typing import Callable

from trtqwen.runtime.engine.core import EngineSpec, Update, addresses
from trtqwen.runtime.subprocesses import child_env, python_executable

POLL_MS = 100
LOAD_TIMEOUT_S = 3600.0  # a 7B checkpoint compiles and captures its graphs in minutes


class EngineUnavailable(RuntimeError):
    """The engine process is being (re)started: nothing can be added now."""


class EngineClient:
    def __init__(self, spec: EngineSpec, on_step: Callable[[list[Update], float], None],
                 on_failure: Callable[[str], None], log: Callable[[str], None] = print, hang_timeout_s: float = 60.0):
        """on_step(updates, step seconds) and on_failure(message: every open request has failed) are called from
        the receiving thread."""
        import zmq

        self.spec, self.on_step, self.on_failure, self.log = spec, on_step, on_failure, log
        self.hang_timeout_s = hang_timeout_s
        self.zmq = zmq
        self.ctx = zmq.Context()
        self.lock = threading.Lock()  # the request socket is used from Triton's threads and the sender's
        self.open: set[str] = set()  # requests the engine has and has not finished
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self.running = True
        self.starting = threading.Event()
        self._start()
        self.thread = threading.Thread(target=self._receive, name="trtqwen-engine-client", daemon=True)
        self.thread.start()

    # --- the process -----------------------------------------------------------------------------------------
    def _start(self) -> None:
        """A fresh engine process on fresh sockets; returns once it is ready, or raises its load error. The lock is
        held only to swap the sockets: adding and cancelling are refused (not blocked) while it loads."""
        self.starting.set()
        with self.lock:
            self.dir = tempfile.mkdtemp(prefix="trtqwen-engine-")  # 0700: nobody else may send it pickles
            requests_addr, steps_addr = addresses(self.dir)
            self.requests, self.steps = self.ctx.socket(self.zmq.PUSH), self.ctx.socket(self.zmq.PULL)
            self.requests.setsockopt(self.zmq.SNDHWM, 0)  # never block a Triton thread on a full queue
            self.steps.setsockopt(self.zmq.RCVHWM, 0)
            self.requests.bind(requests_addr)
            self.steps.bind(steps_addr)
            self.proc = subprocess.Popen([python_executable(), "-m", "trtqwen.runtime.engine.core",
                                          json.dumps(asdict(self.spec)), self.dir, str(os.getpid())], env=child_env())
        deadline = time.time() + LOAD_TIMEOUT_S
        while True:
            if self.steps.poll(POLL_MS):
                kind, payload = self.steps.recv_pyobj()[:2]
                if kind == "ready":
                    self.info = payload
                    self.starting.clear()
                    return
                with self.lock:
                    self._stop_process()
                raise RuntimeError(f"the engine process could not start: {payload}")
            if self.proc.poll() is not None or time.time() > deadline:
                code = self.proc.poll()
                with self.lock:
                    self._stop_process()
                raise RuntimeError(f"the engine process {'exited with code ' + str(code) if code is not None else 'did not load in time'} "
                                   "before it was ready (its output is in the server log)")

    def _stop_process(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for s in (self.requests, self.steps):
            s.close(linger=0)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _restart(self, why: str) -> None:
        """Every open request failed with why; a new engine process (retried until one loads, or close())."""
        self.starting.set()
        with self.lock:
            self.open.clear()
            self._stop_process()
        self.on_failure(why)
        delay = 1.0
        while self.running:
            try:
                self._start()
                self.log(f"a new engine process is ready (pid {self.proc.pid})")
                return
            except RuntimeError as e:
                self.log(f"{e}; trying again in {delay:.0f} s")
                time.sleep(delay)
                delay = min(30.0, delay * 2)

    # --- requests ----------------------------------------------------------------------------------------------
    def add(self, rid: str, prompt: list[int], params, fault_at: int | None = None) -> None:
        if self.starting.is_set():
            raise EngineUnavailable("the engine is starting again after a failure: retry in a moment")
        with self.lock:
            if self.starting.is_set():
                raise EngineUnavailable("the engine is starting again after a failure: retry in a moment")
            self.open.add(rid)
            self.requests.send_pyobj(("add", rid, prompt, params, fault_at))

    def cancel(self, rid: str) -> None:
        if self.starting.is_set():
            return  # its request failed with the engine that had it
        with self.lock:
            if rid in self.open and not self.starting.is_set():
                self.requests.send_pyobj(("cancel", rid))

    # --- the receiving thread ----------------------------------------------------------------------------------
    def _receive(self) -> None:
        last = time.monotonic()
        while self.running:
            if self.starting.is_set():
                time.sleep(0.05)
                continue
            try:
                ready = self.steps.poll(POLL_MS)
            except self.zmq.ZMQError:  # the socket was replaced by a restart meanwhile
                continue
            if ready:
                kind, payload, *rest = self.steps.recv_pyobj()
                last = time.monotonic()
                if kind == "step":
                    updates = [Update(*u) for u in payload]
                    with self.lock:
                        self.open.difference_update(u.rid for u in updates if u.reason is not None)
                    self.on_step(updates, rest[0])
                elif kind == "failed":
                    with self.lock:
                        self.open.clear()
                    self.on_failure(payload)
                elif kind == "broken":
                    self._restart(payload)
                continue
            code = self.proc.poll()
            if code is not None and self.running:
                self._restart(f"the engine process died (exit code {code})")
            elif self.open and time.monotonic() - last > self.hang_timeout_s:
                self._restart(f"the engine process did not step for {self.hang_timeout_s:.0f} s (hung)")
            if not self.open:
                last = time.monotonic()  # idle is not hung

    def close(self) -> None:
        self.running = False
        with self.lock:
            if self.proc and self.proc.poll() is None:
                try:
                    self.requests.send_pyobj(("stop",))
                    self.proc.wait(10)
                except (subprocess.TimeoutExpired, self.zmq.ZMQError):
                    pass
            self._stop_process()
        self.thread.join(timeout=5)
        self.ctx.term()
