"""Quantize an HF Qwen2 with NVIDIA ModelOpt and export a TensorRT-LLM checkpoint (config.json + rank{i}.safetensors).

The recipes follow TensorRT-LLM 1.2's examples/quantization/quantize.py (tensorrt_llm/quantization/
quantize_by_modelopt.py): ModelOpt calibrates int8_sq / int4_awq / fp8 (and the KV cache when asked); int8_wo /
int4_wo / bf16 / fp16 are exported unquantized and TensorRT-LLM quantizes weight-only formats when it loads the
checkpoint. Calibration runs on CUDA when present, else on CPU, over the bundled offline set or the user's file.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import resource
import shutil
import time
from pathlib import Path
from typing import Callable

from trtqwen.build import smoothquant
from trtqwen.build.calib import load_calibration_texts
from trtqwen.errors import UserError
from trtqwen.qwen_tokenizer import EOS_ID, PAD_ID, load_tokenizer
from trtqwen.files import publishing
from trtqwen.shape import ModelShape, check_tp
from trtqwen.build.spec import BuildSpec, KvDtype, Precision
from trtqwen.build.trtllm_config import qwen_checkpoint_config

Progress = Callable[[str], None]
Step = Callable[[str, int, int], None]  # (what, done, total): drives a progress bar
CALIB_TOKENS_PER_FORWARD = 2048  # rows of calib_seq_len per forward; activations stay small next to a 7B's weights
# Calibration time in plain forwards over the set (trained 0.5B, 2 CPU cores; rough, docs/PERFORMANCE.md §6):
# × a plain forward's time; AWQ's search runs every linear at 11 scales: 167 s vs ~10 s plain for 4k tokens (2 cores)
CALIB_COST = {Precision.INT4_AWQ: 17.0, Precision.INT8_SQ: 1.5, Precision.FP8: 1.5}


# ---------------------------------------------------------------- checks before any heavy work


def check_shardable(hf: dict, spec: BuildSpec) -> None:
    """Refuse, before loading or calibrating, a split the one TP rule refuses (heads, KV heads, AWQ groups)."""
    check_tp(ModelShape.from_hf(hf), spec.tp, spec.precision, spec.awq_block_size)


def _check_hf_dir(hf_dir: Path) -> dict:
    config = hf_dir / "config.json"
    if not config.is_file():
        raise UserError(f"{hf_dir} has no config.json", "point --model at a Hugging Face checkpoint directory")
    if not any(hf_dir.glob("*.safetensors")):
        raise UserError(f"{hf_dir} has no *.safetensors weights",
                        "only safetensors checkpoints are loaded (pickle .bin files can run code); convert them first")
    return json.loads(config.read_text())


# ---------------------------------------------------------------- recipe, model, calibration


def modelopt_config(spec: BuildSpec) -> dict | None:
    """ModelOpt quantization config for spec, as TensorRT-LLM's quantize.py chooses it; None: nothing to calibrate."""
    import modelopt.torch.quantization as mtq

    kv_bits = {KvDtype.INT8: 8, KvDtype.FP8: (4, 3)}.get(spec.kv_cache_dtype)
    if not spec.info.calibrated and kv_bits is None:
        return None  # bf16 / fp16 / weight-only: exported as 16-bit weights
    if not spec.info.calibrated:
        # TensorRT-LLM's EMPTY_CFG: every GEMM quantizer off; only the KV cache below is calibrated
        cfg = {"quant_cfg": {"*weight_quantizer": {"enable": False}, "*input_quantizer": {"enable": False},
                             "*lm_head*": {"enable": False}, "default": {"enable": False}}, "algorithm": "max"}
    else:
        cfg = copy.deepcopy({Precision.INT8_SQ: mtq.INT8_SMOOTHQUANT_CFG, Precision.INT4_AWQ: mtq.INT4_AWQ_CFG,
                             Precision.FP8: mtq.FP8_DEFAULT_CFG}[spec.precision])
    if spec.precision is Precision.INT4_AWQ:
        cfg["quant_cfg"]["*weight_quantizer"]["block_sizes"][-1] = spec.awq_block_size
    if spec.precision is Precision.INT8_SQ:
        cfg["algorithm"] = {"method": "smoothquant", "alpha": spec.sq_alpha}
    if kv_bits is not None:
        # ModelOpt 0.37 reads KV scales from the attention's k/v BMM quantizers (FP8_KV_CFG's pattern); TensorRT-LLM's
        # older int8 recipe (k_proj/v_proj output quantizers) is no longer what its exporter reads.
        cfg["quant_cfg"]["*[kv]_bmm_quantizer"] = {"num_bits": kv_bits, "axis": None, "enable": True}
    return cfg


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cap_gpu_memory(gib: float | None, say: Progress | None = None) -> None:
    """Let this process use at most `gib` GiB of the GPU (torch's caching allocator refuses beyond it), so a 24 GB
    card's calibration can be reproduced on a larger one; the lent H200 measured int4_awq at 17.04 GiB under 24."""
    if gib is None or pick_device() != "cuda":
        return
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    if not 0 < gib * 2**30 <= total:
        raise UserError(f"--calib-gpu-memory {gib} GiB is not between 0 and this GPU's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total)
    if say:
        say(f"calibration capped at {gib:g} GiB of the GPU's {total / 2**30:.0f} GiB")


def load_hf_model(hf_dir: Path, spec: BuildSpec, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, spec.dtype), trust_remote_code=False,
                                                 use_safetensors=True, low_cpu_mem_usage=True).to(device).eval()
    model.config.architectures = ["Qwen2ForCausalLM"]  # the exporter needs it; configs built in code lack it
    return model


