"""Keeps a served repository's python models alive: a model stub that dies (killed, out of memory) is reloaded.

Triton's python backend answers every request to a dead stub with "Stub process is not healthy" while the server
and the model still say they are ready, so nothing outside would notice. `server.start` runs this next to
tritonserver, in its process group (stopped with it); it counts each model's stub processes, and when one is
missing asks Triton to load that model again (explicit model control), which starts fresh stubs.

    python -m trtqwen.supervisor <repo> <http base url> <tritonserver pid>
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

STUB = b"triton_python_backend_stub"
INTERVAL_S = 0.5


def stub_counts(repo: Path) -> Counter:
    """Live python-backend stubs per model of repo (a stub's command line names its model.py's path)."""
    root = str(Path(repo).resolve()).encode() + b"/"
    counts: Counter = Counter()
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(STUB):
            for arg in cmd[1:]:
                if arg.startswith(root):
                    counts[arg[len(root):].split(b"/")[0].decode()] += 1
                    break
    return counts


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def live(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/v2/health/live", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def reload(base: str, model: str) -> str:
    req = urllib.request.Request(f"{base}/v2/repository/models/{model}/load", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return f"reloaded ({r.status})"
    except (urllib.error.URLError, OSError) as e:
        return f"reload failed: {e}"


def supervise(repo: Path, base: str, server_pid: int, say=print) -> None:
    expected = stub_counts(repo)  # started right after every model was ready
    say(f"watching {dict(expected)} under {repo}")
    while alive(server_pid):
        now = stub_counts(repo)
        for model, n in expected.items():
            if now[model] < n and live(base):  # not live: the server is shutting down, its stubs with it
                say(f"{model}: {n - now[model]} of {n} stub(s) gone; loading it again")
                say(f"{model}: {reload(base, model)}")
        time.sleep(INTERVAL_S)


if __name__ == "__main__":
    repo_arg, base_arg, pid_arg = sys.argv[1:4]
    supervise(Path(repo_arg), base_arg, int(pid_arg),
              lambda msg: print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True))
