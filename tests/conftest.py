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
