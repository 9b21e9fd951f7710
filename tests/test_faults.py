"""Faults on a real tritonserver (CPU, the tiny model) of its own, and what its supervisor does about them: a model
stub killed (twice, and again on a restarted server), frozen, or unloadable; the server itself killed; the
supervisor killed; the whole group killed and started again. And the admin APIs a web page must not reach."""

import json
import os
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_ports, serve_app, serving

from trtqwen.serve import admin, server
from trtqwen.clients.client import GenerationParams, TritonLLMClient
from trtqwen.errors import UserError
from trtqwen.serve.process import alive, http_status, port_free
from trtqwen.serve.supervisor import processes, stub_processes, stubs

pytestmark = pytest.mark.slow


def stub_pids(repo: Path, model: str) -> list[int]:
    return stubs(repo).get(model, [])


@pytest.fixture(scope="module")
def own_server(tiny_dir, tmp_path_factory):
    from trtqwen.build.pipeline import run_build
    from trtqwen.build.spec import BuildSpec
    from trtqwen.serve.repo import generate_repo

    root = tmp_path_factory.mktemp("faults")
    run_build(BuildSpec.request(str(tiny_dir), precision="bf16"), out=root / "build", until="checkpoint")
    repo = generate_repo(root / "build", root / "repo", runtime="torch")
    with serving(repo, ["ensemble"]) as (grpc, _, ports):
        yield grpc, repo, ports


def ready(ports) -> bool:
    return http_status(f"http://127.0.0.1:{ports[0]}/v2/health/ready") == 200


def wait_for(what, seconds: float, why: str = "") -> float:
    t0 = time.time()
    while not what():
        assert time.time() - t0 < seconds, why or f"not within {seconds} s"
        time.sleep(0.25)
    return time.time() - t0


def regions(repo: Path) -> set[str]:
    """The shared-memory regions of repo's live python-backend stubs."""
    return {region for _, region in stub_processes(repo).values()}


def log_of(repo: Path) -> str:
    return (repo / "supervisor.log").read_text()


def test_a_web_page_cannot_load_a_model_but_the_key_can(own_server, tmp_path):
    """CSRF against 127.0.0.1: a text/plain POST (no CORS preflight) with a `file:` override of model.py is refused
    on HTTP and gRPC; inference still works; trtqwen's key (in a file only its owner reads) opens the API."""
    import base64

    import tritonclient.grpc as grpcclient

    url, repo, ports = own_server
    marker = tmp_path / "pwned"
    payload = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')\nclass TritonPythonModel: pass\n"
    body = json.dumps({"parameters": {"config": json.dumps({"backend": "python"}),
                                      "file:1/model.py": base64.b64encode(payload.encode()).decode()}}).encode()
    base = f"http://127.0.0.1:{ports[0]}"
    for path in ("/v2/repository/models/evil/load", "/v2/repository/index", "/v2/logging", "/v2/models/stats",
                 "/v2/systemsharedmemory/region/x/register"):
        code = http_status(base + path, data=body, headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
        assert code == 403, (path, code)
    with pytest.raises(Exception, match="restricted"):
        grpcclient.InferenceServerClient(url).load_model("evil", config=json.dumps({"backend": "python"}),
                                                          files={"file:1/model.py": payload.encode()})
    time.sleep(1)
    assert not marker.exists() and not (repo / "evil").exists()

    key_file = repo / admin.KEY_FILE
    assert key_file.stat().st_mode & 0o077 == 0  # the owner's only
    key = key_file.read_text()
    assert key not in (repo / server.STATE_FILE).read_text()  # the record shows the command without it
    index = grpcclient.InferenceServerClient(url).get_model_repository_index(headers={admin.GRPC_HEADER: key}, as_json=True)
    assert {"ensemble", "tensorrt_llm"} <= {m["name"] for m in index["models"]}
    assert http_status(base + "/v2/models/stats", headers={admin.HEADER: key}) == 200
    assert TritonLLMClient(url).generate("Hello", GenerationParams(max_tokens=4, top_k=1)).text


def test_a_killed_stub_fails_its_streams_and_is_loaded_again_every_time(own_server):
    """Twice in a row (a bare load would answer 200 and do nothing the second time), and once more after the
    server itself was killed and started again by the supervisor, its crash log kept."""
    url, repo, ports = own_server
    client = TritonLLMClient(url, idle_timeout=5)
    long = GenerationParams(max_tokens=400, min_tokens=400, top_k=1, stop_words=[])
    for death in range(3):
        if death == 2:  # the server itself dies: the supervisor starts it again
            (pid,) = [p for p, cmd in processes() if cmd[0].endswith(b"/tritonserver")
                      and f"--http-port={ports[0]}".encode() in cmd]
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: "starting it again" in log_of(repo), 30, log_of(repo))
            wait_for(lambda: ready(ports) and answers(client), 180, log_of(repo))
            assert (repo / "tritonserver.log.1").is_file()  # the dead server's log, kept
        (pid,) = stub_pids(repo, "tensorrt_llm")
        before = regions(repo)
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
        wait_for(lambda: "first" in outcome, 30)
        os.kill(pid, signal.SIGKILL)  # the stream is in flight
        th.join(60)
        assert not th.is_alive() and "error" in outcome, outcome  # the client gave up instead of waiting for ever
        wait_for(lambda: answers(client), 120, log_of(repo))  # fresh stubs, answering
        assert stub_pids(repo, "tensorrt_llm") and pid not in stub_pids(repo, "tensorrt_llm"), log_of(repo)
        dead = before - regions(repo)
        assert dead and not any(Path("/dev/shm", r).exists() for r in dead), log_of(repo)  # no dead stub's memory left
    assert log_of(repo).count("loaded again") >= 3, log_of(repo)


