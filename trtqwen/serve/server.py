"""Find or prepare a tritonserver, launch it (mpirun for TP ranks), wait until ready, stop it cleanly."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from trtqwen.errors import UserError
from trtqwen.files import publishing, rotate
from trtqwen.serve import admin
from trtqwen.serve.process import http_status, is_loopback, port_free, process_start, same_process, stop_process

SYSTEM_SERVER = Path("/opt/tritonserver")  # NVIDIA's Triton / TensorRT-LLM containers
# TensorRT-LLM's PyTorch backend starts its workers through MPI: under plain tritonserver the llmapi model fails with
# MPI_ERR_SPAWN; its launcher (tensorrt_llm/llmapi/trtllm-llmapi-launch) runs the server as rank 0 of one MPI process.
LLMAPI_LAUNCH = "trtllm-llmapi-launch"
CACHE = Path(os.environ.get("TRTQWEN_CACHE", Path.home() / ".cache" / "trtqwen"))
ADMIN_KEY_VAR = "$TRTQWEN_ADMIN_KEY"  # what --print-command shows in place of the key
STATE_FILE = ".trtqwen-server.json"  # in the model repository: pid, ports, log of the running server


def named(repo: Path, filename: str, name: str = "") -> Path:
    """repo/filename, or for one of several servers on the repository (a replica) repo/<stem>-<name><suffix>."""
    f = Path(filename)
    return Path(repo) / (f"{f.stem}-{name}{f.suffix}" if name else filename)


@dataclass
class TritonInstall:
    kind: str  # "system" or "pytriton"
    root: Path
    env: dict = field(default_factory=dict)

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    def describe(self) -> str:
        where = "NVIDIA's container install" if self.kind == "system" else "the nvidia-pytriton wheel (CPU-capable)"
        return f"{self.binary} ({where})"


def _pytriton_dir() -> Path | None:
    spec = importlib.util.find_spec("pytriton")
    if not spec or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return d if (d / "bin" / "tritonserver").is_file() else None


def prepare_pytriton_server(src: Path, dest_root: Path = CACHE) -> TritonInstall:
    """Copy the wheel's server into a directory of its own with the python backend stub where 2.51 looks for it."""
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.is_file():
        raise UserError(f"nvidia-pytriton has no python backend stub for Python {pyver}", "use Python 3.8–3.13")
    # one copy per wheel location: two venvs never replace each other's server
    dest = dest_root / f"tritonserver-pytriton-py{pyver}-{hashlib.sha256(str(src).encode()).hexdigest()[:8]}"
    if not (dest / ".prepared").is_file():
        with publishing(dest, first_wins=True) as tmp:  # another process or thread may get there first, with the same copy
            for part in ("bin", "backends", "caches"):
                shutil.copytree(src / part, tmp / part, symlinks=True)
            shutil.copy2(stub, tmp / "backends" / "python" / "triton_python_backend_stub")
            (tmp / ".prepared").write_text(str(src))
    return TritonInstall("pytriton", dest, _stub_env(src.parent.parent / "nvidia_pytriton.libs"))


def _stub_env(libs: Path) -> dict:
    """The venv's libpython first (else the stub loads the system one under our stdlib), then the wheel's
    libraries (copied binaries lose their $ORIGIN rpath); the venv's bin first on PATH for the stub's sys.prefix."""
    return {
        "LD_LIBRARY_PATH": os.pathsep.join(p for p in [sysconfig.get_config_var("LIBDIR"), str(libs),
                                                        os.environ.get("LD_LIBRARY_PATH", "")] if p),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "TRTQWEN_PYTRITON_STUB": "1",  # the python models check for numpy<2, which these stubs need
    }


