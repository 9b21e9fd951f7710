"""`trtqwen build`: fetch → checkpoint (quantize + export) → engine, recorded in build.json.

Two targets: `engine` (TensorRT-LLM 1.2.1, frozen: a TensorRT-LLM checkpoint in TP shards, then trtllm-build) and
`pytorch` (TensorRT-LLM's PyTorch backend, the path after 1.2.1: ModelOpt's unified HF checkpoint, split at load,
no engine); `both` writes the two checkpoints from one calibration.

Each stage writes into a temporary directory inside the build dir and renames it when complete, then
updates the manifest atomically; a stage whose inputs are unchanged is skipped, so an interrupted build
continues where it stopped and never leaves output that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from trtqwen import __version__

from trtqwen.build import hf
from trtqwen.errors import UserError
from trtqwen.build.hardware import get_profile
from trtqwen.build.manifest import MANIFEST, read_manifest, stage_key
from trtqwen.build.plan import Plan, make_plan, read_model_shape, recommended_max_batch_size, weight_bytes
from trtqwen.build.spec import BuildSpec, KvDtype, Precision, default_output_dir
from trtqwen.files import clean_temporaries, dir_size, publishing, write_json_atomic
from trtqwen.shape import ModelShape
from trtqwen.versions import tool_versions

STAGES = ("fetch", "checkpoint", "engine")
TARGET_NAMES = {"engine": "TensorRT-LLM 1.2.1 engine (frozen)", "pytorch": "TensorRT-LLM PyTorch backend (llmapi, trtllm-serve)",
           "both": "both"}
CHECKPOINT_DIRS = {"engine": ["checkpoint"], "pytorch": ["hf_checkpoint"], "both": ["checkpoint", "hf_checkpoint"]}


@dataclass
class BuildResult:
    out: Path
    manifest: dict


def free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def decide_spec(spec: BuildSpec, shape: ModelShape, target: str = "engine") -> tuple[BuildSpec, Plan]:
    """Fill what the user left out (None) from `plan` for the chosen GPU; refuse a spec the plan says cannot fit."""
    profile = get_profile(spec.gpu)
    seq = spec.max_seq_len or min(4096, shape.max_position_embeddings)
    spec = spec.replace(gpu=profile.name, max_seq_len=seq, max_num_tokens=spec.max_num_tokens or 8192,
                        max_input_len=spec.max_input_len or max(1, seq // 2),
                        calib_size=spec.calib_size or default_calib_size(spec.precision))
    if spec.max_batch_size is None:
        spec = spec.replace(max_batch_size=recommended_max_batch_size(make_plan(shape, profile, spec.replace(
            max_batch_size=32), min(1024, seq), target=target)))
    plan = make_plan(shape, profile, spec, min(1024, seq), target=target)
    if not plan.fits:
        raise UserError(f"this build does not fit a {profile.name}: {'; '.join(plan.reasons)}",
                        f"see `trtqwen plan --precision {spec.precision.value} --tp {spec.tp} --gpu {profile.name}`; "
                        "quantize further (int4), raise --tp, or lower --max-seq-len / --max-batch-size")
    return spec, plan


def default_calib_size(precision: Precision) -> int:
    """32 samples; AWQ on a CPU 16: on the trained 0.5B as good as 32 (+7.5 % vs +7.4 % perplexity) in half the
    search time (docs/PERFORMANCE.md §6), and a 7B's search on a CPU takes ~15× a 0.5B's."""
    from trtqwen.build.quantize import pick_device

    return 16 if precision is Precision.INT4_AWQ and pick_device() == "cpu" else 32


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is a file", "pick another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file() and not force:
        raise UserError(f"{out} exists and is not a trtqwen build directory", "pick another --out, or pass --force to use it anyway")


HUB_TOKENIZER_BYTES = 50e6  # tokenizer, configs and chat template of a hub model, before they are downloaded


def check_disk(out: Path, needed: float) -> None:
    free = free_bytes(out)
    if free < needed:
        raise UserError(f"not enough disk at {out}: the build needs about {needed / 1e9:.1f} GB, {free / 1e9:.1f} GB is free",
                        "free some space or pass --out on a larger disk")


def copy_tokenizer(src: Path, out: Path) -> Path:
    with publishing(out / "tokenizer") as tmp:
        for name in hf.TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    return out / "tokenizer"


def lossy_on_qwen25(spec: BuildSpec) -> list[str]:
    """Recipes that build and run but measured far worse on the trained Qwen2.5 (docs/PERFORMANCE.md §6)."""
    found = []
    if spec.precision is Precision.INT4_WO:
        found.append("int4_wo (per-channel INT4, no groups) cost +37 % perplexity on a trained Qwen2.5; "
                     "int4_awq costs a fraction of that at the same size")
    if spec.kv_cache_dtype is KvDtype.INT8:
        found.append("an INT8 KV cache shares one scale between K and V: Qwen2.5's first layers have K near 150 and V "
                     "below 0.2, so V rounds to zero (perplexity ×42 measured); use --kv-cache-dtype fp8 on Ada")
    return found


def run_build(spec: BuildSpec, *, out: Path | None = None, until: str = "engine", target: str = "engine",
              force: bool = False, calib_gpu_memory: float | None = None, console: Console | None = None) -> BuildResult:
    """Every stage of a build, from what the user asked for (`BuildSpec.request`); calib_gpu_memory (GiB) caps
    calibration's GPU memory, as a smaller card would."""
    console = console or Console()
    if until not in STAGES:
        raise UserError(f"unknown stage {until!r} for --until", f"use one of {', '.join(STAGES)}")
    if target not in TARGET_NAMES:
        raise UserError(f"unknown target {target!r}", "use engine (TensorRT-LLM 1.2.1), pytorch (its PyTorch backend) or both")
    if target != "engine":
        from trtqwen.build.quantize import check_hf_format

        check_hf_format(spec)
    if spec.calib_data is not None and not Path(spec.calib_data).is_file():
        raise UserError(f"calibration file {spec.calib_data} does not exist", "pass a .jsonl (with a 'text' field) or .txt file")

    # fetch: configs first, so the plan and the disk check come before gigabytes of download.
    t0 = time.time()
    hub = hf.is_hub_id(spec.model)
    cfg_dir = hf.fetch(spec.model, patterns=["config.json"])[0] if hub else hf.fetch(spec.model)[0]
    shape = read_model_shape(cfg_dir)
    spec, plan = decide_spec(spec, shape, "pytorch" if target == "pytorch" else "engine")
    for warning in lossy_on_qwen25(spec):
        console.print(f"[yellow]warning:[/] {warning}")
    out = Path(out) if out else default_output_dir(spec)
    check_output_dir(out, force)
    ckpt_bytes = weight_bytes(shape, spec.precision) * len(CHECKPOINT_DIRS[target])
    tokenizer_bytes = HUB_TOKENIZER_BYTES if hub else sum(
        f.stat().st_size for f in Path(cfg_dir).iterdir() if f.is_file() and f.suffix != ".safetensors")
    engine_too = until == "engine" and target != "pytorch"
    check_disk(out, ckpt_bytes * (2 if engine_too else 1) * 1.1 + tokenizer_bytes
               + (weight_bytes(shape, Precision.BF16) if hub else 0))
    out.mkdir(parents=True, exist_ok=True)
    clean_temporaries(out)
    with disk_full_is_an_error(out):
        return run_stages(hub, spec, plan, out, until, target, force, t0, console, calib_gpu_memory)


