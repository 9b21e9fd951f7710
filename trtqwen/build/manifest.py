"""Manifests (build.json): what a stage was given, what it wrote, with which tools, and how long it took.

Files are replaced atomically so that an interrupted write never leaves a manifest that looks complete.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

MANIFEST = "build.json"


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def read_manifest(build_dir: Path) -> dict | None:
    p = Path(build_dir) / MANIFEST
    return json.loads(p.read_text()) if p.is_file() else None


def stage_key(*parts) -> str:
    """Identity of a stage's inputs: when it is unchanged the stage's output is reused."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tool_versions() -> dict:
    versions = {"python": platform.python_version()}
    for dist in ("trtqwen", "torch", "transformers", "nvidia-modelopt", "safetensors", "tensorrt_llm", "tensorrt"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished temporary directory into place; an old one is moved aside first, then removed."""
    if dst.exists():
        old = dst.with_name(f".old-{dst.name}-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
