"""Faults on a real tritonserver (CPU, the tiny model) of its own: a model stub killed mid-stream, the supervisor
loading it again; the whole server killed and restarted, the client and the OpenAI proxy reaching it at once."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import serve_app, serving

from trtqwen.serve import server
from trtqwen.clients.client import GenerationParams, TritonLLMClient
from trtqwen.errors import UserError
from trtqwen.serve.supervisor import stubs

pytestmark = pytest.mark.slow


def stub_pids(repo: Path, model: str) -> list[int]:
    return stubs(repo).get(model, [])


@pytest.fixture
def own_server(tiny_dir, tmp_path):
    from trtqwen.build.pipeline import run_build
    from trtqwen.build.spec import BuildSpec
    from trtqwen.serve.repo import generate_repo

    run_build(BuildSpec.request(str(tiny_dir), precision="bf16"), out=tmp_path / "build", until="checkpoint")
    repo = generate_repo(tmp_path / "build", tmp_path / "repo", runtime="torch")
    with serving(repo, ["ensemble"]) as (grpc, _, ports):
        yield grpc, repo, ports


def test_a_killed_stub_fails_its_streams_and_is_loaded_again(own_server):
    url, repo, _ = own_server
    client = TritonLLMClient(url, idle_timeout=5)
    long = GenerationParams(max_tokens=400, min_tokens=400, top_k=1, stop_words=[])
    (pid,) = stub_pids(repo, "tensorrt_llm")
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
    deadline = time.time() + 120  # the supervisor loads the model again: fresh stubs, answering
    while time.time() < deadline and not answers(client):
        time.sleep(0.5)
    log = (repo / "supervisor.log").read_text()
    assert answers(client) and stub_pids(repo, "tensorrt_llm") and pid not in stub_pids(repo, "tensorrt_llm"), log
    assert "loading it again" in log


def answers(client) -> bool:
    try:
        return bool(client.generate("Hello", GenerationParams(max_tokens=4, top_k=1)).text)
    except UserError:
        return False


def test_a_restarted_server_is_reached_at_once(own_server):
    import openai

    from trtqwen.clients.openai import make_app

    url, repo, ports = own_server
    with serve_app(make_app(url)) as port:
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        ask = lambda: oai.completions.create(model="qwen2.5", prompt="Hello", max_tokens=4, temperature=0)  # noqa: E731
        assert ask().choices[0].text
        streams = [TritonLLMClient(url).stream("Tell me a story.", GenerationParams(max_tokens=400, min_tokens=400,
                                                                                    stop_words=[])) for _ in range(3)]
        for s in streams:
            next(s)  # in flight when the server dies
        state = server.running_server(repo)
        os.killpg(state["pid"], signal.SIGKILL)
        for s in streams:
            with pytest.raises(UserError):
                for _ in s:
                    pass
        deadline = time.time() + 30  # SIGKILL is asynchronous: the dying group holds its ports for a moment
        while not all(server.port_free("127.0.0.1", p) for p in ports) and time.time() < deadline:
            time.sleep(0.1)
        server.start(repo, ["ensemble"], "127.0.0.1", *ports, timeout=180)  # the same ports, as a restart would
        t0 = time.perf_counter()
        while True:
            try:
                assert ask().choices[0].text
                break
            except openai.APIStatusError:
                assert time.perf_counter() - t0 < 10, "the proxy did not reach the restarted server within 10 s"
                time.sleep(0.2)
        assert TritonLLMClient(url).generate("Hello", GenerationParams(max_tokens=4)).text


def test_supervisor_judges_stubs_by_pid_not_by_reading_their_command_line(monkeypatch):
    """A stub whose /proc cmdline reads empty for a moment (seen under gVisor on the lent GPU machine, mid-request)
    is not reloaded; one whose process has died is, once. A zombie counts as dead."""
    import subprocess

    from trtqwen.serve import supervisor

    live = subprocess.Popen(["sleep", "30"])
    dead = subprocess.Popen(["true"])
    while dead.poll() is None:
        time.sleep(0.01)
    zombie = subprocess.Popen(["true"])
    time.sleep(0.3)  # exited, never waited for: a zombie
    assert supervisor.alive(live.pid) and not supervisor.alive(dead.pid) and not supervisor.alive(zombie.pid)

    scans = iter([{"m": [live.pid]}, {}, {}, {}])  # the first scan sees the stub, later scans do not
    monkeypatch.setattr(supervisor, "stubs", lambda repo, server_pid=None: next(scans, {}))
    monkeypatch.setattr(supervisor, "_get", lambda url: 200)
    reloads = []
    monkeypatch.setattr(supervisor, "reload", lambda base, model: reloads.append(model) or "reloaded")
    monkeypatch.setattr(supervisor, "INTERVAL_S", 0.01)
    rounds = iter(range(5))
    monkeypatch.setattr(supervisor, "process_start", lambda pid: next(rounds, None))
    supervisor.supervise(Path("/repo"), "http://x", 1, say=lambda msg: None)
    assert reloads == []  # alive, whatever its cmdline read

    live.kill()
    live.wait()
    rounds = iter(range(5))
    scans = iter([{"m": [live.pid]}, {}])
    supervisor.supervise(Path("/repo"), "http://x", 1, say=lambda msg: None)
    assert reloads == ["m"]  # dead: reloaded once, then the fresh (here: no) stubs are watched
    zombie.wait()