@contextlib.contextmanager
def disk_full_is_an_error(out: Path):
    """ENOSPC anywhere in a stage: drop the half-written temporaries and say so (finished stages stay)."""
    try:
        yield
    except Exception as e:  # safetensors' writer raises its own error type, naming os error 28
        if getattr(e, "errno", None) != errno.ENOSPC and "No space left on device" not in str(e):
            raise
        clean_temporaries(out)
        raise UserError(f"the disk under {out} filled up while building; the stage in progress was discarded",
                        "free some space (or pass --out on a larger disk) and rerun: finished stages are reused") from None


def run_stages(hub, spec: BuildSpec, plan: Plan, out, until, target, force, t0, console, calib_gpu_memory=None) -> BuildResult:
    model = spec.model
    src_path, revision = hf.fetch(model)
    source = hf.validate(src_path, revision)
    old = read_manifest(out) or {}
    manifest = {
        "trtqwen": __version__,
        "target": target,
        "target_name": TARGET_NAMES[target],
        "spec": spec.to_dict(),
        "plan": {k: plan.to_dict()[k] for k in ("kv_cache_free_gpu_mem_fraction", "kv_tokens", "concurrent_sequences",
                                                 "weight_bytes_per_gpu", "predicted_peak_bytes_per_gpu",
                                                 "calibration_peak_bytes", "decode_estimate_tok_s", "ttft_estimate_s")},
        "source": {"model": model, "path": str(source.path.resolve()), "revision": revision, "dtype": source.dtype,
                   "files": source.fingerprints, "model_type": source.config.get("model_type")},
        "versions": tool_versions(),
        "stages": {"fetch": {"seconds": round(time.time() - t0, 2), "hub": hub}},
        "complete": False,
    }
    write_json_atomic(out / MANIFEST, manifest)
    console.print(f"[bold]fetch[/] {model} → {source.path} ({len(source.weight_files)} weight file(s), {source.dtype})")
    if until == "fetch":
        return finish(out, manifest, console)

    copy_tokenizer(source.path, out)  # first: the checkpoint's rename into place is the stage's last act
    manifest["tokenizer_dir"] = "tokenizer"
    manifest["stages"]["checkpoint"] = checkpoint_stage(spec, source, out, target, force, old, console, calib_gpu_memory)
    write_json_atomic(out / MANIFEST, manifest)
    if target != "engine":
        from trtqwen.build.trtllm_serve import write_serve_files

        write_serve_files(out, spec, plan.kv_cache_free_gpu_mem_fraction)
        console.print(f"[bold]trtllm-serve[/] on the GPU box: [bold]{out / 'trtllm-serve.sh'}[/] "
                      f"(or `trtqwen serve {out} --engine trtllm-serve`)")
    if until == "checkpoint" or target == "pytorch":  # the PyTorch backend builds no engine
        return finish(out, manifest, console)

    manifest["stages"]["engine"] = engine_stage(spec, out, console)
    return finish(out, manifest, console)


