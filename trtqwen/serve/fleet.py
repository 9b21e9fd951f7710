"""N tritonservers on one model repository behind nginx (`trtqwen package --replicas N --layout servers`).

`start` runs the fleet manager (`python -m trtqwen.serve.fleet`) and waits until every replica is ready and nginx
listens on the front ports. The manager keeps the fleet: a replica that dies is started again on its own ports, and
nginx sends requests only to replicas whose /v2/health/ready answers (the manager polls them and reloads nginx;
nginx by itself only notices a refused connection). A replica that hangs while its /ready still answers (a
wedged model process, a stuck GPU) is found by a 1-token request sent to it every few seconds: two in a row unanswered
within the hang timeout, or its HTTP endpoint silent that long, and it is killed and started again. Streams in flight
on a replica that dies fail; the client reports it; new requests go to the others.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from trtqwen.errors import UserError
from trtqwen.serve import server
from trtqwen.serve.process import http_status, port_free, process_start, same_process, stop_process
from trtqwen.serve.balancer import Nginx, Upstream, find_nginx

FLEET_FILE = ".trtqwen-fleet.json"  # in the model repository: the manager's pid, the front ports, the replicas
INTERVAL_S = 0.5
HANG_TIMEOUT_S = 120.0  # no first token for this long, twice in a row: hung (a queue that deep is unusable anyway)


@dataclass(frozen=True)
class Replica:
    name: str
    gpus: list[int]
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def replicas_for(servers: list[dict], ports: list[tuple[int, int, int]]) -> list[Replica]:
    if len(ports) != len(servers):
        raise UserError(f"{len(servers)} replicas need {len(servers)} port triples, got {len(ports)}")
    return [Replica(f"r{i}", list(s["gpus"]), *p) for i, (s, p) in enumerate(zip(servers, ports))]


def port_block(base: int, n: int) -> list[tuple[int, int, int]]:
    """Replica i listens on base+3i (HTTP), +1 (gRPC), +2 (metrics)."""
    return [(base + 3 * i, base + 3 * i + 1, base + 3 * i + 2) for i in range(n)]


def lb_dir(repo: Path) -> Path:
    """nginx's files, next to the repository: tritonserver would take a directory inside it for a model."""
    repo = Path(repo).resolve()
    return repo.parent / f".{repo.name}-nginx"


def fleet_record(repo: Path) -> dict | None:
    """The manager's last state, whether it still runs or not (killed -9, its replicas and nginx go on serving)."""
    path = Path(repo) / FLEET_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def running_fleet(repo: Path) -> dict | None:
    state = fleet_record(repo)
    return state if state and same_process(state) else None


def serving(repo: Path) -> bool:
    """Does a fleet serve repo: its manager, or with the manager gone a replica or nginx it left running?"""
    state = fleet_record(repo)
    if not state:
        return False
    nginx = state.get("nginx_pid")
    return (same_process(state) or bool(nginx and same_process(nginx))
            or any(server.running_server(repo, r["name"]) for r in state["replicas"]))


def start(repo: Path, plan: dict, host: str, http_port: int, grpc_port: int, replica_ports: list[tuple[int, int, int]],
          timeout: float = 300, hang_timeout: float = HANG_TIMEOUT_S) -> dict:
    """Launch the manager and wait for the whole fleet; returns its state (the manager's pid is `pid`)."""
    repo = Path(repo)
    find_nginx()
    if serving(repo):
        raise UserError(f"{repo} is already served by a fleet of tritonservers", f"stop it first: trtqwen serve {repo} --stop")
    replicas = replicas_for(plan["servers"], replica_ports)
    for port in [http_port, grpc_port] + [p for r in replicas for p in (r.http_port, r.grpc_port, r.metrics_port)]:
        if not port_free(host, port):
            raise UserError(f"port {port} on {host} is already in use",
                            "stop what uses it (`trtqwen serve --stop`?) or pick other --http-port/--grpc-port/--replica-port-base")
    config = {"repo": str(repo.resolve()), "host": host, "http_port": http_port, "grpc_port": grpc_port,
              "replicas": [asdict(r) for r in replicas], "models": plan.get("models", []),
              "world_size": plan.get("world_size", 1), "launcher": plan.get("launcher"), "env": plan.get("env", {}),
              "timeout": timeout, "hang_timeout": hang_timeout}
    log = repo / "fleet.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "trtqwen.serve.fleet", json.dumps(config)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout + 30
    while True:
        state = running_fleet(repo)
        if state and state.get("ready"):
            return state
        if proc.poll() is not None or time.time() > deadline:
            stop_process(proc.pid)
            raise UserError(f"the replicas did not all start:\n{log.read_text(errors='replace')[-3000:]}",
                            f"full log: {log}; each replica's: {repo}/tritonserver-r<i>.log")
        time.sleep(0.2)