def test_a_killed_engine_process_ends_its_streams_at_once_and_a_new_one_answers(own_server):
    """The engine core runs in a process of its own (runtime/engine/core.py): kill -9 it with a stream in flight and
    the client gets the error within a second (not after its idle timeout), and the next request is answered."""
    from trtqwen.serve.process import parent

    url, repo, ports = own_server
    (stub,) = stub_pids(repo, "tensorrt_llm")
    (engine,) = [pid for pid, cmd in processes() if b"trtqwen.runtime.engine.core" in b" ".join(cmd)
                 and parent(pid) == stub]
    outcome = {}

    def user():
        try:
            for _ in TritonLLMClient(url, idle_timeout=30).stream(
                    "Tell me a long story.", GenerationParams(max_tokens=400, min_tokens=400, stop_words=[])):
                outcome.setdefault("first", time.monotonic())
        except UserError as e:
            outcome["error"], outcome["at"] = e.message, time.monotonic()

    th = threading.Thread(target=user)
    th.start()
    wait_for(lambda: "first" in outcome, 30)
    killed = time.monotonic()
    os.kill(engine, signal.SIGKILL)
    th.join(30)
    assert "engine process died" in outcome.get("error", ""), outcome
    assert outcome["at"] - killed < 2.0, outcome  # 0.1 s polling; the rest is the response's way out
    wait_for(lambda: answers(url), 60)
    assert stub_pids(repo, "tensorrt_llm") == [stub]  # the model stayed loaded: only its engine was replaced


def test_stream_interval_sends_a_response_every_n_tokens(own_server):
    """`package --stream-interval 4` writes the parameter; served, each streamed response of tensorrt_llm carries 4
    tokens (the last what is left). Loaded here into the running server with its admin key, then put back."""
    import re

    import numpy as np
    import tritonclient.grpc as grpcclient
    from conftest import infer_input

    url, repo, ports = own_server
    config = repo / "tensorrt_llm" / "config.pbtxt"
    original = config.read_text()
    key = (repo / admin.KEY_FILE).read_text()
    load = f"http://127.0.0.1:{ports[0]}/v2/repository/models/tensorrt_llm/load"
    interval = re.compile(r'(key: "stream_interval"\s*value \{\s*string_value: )"1"')
    assert interval.search(original)
    try:
        config.write_text(interval.sub(r'\1"4"', original))
        assert http_status(load, data=b"{}", headers={admin.HEADER: key}, timeout=120) == 200
        sizes, done = [], threading.Event()

        def on_response(result, error):
            assert error is None, error
            sizes.append(result.as_numpy("output_ids").size)
            if result.get_response().parameters.get("triton_final_response").bool_param:
                done.set()

        c = grpcclient.InferenceServerClient(url)
        c.start_stream(on_response)
        c.async_stream_infer("tensorrt_llm", [
            infer_input("input_ids", np.array([[9707, 11, 1879]], np.int32)),
            infer_input("input_lengths", np.array([[3]], np.int32)),
            infer_input("request_output_len", np.array([[14]], np.int32)),
            infer_input("min_tokens", np.array([[14]], np.int32)),
            infer_input("streaming", np.array([[True]]))], enable_empty_final_response=True)
        assert done.wait(60)
        c.stop_stream()
        tokens = [n for n in sizes if n]
        assert sum(tokens) == 14 and tokens[:3] == [4, 4, 4], sizes
    finally:
        config.write_text(original)
        http_status(load, data=b"{}", headers={admin.HEADER: key}, timeout=120)
    wait_for(lambda: answers(url), 60)
    wait_for(lambda: len(stub_pids(repo, "tensorrt_llm")) == 1, 60)  # the replaced stubs take seconds to exit


