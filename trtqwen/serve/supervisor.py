"""Keeps a served repository's python models alive: a model stub that dies (killed, out of memory) is reloaded.

Triton's python backend answers every request to a dead stub with "Stub process is not healthy" while the server
and the model still say they are ready, so nothing outside would notice. `server.start` runs this next to
tritonserver; it notes each model's stub processes, and when one of them has died asks Triton to load that model
again (explicit model control), which starts fresh stubs.

    python -m trtqwen.serve.supervisor <repo> <http base url> <tritonserver pid>
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

from trtqwen.serve.server import _get, process_start

STUB = b"triton_python_backend_stub"
INTERVAL_S = 0.5


def processes():
    """(pid, command line as a list of bytes arguments) of every live process."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                yield int(d.name), (d / "cmdline").read_bytes().split(b"\0")
            except OSError:  # gone meanwhile
                continue


def parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def stubs(repo: Path, server_pid: int | None = None) -> dict[str, list[int]]:
    """Live python-backend stubs per model of repo (a stub's command line names its model.py's path), of the server
    server_pid only when given (replicas serve one repository: the stubs are tritonserver's children)."""
    root = str(Path(repo).resolve()).encode() + b"/"
    found: dict[str, list[int]] = defaultdict(list)
    for pid, cmd in processes():
        if cmd[0].endswith(STUB) and (server_pid is None or parent(pid) == server_pid):
            arg = next((a for a in cmd[1:] if a.startswith(root)), None)  # None: another server's stub
            if arg is not None:
                found[arg[len(root):].split(b"/")[0].decode()].append(pid)
    return found


def reload(base: str, model: str) -> str:
    req = urllib.request.Request(f"{base}/v2/repository/models/{model}/load", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return f"reloaded ({r.status})"
    except (urllib.error.URLError, OSError) as e:
        return f"reload failed: {e}"


def alive(pid: int) -> bool:
    """The process exists and is not a zombie. Judged by its pid, never by reading its command line: under gVisor
    (the lent GPU machines) /proc/<pid>/cmdline of a busy stub can read empty, and a model was reloaded mid-request."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def describe(pid: int) -> str:
    """pid, parent, state and command line as /proc shows them now (for the log)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        state, ppid = fields[0], fields[1]
    except (OSError, IndexError):
        state = ppid = "?"
    try:
        cmd = b" ".join((Path(f"/proc/{pid}") / "cmdline").read_bytes().split(b"\0")[:3]).decode(errors="replace")
    except OSError as e:
        cmd = f"({e.__class__.__name__})"
    return f"pid {pid} ppid {ppid} state {state} cmd {cmd[:200]!r}"


def supervise(repo: Path, base: str, server_pid: int, say=print) -> None:
    known = dict(stubs(repo, server_pid))  # model → its stubs' pids; every model is ready by now
    say(f"watching { {m: len(p) for m, p in known.items()} } under {repo}")
    for model, pids in known.items():
        for p in pids:
            say(f"  {model}: {describe(p)}")
    while process_start(server_pid) is not None:
        for model, pids in known.items():
            gone = [p for p in pids if not alive(p)]
            # not live: the server is shutting down, its stubs with it
            if gone and _get(f"{base}/v2/health/live") == 200:
                say(f"{model}: {len(gone)} of {len(pids)} stub(s) gone; loading it again")
                for p in gone:
                    say(f"  gone: {describe(p)}")
                for p in stubs(repo, server_pid).get(model, []):
                    say(f"  stubs now: {describe(p)}")
                say(f"{model}: {reload(base, model)}")
                known[model] = stubs(repo, server_pid).get(model, [])  # the fresh stubs
        time.sleep(INTERVAL_S)


if __name__ == "__main__":
    repo_arg, base_arg, pid_arg = sys.argv[1:4]
    supervise(Path(repo_arg), base_arg, int(pid_arg),
              lambda msg: print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True))
