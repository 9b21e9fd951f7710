"""Faults on a real tritonserver (CPU, the tiny model) of its own: a model stub killed mid-stream."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import free_ports

from trtqwen import server
from trtqwen.client import GenerationParams, TritonLLMClient
from trtqwen.errors import UserError

pytestmark = pytest.mark.slow


def stub_pids(model: str) -> list[int]:
    """The python backend stubs serving `model` (their command line names the model's directory)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"triton_python_backend_stub") and any(f"/{model}/".encode() in c for c in cmd):
            pids.append(int(d.name))
    return pids


@pytest.fixture
def own_server(tiny_dir, tmp_path):
    from trtqwen.build import run_build
    from trtqwen.repo import generate_repo

    run_build(model=str(tiny_dir), precision="bf16", out=tmp_path / "build", until="checkpoint")
    repo = generate_repo(tmp_path / "build", tmp_path / "repo", runtime="torch")
    http, grpc, metrics = free_ports(3)
    server.start(repo, ["ensemble"], "127.0.0.1", http, grpc, metrics, timeout=180)
    try:
        yield f"127.0.0.1:{grpc}"
    finally:
        server.stop(repo)


def test_a_killed_stub_fails_streams_in_bounded_time(own_server):
    client = TritonLLMClient(own_server, idle_timeout=5)
    long = GenerationParams(max_tokens=400, min_tokens=400, top_k=1, stop_words=[])
    (pid,) = stub_pids("tensorrt_llm")
    outcome = {}

    def user():
        t0 = time.perf_counter()
        try:
            for _ in client.stream("Tell me a long story.", long):
                outcome.setdefault("first", time.perf_counter() - t0)
        except UserError as e:
            outcome["error"], outcome["after"] = e.message, time.perf_counter() - t0

    th = threading.Thread(target=user)
    th.start()
    deadline = time.time() + 30
    while "first" not in outcome and time.time() < deadline:
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)  # the stream is in flight
    th.join(60)
    assert not th.is_alive() and "error" in outcome, outcome  # the client gave up instead of waiting for ever
    with pytest.raises(UserError):  # and a new request fails at once, with the server's word for it
        client.generate("Hello", GenerationParams(max_tokens=4))