def stop(repo: Path) -> dict | None:
    """Stop the manager, which stops nginx and every replica; what a dead manager left running is stopped here."""
    state = fleet_record(repo)
    if state is None:
        return None
    if same_process(state):
        os.kill(state["pid"], signal.SIGTERM)
        deadline = time.time() + 60
        while same_process(state) and time.time() < deadline:
            time.sleep(0.1)
        stop_process(state["pid"])
    for r in state["replicas"]:  # each by its own record: a recycled pid is never signalled
        server.stop(repo, r["name"])
    if state.get("nginx_pid") and same_process(state["nginx_pid"]):
        stop_process(state["nginx_pid"]["pid"])
    (Path(repo) / FLEET_FILE).unlink(missing_ok=True)
    return state


def probe(r: Replica, timeout: float) -> str | None:
    """None when a 1-token request sent straight to the replica is answered within timeout, else what went wrong."""
    from trtqwen.clients.client import GenerationParams, connect

    try:
        connect(f"127.0.0.1:{r.grpc_port}", timeout=timeout, idle_timeout=timeout).generate(
            "ping", GenerationParams(max_tokens=1))
        return None
    except Exception as e:  # noqa: BLE001 - whatever the failure, the replica did not answer
        return getattr(e, "message", None) or f"{type(e).__name__}: {e}"


