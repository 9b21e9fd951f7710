"""Process and port helpers every part of serve/ shares: identity of a pid, stopping a group, probing HTTP."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (state, ppid, pgrp, …); None for a pid that is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> int | None:
    """The kernel's start time of pid (clock ticks since boot): a recycled pid has another one; None when dead."""
    fields = stat_fields(pid)
    return None if fields is None or fields[0] == "Z" else int(fields[19])  # a zombie is dead, just not reaped yet


def parent(pid: int) -> int | None:
    fields = stat_fields(pid)
    return None if fields is None else int(fields[1])


def group(pid: int) -> int | None:
    fields = stat_fields(pid)
    return None if fields is None else int(fields[2])


def alive(pid: int) -> bool:
    """The process exists and is not a zombie. Judged by its pid, never by its command line: under gVisor
    /proc/<pid>/cmdline of a busy process can read empty."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = stat_fields(pid)
    return fields is None or fields[0] != "Z"


def same_process(record: dict) -> bool:
    """Is record's pid still the process it names (same start time), not a dead one or a recycled pid?"""
    return record.get("started") is not None and process_start(record["pid"]) == record["started"]


def reap(pgid: int) -> None:
    """Collect those of the group that are our children: zombies would look alive to killpg."""
    try:
        while os.waitpid(-pgid, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def stop_process(pid: int, timeout: float = 15) -> bool:
    """SIGTERM pid's process group, SIGKILL it if it lingers; True if something was stopped."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return False
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        reap(pgid)
        time.sleep(0.05)
    os.killpg(pgid, signal.SIGKILL)
    return True


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def http_status(url: str, timeout: float = 2.0, data: bytes | None = None, headers: dict | None = None) -> int:
    """The HTTP status of a GET (or a POST of data); 0 when nothing answered."""
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a server to this machine (127.0.0.0/8, ::1, localhost)."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