@contextlib.contextmanager
def stage_progress(console: Console):
    """(say, step) for a long stage: say(msg) prints a line, step(what, done, total) drives a bar with an ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bars = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)
    tasks: dict[str, int] = {}

    def say(message: str) -> None:
        bars.console.print(f"  {message}")

    def step(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = bars.add_task(what, total=total)
        bars.update(tasks[what], completed=done, total=total)

    with bars:
        yield say, step


def checkpoint_stage(spec: BuildSpec, source: hf.HfCheckpoint, out: Path, target: str, force: bool, old: dict, console,
                     calib_gpu_memory: float | None = None) -> dict:
    key = stage_key(spec.to_dict(), source.fingerprints, target)
    prev = old.get("stages", {}).get("checkpoint", {})
    wanted = CHECKPOINT_DIRS[target]
    if not force and prev.get("key") == key and all((out / d / "config.json").is_file() for d in wanted):
        console.print(f"[bold]checkpoint[/] unchanged inputs: reusing {', '.join(wanted)} (--force redoes it)")
        return {**prev, "skipped": True}
    from trtqwen.build import quantize  # heavy: torch, modelopt

    t0 = time.time()
    record: dict = {"key": key, "target": target}
    shards = f"TP {spec.tp} shards" if "checkpoint" in wanted else f"the unified HF checkpoint (any TP; TP {spec.tp} planned)"
    console.print(f"[bold]checkpoint[/] quantizing {spec.precision.value} and exporting {shards}")
    with stage_progress(console) as (say, step):
        quantize.cap_gpu_memory(calib_gpu_memory, say)
        info = quantize.export_checkpoint(source.path, spec, out / "checkpoint" if "checkpoint" in wanted else None, say,
                                          step, hf_out_dir=out / "hf_checkpoint" if "hf_checkpoint" in wanted else None)
    if "checkpoint" in wanted:
        record.update(dir="checkpoint", bytes=dir_size(out / "checkpoint"),
                      files=sorted(p.name for p in (out / "checkpoint").iterdir()))
    if "hf_checkpoint" in wanted:
        record.update(hf_dir="hf_checkpoint", hf_bytes=dir_size(out / "hf_checkpoint"))
    record.update(info=info, seconds=round(time.time() - t0, 2))
    console.print(f"[bold]checkpoint[/] {', '.join(wanted)} written in {record['seconds']:.1f} s")
    return record


def engine_stage(spec: BuildSpec, out: Path, console) -> dict:
    from trtqwen.build import trtllm_build as engine  # the one place that touches TensorRT-LLM

    script = out / "build.sh"
    script.write_text(engine.build_script(spec, Path("checkpoint"), Path("engine"), engine.TRTLLM_IMAGE))
    script.chmod(0o755)
    try:
        t0 = time.time()
        with console.status(f"[bold]engine[/] trtllm-build running, TP {spec.tp} (log: {out / 'engine_build.log'})"):
            record = engine.run_engine_build(spec, out / "checkpoint", out / "engine", out / "engine_build.log")
    except engine.EngineToolsMissing as e:
        console.print(f"[yellow]engine[/] not built here: {e.message}")
        console.print(f"  → on the 4090D box run [bold]{script}[/] (or the container command inside it)")
        return {"status": "pending", "reason": e.message, "script": "build.sh"}
    console.print(f"[bold]engine[/] built in {time.time() - t0:.0f} s → {out / 'engine'}")
    return {"status": "built", "dir": "engine", "seconds": round(time.time() - t0, 2), "script": "build.sh", **record}


def finish(out: Path, manifest: dict, console) -> BuildResult:
    engine_rec = manifest["stages"].get("engine", {})
    manifest["complete"] = engine_rec.get("status") != "pending"
    write_json_atomic(out / MANIFEST, manifest)
    console.print(f"build directory: [bold]{out}[/] (manifest: {out / MANIFEST})")
    return BuildResult(out=out, manifest=manifest)