def calibration_texts(spec: BuildSpec) -> list[str]:
    return load_calibration_texts(Path(spec.calib_data) if spec.calib_data else None, spec.calib_size)


def calibration_batches(texts: list[str], tokenizer, spec: BuildSpec, device: str) -> list:
    """The calibration samples, each cut to calib_seq_len tokens, packed end to end (EOS between them) into rows of calib_seq_len tokens, a few rows
    per forward: ModelOpt's per-forward work (AWQ fake-quantizes every weight for each of its 11 scale candidates)
    is paid once per batch, not once per sample — the difference between minutes and an hour on a CPU."""
    import torch

    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    stream: list[int] = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=spec.calib_seq_len)["input_ids"]  # as TensorRT-LLM's calib_max_seq_length
        stream += ids + ([sep] if sep is not None else [])
    length = spec.calib_seq_len
    rows = [stream[i:i + length] for i in range(0, len(stream), length)]
    full, tail = [r for r in rows if len(r) == length], [r for r in rows if 2 <= len(r) < length]
    per_forward = max(1, CALIB_TOKENS_PER_FORWARD // length)
    batches = [torch.tensor(full[i:i + per_forward]) for i in range(0, len(full), per_forward)]
    batches += [torch.tensor([r]) for r in tail]
    if not batches:
        raise UserError("the calibration texts tokenize to nothing", "give --calib-data a file with real text")
    return [b.to(device) for b in batches]


def calibration_eta(model, batches: list, spec: BuildSpec) -> float:
    """Seconds calibration will take: one timed plain forward, scaled by tokens and by what the algorithm does."""
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=batches[0], logits_to_keep=1)
    per_token = (time.perf_counter() - t0) / batches[0].numel()
    return per_token * sum(b.numel() for b in batches) * CALIB_COST.get(spec.precision, 1.0)


