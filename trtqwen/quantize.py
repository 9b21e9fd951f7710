"""Quantize an HF Qwen2 with NVIDIA ModelOpt and export a TensorRT-LLM checkpoint (config.json + rank{i}.safetensors).

Calibration runs on CUDA when present, else on CPU, over the bundled offline set (or the user's file).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import resource
import shutil
import time
from pathlib import Path

from trtqwen.calib import load_calibration_texts
from trtqwen.errors import UserError
from trtqwen.spec import BuildSpec, KvDtype, Precision
from trtqwen.trtllm_config import WEIGHT_ONLY, qwen_checkpoint_config


def check_shardable(hf: dict, spec: BuildSpec) -> None:
    """Refuse, before any calibration, shapes that the chosen precision cannot split over spec.tp ranks."""
    tp, heads = spec.tp, hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads", heads)
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if heads % tp or kv_heads % tp:
        raise UserError(f"TP {tp} does not divide the model's {heads} query / {kv_heads} KV heads",
                        "use a TP size that divides both")
    if spec.precision is Precision.INT4_AWQ:
        g = spec.awq_block_size
        for layer, dim in (("attention.dense", heads * head_dim // tp), ("mlp.proj", hf["intermediate_size"] // tp),
                           ("attention.qkv / mlp.fc", hf["hidden_size"])):
            if dim % g:
                raise UserError(
                    f"INT4-AWQ at TP {tp}: {layer} has {dim} input channels per rank, not a multiple of the group size {g}",
                    "use a lower --tp, or int8_sq / fp8 / int4_wo, which have no input-group constraint",
                )


def modelopt_config(spec: BuildSpec) -> dict | None:
    """ModelOpt quantization recipe as TensorRT-LLM's examples/quantization/quantize.py chooses it."""
    import modelopt.torch.quantization as mtq

    base = {
        Precision.INT8_SQ: mtq.INT8_SMOOTHQUANT_CFG,
        Precision.INT4_AWQ: mtq.INT4_AWQ_CFG,
        Precision.FP8: mtq.FP8_DEFAULT_CFG,
    }.get(spec.precision)
    kv_bits = {KvDtype.INT8: 8, KvDtype.FP8: (4, 3)}.get(spec.kv_cache_dtype)
    if base is None and kv_bits is None:
        return None  # bf16 / fp16 / weight-only (TensorRT-LLM quantizes weight-only formats itself)
    cfg = copy.deepcopy(base) if base else {"quant_cfg": {"default": {"enable": False}}, "algorithm": "max"}
    if spec.precision is Precision.INT4_AWQ:
        cfg["quant_cfg"]["*weight_quantizer"]["block_sizes"][-1] = spec.awq_block_size
    if spec.precision is Precision.INT8_SQ:
        cfg["algorithm"] = {"method": "smoothquant", "alpha": spec.sq_alpha}
    if kv_bits is not None:
        cfg["quant_cfg"]["*[kv]_bmm_quantizer"] = {"num_bits": kv_bits, "axis": None, "enable": True}
    return cfg


def load_hf_model(hf_dir: Path, spec: BuildSpec, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    # Calibrate in float32 on CPU (bf16 matmuls are slow there), in the export dtype on CUDA.
    dtype = getattr(torch, spec.dtype) if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=dtype, trust_remote_code=False,
                                                 use_safetensors=True).to(device).eval()
    model.config.architectures = ["Qwen2ForCausalLM"]  # the exporter needs it; configs built in code lack it
    return model


def calibrate(model, tokenizer, spec: BuildSpec, cfg: dict, device: str) -> float:
    import modelopt.torch.quantization as mtq
    import torch

    texts = load_calibration_texts(spec.calib_data, spec.calib_size)
    batches = [tokenizer(t, return_tensors="pt", truncation=True, max_length=spec.calib_seq_len)["input_ids"].to(device)
               for t in texts]

    def forward_loop(m):
        with torch.no_grad():
            for ids in batches:
                m(ids)

    t0 = time.time()
    mtq.quantize(model, cfg, forward_loop=forward_loop)
    return time.time() - t0


