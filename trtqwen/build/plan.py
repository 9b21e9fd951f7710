"""Memory and speed model: will this model, precision and TP fit a GPU, and how fast will it be?

Pure functions. Decode at small batch is memory-bound (tok/s ≈ bandwidth ÷ bytes read per token);
prefill is compute-bound (≈ 2 FLOP per parameter per prompt token, plus attention).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trtqwen.build.hardware import GpuProfile
from trtqwen.build.spec import BuildSpec, KvDtype, Precision, check_spec
from trtqwen.checkpoint import read_config
from trtqwen.errors import UserError
from trtqwen.precision import PRECISIONS
from trtqwen.shape import QWEN25_7B, ModelShape

# Fractions of the hardware peak that tuned engines reach (FACTS §3: 70–85 % for decode; 1K-token
# prefill 130–170 ms on a 4090D ≈ 60–75 % of peak tensor throughput).
DECODE_EFFICIENCY = 0.80
PREFILL_EFFICIENCY = 0.65
CUDA_CONTEXT_BYTES = 0.75 * 2**30  # CUDA context, cuBLAS/TensorRT workspaces, NCCL buffers
# TensorRT-LLM's PyTorch backend (target pytorch) runs the same attention and GEMM kernels from Python: its torch
# context and CUDA-graph pools cost more memory, its per-step host work a little decode speed (estimates: it cannot
# run here; replace with a 4090D measurement).
TARGETS = ("engine", "pytorch")
PYTORCH_EXTRA_BYTES = 0.5 * 2**30
PYTORCH_DECODE_EFFICIENCY = 0.75
TOKENS_PER_BLOCK = 32  # TensorRT-LLM 1.x paged-KV default


def weight_bytes(dims: ModelShape, precision: Precision) -> float:
    """Bytes of all weights; embedding and lm_head stay 16-bit (TensorRT-LLM's default exclusions)."""
    info = PRECISIONS[precision]
    linear = dims.num_layers * dims.linear_params_per_layer
    scale_bytes = 0.0
    if info.group_size:  # one fp16 scale per group of input channels (AWQ), plus the pre-quant scale
        scale_bytes = linear / info.group_size * 2 + dims.num_layers * 4 * dims.hidden_size * 2
    elif info.weight_bits < 16:  # per-output-channel scales
        scale_bytes = dims.num_layers * (dims.qkv_out + 2 * dims.hidden_size + 2 * dims.intermediate_size) * 4
    sixteen_bit = dims.num_layers * dims.other_params_per_layer + dims.embedding_params + dims.lm_head_params + dims.hidden_size
    return linear * info.weight_bits / 8 + scale_bytes + sixteen_bit * 2


def kv_bytes_per_token(dims: ModelShape, kv: KvDtype = KvDtype.AUTO) -> int:
    per_value = 2 if kv is KvDtype.AUTO else 1
    return 2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * per_value


def activation_bytes(dims: ModelShape, tp: int, max_num_tokens: int, max_batch_size: int) -> float:
    """TensorRT's activation pool for one forward of max_num_tokens tokens plus the logits buffer."""
    per_token = 4 * dims.hidden_size + (2 * dims.intermediate_size + dims.qkv_out) / tp
    return max_num_tokens * per_token * 2 * 2 + max_batch_size * dims.vocab_size / tp * 4


def allreduce_seconds(gpu: GpuProfile, tp: int, tokens: int, dims: ModelShape, count: int) -> float:
    """`count` ring all-reduces of tokens × hidden bf16 values over the GPU's link."""
    if tp == 1:
        return 0.0
    payload = tokens * dims.hidden_size * 2
    one = gpu.allreduce_latency_us * 1e-6 + 2 * (tp - 1) / tp * payload / (gpu.link_gbs * 1e9)
    return count * one


def prefill_tflops(gpu: GpuProfile, precision: Precision) -> float:
    if precision is Precision.INT8_SQ:
        return gpu.int8_tops
    if precision is Precision.FP8:
        return gpu.fp8_tflops
    return gpu.fp16_tflops  # weight-only formats dequantize into FP16/BF16 GEMMs


# Calibration (ModelOpt, the 16-bit model whole on the GPU): what it needs above the 16-bit weights and the CUDA
# context, in decoder layers' worth of 16-bit linear weights (AWQ's scale search holds copies of a layer's weights).
# Fitted to the lent H200 capped at 24 GB (torch.cuda.set_per_process_memory_fraction), a random Qwen2.5-7B-shaped
# checkpoint, 32 × 512 tokens: int4_awq 17.04 GiB, int8_sq 16.63, fp8 16.44 (docs/PERFORMANCE.md §1).
CALIB_LAYERS = {Precision.INT4_AWQ: 4.85, Precision.INT8_SQ: 3.90, Precision.FP8: 3.47}


def calibration_peak_bytes(shape: ModelShape, precision: Precision, kv: KvDtype = KvDtype.AUTO) -> float | None:
    """GPU memory a calibration peaks at (None: nothing is calibrated, the export runs in 16 bits)."""
    if not PRECISIONS[precision].calibrated and kv is KvDtype.AUTO:
        return None
    layers = CALIB_LAYERS.get(precision, CALIB_LAYERS[Precision.FP8])  # a KV-cache-only calibration is a max pass
    return weight_bytes(shape, Precision.BF16) + CUDA_CONTEXT_BYTES + layers * shape.linear_params_per_layer * 2


@dataclass
class Plan:
    model: str
    gpu: str
    target: str  # engine (TensorRT-LLM 1.2.1) or pytorch (its PyTorch backend)
    precision: Precision
    tp: int
    kv_cache_dtype: KvDtype
    max_seq_len: int
    max_batch_size: int
    prompt_len: int
    kv_cache_free_gpu_mem_fraction: float
    total_params: int
    weight_bytes_total: float
    weight_bytes_per_gpu: float
    kv_bytes_per_token_per_gpu: int
    overhead_bytes_per_gpu: float
    kv_cache_bytes_per_gpu: float
    kv_tokens: int
    concurrent_sequences: int
    gpu_memory_bytes: float
    predicted_peak_bytes_per_gpu: float
    calibration_peak_bytes: float | None
    decode_ceiling_tok_s: float
    decode_estimate_tok_s: float
    ttft_estimate_s: float
    allreduce_per_decode_step_s: float
    weight_read_s: float  # of one decode step: every weight read once, whatever the batch
    kv_read_s_per_stream: float  # of one decode step: each stream's context read once (at prompt_len)
    fits: bool
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    suggested_build: str = ""

    def to_dict(self) -> dict:
        return {**asdict(self), "precision": self.precision.value, "kv_cache_dtype": self.kv_cache_dtype.value}


def default_kv_fraction(gpu: GpuProfile) -> float:
    # Leave more headroom on 24 GB desktop cards (display, other processes): memory must never overflow.
    return 0.85 if gpu.memory_gib <= 32 else 0.90


def make_plan(shape: ModelShape, gpu: GpuProfile, spec: BuildSpec, prompt_len: int = 1024,
              kv_fraction: float | None = None, target: str = "engine") -> Plan:
    check_spec(spec, shape, gpu)
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}", "use engine (TensorRT-LLM 1.2.1) or pytorch (its PyTorch backend)")
    pytorch = target == "pytorch"
    precision, tp, kv, max_seq_len = spec.precision, spec.tp, spec.kv_cache_dtype, spec.max_seq_len
    if not 0 < prompt_len <= max_seq_len:
        raise UserError(f"prompt length {prompt_len} must be between 1 and max_seq_len {max_seq_len}")
    kv_fraction = default_kv_fraction(gpu) if kv_fraction is None else kv_fraction
    if not 0 < kv_fraction < 1:
        raise UserError(f"kv_cache_free_gpu_mem_fraction must be between 0 and 1, got {kv_fraction}")

    w_total = weight_bytes(shape, precision)
    w_gpu = w_total / tp
    kv_tok = kv_bytes_per_token(shape, kv) // tp
    overhead = (CUDA_CONTEXT_BYTES + PYTORCH_EXTRA_BYTES * pytorch
                + activation_bytes(shape, tp, spec.max_num_tokens, spec.max_batch_size))
    free = gpu.memory_bytes - w_gpu - overhead
    kv_pool = max(0.0, free * kv_fraction)
    kv_tokens = int(kv_pool // kv_tok) // TOKENS_PER_BLOCK * TOKENS_PER_BLOCK
    blocks_per_seq = math.ceil(max_seq_len / TOKENS_PER_BLOCK)
    concurrent = kv_tokens // (blocks_per_seq * TOKENS_PER_BLOCK)

    # Decode: every weight but the embedding table is read once per step (one embedding row).
    read_per_token = (w_total - shape.embedding_params * 2) / tp
    ceiling = gpu.bandwidth_gbs * 1e9 / read_per_token
    step_ar = allreduce_seconds(gpu, tp, 1, shape, 2 * shape.num_layers)
    kv_read = kv_tok * prompt_len  # attention reads the context's KV each step
    efficiency = PYTORCH_DECODE_EFFICIENCY if pytorch else DECODE_EFFICIENCY
    weight_read_s = read_per_token / (gpu.bandwidth_gbs * 1e9 * efficiency)
    kv_read_s = kv_read / (gpu.bandwidth_gbs * 1e9 * efficiency)
    step = weight_read_s + kv_read_s + step_ar
    estimate = 1.0 / step

    flops = 2 * shape.non_embedding_params * prompt_len + 2 * shape.num_layers * prompt_len**2 * shape.q_size
    prefill = flops / (prefill_tflops(gpu, precision) * 1e12 * PREFILL_EFFICIENCY * tp)
    ttft = prefill + allreduce_seconds(gpu, tp, prompt_len, shape, 2 * shape.num_layers) + step
    calib = calibration_peak_bytes(shape, precision, kv)

    reasons, notes = [], []
    if pytorch and PRECISIONS[precision].not_on_pytorch_backend:
        reasons.append(f"{precision.value} does not run on TensorRT-LLM's PyTorch backend: "
                       f"{PRECISIONS[precision].not_on_pytorch_backend}")
    if free <= 0:
        reasons.append(
            f"weights ({w_gpu / 1e9:.2f} GB per GPU) and runtime ({overhead / 1e9:.2f} GB) exceed the "
            f"{gpu.memory_gib:.0f} GiB of a {gpu.name}"
        )
    elif concurrent < 1:
        reasons.append(f"KV cache holds {kv_tokens} tokens, less than one {max_seq_len}-token sequence")
    fits = not reasons
    if fits and concurrent < 5:
        notes.append(f"only {concurrent} concurrent {max_seq_len}-token sequences (target ≥ 5): lower --max-seq-len, "
                     "quantize further, or use --kv-cache-dtype int8")
    if estimate < 20:
        notes.append(f"estimated {estimate:.0f} tok/s is below the 20 tok/s per-user target")
    if ttft > 1.0:
        notes.append(f"estimated first token {ttft:.2f} s for a {prompt_len}-token prompt exceeds 1 s")
    if calib is not None and calib > gpu.memory_bytes:
        notes.append(f"calibration peaks at about {calib / 2**30:.1f} GiB, more than one {gpu.name}: quantize on a "
                     "larger GPU (or on the CPU with CUDA_VISIBLE_DEVICES=, slower) and build the engine here")
    if tp > 1 and not gpu.p2p:
        notes.append(
            f"TP {tp} on {gpu.name}: no GPU peer-to-peer, all-reduces go through host memory "
            f"({step_ar * 1e3:.2f} ms per decode step); {tp} TP-1 instances give more total throughput "
            "if the model fits one card (set NCCL_P2P_DISABLE=1 if NCCL hangs)"
        )
    if precision is Precision.FP16:
        notes.append("Qwen2 in FP16 can overflow into garbage output: prefer bf16 (check with `trtqwen verify`)")

    suggested = (
        f"trtqwen build --model {spec.model} --precision {precision.value} --tp {tp} --gpu {gpu.name}"
        + (f" --kv-cache-dtype {kv.value}" if kv is not KvDtype.AUTO else "")
        + f" --max-seq-len {max_seq_len} --max-batch-size {spec.max_batch_size}"
        + (" --target pytorch" if pytorch else "")
    ) if fits else ""

    return Plan(
        model=shape.name, gpu=gpu.name, target=target, precision=precision, tp=tp, kv_cache_dtype=kv,
        max_seq_len=max_seq_len, max_batch_size=spec.max_batch_size, prompt_len=prompt_len,
        kv_cache_free_gpu_mem_fraction=kv_fraction, total_params=shape.total_params,
        weight_bytes_total=w_total, weight_bytes_per_gpu=w_gpu, kv_bytes_per_token_per_gpu=kv_tok,
        overhead_bytes_per_gpu=overhead, kv_cache_bytes_per_gpu=kv_pool, kv_tokens=kv_tokens,
        concurrent_sequences=concurrent, gpu_memory_bytes=gpu.memory_bytes,
        predicted_peak_bytes_per_gpu=w_gpu + overhead + kv_pool, calibration_peak_bytes=calib,
        decode_ceiling_tok_s=ceiling, decode_estimate_tok_s=estimate, ttft_estimate_s=ttft,
        allreduce_per_decode_step_s=step_ar, weight_read_s=weight_read_s, kv_read_s_per_stream=kv_read_s, fits=fits, reasons=reasons, notes=notes, suggested_build=suggested,
    )


def recommended_max_batch_size(plan: Plan) -> int:
    """Paged KV lets more sequences run than fit at full length: allow 2×, capped at 64, a power of two."""
    n = max(1, min(64, 2 * plan.concurrent_sequences))
    return 2 ** int(math.log2(n))


def read_model_shape(path: Path) -> ModelShape:
    """The shape of an HF model directory (or its config.json)."""
    path = Path(path)
    directory = path.parent if path.name == "config.json" else path
    return ModelShape.from_hf(read_config(directory), name=directory.name)


def shape_and_gpu(model: Path | None, gpu: str, memory_gib=None, bandwidth_gbs=None,
                  tflops=None) -> tuple[ModelShape, GpuProfile]:
    """The model's shape (default: Qwen2.5-7B) and the GPU profile the options name."""
    from trtqwen.build.hardware import custom_profile, get_profile

    if gpu == "custom":
        if None in (memory_gib, bandwidth_gbs, tflops):
            raise UserError("--gpu custom needs --memory-gib, --bandwidth-gbs and --tflops")
        profile = custom_profile(memory_gib, bandwidth_gbs, tflops)
    else:
        profile = get_profile(gpu)
    return (QWEN25_7B if model is None else read_model_shape(model)), profile


def plan_from_options(model: Path | None, gpu: str, spec: BuildSpec, prompt_len: int = 1024, kv_fraction=None,
                      memory_gib=None, bandwidth_gbs=None, tflops=None, target: str = "engine") -> Plan:
    shape, profile = shape_and_gpu(model, gpu, memory_gib, bandwidth_gbs, tflops)
    return make_plan(shape, profile, spec, prompt_len, kv_fraction, target)


def plan_table(p: Plan):
    from rich.table import Table

    where = "TensorRT-LLM 1.2.1 engine" if p.target == "engine" else "TensorRT-LLM PyTorch backend"
    t = Table(title=f"{p.model} · {p.precision.value} · TP {p.tp} · {p.gpu} · {where}", show_header=False)
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    rows = [
        ("parameters", f"{p.total_params / 1e9:.3f} B"),
        ("weights", f"{gb(p.weight_bytes_total)} total, {gb(p.weight_bytes_per_gpu)} per GPU"),
        ("KV cache per token", f"{p.kv_bytes_per_token_per_gpu:,} B per GPU ({p.kv_cache_dtype.value})"),
        ("runtime overhead", f"{gb(p.overhead_bytes_per_gpu)} per GPU (CUDA context, activations, logits)"),
        ("KV cache pool", f"{gb(p.kv_cache_bytes_per_gpu)} per GPU at fraction {p.kv_cache_free_gpu_mem_fraction}"),
        ("KV tokens that fit", f"{p.kv_tokens:,}"),
        ("concurrent sequences", f"{p.concurrent_sequences} at {p.max_seq_len} tokens each"),
        ("predicted GPU memory", f"{p.predicted_peak_bytes_per_gpu / 2**30:.2f} GiB of {p.gpu_memory_bytes / 2**30:.2f} GiB per GPU"),
        ("calibration peak", "none (16-bit export)" if p.calibration_peak_bytes is None else
         f"≈ {p.calibration_peak_bytes / 2**30:.1f} GiB on one GPU (ModelOpt, {p.precision.value})"),
        ("decode, batch 1", f"ceiling {p.decode_ceiling_tok_s:.0f} tok/s, estimate {p.decode_estimate_tok_s:.0f} tok/s"),
        ("first token", f"≈ {p.ttft_estimate_s * 1e3:.0f} ms for a {p.prompt_len}-token prompt"),
        ("TP all-reduce", f"{p.allreduce_per_decode_step_s * 1e3:.2f} ms per decode step" if p.tp > 1 else "none (TP 1)"),
        ("verdict", "[green]fits[/]" if p.fits else "[red]does not fit: " + "; ".join(p.reasons) + "[/]"),
    ]
    rows += [("note", n) for n in p.notes]
    if p.suggested_build:
        rows.append(("build with", p.suggested_build))
    for k, v in rows:
        t.add_row(k, v)
    return t