def test_a_model_that_cannot_load_again_makes_the_server_not_ready_until_it_can(own_server):
    """The checkpoint is gone when the stub dies: the server says not ready (what nginx and Kubernetes act on)
    within seconds instead of ready-and-refusing; the checkpoint back, the retries bring the model back."""
    url, repo, ports = own_server
    ckpt = Path(json.loads((repo / "trtqwen_repo.json").read_text())["build_dir"]) / "checkpoint"
    aside = ckpt.with_name("checkpoint.aside")
    (pid,) = stub_pids(repo, "tensorrt_llm")
    ckpt.rename(aside)
    try:
        os.kill(pid, signal.SIGKILL)
        took = wait_for(lambda: not ready(ports), 30, log_of(repo))
        assert took < 15 and "reload failed" in log_of(repo) or wait_for(lambda: "reload failed" in log_of(repo), 30)
    finally:
        aside.rename(ckpt)
    wait_for(lambda: ready(ports) and answers(url), 120, log_of(repo))


def test_a_frozen_stub_that_takes_the_server_down_is_followed_by_a_server_that_answers(own_server):
    """SIGSTOP (memory pressure, `docker pause`, a debugger) while a request arrives, then SIGCONT: tritonserver
    may abort on resume (python_backend's lock_exception); either way it answers again within bounded time."""
    url, repo, ports = own_server
    (pid,) = stub_pids(repo, "tensorrt_llm")
    os.kill(pid, signal.SIGSTOP)
    th = threading.Thread(target=lambda: answers(TritonLLMClient(url, idle_timeout=5)), daemon=True)
    th.start()
    time.sleep(1.5)
    os.kill(pid, signal.SIGCONT)
    wait_for(lambda: answers(url), 180, log_of(repo))


def test_a_killed_supervisor_takes_its_server_with_it(own_server):
    """Nobody would reload a model or restart the server any more: the server goes too (PR_SET_PDEATHSIG), its
    ports close — not ready for every probe — and `serve` can start it again."""
    url, repo, ports = own_server
    state = server.running_server(repo)
    os.kill(state["pid"], signal.SIGKILL)
    wait_for(lambda: http_status(f"http://127.0.0.1:{ports[0]}/v2/health/live") == 0, 30)
    wait_for(lambda: not stub_pids(repo, "tensorrt_llm") and all(port_free("127.0.0.1", p) for p in ports), 60)
    assert server.running_server(repo) is None
    server.start(repo, ["ensemble"], "127.0.0.1", *ports, timeout=180)  # the fixture's stop ends it
    assert answers(TritonLLMClient(url))


def answers(client) -> bool:
    """A short answer comes back (client: a TritonLLMClient, or a gRPC url to connect to first)."""
    try:
        client = TritonLLMClient(client) if isinstance(client, str) else client
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


def test_supervisor_judges_stubs_by_pid_and_retries_a_failed_reload_with_backoff(monkeypatch):
    """A stub whose /proc cmdline reads empty for a moment (seen under gVisor, mid-request) is not reloaded; one whose
    process has died is, until a reload succeeds, with growing waits between failures. A zombie counts as dead."""
    import subprocess

    from trtqwen.serve import supervisor

    live = subprocess.Popen(["sleep", "30"])
    zombie = subprocess.Popen(["true"])
    time.sleep(0.3)  # exited, never waited for: a zombie
    assert alive(live.pid) and not alive(zombie.pid)

    class Server:  # the watched tritonserver: runs for a number of rounds
        def __init__(self, rounds):
            self.rounds = iter(range(rounds))

        def poll(self):
            return None if next(self.rounds, None) is not None else 0

    sup = supervisor.Supervisor({"repo": "/repo", "cmd": [], "log": "/dev/null", "base": "http://x", "host": "127.0.0.1",
                                 "ports": [], "watch_stubs": True, "key_file": "/nonexistent"}, say=lambda msg: None)
    monkeypatch.setattr(supervisor, "INTERVAL_S", 0.01)
    monkeypatch.setattr(supervisor, "http_status", lambda url, **kw: 200)
    scans = iter([{"m": [live.pid]}])  # the first scan sees the stub, later scans read nothing
    monkeypatch.setattr(sup, "scan", lambda: next(scans, {"m": [live.pid]}))
    reloads = []
    monkeypatch.setattr(sup, "reload", lambda model, old: reloads.append(model))
    sup.proc = Server(20)
    sup.watch()
    assert reloads == []  # alive, whatever its cmdline read

    outcomes = iter(["HTTP 400: load failed", "HTTP 400: load failed", None])
    attempts = []
    loaded = []  # the stubs a successful load started
    monkeypatch.setattr(sup, "scan", lambda: {"m": loaded or [zombie.pid]})

    def reload(model, old):
        attempts.append(time.time())
        why = next(outcomes)
        if why is None:
            loaded.append(live.pid)
        return why

    monkeypatch.setattr(sup, "reload", reload)
    monkeypatch.setattr(supervisor, "BACKOFF_MAX_S", 0.2)
    sup.proc = Server(200)
    sup.watch()
    assert len(attempts) == 3  # failed twice, then loaded; the fresh stub is watched and alive
    assert attempts[2] - attempts[1] >= attempts[1] - attempts[0] - 0.02  # waits grow (capped)
    live.kill()
    live.wait()
    zombie.wait()
