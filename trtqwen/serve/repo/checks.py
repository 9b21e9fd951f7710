"""Refusals before packaging: what the build directory must hold for each runtime, and version gates.

Each check raises UserError saying what is wrong and what to run instead; none imports TensorRT-LLM
(its version is read from package metadata, lazily, only for the runtimes that serve with it).
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from trtqwen.errors import UserError
from trtqwen.build.manifest import MANIFEST, read_manifest
from trtqwen.serve.repo.settings import RUNTIMES

ENGINE_RECORD = "engine_versions.json"  # written into the engine dir by `trtqwen build` and build.sh


def read_build(build_dir: Path) -> dict:
    manifest = read_manifest(build_dir)
    if manifest is None:
        raise UserError(f"{build_dir} is not a trtqwen build directory (no {MANIFEST})",
                        "pass the directory `trtqwen build` wrote (it holds build.json)")
    return manifest


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}",
                        "use torch (reference PyTorch runtime, runs anywhere), trtllm (TensorRT engines, C++ backend) "
                        "or llmapi (TensorRT-LLM's PyTorch backend)")
    return runtime


def checkpoint_dir(build_dir: Path, manifest: dict) -> Path:
    rel = (manifest.get("stages", {}).get("checkpoint") or {}).get("dir", "checkpoint")
    path = build_dir / rel
    if not (path / "config.json").is_file():
        raise UserError(f"{build_dir} has no checkpoint ({path} with a config.json)",
                        f"run `trtqwen build` up to the checkpoint stage first (it writes {rel}/)")
    return path


def check_tp(manifest: dict, model_config: Path, what: str) -> None:
    """build.json's spec.tp must be the TP the checkpoint (or engine) was sharded for."""
    cfg = json.loads(model_config.read_text())
    mapping = cfg.get("mapping") or (cfg.get("pretrained_config") or {}).get("mapping")
    if not mapping:
        return  # an HF checkpoint: not sharded, any TP can load it
    tp = mapping.get("tp_size", mapping.get("world_size"))
    want = (manifest.get("spec") or {}).get("tp")
    if tp is not None and want is not None and int(tp) != int(want):
        raise UserError(f"build.json says tp {want} but the {what} at {model_config.parent} is sharded for tp {tp}",
                        "TP is fixed when the checkpoint is written: rebuild with `trtqwen build --tp "
                        f"{want} --force`, or package the build directory that matches")


def engine_dir(build_dir: Path, manifest: dict) -> Path:
    """The built engine: recorded as built by `trtqwen build`, or brought back from build.sh (its version record)."""
    record = manifest.get("stages", {}).get("engine") or {}
    path = build_dir / record.get("dir", "engine")
    built = record.get("status") == "built" or (path / ENGINE_RECORD).is_file()
    if not built or not (path / "config.json").is_file():
        raise UserError(f"{build_dir} has no built TensorRT engine (engine stage: {record.get('status', 'not run')})",
                        f"build it on the 4090D box with build.sh: `bash {build_dir / 'build.sh'}` "
                        "(or serve the checkpoint anywhere with --runtime torch)")
    return path


def recorded_engine_version(build_dir: Path, manifest: dict, engine: Path) -> str | None:
    """The TensorRT-LLM version the engine was built with: its own record first, then build.json's."""
    rec = engine / ENGINE_RECORD
    if rec.is_file():
        v = json.loads(rec.read_text()).get("tensorrt_llm")
        if v:
            return str(v)
    v = (manifest.get("stages", {}).get("engine") or {}).get("tensorrt_llm")
    if v:
        return str(v)
    return json.loads((engine / "config.json").read_text()).get("version")  # trtllm-build writes it there too


def serving_tensorrt_llm_version() -> str | None:
    """TensorRT-LLM installed where this runs (the serving container), or None where it is absent."""
    try:
        return importlib.metadata.version("tensorrt_llm")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_serving_versions(recorded: str | None, serving: str | None) -> None:
    """Engines only load in the TensorRT-LLM that built them ("Version tag does not match", FACTS §4)."""
    if recorded and serving and recorded != serving:
        raise UserError(f"the engine was built with TensorRT-LLM {recorded} but the serving TensorRT-LLM is {serving}",
                        f"serve in the container that built it (TensorRT-LLM {recorded}), or rebuild the engine with "
                        f"TensorRT-LLM {serving}: `bash build.sh` in the build directory on the serving machine")


def llmapi_model_dir(build_dir: Path, manifest: dict) -> Path:
    """What TensorRT-LLM's PyTorch backend loads: the build's HF-format export, else the source HF model."""
    ckpt = manifest.get("stages", {}).get("checkpoint") or {}
    candidates = [build_dir / ckpt["hf_dir"]] if ckpt.get("hf_dir") else []
    candidates.append(build_dir / "hf_checkpoint")
    if (manifest.get("source") or {}).get("path"):
        candidates.append(Path(manifest["source"]["path"]))
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise UserError(f"{build_dir} has no HF-format checkpoint for the llmapi runtime",
                    "rebuild with `trtqwen build --format hf` (or both), or keep the source model where build.json "
                    "says it is")
