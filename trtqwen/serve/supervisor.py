"""Keeps one tritonserver serving, or saying that it cannot: the parent of the server process, started by
`server.start` with its launch spec as JSON on stdin.

- A dead server (SIGSTOP'd stub made it abort, out of memory, killed) is started again with the same command, its
  log kept (tritonserver.log.1, .2, …), its orphaned model stubs killed and their shared memory removed.
- A dead python-model stub: Triton's python backend answers every request to it with "Stub process is not healthy"
  while the server says ready. Its model is unloaded and loaded again (a bare load answers 200 and does nothing when
  Triton thinks the model unchanged), then checked: fresh stubs, model ready. A load that fails leaves Triton not
  ready (strict readiness counts a model that failed to load), and is retried with backoff.
- The server dies with this process (PR_SET_PDEATHSIG): a killed supervisor never leaves a server that nobody
  keeps; its ports close, which load balancers and Kubernetes read as not ready.

    python -m trtqwen.serve.supervisor < spec.json
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

from trtqwen.files import rotate
from trtqwen.serve import admin
from trtqwen.serve.process import alive, group, http_status, port_free

STUB = b"triton_python_backend_stub"
INTERVAL_S = 0.5
BACKOFF_MAX_S = 30.0
PR_SET_PDEATHSIG = 1
UNLOADING = "All models are stopped, unloading models"  # Triton's log (server.cc) once no request is in flight
UNLOAD_GRACE_S = 1.0
HUNG_S = 20.0  # /v2/health/live silent this long while the process lives: hung (a busy server still answers it)


def processes():
    """(pid, command line as a list of bytes arguments) of every live process."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                yield int(d.name), (d / "cmdline").read_bytes().split(b"\0")
            except OSError:  # gone meanwhile
                continue


def stub_processes(repo: Path, pgid: int | None = None) -> dict[int, tuple[str, str]]:
    """pid → (model, shared-memory region) of the python-backend stubs serving repo (a stub's command line names its
    model.py and its region), in process group pgid only when given: replicas serve one repository."""
    root = str(Path(repo).resolve()).encode() + b"/"
    found = {}
    for pid, cmd in processes():
        if cmd[0].endswith(STUB) and len(cmd) > 2 and (pgid is None or group(pid) == pgid):
            if cmd[1].startswith(root):  # else another server's stub
                found[pid] = (cmd[1][len(root):].split(b"/")[0].decode(), cmd[2].decode())
    return found


def by_model(found: dict[int, tuple[str, str]]) -> dict[str, list[int]]:
    models: dict[str, list[int]] = defaultdict(list)
    for pid, (model, _) in found.items():
        models[model].append(pid)
    return models


def stubs(repo: Path, pgid: int | None = None) -> dict[str, list[int]]:
    """Live stubs per model of repo (of the server whose supervisor leads process group pgid, when given)."""
    return by_model(stub_processes(repo, pgid))


def describe(pid: int) -> str:
    try:
        cmd = b" ".join(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:3]).decode(errors="replace")
    except OSError as e:
        cmd = f"({e.__class__.__name__})"
    return f"pid {pid} cmd {cmd[:200]!r}"