@contextlib.contextmanager
def _qwen_config_without_tensorrt_llm():
    """ModelOpt builds the Qwen config through tensorrt_llm.models.QWenConfig and raises without TensorRT-LLM;
    the weight conversion before it needs only the rank and mapping, so give it those and write the real
    config ourselves (trtllm_config.py)."""
    import modelopt.torch.export.model_config_export as mce

    if importlib.util.find_spec("tensorrt_llm") is not None:
        yield
        return
    original = mce.convert_to_tensorrt_llm_config

    def minimal(model_config, quant_config, hf_config=None):
        tp = model_config.tensor_parallel
        return {"rank": model_config.rank, "decoder": "qwen", "quantization": quant_config,
                "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1}}

    mce.convert_to_tensorrt_llm_config = minimal
    try:
        yield
    finally:
        mce.convert_to_tensorrt_llm_config = original


def export_checkpoint(hf_dir: Path, spec: BuildSpec, out_dir: Path, progress=None) -> dict:
    """HF dir → TensorRT-LLM checkpoint in out_dir (written to a temporary dir, renamed when complete)."""
    import torch
    from transformers import AutoTokenizer

    hf = json.loads((Path(hf_dir) / "config.json").read_text())
    check_shardable(hf, spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    model = load_hf_model(Path(hf_dir), spec, device)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False) if modelopt_config(spec) else None
    info = export_model(model, hf, tokenizer, spec, Path(out_dir), progress)
    info["load_seconds"] = round(time.time() - t0 - info["quantize_seconds"] - info["export_seconds"], 2)
    return info


def export_model(model, hf: dict, tokenizer, spec: BuildSpec, out_dir: Path, progress=None) -> dict:
    """Quantize an in-memory HF Qwen2 per spec and write its TensorRT-LLM checkpoint to out_dir."""
    import torch
    from modelopt.torch.export.model_config_export import torch_to_tensorrt_llm_checkpoint
    from safetensors.torch import save_file

    say = progress or (lambda msg: None)
    check_shardable(hf, spec)
    device = next(model.parameters()).device.type
    cfg = modelopt_config(spec)
    quant_seconds = 0.0
    if cfg is not None:
        say(f"calibrating {spec.precision.value} on {device} with {spec.calib_size} samples")
        quant_seconds = calibrate(model, tokenizer, spec, cfg, device)

    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t1 = time.time()
    exported_quant, parallel_embedding = None, False
    try:
        with _qwen_config_without_tensorrt_llm(), torch.inference_mode():
            for rank_cfg, weights, quant in torch_to_tensorrt_llm_checkpoint(
                model, "qwen", getattr(torch, spec.dtype), inference_tensor_parallel=spec.tp
            ):
                rank = rank_cfg["rank"]
                emb = weights.get("transformer.vocab_embedding.weight")
                parallel_embedding |= emb is not None and emb.shape[0] < hf["vocab_size"]
                save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / f"rank{rank}.safetensors"))
                exported_quant = {k: v for k, v in (quant or {}).items() if k != "quantized_layers"} or None
                say(f"exported rank {rank}")
        config = qwen_checkpoint_config(hf, spec, exported_quant, parallel_embedding)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "device": device,
        "quant_algo": config["quantization"]["quant_algo"],
        "kv_cache_quant_algo": config["quantization"]["kv_cache_quant_algo"],
        "quantize_seconds": round(quant_seconds, 2),
        "export_seconds": round(time.time() - t1, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "files": sorted(p.name for p in out_dir.iterdir()),
        "weight_only_by_tensorrt_llm": spec.precision in WEIGHT_ONLY,
    }


def export_hf_checkpoint_dir(hf_dir: Path, spec: BuildSpec, out_dir: Path) -> dict:
    """ModelOpt's unified HF checkpoint (input of TensorRT-LLM's PyTorch backend / the llmapi Triton model)."""
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_hf_model(Path(hf_dir), spec, device)
    cfg = modelopt_config(spec)
    if cfg is not None:
        calibrate(model, AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False), spec, cfg, device)
    model = model.to(getattr(torch, spec.dtype))
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        export_hf_checkpoint(model, export_dir=str(tmp))
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if (Path(hf_dir) / name).is_file():
                shutil.copy2(Path(hf_dir) / name, tmp / name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"dir": str(out_dir), "files": sorted(p.name for p in out_dir.iterdir())}