def find_tritonserver() -> TritonInstall:
    custom = os.environ.get("TRTQWEN_TRITONSERVER")  # a prepared copy: bin/, backends/ (with the stub), caches/, libs/
    if custom:
        root = Path(custom)
        if not (root / "bin" / "tritonserver").is_file():
            raise UserError(f"TRTQWEN_TRITONSERVER={custom} has no bin/tritonserver", "unset it or point it at a server")
        return TritonInstall("pytriton", root, _stub_env(root / "libs"))
    if (SYSTEM_SERVER / "bin" / "tritonserver").is_file():
        return TritonInstall("system", SYSTEM_SERVER)
    src = _pytriton_dir()
    if src is None:
        raise UserError("no tritonserver found (neither /opt/tritonserver nor the nvidia-pytriton wheel)",
                        "run `make install` (installs nvidia-pytriton), or use NVIDIA's Triton container")
    return prepare_pytriton_server(src)


def server_args(install: TritonInstall, repo: Path, host: str, http_port: int, grpc_port: int, metrics_port: int,
                extra: list[str] | None = None, key: str | None = None) -> list[str]:
    args = [
        str(install.binary), f"--model-repository={repo.resolve()}",
        f"--http-address={host}", f"--http-port={http_port}",
        f"--grpc-address={host}", f"--grpc-port={grpc_port}",
        f"--metrics-address={host}", f"--metrics-port={metrics_port}",
        f"--backend-directory={install.root / 'backends'}",
        "--log-verbose=0", "--disable-auto-complete-config",
    ]
    if install.kind == "pytriton":
        args += [f"--cache-directory={install.root / 'caches'}", "--pinned-memory-pool-byte-size=0",
                 "--allow-gpu-metrics=false"]
    return args + (admin.restrict_flags(key) if key else []) + (extra or [])


def server_command(install: TritonInstall, repo: Path, host: str, http_port: int, grpc_port: int, metrics_port: int,
                   world_size: int = 1, launcher: str | None = None, key: str | None = None) -> list[str]:
    """One process, or for TP > 1 one per rank under mpirun as tensorrtllm_backend's launcher does; the llmapi model
    (any TP: the LLM spawns its ranks itself) as rank 0 of one MPI process under trtllm-llmapi-launch, as
    launch_triton_server.py --trtllm_llmapi_launch runs it."""
    if launcher == "llmapi":
        return ["mpirun", "--allow-run-as-root", "-n", "1", LLMAPI_LAUNCH] + server_args(
            install, repo, host, http_port, grpc_port, metrics_port, key=key)
    if world_size == 1:  # explicit model control: the supervisor reloads a model whose stub died
        return server_args(install, repo, host, http_port, grpc_port, metrics_port,
                           ["--model-control-mode=explicit", "--load-model=*"], key)
    cmd = ["mpirun", "--allow-run-as-root"]
    for rank in range(world_size):
        # Rank 0 serves everything; other ranks load only tensorrt_llm and never listen for clients.
        extra = [f"--backend-config=python,shm-region-prefix-name=prefix{rank}_"]
        if rank:
            extra += ["--model-control-mode=explicit", "--load-model=tensorrt_llm", "--allow-http=false",
                      "--allow-grpc=false", "--allow-metrics=false"]
        cmd += (["-n", "1"] + server_args(install, repo, host, http_port, grpc_port, metrics_port, extra, key)
                + ([":"] if rank < world_size - 1 else []))
    return cmd