def die_with_parent() -> None:
    """In the child before exec: SIGKILL when the supervisor dies (however it dies)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Supervisor:
    def __init__(self, spec: dict, say=print):
        self.repo, self.cmd, self.log, self.base = Path(spec["repo"]), spec["cmd"], Path(spec["log"]), spec["base"]
        self.host, self.ports, self.watch_stubs = spec["host"], spec["ports"], spec["watch_stubs"]
        self.key = admin.read_key(Path(spec["key_file"]))
        self.say, self.stopping = say, threading.Event()
        self.proc: subprocess.Popen | None = None
        self.serving = False  # this launch has been ready (before that, Triton is loading models: its HTTP is not up)
        self.regions: dict[int, str] = {}  # stub pid → its shared-memory region, to remove once it is gone

    # --- the server process -------------------------------------------------------------------------------------
    def launch(self) -> None:
        deadline = time.time() + 30  # a server that just died may hold its ports for a moment
        while not all(port_free(self.host, p) for p in self.ports) and time.time() < deadline:
            time.sleep(0.2)
        rotate(self.log)  # the log of a crashed server is the evidence: kept, never truncated
        with self.log.open("w") as out:
            self.serving = False
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        self.say(f"tritonserver started (pid {self.proc.pid})")

    def wait_ready(self) -> bool:
        while self.proc.poll() is None and not self.stopping.is_set():
            if http_status(f"{self.base}/v2/health/ready") == 200:
                return True
            time.sleep(0.25)
        return False

    def clean_up_after(self) -> None:
        """Kill the dead server's orphaned stubs (they would hold the model's memory) and remove their shared memory.
        Found again by command line and process group, not by remembered pids: a dead one's pid may be reused."""
        for pid in stub_processes(self.repo, os.getpgid(0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        self.forget(list(self.regions))

    def forget(self, dead: list[int]) -> None:
        """Remove dead stubs' shared-memory regions (up to 63 MB each): nobody unlinks a killed stub's. Mappings
        the server still holds stay valid; the names are unique per stub."""
        for pid in dead:
            if pid in self.regions:
                Path("/dev/shm", self.regions.pop(pid)).unlink(missing_ok=True)

    # --- the model stubs ----------------------------------------------------------------------------------------
    def scan(self) -> dict[str, list[int]]:
        found = stub_processes(self.repo, os.getpgid(0))
        self.regions.update({pid: region for pid, (_, region) in found.items()})
        return by_model(found)

    def admin_post(self, path: str) -> str | None:
        """POST to a restricted Triton API with the key; None on success, else Triton's reason. Given up when the
        server dies meanwhile (a load can take minutes; a dying server may never answer)."""
        req = urllib.request.Request(f"{self.base}{path}", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json", admin.HEADER: self.key or ""})
        outcome: dict[str, str | None] = {}

        def post() -> None:
            try:
                with urllib.request.urlopen(req, timeout=3600):
                    outcome["why"] = None
            except urllib.error.HTTPError as e:
                outcome["why"] = f"HTTP {e.code}: {e.read().decode(errors='replace')[:500]}"
            except (urllib.error.URLError, OSError) as e:
                outcome["why"] = str(e)

        sender = threading.Thread(target=post, daemon=True)
        sender.start()
        while sender.is_alive():
            if self.proc.poll() is not None:
                return "the server exited"
            sender.join(0.2)
        return outcome["why"]

    def watchdog(self) -> None:
        """A thread: a server process that is alive but has not answered /v2/health/live for HUNG_S (stuck in an
        abort handler, deadlocked) is killed, so that the supervisor starts it again."""
        silent_since = None
        while not self.stopping.wait(1.0):
            proc = self.proc
            if not self.serving or proc.poll() is not None or http_status(f"{self.base}/v2/health/live") != 0:
                silent_since = None
            elif silent_since is None:
                silent_since = time.time()
            elif time.time() - silent_since > HUNG_S:
                self.say(f"tritonserver (pid {proc.pid}) has not answered for {HUNG_S:.0f} s; killing it")
                proc.kill()
                silent_since = None

    def reload(self, model: str, old: list[int]) -> str | None:
        """Unload and load model, then check it: None when fresh stubs run and it is ready, else why not."""
        why = self.admin_post(f"/v2/repository/models/{model}/unload") or \
            self.admin_post(f"/v2/repository/models/{model}/load")
        if why:
            return why
        fresh = [p for p in self.scan().get(model, []) if p not in old and alive(p)]
        if not fresh:
            return "loaded, but no stub of it runs"
        if http_status(f"{self.base}/v2/models/{model}/ready") != 200:
            return "loaded, but Triton does not say it is ready"
        return None

    def watch(self) -> None:
        """Until the server exits or a stop: reload each model whose stub died, retrying with backoff."""
        known = dict(self.scan())
        self.say(f"watching { {m: len(p) for m, p in known.items()} } under {self.repo}")
        failing: dict[str, tuple[int, float]] = {}  # model → (failed attempts, when to try again)
        while self.proc.poll() is None and not self.stopping.is_set():
            for model, pids in known.items():
                gone = [p for p in pids if not alive(p)]
                if gone and model not in failing:
                    fresh = [p for p in self.scan().get(model, []) if p not in pids and alive(p)]
                    if fresh:  # loaded again through the admin API (with the key): adopt its new stubs
                        self.forget(gone)
                        known[model] = [p for p in pids if p not in gone] + fresh
                        self.say(f"{model}: reloaded by an admin request, stubs {known[model]}")
                        continue
                # not live: the server is shutting down, its stubs with it
                if gone and model not in failing and http_status(f"{self.base}/v2/health/live") == 200:
                    self.say(f"{model}: {len(gone)} of {len(pids)} stub(s) gone ({', '.join(map(str, gone))}); "
                             "unloading and loading it again")
                    failing[model] = (0, 0.0)
                    self.forget(gone)
            for model, (attempts, when) in list(failing.items()):
                if time.time() < when or self.proc.poll() is not None:
                    continue
                why = self.reload(model, known[model])
                if why is None:
                    known[model] = self.scan()[model]
                    del failing[model]
                    self.say(f"{model}: loaded again, stubs {known[model]}")
                else:
                    wait = min(BACKOFF_MAX_S, 2.0 ** attempts)
                    failing[model] = (attempts + 1, time.time() + wait)
                    self.say(f"{model}: reload failed ({why}); the server reports not ready; next try in {wait:.0f} s")
            self.stopping.wait(INTERVAL_S)

    # --- the whole life ----------------------------------------------------------------------------------------
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        first, crashes = True, 0
        threading.Thread(target=self.watchdog, daemon=True).start()
        while not self.stopping.is_set():
            self.launch()
            if self.wait_ready():
                first, crashes, self.serving = False, 0, True
                if self.watch_stubs:
                    self.watch()
                else:
                    self.say("watching the server")
                    while self.proc.poll() is None and not self.stopping.wait(INTERVAL_S):
                        pass
            if self.stopping.is_set():
                break
            code = self.proc.wait()
            if first:  # never ready: `server.start` reports the log; starting it again would fail the same way
                return code or 1
            self.say(f"tritonserver exited with code {code}; its log is {self.log}.1; starting it again")
            self.clean_up_after()
            crashes += 1
            self.stopping.wait(min(BACKOFF_MAX_S, 0.5 * 2 ** (crashes - 1)))
        return self.shut_down()

    def shut_down(self) -> int:
        """A stop: the server got the same SIGTERM (one process group) and first finishes the requests in flight.
        Then it unloads the models, and each python stub takes seconds to exit (measured: ~8 s for this repository's
        four models on 2 CPU cores, 1.3 s for an empty model), which is teardown nobody waits for: cut short."""
        cut = None
        while self.proc and self.proc.poll() is None:
            if cut is None and UNLOADING in tail(self.log):
                cut = time.time() + UNLOAD_GRACE_S
            if cut is not None and time.time() > cut:
                self.kill_server_group()
                break
            time.sleep(0.05)
        self.clean_up_after()
        self.say("stopped")
        return 0

    def kill_server_group(self) -> None:
        """SIGKILL every process of this group but this one: the server, its stubs, mpirun's ranks."""
        me, pgid = os.getpid(), os.getpgid(0)
        for pid, _ in processes():
            if pid != me and group(pid) == pgid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc.wait()


def tail(log: Path, size: int = 4096) -> str:
    try:
        with log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(Supervisor(json.load(sys.stdin), lambda msg: print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)).run())
