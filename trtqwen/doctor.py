"""What this machine has for the job: Python, torch/CUDA, GPUs, TensorRT-LLM, tritonserver, mpirun, disk."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil
import sys
from pathlib import Path

from trtqwen.build.hardware import detect_gpus, profile_for_gpu_name


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_report() -> dict:
    if importlib.util.find_spec("torch") is None:
        return {"installed": False}
    import torch

    return {
        "installed": True,
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }


def tritonserver_candidates() -> list[Path]:
    """System server first (NVIDIA's containers), then the one inside the nvidia-pytriton wheel."""
    found = [Path("/opt/tritonserver/bin/tritonserver")]
    which = shutil.which("tritonserver")
    if which:
        found.append(Path(which))
    spec = importlib.util.find_spec("pytriton")
    if spec and spec.submodule_search_locations:
        found.append(Path(list(spec.submodule_search_locations)[0]) / "tritonserver" / "bin" / "tritonserver")
    return [p for p in found if p.is_file()]


def collect(path: Path = Path(".")) -> dict:
    gpus = detect_gpus()
    for g in gpus:
        g["profile"] = profile_for_gpu_name(g["name"])
    disk = shutil.disk_usage(path.resolve())
    return {
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": torch_report(),
        "gpus": gpus,
        "tensorrt_llm": _version("tensorrt_llm") or _version("tensorrt-llm"),
        "tensorrt": _version("tensorrt") or _version("tensorrt-cu12") or _version("tensorrt-cu13"),
        "modelopt": _version("nvidia-modelopt"),
        "transformers": _version("transformers"),
        "tritonclient": _version("tritonclient"),
        "tritonserver": [str(p) for p in tritonserver_candidates()],
        "mpirun": shutil.which("mpirun"),
        "disk_free_gb": round(disk.free / 1e9, 1),
    }


def verdicts(report: dict) -> list[tuple[str, bool, str]]:
    """(capability, available, why) rows a user reads to know what they can run here."""
    has_gpu = bool(report["gpus"])
    has_trtllm = bool(report["tensorrt_llm"])
    return [
        ("quantize + export checkpoints", bool(report["modelopt"]) and report["torch"].get("installed", False),
         "needs torch and nvidia-modelopt"),
        ("build TensorRT engines", has_gpu and has_trtllm, "needs TensorRT-LLM 1.2.1 and an NVIDIA GPU"),
        ("serve with the reference runtime", bool(report["tritonserver"]), "needs a tritonserver (nvidia-pytriton)"),
        ("serve engines (tensorrtllm backend)", has_gpu and has_trtllm and Path("/opt/tritonserver").exists(),
         "needs the TensorRT-LLM Triton container on a GPU box"),
        ("tensor parallel > 1 with engines", has_trtllm and len(report["gpus"]) > 1 and bool(report["mpirun"]),
         "needs ≥ 2 GPUs and mpirun"),
    ]
