"""Starting this checkout's Python modules as processes of their own (TP ranks, the engine core)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def python_executable() -> str:
    """This interpreter (inside Triton's python backend sys.executable is the stub: take the env's python)."""
    exe = Path(sys.executable)
    return str(exe) if exe.name.startswith("python") else str(Path(sys.prefix) / "bin" / "python3")


def child_env(**extra: str) -> dict:
    """This environment with this checkout first on PYTHONPATH: the child imports our trtqwen, installed or not."""
    src = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [src, os.environ.get("PYTHONPATH", "")] if p),
            **extra}
