import contextlib
import os
from pathlib import Path

# No test may reach a hub or phone home: everything they need is made locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The default tiny model (hidden 128): AWQ works at TP 1."""
    from trtqwen.build.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_tp_dir(tmp_path_factory):
    """The shardable tiny model (hidden 512, 4 KV heads): every precision at TP 1, 2 and 4."""
    from trtqwen.build.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-tp", preset="tiny-tp")


@pytest.fixture(scope="session")
def exported(tiny_tp_dir, tmp_path_factory):
    """exported(precision, tp, kv="auto") → checkpoint dir of the tiny-tp model; each (precision, kv) calibrated once."""
    from tests.checkpoints import checkpoint_factory

    return checkpoint_factory(tiny_tp_dir, tmp_path_factory.mktemp("ckpt"), calib_size=8, calib_seq_len=128)


def pytest_addoption(parser):
    parser.addoption("--url", default=None, help="smoke-test this Triton gRPC address instead of a local tiny server")
    parser.addoption("--model", default="ensemble", help="model to smoke-test with --url")
    parser.addoption("--content", action="store_true", help="with --url: also judge answers' wording")


@pytest.fixture(scope="session")
def served_tiny(tiny_dir, tmp_path_factory):
    """A real tritonserver serving the tiny model through the torch runtime: (grpc url, http url, repo)."""
    from trtqwen.build.pipeline import run_build
    from trtqwen.build.spec import BuildSpec
    from trtqwen.serve.repo import generate_repo

    root = tmp_path_factory.mktemp("served")
    run_build(BuildSpec.request(str(tiny_dir), precision="bf16"), out=root / "build", until="checkpoint")
    repo = generate_repo(root / "build", root / "repo", runtime="torch")
    # the engine's test hook on (TRTQWEN_TEST_FAULTS: only a request id made for it fails; tests/test_bad_requests.py)
    with serving(repo, env={"TRTQWEN_TEST_FAULTS": "1"}) as (grpc, http, _):
        yield grpc, http, repo


@contextlib.contextmanager
def serving(repo, models=("ensemble", "tensorrt_llm_bls"), timeout: float = 180, env: dict | None = None):
    """A real tritonserver for repo on free ports: yields (grpc url, http url, ports); stopped on exit."""
    from trtqwen.serve import server
    ports = free_ports(3)
    server.start(repo, list(models), "127.0.0.1", *ports, timeout=timeout, env=env)
    try:
        yield f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[0]}", ports
    finally:
        server.stop(repo)


def infer_input(name: str, value):
    """A gRPC input tensor from a numpy array, its Triton dtype from the array's."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    value = np.asarray(value)
    t = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
    t.set_data_from_numpy(value)
    return t


_handed_out: set[int] = set()


def free_ports(n: int) -> list[int]:
    """n distinct ports free now, below the kernel's ephemeral range (outgoing connections, such as TP ranks' gloo
    links, take ports from that range: one took a server's port between pick and bind), at random so suites side by
    side rarely meet, never one this session handed out before."""
    import random

    from trtqwen.serve.server import port_free

    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    ports: list[int] = []
    while len(ports) < n:
        # replicas take their ports from the front's HTTP port + 100 up: leave room under the range
        port = random.randrange(10000, max(low - 1000, 11000))
        if port not in _handed_out and port not in ports and port_free("127.0.0.1", port):
            ports.append(port)
    _handed_out.update(ports)
    return ports


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """module_tmp(name) → a new directory for a module's builds and repositories, all removed when the module's tests
    end (fixtures using it are torn down first): a session's builds kept to its end outgrew a small CI disk."""
    import shutil
    import tempfile

    root = tmp_path_factory.mktemp("module")
    yield lambda name: Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def serve_app(app):
    """An ASGI app (the OpenAI proxy) under uvicorn in a thread on a free port; yields the port, stops on exit."""
    import threading
    import time

    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_ports(1)[0], log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 20
    while not srv.started:
        assert th.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield srv.config.port
    finally:
        srv.should_exit = True
        th.join(10)


@contextlib.contextmanager
def started_together(starts: dict, stop):
    """Run the start callables side by side; yield {name: result}; stop those that started even if another failed."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(starts)) as pool:
        futures = {name: pool.submit(fn) for name, fn in starts.items()}
        started, errors = {}, []
        for name, f in futures.items():
            try:
                started[name] = f.result()
            except Exception as e:  # noqa: BLE001 - stop whatever did start before failing
                errors.append(e)
        try:
            if errors:
                raise errors[0]
            yield started
        finally:
            list(pool.map(stop, started.values()))
