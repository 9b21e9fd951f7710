"""Manifests (build.json): what a stage was given, what it wrote, with which tools, and how long it took.

Written with trtqwen.files.write_json_atomic, so an interrupted write never leaves a manifest that looks complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


MANIFEST = "build.json"


def read_manifest(build_dir: Path) -> dict | None:
    p = Path(build_dir) / MANIFEST
    return json.loads(p.read_text()) if p.is_file() else None


def stage_key(*parts) -> str:
    """Identity of a stage's inputs: when it is unchanged the stage's output is reused."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