def calibrate(model, tokenizer, spec: BuildSpec, cfg: dict, device: str, say: Progress,
              step: Step | None = None) -> dict:
    """mtq.quantize over the packed calibration set; step(pass, done, total) after every forward."""
    import modelopt.torch.quantization as mtq
    import torch

    texts = calibration_texts(spec)
    batches = calibration_batches(texts, tokenizer, spec, device)
    tokens, samples = sum(b.numel() for b in batches), len(texts)
    eta = calibration_eta(model, batches, spec)
    say(f"calibrating {spec.precision.value} (KV {spec.kv_cache_dtype.value}) on {device}: {samples} samples, "
        f"{tokens} tokens in {len(batches)} forward(s) per pass; about {_duration(eta)}")
    passes = [0]

    def forward_loop(m):
        passes[0] += 1  # AWQ runs the set twice (statistics, then the scale search); max/SmoothQuant once
        with torch.no_grad():
            for i, ids in enumerate(batches, 1):
                m(input_ids=ids, logits_to_keep=1)  # lm_head stays 16-bit: its 151,936 logits are not needed
                if step:
                    step(f"calibration pass {passes[0]}", i, len(batches))

    t0 = time.perf_counter()
    mtq.quantize(model, cfg, forward_loop=forward_loop)
    if spec.precision is Precision.INT8_SQ:
        smoothquant.share_smoothing(model, spec.sq_alpha)
    return {"quantize_seconds": round(time.perf_counter() - t0, 2), "calib_samples": samples,
            "calib_tokens": tokens, "calib_forwards": len(batches), "calib_eta_seconds": round(eta, 1)}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


# ---------------------------------------------------------------- the export


@contextlib.contextmanager
def _config_step_without_tensorrt_llm():
    """Let ModelOpt 0.37 export Qwen weights without TensorRT-LLM.

    Its `convert_to_tensorrt_llm_config` takes the Qwen fields from `tensorrt_llm.models.QWenConfig` and raises
    NotImplementedError for "qwen" without it, after the weights are already converted. For the duration of the
    export it is replaced by a stand-in returning a dict of its own with what the exporter reads from it (`rank`,
    `mapping.world_size`, `decoder`, `quantization`) plus the padded vocabulary; trtllm_config.py writes the real
    config afterwards. With TensorRT-LLM importable, ModelOpt's own path runs untouched.
    """
    if importlib.util.find_spec("tensorrt_llm") is not None:
        yield
        return
    import modelopt
    import modelopt.torch.export.model_config_export as mce

    original = mce.convert_to_tensorrt_llm_config

    def stand_in(model_config, quant_config, hf_config=None):
        tp, pp = model_config.tensor_parallel, model_config.pipeline_parallel
        attention = next(layer.attention for layer in model_config.layers if layer.attention)
        quant_config["kv_cache_quant_algo"] = attention.kv_cache_dtype  # as the original does
        return {
            "producer": {"name": "modelopt", "version": modelopt.__version__},
            "rank": model_config.rank,
            "decoder": model_config.layers[0].decoder_type,
            "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
            "quantization": quant_config,
            "vocab_size": model_config.vocab_size,
            "use_parallel_embedding": True,
            "share_embedding_table": model_config.lm_head is None,
        }

    mce.convert_to_tensorrt_llm_config = stand_in
    try:
        yield
    finally:
        mce.convert_to_tensorrt_llm_config = original


def _check_exported(exported: dict, spec: BuildSpec) -> None:
    """ModelOpt must report the format spec asked for; anything else would be mislabelled in config.json."""
    q = exported.get("quantization") or {}
    want = spec.quant_algo if spec.info.calibrated else None
    if spec.precision is Precision.INT8_SQ:
        want = smoothquant.MODELOPT_QUANT_ALGO  # rewritten to the per-token layout afterwards
    if q.get("quant_algo") != want:
        raise RuntimeError(f"ModelOpt exported quant_algo {q.get('quant_algo')!r}, expected {want!r}")
    if spec.kv_cache_quant_algo and q.get("kv_cache_quant_algo") != spec.kv_cache_quant_algo:
        raise RuntimeError(f"ModelOpt exported kv_cache_quant_algo {q.get('kv_cache_quant_algo')!r}, "
                           f"expected {spec.kv_cache_quant_algo!r}")


