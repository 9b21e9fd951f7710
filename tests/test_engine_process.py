"""The engine core in a process of its own (runtime/engine/core.py) and its client (engine/client.py), on the CPU:
the same tokens as the engine in-process, one message per step, a killed or frozen engine process failing its
requests at once (or after the hang timeout) and replaced by a new one that answers."""

import os
import signal
import threading
import time

import pytest

from trtqwen.runtime import LLMEngine, SamplingParams, load_model
from trtqwen.runtime.engine.client import EngineClient, EngineUnavailable
from trtqwen.runtime.engine.core import EngineSpec

pytestmark = pytest.mark.slow


class Collector:
    """on_step/on_failure for the client: every request's tokens and how it ended."""

    def __init__(self):
        self.tokens: dict[str, list[int]] = {}
        self.reasons: dict[str, str] = {}
        self.failures: list[tuple[float, str]] = []
        self.messages = 0
        self.done = threading.Condition()

    def on_step(self, updates, step_s):
        with self.done:
            self.messages += 1
            for u in updates:
                self.tokens.setdefault(u.rid, []).extend(u.tokens)
                if u.reason is not None:
                    self.reasons[u.rid] = u.reason
            self.done.notify_all()

    def on_failure(self, message):
        with self.done:
            self.failures.append((time.monotonic(), message))
            self.done.notify_all()

    def wait(self, what, timeout=120):
        with self.done:
            assert self.done.wait_for(what, timeout), (self.reasons, self.failures)


@pytest.fixture(scope="module")
def checkpoint(tiny_dir, tmp_path_factory):
    from trtqwen.build.pipeline import run_build
    from trtqwen.build.spec import BuildSpec

    out = tmp_path_factory.mktemp("engine-proc") / "build"
    run_build(BuildSpec.request(str(tiny_dir), precision="bf16"), out=out, until="checkpoint")
    return out / "checkpoint"


@pytest.fixture(scope="module")
def client(checkpoint):
    got = Collector()
    c = EngineClient(EngineSpec(path=str(checkpoint), max_seq_len=512, max_batch_size=8), got.on_step, got.on_failure,
                     log=lambda m: None, hang_timeout_s=3)
    yield c, got
    c.close()


def engine_pid(c: EngineClient) -> int:
    return c.proc.pid


PROMPTS = [[151644, 872, 198, 9707, 0], [40, 1079, 264, 1273, 13, 362], [785, 6722, 315, 9625, 374]]
PARAMS = [SamplingParams(max_tokens=12, top_k=1, end_id=None),
          SamplingParams(max_tokens=10, temperature=0.8, top_k=40, seed=7, end_id=None),
          SamplingParams(max_tokens=9, temperature=1.0, top_p=0.9, seed=3, repetition_penalty=1.2, end_id=None)]


def test_the_engine_process_gives_the_tokens_the_engine_gives_in_process(client, checkpoint):
    c, got = client
    expected = LLMEngine(load_model(checkpoint, max_positions=512), max_slots=8, max_seq_len=512).generate(
        PROMPTS, PARAMS)
    for i, (prompt, params) in enumerate(zip(PROMPTS, PARAMS)):
        c.add(f"same-{i}", prompt, params)
    got.wait(lambda: all(f"same-{i}" in got.reasons for i in range(3)))
    assert [got.tokens[f"same-{i}"] for i in range(3)] == [r.output for r in expected]  # greedy and seeded alike
    assert [got.reasons[f"same-{i}"] for i in range(3)] == ["length"] * 3
    assert got.messages < sum(p.max_tokens for p in PARAMS)  # one message per step carries every stream


def test_a_bad_request_is_rejected_by_the_engine_alone(client):
    c, got = client
    c.add("bad", [151936 + 5], SamplingParams(max_tokens=3))
    c.add("good", PROMPTS[0], SamplingParams(max_tokens=4, top_k=1, end_id=None))
    got.wait(lambda: "bad" in got.reasons and "good" in got.reasons)
    assert got.reasons["bad"] == "rejected" and got.reasons["good"] == "length" and not got.failures


def test_a_cancelled_request_ends_as_cancelled(client):
    c, got = client
    c.add("long", PROMPTS[1], SamplingParams(max_tokens=400, min_tokens=400, top_k=1, end_id=None))
    got.wait(lambda: len(got.tokens.get("long", [])) >= 2)
    c.cancel("long")
    got.wait(lambda: "long" in got.reasons)
    assert got.reasons["long"] == "cancelled" and len(got.tokens["long"]) < 400


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_dead_or_hung_engine_process_fails_its_requests_and_a_new_one_answers(client, sig):
    """kill -9: its requests fail within 1 s; SIGSTOP: after the hang timeout (3 s here); either way a new engine
    process takes over and answers, and meanwhile adding is refused as unavailable, not queued for ever."""
    c, got = client
    before = len(got.failures)
    rid = f"victim-{sig}"
    c.add(rid, PROMPTS[2], SamplingParams(max_tokens=400, min_tokens=400, top_k=1, end_id=None))
    got.wait(lambda: len(got.tokens.get(rid, [])) >= 2)
    old = engine_pid(c)
    t0 = time.monotonic()
    os.kill(old, sig)
    got.wait(lambda: len(got.failures) > before, timeout=30)
    took = got.failures[-1][0] - t0
    assert took < (1.0 if sig == signal.SIGKILL else 3.0 + 1.5), (took, got.failures[-1])
    assert ("died" if sig == signal.SIGKILL else "hung") in got.failures[-1][1]
    deadline = time.monotonic() + 120
    while True:  # refused as unavailable (at once, never blocked) until the new process is ready, then answered
        asked = time.monotonic()
        try:
            c.add(f"after-{sig}", PROMPTS[0], SamplingParams(max_tokens=4, top_k=1, end_id=None))
            break
        except EngineUnavailable:
            assert time.monotonic() - asked < 0.5 and time.monotonic() < deadline
            time.sleep(0.2)
    got.wait(lambda: f"after-{sig}" in got.reasons)
    assert got.reasons[f"after-{sig}"] == "length" and engine_pid(c) != old
    if sig == signal.SIGSTOP:
        with pytest.raises(ProcessLookupError):  # the frozen one was killed, not left behind
            os.kill(old, signal.SIGCONT)


def test_the_engine_process_dies_with_its_frontend(checkpoint, tmp_path):
    """An engine whose frontend (the Triton stub) is killed goes too: it would hold the GPU's memory."""
    import subprocess
    import sys

    script = tmp_path / "frontend.py"
    script.write_text(
        "import sys, time\n"
        "from trtqwen.runtime.engine.client import EngineClient\n"
        "from trtqwen.runtime.engine.core import EngineSpec\n"
        f"c = EngineClient(EngineSpec(path={str(checkpoint)!r}, max_seq_len=256), lambda u, s: None, lambda m: None)\n"
        "print(c.proc.pid, flush=True)\n"
        "time.sleep(600)\n")
    frontend = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    engine = int(frontend.stdout.readline())
    frontend.kill()
    frontend.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(engine, 0)
        except ProcessLookupError:
            return
        try:
            os.waitpid(engine, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    pytest.fail("the engine process outlived its frontend")
