"""The admin key of a served repository: Triton's model-repository, shared-memory, statistics, trace and logging
APIs answer only requests that carry it.

Triton reads a request body whatever its Content-Type, so without this a web page the user visits could POST
`text/plain` (no CORS preflight) to http://127.0.0.1:8000/v2/repository/models/x/load with a `file:` override —
a model.py of its choosing, run by the python backend. Triton 2.41+ restricts APIs behind a header
(`--http-restricted-api` / `--grpc-restricted-protocol`, docs/customization_guide/inference_protocols.md).
The key is random per server start, kept in a file only its owner reads; trtqwen's own processes (the supervisor)
read it there. Model config, metadata, health and inference stay open: clients (trtqwen's, perf_analyzer) read
model configs, and they are read-only.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

HEADER = "trtqwen-admin-key"  # gRPC metadata keys are lower case
GRPC_HEADER = f"triton-grpc-protocol-{HEADER}"  # the name Triton's gRPC frontend expects (its error message says so)
RESTRICTED = ("model-repository", "shared-memory", "statistics", "trace", "logging")
KEY_FILE = ".trtqwen-admin-key"


def new_key(path: Path) -> str:
    """A fresh key written to path, readable by its owner only (created so, never widened)."""
    key = secrets.token_urlsafe(32)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    os.replace(tmp, path)
    return key


def read_key(path: Path) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def restrict_flags(key: str) -> list[str]:
    apis = ",".join(RESTRICTED)
    return [f"--http-restricted-api={apis}:{HEADER}={key}", f"--grpc-restricted-protocol={apis}:{HEADER}={key}"]


def redact(cmd: list[str], key: str) -> list[str]:
    """The command as records and logs show it: the key is not written to files others can read."""
    return [c.replace(key, "<admin key>") for c in cmd]
