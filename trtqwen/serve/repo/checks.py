"""Refusals before packaging: what the build directory must hold for each runtime, and version gates.

Each check raises UserError saying what is wrong and what to run instead; none imports TensorRT-LLM
(its version is read from package metadata, lazily, only for the runtimes that serve with it).
"""

from __future__ import annotations

import json
from pathlib import Path

from trtqwen.build.hardware import compute_capability, detect_gpus
from trtqwen.build.manifest import MANIFEST, read_manifest
from trtqwen.build.spec import BuildSpec, check_spec
from trtqwen.build.trtllm_build import TRTLLM_IMAGE
from trtqwen.checkpoint import read_shape
from trtqwen.errors import UserError
from trtqwen.serve.repo.settings import RUNTIMES
from trtqwen.versions import package_version

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
    """The TensorRT-LLM checkpoint of an engine (or both) build, the HF one of a pytorch build."""
    stage = manifest.get("stages", {}).get("checkpoint") or {}
    rel = stage.get("dir") or stage.get("hf_dir") or "checkpoint"
    path = build_dir / rel
    if not (path / "config.json").is_file():
        raise UserError(f"{build_dir} has no checkpoint ({path} with a config.json)",
                        f"run `trtqwen build` up to the checkpoint stage first (it writes {rel}/)")
    return path


def check_tp(spec: BuildSpec, tp: int, where: Path) -> None:
    """build.json's spec.tp must be the TP the checkpoint (or engine) was sharded for."""
    if tp != spec.tp:
        raise UserError(f"build.json says tp {spec.tp} but {where} is sharded for tp {tp}",
                        "TP is fixed when the checkpoint is written: rebuild with `trtqwen build --tp "
                        f"{spec.tp} --force`, or package the build directory that matches")


def check_build_checkpoint(build_dir: Path, manifest: dict, spec: BuildSpec) -> Path:
    """The build's checkpoint, checked by the one reader and the one spec validator, and against build.json
    (an HF checkpoint, which the torch runtime loads too, is not split: any TP can load it)."""
    path = checkpoint_dir(build_dir, manifest)
    shape, ck = read_shape(path)
    check_spec(spec, shape)
    if ck is not None:
        check_tp(spec, ck.tp, ck.path)
    return path


def engine_tp(engine: Path) -> int:
    """The TP an engine was built for (trtllm-build's config.json: pretrained_config.mapping)."""
    mapping = (json.loads((engine / "config.json").read_text()).get("pretrained_config") or {}).get("mapping") or {}
    return int(mapping.get("tp_size", mapping.get("world_size", 1)))


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


def recorded_engine(build_dir: Path, manifest: dict, engine: Path) -> dict:
    """What the engine was built with (TensorRT-LLM, TensorRT, GPU): its own record, else build.json's, else the
    version trtllm-build writes into the engine's config.json."""
    rec = engine / ENGINE_RECORD
    record = json.loads(rec.read_text()) if rec.is_file() else {}
    stage = manifest.get("stages", {}).get("engine") or {}
    version = record.get("tensorrt_llm") or stage.get("tensorrt_llm") or json.loads((engine / "config.json").read_text()).get("version")
    return {**{k: stage.get(k) for k in ("tensorrt", "compute_capability") if stage.get(k)}, **record,
            "tensorrt_llm": str(version) if version else None}


def serving_environment() -> dict:
    """What an engine meets where this runs: TensorRT-LLM and TensorRT versions and GPU 0's compute capability
    (keys absent where there is none: the gate then checks what it can and `serve` checks again where it runs)."""
    gpus = detect_gpus()
    found = {"tensorrt_llm": package_version("tensorrt_llm", "tensorrt-llm"),
             "tensorrt": package_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
             "compute_capability": gpus[0]["compute_capability"] if gpus else None}
    return {k: v for k, v in found.items() if v}


_GATES = (("tensorrt_llm", "TensorRT-LLM"), ("tensorrt", "TensorRT"), ("compute_capability", "GPU compute capability"))


def check_engine_compatible(recorded: dict, serving: dict) -> None:
    """Refuse an engine built by another TensorRT-LLM or TensorRT, or for another GPU architecture, naming both.

    TensorRT would refuse it anyway, late and cryptically ("Serialization assertion ... Version tag does not match").
    """
    mismatches = []
    for key, what in _GATES:
        built, now = recorded.get(key), serving.get(key)
        if key == "compute_capability":
            built, now = compute_capability(built), compute_capability(now)
        if built and now and str(built) != str(now):
            if key == "compute_capability":
                built, now = f"{built} (sm_{built.replace('.', '')})", f"{now} (sm_{now.replace('.', '')})"
            mismatches.append(f"{what}: built with {built}, this machine has {now}")
    if mismatches:
        raise UserError(
            "this engine cannot be loaded here (TensorRT would fail with 'Version tag does not match'): "
            + "; ".join(mismatches),
            "engines load only with the exact TensorRT-LLM/TensorRT and GPU architecture that built them: serve in "
            f"the image that built it ({TRTLLM_IMAGE} for trtqwen builds), or rebuild with build.sh on this machine",
        )


def llmapi_model_dir(build_dir: Path, manifest: dict, spec: BuildSpec) -> Path:
    """What TensorRT-LLM's PyTorch backend loads: the build's unified HF checkpoint; for a 16-bit build the source
    model does as well (a quantized build never falls back to it: that would serve other weights than built)."""
    ckpt = manifest.get("stages", {}).get("checkpoint") or {}
    candidates = [build_dir / ckpt.get("hf_dir", "hf_checkpoint")]
    unquantized = spec.info.weight_bits == 16 and spec.kv_cache_quant_algo is None
    if unquantized and (manifest.get("source") or {}).get("path"):
        candidates.append(Path(manifest["source"]["path"]))
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise UserError(f"{build_dir} has no unified HF checkpoint for the llmapi runtime ({spec.precision.value})",
                    "rebuild with `trtqwen build --target pytorch` (or --target both) and package that")
