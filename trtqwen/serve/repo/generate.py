"""`trtqwen package`: a build directory → a Triton model repository in the tensorrtllm_backend layout.

ensemble, preprocessing, tensorrt_llm, postprocessing, tensorrt_llm_bls — NVIDIA's model names, tensor names
and parameter keys — with the tensorrt_llm step served by one of three runtimes: `trtllm` (TensorRT engines,
C++ backend), `llmapi` (TensorRT-LLM's PyTorch backend) or `torch` (trtqwen's reference runtime, anywhere).
The repository is written into a temporary directory and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from trtqwen import __version__
from trtqwen.errors import UserError
from trtqwen.files import publishing, write_json_atomic
from trtqwen.serve.repo import checks, llmapi
from trtqwen.serve.repo.configs import model_configs, to_pbtxt
from trtqwen.serve.repo.interface import BLS, ENSEMBLE, POSTPROCESSING, PREPROCESSING, TENSORRT_LLM
from trtqwen.serve.repo.record import RECORD, make_record
from trtqwen.serve.repo.settings import read_build_spec, resolve_settings

HERE = Path(__file__).resolve().parent
MODEL_SOURCES = HERE / "models"
SERVER_STATE = ".trtqwen-server.json"  # trtqwen.serve.server writes it into a repository it serves

# Model dir → {file in the repository's version dir: source}; the helpers ride along because trtqwen may not
# be installed in the Python that Triton's stub runs (NVIDIA's container).
PYTHON_MODELS = {
    PREPROCESSING: {"model.py": MODEL_SOURCES / "preprocessing" / "model.py", "trtqwen_text.py": HERE / "text.py"},
    POSTPROCESSING: {"model.py": MODEL_SOURCES / "postprocessing" / "model.py", "trtqwen_text.py": HERE / "text.py"},
    BLS: {"model.py": MODEL_SOURCES / "tensorrt_llm_bls" / "model.py", "trtqwen_text.py": HERE / "text.py",
          "trtqwen_interface.py": HERE / "interface.py"},
}
TORCH_MODEL = {"model.py": MODEL_SOURCES / "tensorrt_llm_torch" / "model.py", "trtqwen_text.py": HERE / "text.py",
               "trtqwen_request.py": HERE / "torch_request.py"}


def _server_running(out: Path) -> int | None:
    state = out / SERVER_STATE
    if not state.is_file():
        return None
    try:
        pid = int(json.loads(state.read_text())["pid"])
        os.kill(pid, 0)
        return pid
    except (ValueError, KeyError, OSError):
        return None


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is a file", "pick another --out")
    pid = _server_running(out) if out.is_dir() else None
    if pid:
        raise UserError(f"a tritonserver (pid {pid}) is serving {out}", "stop it first: `trtqwen serve --stop`")
    if out.is_dir() and any(p.name != "README.md" for p in out.iterdir()) and not force:
        what = "a model repository" if (out / RECORD).is_file() else "a directory that is not empty"
        raise UserError(f"{out} already exists ({what})", "pass --force to replace it, or choose another --out")


def _tokenizer_dir(build_dir: Path, manifest: dict) -> Path:
    d = build_dir / manifest.get("tokenizer_dir", "tokenizer")
    if not ((d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()):
        raise UserError(f"{build_dir} has no tokenizer ({d} with tokenizer.json)",
                        "run `trtqwen build` again: it copies the model's tokenizer files into the build directory")
    return d


def generate_repo(build_dir: Path, out: Path, runtime: str = "torch", max_batch_size: int | None = None,
                  replicas: int = 1, gpus: str | None = None, layout: str = "servers",
                  kv_cache_free_gpu_mem_fraction: float | None = None, streaming: bool = True,
                  force: bool = False, llmapi_model_src: Path | None = None, serving: dict | None = None,
                  stream_interval: int = 1) -> Path:
    """Write the model repository for `build_dir` into `out`; returns `out`.

    `serving` is what an engine will meet where it is served ({tensorrt_llm, tensorrt, compute_capability}; default:
    this machine, read lazily for the runtimes that need it); `serve` checks again where it runs.
    """
    build_dir, out = Path(build_dir), Path(out)
    checks.check_runtime(runtime)
    manifest = checks.read_build(build_dir)
    spec = read_build_spec(build_dir, manifest)
    checkpoint = checks.check_build_checkpoint(build_dir, manifest, spec)
    _tokenizer_dir(build_dir, manifest)
    notes: list[str] = []
    versions = {"trtqwen": __version__, "tensorrt_llm": None, "engine": None, "build": manifest.get("versions", {})}
    if runtime == "trtllm":
        model_dir = checks.engine_dir(build_dir, manifest)
        checks.check_tp(spec, checks.engine_tp(model_dir), model_dir)
        engine = checks.recorded_engine(build_dir, manifest, model_dir)
        versions.update(engine=engine, tensorrt_llm=engine["tensorrt_llm"])
        here = checks.serving_environment() if serving is None else serving
        checks.check_engine_compatible(engine, here)
        if "tensorrt_llm" not in here:
            notes.append("TensorRT-LLM is not installed here: `trtqwen serve` checks the engine's TensorRT-LLM "
                         f"({versions['tensorrt_llm']}), TensorRT and GPU architecture against the serving ones first")
    elif runtime == "llmapi":
        model_dir = checks.llmapi_model_dir(build_dir, manifest, spec)
    else:
        model_dir = checkpoint
    check_output(out, force)
    settings = resolve_settings(build_dir, manifest, spec, runtime, model_dir, max_batch_size=max_batch_size,
                                replicas=replicas, gpus=gpus, layout=layout,
                                kv_cache_free_gpu_mem_fraction=kv_cache_free_gpu_mem_fraction,
                                streaming=streaming, stream_interval=stream_interval)

    with publishing(out) as tmp:
        for name, config in model_configs(settings).items():
            (tmp / name / "1").mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(to_pbtxt(config))
        for name, files in PYTHON_MODELS.items():
            _copy(files, tmp / name / "1")
        version_dir = tmp / TENSORRT_LLM / "1"
        if runtime == "torch":
            _copy(TORCH_MODEL, version_dir)
        elif runtime == "llmapi":
            (version_dir / "model.yaml").write_text(llmapi.dump_model_yaml(settings))
            src = llmapi.find_llmapi_model_code(llmapi_model_src)
            if src is None:
                notes.append(f"tensorrt_llm/1/ has model.yaml but not NVIDIA's model code: {llmapi.WHERE_TO_GET_IT}")
            else:
                llmapi.copy_llmapi_model_code(src, version_dir)
        (tmp / ENSEMBLE / "1" / ".keep").touch()  # Triton wants a version directory, even for an ensemble
        if runtime == "trtllm":
            (version_dir / ".keep").touch()
        write_json_atomic(tmp / RECORD, make_record(build_dir, manifest, settings, versions, notes))
        if (out / "README.md").is_file():  # the project's own note in model_repo/ survives re-packaging
            shutil.copy2(out / "README.md", tmp / "README.md")
    return out


def _copy(files: dict[str, Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copy2(src, dest / name)
