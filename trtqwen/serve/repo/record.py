"""`trtqwen_repo.json`: what a model repository was made from and for, and the check `serve` runs on it."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from trtqwen.build.spec import BuildSpec, check_spec
from trtqwen.checkpoint import read_shape
from trtqwen.errors import UserError
from trtqwen.serve.repo import checks
from trtqwen.serve.repo.settings import RepoSettings

RECORD = "trtqwen_repo.json"


def make_record(build_dir: Path, manifest: dict, settings: RepoSettings, versions: dict, notes: list[str]) -> dict:
    return {
        "build_dir": str(Path(build_dir).resolve()),
        "spec": manifest.get("spec"),
        "runtime": settings.runtime,
        "streaming": settings.streaming,
        "versions": versions,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "serve": {"world_size": settings.world_size, "launcher": "llmapi" if settings.runtime == "llmapi" else None,
                  "env": {"TRTLLM_ORCHESTRATOR": "1"} if settings.runtime == "trtllm" and settings.instances > 1 else {},
                  "models": ["ensemble", "preprocessing", "tensorrt_llm", "postprocessing", "tensorrt_llm_bls"],
                  "servers": settings.servers},
        "settings": settings.to_dict(),
        "template_values": settings.template_values(),
        "notes": notes,
    }


def read_record(repo: Path) -> dict:
    path = Path(repo) / RECORD
    if not path.is_file():
        raise UserError(f"{repo} was not written by `trtqwen package` (no {RECORD})",
                        "package a build directory first: `trtqwen package <build dir> --out model_repo`")
    return json.loads(path.read_text())


def check_repo_servable(repo: Path, serving: dict | None = None) -> dict:
    """Before launching: the torch runtime's checkpoint must still be one the TP rule accepts; an engine repository must meet the TensorRT-LLM, TensorRT and GPU architecture that built
    the engine (`serving`: what this machine has, by default)."""
    record = read_record(repo)
    if record.get("runtime") == "torch":  # the checkpoint may have changed since packaging: read it as the runtime will
        shape, _ = read_shape(Path(record["settings"]["model_dir"]))
        if record.get("spec"):
            check_spec(BuildSpec.from_dict(record["spec"]), shape)
    if record.get("runtime") == "trtllm":
        versions = record.get("versions", {})
        engine = versions.get("engine") or {"tensorrt_llm": versions.get("tensorrt_llm")}
        checks.check_engine_compatible(engine, checks.serving_environment() if serving is None else serving)
    return record