def wait_ready(proc: subprocess.Popen, base: str, models: list[str], log: Path, timeout: float,
               supervisor_log: Path | None = None) -> None:
    """Until the server and every model answer ready (and the supervisor has counted the stubs, when it watches)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise UserError(f"tritonserver exited before it was ready:\n{explain_log(log)}", f"full log: {log}")
        if (http_status(f"{base}/v2/health/ready") == 200
                and all(http_status(f"{base}/v2/models/{m}/ready") == 200 for m in models)
                and (supervisor_log is None or "watching" in supervisor_log.read_text(errors="replace"))):
            return
        time.sleep(0.1)
    raise UserError(f"tritonserver was not ready within {timeout:.0f} s:\n{explain_log(log)}", f"full log: {log}")


def explain_log(log: Path, lines: int = 25) -> str:
    """The part of the server log that explains a failure: error lines first, else the tail."""
    if not log.is_file():
        return "(no log)"
    text = log.read_text(errors="replace").splitlines()
    errors = [l for l in text if l[:1] == "E" or "error" in l.lower() or "Traceback" in l or "failed" in l.lower()]
    return "\n".join((errors or text)[-lines:])


def start(repo: Path, models: list[str], host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int = 8002, log: Path | None = None, world_size: int = 1, timeout: float = 180,
          install: TritonInstall | None = None, env: dict | None = None, launcher: str | None = None,
          name: str = "") -> dict:
    """Start tritonserver under its supervisor (trtqwen.serve.supervisor: restarts a dead server, reloads a dead
    model stub) and wait for it and every model to be ready; returns its state. The admin APIs are restricted to a
    fresh key (trtqwen.serve.admin).

    env: more environment for the server and its models (e.g. TRTQWEN_PROFILE_DIR, CUDA_VISIBLE_DEVICES).
    name: one of several servers on this repository (a replica): its own state file, logs and key."""
    repo = Path(repo)
    if not repo.is_dir():
        raise UserError(f"no model repository at {repo}", "run `trtqwen package <build dir> --out model_repo` first")
    if not name:
        from trtqwen.serve import fleet

        if fleet.serving(repo):
            raise UserError(f"{repo} is already served by its replicas", f"stop them first: trtqwen serve {repo} --stop")
    running = running_server(repo, name)
    if running:  # a second server would orphan the first and take over its log
        raise UserError(f"{repo} is already served by tritonserver pid {running['pid']} (HTTP {running['http_port']}, "
                        f"gRPC {running['grpc_port']})", f"stop it first: trtqwen serve {repo} --stop")
    for port in (http_port, grpc_port, metrics_port):
        if not port_free(host, port):
            raise UserError(f"port {port} on {host} is already in use",
                            "stop what uses it (`trtqwen serve --stop`?) or pick other --http-port/--grpc-port/--metrics-port")
    if launcher == "llmapi":
        check_llmapi_runnable(repo)
    if world_size > 1 and not shutil.which("mpirun"):
        raise UserError("tensor parallel serving needs mpirun", "install OpenMPI (it comes with NVIDIA's TensorRT-LLM container)")
    install = install or find_tritonserver()
    log = Path(log) if log else named(repo, "tritonserver.log", name)
    key_file = named(repo, admin.KEY_FILE, name)
    key = admin.new_key(key_file)
    cmd = server_command(install, repo, host, http_port, grpc_port, metrics_port, world_size, launcher, key)
    base = f"http://{host}:{http_port}"
    watch_stubs = world_size == 1 and not launcher  # python-backend stubs of this repository, one server process
    spec = {"repo": str(repo.resolve()), "cmd": cmd, "log": str(log.resolve()), "base": base, "host": host,
            "ports": [http_port, grpc_port, metrics_port], "watch_stubs": watch_stubs, "key_file": str(key_file)}
    supervisor_log = named(repo, "supervisor.log", name)
    rotate(supervisor_log)
    with supervisor_log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "trtqwen.serve.supervisor"], stdin=subprocess.PIPE, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **install.env, **(env or {})},
                                start_new_session=True)
    proc.stdin.write(json.dumps(spec).encode())  # on stdin: the key is in the command, never in a file others read
    proc.stdin.close()
    try:
        wait_ready(proc, base, models, log, timeout, supervisor_log if watch_stubs else None)
    except BaseException:
        stop_process(proc.pid)
        raise
    state = {"pid": proc.pid, "started": process_start(proc.pid), "host": host, "http_port": http_port,
             "grpc_port": grpc_port, "metrics_port": metrics_port, "log": str(log.resolve()),
             "supervisor_log": str(supervisor_log.resolve()), "server": install.describe(),
             "command": admin.redact(cmd, key), "name": name}
    named(repo, STATE_FILE, name).write_text(json.dumps(state, indent=2))
    return state


def running_server(repo: Path, name: str = "") -> dict | None:
    """The state of the server started for repo if that very process still runs; a stale record is removed."""
    state_path = named(repo, STATE_FILE, name)
    if not state_path.is_file():
        return None
    state = json.loads(state_path.read_text())
    if same_process(state):
        return state
    state_path.unlink(missing_ok=True)  # its pid is dead or now another process's: never signal that one
    return None


def stop(repo: Path, name: str = "", grace: float = 15) -> dict | None:
    """Stop the server started for repo (SIGKILL after grace seconds); None when none runs (a stale record is
    dropped, its pid left alone)."""
    if not name:
        from trtqwen.serve import fleet

        if fleet.fleet_record(repo):
            return fleet.stop(repo)
    state = running_server(repo, name)
    if state is None:
        return None
    stop_process(state["pid"], timeout=grace)
    for leftover in (STATE_FILE, admin.KEY_FILE):
        named(repo, leftover, name).unlink(missing_ok=True)
    return state


def exposure_warnings(host: str, openai_port: int | None, api_key: str | None) -> list[str]:
    """What a bind beyond this machine opens: refused for the OpenAI API without a key; said loudly for Triton,
    whose inference API has no authentication of its own (its admin APIs are behind the per-start key)."""
    if is_loopback(host):
        return []
    if openai_port and not api_key:
        raise UserError(f"--host {host} would open the OpenAI API on :{openai_port} to the network without a key",
                        "pass --api-key (or TRTQWEN_API_KEY), or bind 127.0.0.1")
    return [f"--host {host}: Triton's inference, metadata and metrics endpoints are open to anyone who can reach this "
            "machine (Triton has no authentication for them); put it behind a firewall or a proxy that authenticates"]


def _record(repo: Path) -> dict:
    from trtqwen.serve.repo import check_repo_servable

    return check_repo_servable(repo)


def serve_repo(repo: Path, host: str, http_port: int, grpc_port: int, metrics_port: int, log: Path | None,
               timeout: float, replica_port_base: int | None = None, hang_timeout: float = 120) -> dict:
    """Check the repository's records (engine version vs serving one), then start and wait for every model: one
    tritonserver, or for the servers layout one per replica (from replica_port_base, default HTTP port + 100) with
    nginx on the front ports."""
    record = _record(repo)
    plan = record.get("serve", {})
    if len(plan.get("servers", [])) > 1:
        from trtqwen.serve import fleet

        ports = fleet.port_block(replica_port_base or http_port + 100, len(plan["servers"]))
        return fleet.start(repo, plan, host, http_port, grpc_port, ports, timeout, hang_timeout)
    os.environ.update(plan.get("env", {}))
    return start(repo, plan.get("models", []), host, http_port, grpc_port, metrics_port, log,
                 plan.get("world_size", 1), timeout, launcher=plan.get("launcher"))


def run_trtllm_serve(build_dir: Path, print_only: bool = False) -> None:
    """The build's trtllm-serve.sh (written by `build --target pytorch|both`): shown, or run in the foreground."""
    from trtqwen.build.trtllm_serve import SCRIPT

    script = Path(build_dir) / SCRIPT
    if not script.is_file():
        raise UserError(f"{build_dir} has no {SCRIPT}", "pass a build directory of `trtqwen build --target pytorch` "
                        "(or both); trtllm-serve serves its unified HF checkpoint")
    if print_only:
        print(script.read_text())
        return
    if not (shutil.which("trtllm-serve") or shutil.which("docker")):
        raise UserError("neither trtllm-serve nor docker is installed here",
                        f"run {script} on the GPU box that has TensorRT-LLM (or its container)")
    os.execv("/bin/bash", ["bash", str(script)])


