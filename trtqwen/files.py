"""Writing outputs so that nothing half-written ever looks complete: build in a temporary place, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def publishing(dst: Path, first_wins: bool = False) -> Iterator[Path]:
    """A fresh temporary directory beside dst (same filesystem, its own name per process and thread); when the
    block finishes it replaces dst (an old dst is moved aside first, then removed); when the block fails it is
    removed and dst is left as it was. first_wins: a dst that another process published meanwhile is kept."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".tmp-{dst.name}-"))
    try:
        yield tmp
        if not (first_wins and dst.exists()):
            replace_dir(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place; an old one is moved aside first, then removed."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".old-{dst.name}-"))
    os.replace(dst, old / dst.name)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def clean_temporaries(parent: Path, name: str = "") -> None:
    """Remove what an interrupted `publishing` left beside its destinations (a killed process runs no finally)."""
    for p in Path(parent).glob(f".tmp-{name}*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in Path(parent).glob(f".old-{name}*"):
        shutil.rmtree(p, ignore_errors=True)


def rotate(log: Path, keep: int = 3) -> None:
    """log → log.1 → log.2 …: a new start never overwrites the evidence of the last one."""
    log = Path(log)
    if not log.is_file() or log.stat().st_size == 0:
        return
    for i in range(keep - 1, 0, -1):
        older = log.with_name(f"{log.name}.{i}")
        if older.exists():
            older.replace(log.with_name(f"{log.name}.{i + 1}"))
    log.replace(log.with_name(f"{log.name}.1"))
