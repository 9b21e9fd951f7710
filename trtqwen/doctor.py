"""What this machine has for the job: Python, torch/CUDA, GPUs, TensorRT-LLM, tritonserver, mpirun, disk."""

from __future__ import annotations

import importlib.util
import platform
import shutil
import sys
from pathlib import Path

from trtqwen.build.hardware import detect_gpus, profile_for_gpu_name
from trtqwen.versions import package_version


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
        "tensorrt_llm": package_version("tensorrt_llm", "tensorrt-llm"),
        "tensorrt": package_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
        "modelopt": package_version("nvidia-modelopt"),
        "transformers": package_version("transformers"),
        "tritonclient": package_version("tritonclient"),
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


def tables(report: dict) -> list:
    """The report as two rich tables: what is installed, and what can run here."""
    from rich.table import Table

    t = Table(title="trtqwen doctor", show_header=False)
    t.add_row("python", report["python"])
    tr = report["torch"]
    t.add_row("torch", f"{tr['version']} (CUDA build {tr['cuda_build']}, CUDA available: {tr['cuda_available']})"
              if tr["installed"] else "[red]not installed[/]")
    for g in report["gpus"] or [None]:
        t.add_row("gpu", "[yellow]none found (no NVIDIA driver or GPU)[/]" if g is None else
                  f"{g['index']}: {g['name']}, {g['memory_gib']} GiB, sm_{g['compute_capability'].replace('.', '')}"
                  f" (profile: {g['profile'] or 'custom'})")
    for key in ("tensorrt_llm", "tensorrt", "modelopt", "transformers", "tritonclient"):
        t.add_row(key, report[key] or "[yellow]absent[/]")
    t.add_row("tritonserver", ", ".join(report["tritonserver"]) or "[yellow]none found[/]")
    t.add_row("mpirun", report["mpirun"] or "[yellow]absent[/]")
    t.add_row("disk free", f"{report['disk_free_gb']} GB")
    v = Table(title="what you can run here")
    for c in ("capability", "here?", "needs"):
        v.add_column(c)
    for name, ok, why in verdicts(report):
        v.add_row(name, "[green]yes[/]" if ok else "[red]no[/]", why)
    return [t, v]