def check_llmapi_runnable(repo: Path) -> None:
    """The llmapi model is NVIDIA's code on TensorRT-LLM's PyTorch backend: refuse, saying where it runs, what is
    missing here (the launcher, mpirun, TensorRT-LLM, the model's code)."""
    missing = [what for what, ok in (
        (LLMAPI_LAUNCH, shutil.which(LLMAPI_LAUNCH)), ("mpirun", shutil.which("mpirun")),
        ("the tensorrt_llm package", importlib.util.find_spec("tensorrt_llm")),
        ("tensorrt_llm/1/model.py (NVIDIA's llmapi model)", (Path(repo) / "tensorrt_llm" / "1" / "model.py").is_file()),
    ) if not ok]
    if missing:
        raise UserError(f"the llmapi runtime needs TensorRT-LLM's PyTorch backend; missing here: {', '.join(missing)}",
                        "run it in TensorRT-LLM's container (`trtqwen serve <repo> --print-command` shows the docker "
                        "command), or package with --runtime torch to serve the same checkpoint here")


def describe_commands(repo: Path, host: str, http_port: int, grpc_port: int, metrics_port: int) -> list[str]:
    """The exact command `serve` would run here, and the container command for the 4090D box."""
    import shlex

    record = _record(repo)
    world, launcher = record.get("serve", {}).get("world_size", 1), record.get("serve", {}).get("launcher")
    install = find_tritonserver()
    def shell(cmd: list[str]) -> str:  # "$TRTQWEN_ADMIN_KEY" expands; everything else is quoted as it is
        return " ".join(f'"{c}"' if "$TRTQWEN_ADMIN_KEY" in c else shlex.quote(c) for c in cmd)

    cmd = server_command(install, Path(repo), host, http_port, grpc_port, metrics_port, world, launcher, ADMIN_KEY_VAR)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in install.env.items())
    lines = [f"# here ({install.describe()}; `serve` draws a fresh admin key per start, in {admin.KEY_FILE}):",
             (env + " " if env else "") + shell(cmd)]
    servers = record.get("serve", {}).get("servers", [])
    if len(servers) > 1:  # the servers layout: the fleet manager runs that command once per replica
        lines.insert(0, f"# {len(servers)} replicas: the command below once per replica with CUDA_VISIBLE_DEVICES="
                        f"{' / '.join(','.join(map(str, s['gpus'])) for s in servers)} on its own three ports "
                        f"(from HTTP port + 100), nginx on :{http_port}/:{grpc_port} in front (trtqwen/serve/fleet.py)")
    if record.get("runtime") in ("trtllm", "llmapi"):
        from trtqwen.build.trtllm_build import TRTLLM_IMAGE

        inner = server_command(TritonInstall("system", SYSTEM_SERVER), Path("/model_repo"), "0.0.0.0", http_port,
                               grpc_port, metrics_port, world, launcher, ADMIN_KEY_VAR)
        lines += ["# in the TensorRT-LLM container on the 4090D box (TRTQWEN_ADMIN_KEY: a secret of your choosing):",
                  f"docker run --rm --gpus all --ipc=host -p 127.0.0.1:{http_port}:{http_port} "
                  f"-p 127.0.0.1:{grpc_port}:{grpc_port} -p 127.0.0.1:{metrics_port}:{metrics_port} "
                  f"-v {Path(repo).resolve()}:/model_repo -v {record.get('build_dir')}:{record.get('build_dir')} "
                  f"{TRTLLM_IMAGE} " + shell(inner)]
    return lines


def run_in_foreground(repo: Path, state: dict, host: str, grpc_port: int, openai_port: int | None = None,
                      api_key: str | None = None) -> None:
    """Until Ctrl-C or the server exits (with an OpenAI-compatible API in front when asked); the server is stopped
    on the way out, whatever ends it."""
    try:
        if openai_port:
            from trtqwen.clients.openai import serve_openai

            # beyond loopback a key is required (exposure_warnings): any Host may reach it, the key guards it
            serve_openai(f"{host}:{grpc_port}", host, openai_port, api_key=api_key,
                         allowed_hosts=() if is_loopback(host) else ("*",))
        else:
            wait_until_exit(state["pid"])
    except KeyboardInterrupt:
        pass
    finally:
        stop(repo)


def wait_until_exit(pid: int) -> None:
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.5)