def quantize_model(model, tokenizer, spec: BuildSpec, progress: Progress | None = None, step: Step | None = None) -> dict:
    """Calibrate and quantize an in-memory HF Qwen2 in place per spec (nothing to do for bf16/fp16/weight-only)."""
    device = next(model.parameters()).device.type
    info: dict = {"device": device, "quantize_seconds": 0.0, "calib_samples": 0, "calib_tokens": 0}
    cfg = modelopt_config(spec)
    if cfg is not None:
        if tokenizer is None:
            raise UserError(f"{spec.precision.value} (KV {spec.kv_cache_dtype.value}) needs calibration and a tokenizer")
        info.update(calibrate(model, tokenizer, spec, cfg, device, progress or (lambda msg: None), step))
    return info


def write_checkpoint(model, hf: dict, spec: BuildSpec, out_dir: Path, progress: Progress | None = None) -> dict:
    """Export an (already quantized) HF Qwen2 as a TensorRT-LLM checkpoint with spec.tp ranks into out_dir.

    The same quantized model can be written at several TP sizes: the split happens here, not in calibration.
    """
    import torch
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from safetensors.torch import load_file, save_file

    say = progress or (lambda msg: None)
    check_shardable(hf, spec)
    out_dir = Path(out_dir)
    model.config.architectures = ["Qwen2ForCausalLM"]  # the exporter needs it; configs built in code lack it
    say(f"exporting {spec.tp} rank(s) as {spec.quant_algo or spec.dtype}")
    t0 = time.perf_counter()
    with publishing(out_dir) as tmp:
        with _config_step_without_tensorrt_llm(), torch.no_grad():
            export_tensorrt_llm_checkpoint(model, "qwen", getattr(torch, spec.dtype), export_dir=tmp,
                                           inference_tensor_parallel=spec.tp)
        exported = json.loads((tmp / "config.json").read_text())
        _check_exported(exported, spec)
        # ModelOpt's per-layer file for mixed precision; with a single format (or none) it only restates, wrongly
        # for weight-only, what config.json says, and TensorRT-LLM reads it only for MIXED_PRECISION.
        (tmp / "quant_cfg.json").unlink(missing_ok=True)
        config = qwen_checkpoint_config(hf, spec, exported)
        (tmp / "config.json").write_text(json.dumps(config, indent=4) + "\n")
        missing = [f"rank{r}.safetensors" for r in range(spec.tp) if not (tmp / f"rank{r}.safetensors").is_file()]
        if missing:
            raise RuntimeError(f"ModelOpt wrote no {', '.join(missing)}")
        if spec.precision is Precision.INT8_SQ:
            for rank in range(spec.tp):
                f = tmp / f"rank{rank}.safetensors"
                save_file(smoothquant.to_per_token_layout(load_file(f), hf["num_hidden_layers"]), f)
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    say(f"wrote {out_dir} ({sum(files.values()) / 1e6:.1f} MB)")
    return {
        "quant_algo": config["quantization"]["quant_algo"],
        "kv_cache_quant_algo": config["quantization"]["kv_cache_quant_algo"],
        # int8_wo / int4_wo: 16-bit weights here, quantized per channel by TensorRT-LLM when it loads them
        "weight_only_by_tensorrt_llm": spec.info.weight_only,
        "export_seconds": round(time.perf_counter() - t0, 2),
        "files": files,
    }


def _peak_memory(device: str) -> dict:
    import torch

    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # Linux: KiB
    if device == "cuda":
        peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


@contextlib.contextmanager
def _gpu_memory_is_a_user_error(hf_dir: Path):
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        raise UserError(
            f"the GPU ran out of memory quantizing {hf_dir} ({e})",
            "calibrating a 7B model peaks at about 17 GiB on the GPU (docs/PERFORMANCE.md): free the GPU of other "
            "processes, lower --calib-size, or quantize on the CPU with CUDA_VISIBLE_DEVICES= (slower; about 2× the "
            "model's size in RAM), then build the engine here",
        ) from None


