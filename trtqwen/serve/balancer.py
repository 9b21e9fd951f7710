"""nginx in front of the replicas' tritonservers: its configuration (a pure function of who is up) and its process.

nginx does the proxying (HTTP with SSE streaming, gRPC streams over HTTP/2, least-connections, a failed connect
retried on the next server); open-source nginx has only passive health checks, so `fleet` polls every replica's
/v2/health/ready itself and reloads nginx with the ones that are not ready marked `down`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from trtqwen.errors import UserError
from trtqwen.serve.process import is_loopback

NGINX_PATHS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
STREAM_TIMEOUT = "3600s"  # between two messages of a stream: a long prompt's prefill must not cut it


@dataclass(frozen=True)
class Upstream:
    host: str
    http_port: int
    grpc_port: int
    up: bool


def find_nginx() -> str:
    found = shutil.which("nginx") or next((p for p in NGINX_PATHS if os.access(p, os.X_OK)), None)
    if not found:
        raise UserError("the replicas' load balancer needs nginx, which is not installed",
                        "apt-get install nginx (`make install` does), or package with --layout instances "
                        "(one tritonserver, no balancer)")
    return found


def _servers(upstreams: list[Upstream], port: str) -> str:
    # nginx wants at least one server per upstream: when none is up, all are listed down and clients get 502
    return "\n".join(f"        server {u.host}:{getattr(u, port)} max_fails=1 fail_timeout=2s{'' if u.up else ' down'};"
                     for u in upstreams)


# Triton's admin APIs (behind each replica's own key as well): never proxied, HTTP paths and gRPC methods alike.
ADMIN_HTTP = r"^/v2/(repository|logging|trace|systemsharedmemory|cudasharedmemory)(/|$)|^/v2/models/(.*/)?stats$"
ADMIN_GRPC = (r"^/inference\.GRPCInferenceService/(Repository|ModelStatistics|SystemSharedMemory|CudaSharedMemory|"
              r"Trace|Log)")


def _front_guard(host: str) -> str:
    """A browser's request is refused: on a loopback bind a Host that is not loopback (DNS rebinding), any Origin
    (no page of ours is served here: every Origin is foreign); and the admin APIs for everyone."""
    hosts = "" if not is_loopback(host) else (
        "        if ($host !~ \"^(127\\.[0-9.]+|localhost|\\[::1\\])$\") { return 403; }\n")
    return (hosts + "        if ($http_origin) { return 403; }\n"
            f"        location ~ \"{ADMIN_HTTP}\" {{ return 403; }}\n"
            f"        location ~ \"{ADMIN_GRPC}\" {{ return 403; }}")


def nginx_conf(workdir: Path, host: str, http_port: int, grpc_port: int, upstreams: list[Upstream]) -> str:
    """The whole nginx.conf: the HTTP front on http_port, the gRPC front on grpc_port, least-conn to the replicas."""
    w = Path(workdir).resolve()
    temp = "\n".join(f"    {kind}_temp_path {w / 'tmp' / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""# written by trtqwen (serve/balancer.py): rewritten and reloaded when a replica's readiness changes
daemon off;
worker_processes 1;
pid {w / 'nginx.pid'};
error_log {w / 'error.log'} warn;
events {{ worker_connections 8192; }}
http {{
    log_format upstream '$remote_addr "$request" $status $upstream_addr $request_time';
    access_log {w / 'access.log'} upstream;
{temp}
    client_max_body_size 64m;
    client_body_buffer_size 1m;
    upstream triton_http {{
        least_conn;
{_servers(upstreams, 'http_port')}
        keepalive 64;
    }}
    upstream triton_grpc {{
        least_conn;
{_servers(upstreams, 'grpc_port')}
        keepalive 64;
    }}
    server {{
        listen {host}:{http_port};
{_front_guard(host)}
        location / {{
            proxy_pass http://triton_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;  # SSE: each event as it comes
            proxy_read_timeout {STREAM_TIMEOUT};
            proxy_next_upstream error timeout http_502;
        }}
    }}
    server {{
        listen {host}:{grpc_port} http2;
{_front_guard(host)}
        location / {{
            grpc_pass grpc://triton_grpc;
            grpc_read_timeout {STREAM_TIMEOUT};
            grpc_send_timeout {STREAM_TIMEOUT};
            grpc_next_upstream error timeout;
        }}
    }}
}}
"""


class Nginx:
    """One nginx master for the fleet, run in the foreground of its own process group; `apply` reloads it."""

    def __init__(self, workdir: Path, host: str, http_port: int, grpc_port: int):
        self.workdir, self.host, self.http_port, self.grpc_port = Path(workdir), host, http_port, grpc_port
        self.proc: subprocess.Popen | None = None
        self.binary = find_nginx()

    @property
    def conf(self) -> Path:
        return self.workdir / "nginx.conf"

    def write(self, upstreams: list[Upstream]) -> None:
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            d = self.workdir / "tmp" / kind
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o777)  # run as root, nginx's workers are `nobody`: they buffer large bodies here
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(nginx_conf(self.workdir, self.host, self.http_port, self.grpc_port, upstreams))
        check = subprocess.run([self.binary, "-t", "-q", "-c", str(tmp), "-e", str(self.workdir / "error.log")],
                               capture_output=True, text=True)
        if check.returncode:
            raise UserError(f"nginx refused its configuration:\n{check.stderr.strip()}", f"see {tmp}")
        tmp.replace(self.conf)

    def start(self, upstreams: list[Upstream], timeout: float = 10) -> None:
        self.write(upstreams)
        with (self.workdir / "nginx.out").open("a") as out:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf), "-e", str(self.workdir / "error.log")],
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        from trtqwen.serve.process import port_free

        deadline = time.time() + timeout
        while port_free(self.host, self.grpc_port) or port_free(self.host, self.http_port):
            if self.proc.poll() is not None or time.time() > deadline:
                raise UserError(f"nginx did not start:\n{(self.workdir / 'error.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def apply(self, upstreams: list[Upstream]) -> None:
        """New configuration, then SIGHUP: nginx's old workers finish the streams they carry, new ones take over."""
        self.write(upstreams)
        if self.alive():
            os.kill(self.proc.pid, signal.SIGHUP)

    def record(self) -> dict | None:
        """pid and start time of the master, for stopping it when the manager is gone."""
        from trtqwen.serve.process import process_start

        return {"pid": self.proc.pid, "started": process_start(self.proc.pid)} if self.alive() else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
