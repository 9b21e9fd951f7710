import contextlib
import os

# No test may reach a hub or phone home: everything they need is made locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The default tiny model (hidden 128): AWQ works at TP 1."""
    from trtqwen.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_tp_dir(tmp_path_factory):
    """The shardable tiny model (hidden 512, 4 KV heads): every precision at TP 1, 2 and 4."""
    from trtqwen.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-tp", preset="tiny-tp")


@pytest.fixture(scope="session")
def exported(tiny_tp_dir, tmp_path_factory):
    """export(precision, tp, kv="auto") → checkpoint dir, each made once per test session."""
    from trtqwen.quantize import export_checkpoint
    from trtqwen.spec import BuildSpec

    root, cache = tmp_path_factory.mktemp("ckpt"), {}

    def export(precision: str, tp: int, kv: str = "auto"):
        key = (precision, tp, kv)
        if key not in cache:
            spec = BuildSpec(model=str(tiny_tp_dir), precision=precision, tp=tp, kv_cache_dtype=kv, calib_size=8,
                             calib_seq_len=128)
            out = root / f"{precision}-tp{tp}-kv{kv}"
            cache[key] = (out, export_checkpoint(tiny_tp_dir, spec, out))
        return cache[key][0]

    return export


def pytest_addoption(parser):
    parser.addoption("--url", default=None, help="smoke-test this Triton gRPC address instead of a local tiny server")
    parser.addoption("--model", default="ensemble", help="model to smoke-test with --url")
    parser.addoption("--content", action="store_true", help="with --url: also judge answers' wording")


@pytest.fixture(scope="session")
def served_tiny(tiny_dir, tmp_path_factory):
    """A real tritonserver serving the tiny model through the torch runtime: (grpc url, http url, repo)."""
    from trtqwen import server
    from trtqwen.build import run_build
    from trtqwen.repo import generate_repo

    root = tmp_path_factory.mktemp("served")
    run_build(model=str(tiny_dir), precision="bf16", out=root / "build", until="checkpoint")
    repo = generate_repo(root / "build", root / "repo", runtime="torch")
    base = 18700
    server.start(repo, ["ensemble", "tensorrt_llm_bls"], "127.0.0.1", base, base + 1, base + 2, timeout=180)
    try:
        yield f"127.0.0.1:{base + 1}", f"127.0.0.1:{base}", repo
    finally:
        server.stop(repo)


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