def export_checkpoint(hf_dir: Path, spec: BuildSpec, out_dir: Path | None, progress: Progress | None = None,
                      step: Step | None = None, hf_out_dir: Path | None = None) -> dict:
    """HF dir → TensorRT-LLM checkpoint in out_dir and/or ModelOpt's unified HF checkpoint in hf_out_dir, from one
    load and one calibration (each written in a temporary dir beside it, renamed when complete).

    Returns device, quant_algo, kv_cache_quant_algo, files {name: bytes}, load/quantize/export seconds,
    calib_samples/tokens and peak_rss_mb (peak_gpu_mb on CUDA); with hf_out_dir also hf_files, hf_export_seconds.
    """
    hf_dir = Path(hf_dir)
    hf = _check_hf_dir(hf_dir)
    check_shardable(hf, spec)  # before the minutes of loading and calibrating
    if hf_out_dir is not None:
        check_hf_format(spec)
    say = progress or (lambda msg: None)
    device = pick_device()
    tokenizer = load_tokenizer(hf_dir) if modelopt_config(spec) is not None else None
    t0 = time.perf_counter()
    say(f"loading {hf_dir} ({spec.dtype}) on {device}")
    with _gpu_memory_is_a_user_error(hf_dir):
        model = load_hf_model(hf_dir, spec, device)
        info = {"load_seconds": round(time.perf_counter() - t0, 2), **quantize_model(model, tokenizer, spec, say, step)}
        if out_dir is not None:
            info.update(write_checkpoint(model, hf, spec, Path(out_dir), say))
        if hf_out_dir is not None:  # last: ModelOpt's HF export packs the model's weights in place
            info.update(write_hf_checkpoint(model, hf_dir, spec, Path(hf_out_dir), say))
    return {**info, **_peak_memory(device)}


def check_hf_format(spec: BuildSpec) -> None:
    """The PyTorch backend's checkpoint exists for what that backend runs (precision.py says why not the rest)."""
    why = spec.info.not_on_pytorch_backend
    if why:
        raise UserError(f"{spec.precision.value} cannot target TensorRT-LLM's PyTorch backend: {why}",
                        "use --target engine (TensorRT-LLM 1.2.1) for it, or int4_awq / fp8 / bf16 for --target pytorch")


HF_EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                  "vocab.json", "merges.txt", "chat_template.jinja")


def write_hf_checkpoint(model, hf_dir: Path, spec: BuildSpec, out_dir: Path, progress: Progress | None = None) -> dict:
    """ModelOpt's unified HF checkpoint of an (already quantized) HF Qwen2, with the source's tokenizer files: the
    input of TensorRT-LLM's PyTorch backend (trtllm-serve, the Triton llmapi model), any TP (split at load)."""
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    say = progress or (lambda msg: None)
    say(f"exporting the unified HF checkpoint ({spec.quant_algo or spec.dtype})")
    t0 = time.perf_counter()
    with publishing(out_dir) as tmp:
        with torch.no_grad():
            export_hf_checkpoint(model.to(getattr(torch, spec.dtype)), dtype=getattr(torch, spec.dtype), export_dir=tmp)
        for name in HF_EXTRA_FILES:
            if (hf_dir / name).is_file() and not (tmp / name).exists():
                shutil.copy2(hf_dir / name, tmp / name)
        stop_ids_in_generation_config(tmp)
    return {"hf_export_seconds": round(time.perf_counter() - t0, 2),
            "hf_files": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}}


def stop_ids_in_generation_config(d: Path) -> None:
    """TensorRT-LLM's PyTorch backend stops on generation_config.json's eos_token_id: list both Qwen2.5 stop ids
    (base models' configs name only <|endoftext|>, so chat answers would run on past <|im_end|>)."""
    f = d / "generation_config.json"
    gen = json.loads(f.read_text()) if f.is_file() else {}
    eos = gen.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    gen["eos_token_id"] = eos + [i for i in (EOS_ID, PAD_ID) if i not in eos and i < vocab]  # <|im_end|>, <|endoftext|>
    f.write_text(json.dumps(gen, indent=2) + "\n")