# --- the manager -----------------------------------------------------------------------------------------------------
class Manager:
    def __init__(self, config: dict, say=print):
        self.c, self.say = config, say
        self.repo = Path(config["repo"])
        self.replicas = [Replica(**r) for r in config["replicas"]]
        self.nginx = Nginx(lb_dir(self.repo), config["host"], config["http_port"], config["grpc_port"])
        self.nginx.workdir.mkdir(parents=True, exist_ok=True)
        self.stopping = threading.Event()
        self.pids: dict[str, int] = {}
        self.starting: dict[str, threading.Thread] = {}
        self.up: dict[str, bool] = {r.name: False for r in self.replicas}
        self.changed = False
        self.hang_timeout = float(config.get("hang_timeout", HANG_TIMEOUT_S))
        self.hung: dict[str, str] = {}  # replica → why the prober thinks it hangs
        self.silent_since: dict[str, float] = {}  # replica → when its HTTP endpoint stopped answering

    def launch(self, r: Replica) -> dict:
        deadline = time.time() + 30  # a replica that just died may hold its ports for a moment
        while not all(port_free(self.c["host"], p) for p in (r.http_port, r.grpc_port, r.metrics_port)):
            if time.time() > deadline:
                raise UserError(f"{r.name}: its ports are still in use")
            time.sleep(0.2)
        env = {**self.c["env"], "CUDA_VISIBLE_DEVICES": ",".join(map(str, r.gpus))}
        state = server.start(self.repo, self.c["models"], self.c["host"], r.http_port, r.grpc_port, r.metrics_port,
                             world_size=self.c["world_size"], timeout=self.c["timeout"], env=env,
                             launcher=self.c["launcher"], name=r.name)
        self.pids[r.name] = state["pid"]
        return state

    def relaunch(self, r: Replica) -> None:
        try:
            self.launch(r)
            self.say(f"{r.name}: started again (pid {self.pids[r.name]})")
        except UserError as e:
            self.say(f"{r.name}: could not start again: {e.message}")
            self.stopping.wait(5)  # then the next round tries again

    def upstreams(self) -> list[Upstream]:
        return [Upstream("127.0.0.1", r.http_port, r.grpc_port, self.up[r.name]) for r in self.replicas]

    def write_state(self, ready: bool) -> None:
        state = {"pid": os.getpid(), "started": process_start(os.getpid()), "ready": ready,
                 "host": self.c["host"], "http_port": self.c["http_port"], "grpc_port": self.c["grpc_port"],
                 "nginx": str(self.nginx.workdir), "nginx_pid": self.nginx.record(),
                 "log": str(self.repo / "fleet.log"),
                 "replicas": [{**asdict(r), "up": self.up[r.name], "pid": self.pids.get(r.name)} for r in self.replicas]}
        tmp = self.repo / (FLEET_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.repo / FLEET_FILE)

    def watch(self, r: Replica) -> None:
        """The prober of one replica (a thread): a 1-token request every few seconds while it is in rotation."""
        failures = 0
        while not self.stopping.wait(min(10.0, self.hang_timeout / 2)):
            if not self.up[r.name]:
                failures = 0  # out of rotation (loading, restarting): readiness speaks for it
                continue
            error = probe(r, self.hang_timeout)
            failures = 0 if error is None else failures + 1
            if failures >= 2:  # one slow or failed answer is not a hang
                self.hung[r.name], failures = error, 0

    def kill_if_hung(self, r: Replica) -> None:
        why = self.hung.pop(r.name, None)
        silent = self.silent_since.get(r.name)
        if why is None and silent is not None and time.time() - silent > self.hang_timeout:
            why = f"its HTTP endpoint has not answered for {self.hang_timeout:.0f} s"
        if why is not None and server.running_server(self.repo, r.name) is not None:
            self.say(f"{r.name}: hung ({why}); killing it")
            server.stop(self.repo, r.name, grace=0)  # a hung server does not shut down gracefully
            self.silent_since.pop(r.name, None)

    def check(self) -> None:
        """One round: kill hung replicas, reap and restart dead ones, poll readiness, reload nginx when who is up has
        changed."""
        for r in self.replicas:
            self.kill_if_hung(r)
            pid = self.pids.get(r.name)
            if pid:
                try:
                    os.waitpid(pid, os.WNOHANG)  # a killed replica is our child: reap it, else it lingers a zombie
                except ChildProcessError:
                    pass
            busy = r.name in self.starting and self.starting[r.name].is_alive()
            alive = server.running_server(self.repo, r.name) is not None
            if not alive and not busy:
                self.say(f"{r.name}: tritonserver is gone; starting it again")
                self.starting[r.name] = threading.Thread(target=self.relaunch, args=(r,), daemon=True)
                self.starting[r.name].start()
            code = http_status(f"{r.base}/v2/health/ready", timeout=1.0) if alive and not busy else None
            if code == 0:
                self.silent_since.setdefault(r.name, time.time())
            else:
                self.silent_since.pop(r.name, None)
            up = code == 200
            if up != self.up[r.name]:
                self.up[r.name] = up
                self.say(f"{r.name}: {'ready: back in rotation' if up else 'not ready: out of rotation'}")
                self.changed = True
        if not self.nginx.alive():
            self.say("nginx is gone; starting it again")
            self.nginx.start(self.upstreams())
            self.changed = True
        elif self.changed:
            self.nginx.apply(self.upstreams())
        if self.changed:
            self.write_state(True)
            self.changed = False

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        try:
            with ThreadPoolExecutor(len(self.replicas)) as pool:  # replicas load at once: each on its own GPU
                futures = {r.name: pool.submit(self.launch, r) for r in self.replicas}
            failed = {n: f.exception() for n, f in futures.items() if f.exception()}
            if failed:
                for n, e in failed.items():
                    self.say(f"{n}: did not start: {getattr(e, 'message', e)}")
                return 1
            self.up = {r.name: True for r in self.replicas}
            for r in self.replicas:
                threading.Thread(target=self.watch, args=(r,), daemon=True).start()
            self.nginx.start(self.upstreams())
            self.write_state(True)
            self.say(f"ready: nginx on {self.c['host']}:{self.c['http_port']} (HTTP) and :{self.c['grpc_port']} "
                     f"(gRPC) in front of {', '.join(f'{r.name} :{r.grpc_port}' for r in self.replicas)}")
            while not self.stopping.wait(INTERVAL_S):
                self.check()
            return 0
        finally:
            self.nginx.stop()
            with ThreadPoolExecutor(len(self.replicas)) as pool:
                list(pool.map(lambda r: server.stop(self.repo, r.name), self.replicas))
            (self.repo / FLEET_FILE).unlink(missing_ok=True)
            self.say("stopped")


if __name__ == "__main__":
    sys.exit(Manager(json.loads(sys.argv[1]), lambda msg: print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)).run())
