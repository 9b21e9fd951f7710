"""`trtqwen_repo.json`: what a model repository was made from and for, and the check `serve` runs on it."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from trtqwen.errors import UserError
from trtqwen.serve.repo.checks import check_serving_versions, serving_tensorrt_llm_version
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
        "serve": {"world_size": settings.world_size,
                  "env": {"TRTLLM_ORCHESTRATOR": "1"} if settings.runtime == "trtllm" and settings.instances > 1 else {},
                  "models": ["ensemble", "preprocessing", "tensorrt_llm", "postprocessing", "tensorrt_llm_bls"]},
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


def check_repo_servable(repo: Path, serving: str | None = None) -> dict:
    """Before launching: an engine repository must be served by the TensorRT-LLM that built the engine."""
    record = read_record(repo)
    if record.get("runtime") == "trtllm":
        check_serving_versions(record.get("versions", {}).get("tensorrt_llm"),
                               serving if serving is not None else serving_tensorrt_llm_version())
    return record
