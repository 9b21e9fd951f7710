"""Memory and speed model: will this model, precision and TP fit a GPU, and how fast will it be?

Pure functions. Decode at small batch is memory-bound (tok/s ≈ bandwidth ÷ bytes read per token);
prefill is compute-bound (≈ 2 FLOP per parameter per prompt token, plus attention).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trtqwen.errors import UserError
from trtqwen.build.hardware import GpuProfile
from trtqwen.build.spec import PRECISIONS, KvDtype, Precision, check_tp

# Fractions of the hardware peak that tuned engines reach (FACTS §3: 70–85 % for decode; 1K-token
# prefill 130–170 ms on a 4090D ≈ 60–75 % of peak tensor throughput).
DECODE_EFFICIENCY = 0.80
PREFILL_EFFICIENCY = 0.65
CUDA_CONTEXT_BYTES = 0.75 * 2**30  # CUDA context, cuBLAS/TensorRT workspaces, NCCL buffers
TOKENS_PER_BLOCK = 32  # TensorRT-LLM 1.x paged-KV default


@dataclass(frozen=True)
class ModelDims:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    name: str = "custom"

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "custom") -> "ModelDims":
        arch = (cfg.get("architectures") or ["?"])[0]
        if arch != "Qwen2ForCausalLM" and cfg.get("model_type") != "qwen2":
            raise UserError(
                f"model architecture is {arch!r}, not Qwen2ForCausalLM",
                "trtqwen plans and builds Qwen2-architecture checkpoints (Qwen2, Qwen2.5)",
            )
        try:
            heads = cfg["num_attention_heads"]
            return cls(
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads", heads),
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                intermediate_size=cfg["intermediate_size"],
                max_position_embeddings=cfg.get("max_position_embeddings", 32768),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                name=name,
            )
        except KeyError as e:
            raise UserError(f"model config lacks {e.args[0]!r}", "pass a Hugging Face config.json of a Qwen2 model") from None

    @classmethod
    def from_config_file(cls, path: Path) -> "ModelDims":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise UserError(f"no model config at {path}", "pass a config.json or a model directory that has one")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e})") from None
        return cls.from_hf_config(cfg, name=path.parent.name)

    # Parameter counts
    @property
    def qkv_out(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def linear_params_per_layer(self) -> int:
        """Weights of the quantizable linear layers: qkv, o_proj, gate, up, down."""
        h, i = self.hidden_size, self.intermediate_size
        return h * self.qkv_out + self.num_heads * self.head_dim * h + 3 * h * i

    @property
    def other_params_per_layer(self) -> int:
        return self.qkv_out + 2 * self.hidden_size  # q/k/v bias, two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.embedding_params

    @property
    def total_params(self) -> int:
        per_layer = self.linear_params_per_layer + self.other_params_per_layer
        return self.num_layers * per_layer + self.embedding_params + self.lm_head_params + self.hidden_size

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params


# Qwen2.5-7B(-Instruct) config.json dims (FACTS §2).
QWEN25_7B = ModelDims(
    vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
    intermediate_size=18944, max_position_embeddings=32768, name="Qwen2.5-7B",
)


def validate_combination(dims: ModelDims, gpu: GpuProfile, precision: Precision, tp: int, kv: KvDtype, max_seq_len: int):
    check_tp(tp)
    if dims.num_kv_heads % tp or dims.num_heads % tp:
        raise UserError(
            f"--tp {tp} does not divide the model's {dims.num_heads} query / {dims.num_kv_heads} KV heads",
            f"use a TP size that divides {math.gcd(dims.num_heads, dims.num_kv_heads)}",
        )
    if (PRECISIONS[precision].needs_fp8_hardware or kv is KvDtype.FP8) and not gpu.has_fp8:
        raise UserError(
            f"FP8 needs an Ada (sm_89) or Hopper GPU; {gpu.name} (sm_{gpu.compute_capability.replace('.', '')}) has none",
            "use int8_sq or int4_awq with the default 16-bit KV cache (an INT8 KV cache breaks Qwen2.5: README)",
        )
    if max_seq_len > dims.max_position_embeddings:
        raise UserError(
            f"max sequence length {max_seq_len} exceeds the model's {dims.max_position_embeddings} positions",
            f"use --max-seq-len {dims.max_position_embeddings} or less",
        )
    if max_seq_len < 1:
        raise UserError("max sequence length must be at least 1")


def weight_bytes(dims: ModelDims, precision: Precision) -> float:
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


def kv_bytes_per_token(dims: ModelDims, kv: KvDtype = KvDtype.AUTO) -> int:
    per_value = 2 if kv is KvDtype.AUTO else 1
    return 2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * per_value


def activation_bytes(dims: ModelDims, tp: int, max_num_tokens: int, max_batch_size: int) -> float:
    """TensorRT's activation pool for one forward of max_num_tokens tokens plus the logits buffer."""
    per_token = 4 * dims.hidden_size + (2 * dims.intermediate_size + dims.qkv_out) / tp
    return max_num_tokens * per_token * 2 * 2 + max_batch_size * dims.vocab_size / tp * 4


def allreduce_seconds(gpu: GpuProfile, tp: int, tokens: int, dims: ModelDims, count: int) -> float:
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


@dataclass
class Plan:
    model: str
    gpu: str
    precision: str
    tp: int
    kv_cache_dtype: str
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
    decode_ceiling_tok_s: float
    decode_estimate_tok_s: float
    ttft_estimate_s: float
    allreduce_per_decode_step_s: float
    fits: bool
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    suggested_build: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def default_kv_fraction(gpu: GpuProfile) -> float:
    # Leave more headroom on 24 GB desktop cards (display, other processes): memory must never overflow.
    return 0.85 if gpu.memory_gib <= 32 else 0.90


def make_plan(
    dims: ModelDims,
    gpu: GpuProfile,
    precision: Precision = Precision.INT4_AWQ,
    tp: int = 1,
    kv: KvDtype = KvDtype.AUTO,
    max_seq_len: int = 4096,
    max_batch_size: int = 32,
    prompt_len: int = 1024,
    max_num_tokens: int = 8192,
    kv_fraction: float | None = None,
    model_ref: str = "Qwen/Qwen2.5-7B-Instruct",
) -> Plan:
    validate_combination(dims, gpu, precision, tp, kv, max_seq_len)
    if not 0 < prompt_len <= max_seq_len:
        raise UserError(f"prompt length {prompt_len} must be between 1 and max_seq_len {max_seq_len}")
    kv_fraction = default_kv_fraction(gpu) if kv_fraction is None else kv_fraction
    if not 0 < kv_fraction < 1:
        raise UserError(f"kv_cache_free_gpu_mem_fraction must be between 0 and 1, got {kv_fraction}")

    w_total = weight_bytes(dims, precision)
    w_gpu = w_total / tp
    kv_tok = kv_bytes_per_token(dims, kv) // tp
    overhead = CUDA_CONTEXT_BYTES + activation_bytes(dims, tp, max_num_tokens, max_batch_size)
    free = gpu.memory_bytes - w_gpu - overhead
    kv_pool = max(0.0, free * kv_fraction)
    kv_tokens = int(kv_pool // kv_tok) // TOKENS_PER_BLOCK * TOKENS_PER_BLOCK
    blocks_per_seq = math.ceil(max_seq_len / TOKENS_PER_BLOCK)
    concurrent = kv_tokens // (blocks_per_seq * TOKENS_PER_BLOCK)

    # Decode: every weight but the embedding table is read once per step (one embedding row).
    read_per_token = (w_total - dims.embedding_params * 2) / tp
    ceiling = gpu.bandwidth_gbs * 1e9 / read_per_token
    step_ar = allreduce_seconds(gpu, tp, 1, dims, 2 * dims.num_layers)
    kv_read = kv_tok * prompt_len  # attention reads the context's KV each step
    step = (read_per_token + kv_read) / (gpu.bandwidth_gbs * 1e9 * DECODE_EFFICIENCY) + step_ar
    estimate = 1.0 / step

    flops = 2 * dims.non_embedding_params * prompt_len + 2 * dims.num_layers * prompt_len**2 * dims.num_heads * dims.head_dim
    prefill = flops / (prefill_tflops(gpu, precision) * 1e12 * PREFILL_EFFICIENCY * tp)
    ttft = prefill + allreduce_seconds(gpu, tp, prompt_len, dims, 2 * dims.num_layers) + step

    reasons, notes = [], []
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
    if tp > 1 and not gpu.p2p:
        notes.append(
            f"TP {tp} on {gpu.name}: no GPU peer-to-peer, all-reduces go through host memory "
            f"({step_ar * 1e3:.2f} ms per decode step); {tp} TP-1 instances give more total throughput "
            "if the model fits one card (set NCCL_P2P_DISABLE=1 if NCCL hangs)"
        )
    if precision is Precision.FP16:
        notes.append("Qwen2 in FP16 can overflow into garbage output: prefer bf16 (check with `trtqwen verify`)")

    suggested = (
        f"trtqwen build --model {model_ref} --precision {precision.value} --tp {tp} --gpu {gpu.name}"
        + (f" --kv-cache-dtype {kv.value}" if kv is not KvDtype.AUTO else "")
        + f" --max-seq-len {max_seq_len} --max-batch-size {max_batch_size}"
    ) if fits else ""

    return Plan(
        model=dims.name, gpu=gpu.name, precision=precision.value, tp=tp, kv_cache_dtype=kv.value,
        max_seq_len=max_seq_len, max_batch_size=max_batch_size, prompt_len=prompt_len,
        kv_cache_free_gpu_mem_fraction=kv_fraction, total_params=dims.total_params,
        weight_bytes_total=w_total, weight_bytes_per_gpu=w_gpu, kv_bytes_per_token_per_gpu=kv_tok,
        overhead_bytes_per_gpu=overhead, kv_cache_bytes_per_gpu=kv_pool, kv_tokens=kv_tokens,
        concurrent_sequences=concurrent, gpu_memory_bytes=gpu.memory_bytes,
        predicted_peak_bytes_per_gpu=w_gpu + overhead + kv_pool,
        decode_ceiling_tok_s=ceiling, decode_estimate_tok_s=estimate, ttft_estimate_s=ttft,
        allreduce_per_decode_step_s=step_ar, fits=fits, reasons=reasons, notes=notes, suggested_build=suggested,
    )


def recommended_max_batch_size(plan: Plan) -> int:
    """Paged KV lets more sequences run than fit at full length: allow 2×, capped at 64, a power of two."""
    n = max(1, min(64, 2 * plan.concurrent_sequences))
    return 2 ** int(math.log2(n))


def plan_from_options(model, gpu, precision, tp, kv_cache_dtype, max_seq_len, max_batch_size, prompt_len,
                      max_num_tokens, kv_fraction=None, memory_gib=None, bandwidth_gbs=None, tflops=None) -> Plan:
    """Resolve CLI-level names (model path, GPU profile, precision alias) into a Plan."""
    from trtqwen.build.hardware import custom_profile, get_profile
    from trtqwen.build.spec import parse_kv_dtype, parse_precision

    dims = QWEN25_7B if model is None else ModelDims.from_config_file(model)
    if gpu == "custom":
        if None in (memory_gib, bandwidth_gbs, tflops):
            raise UserError("--gpu custom needs --memory-gib, --bandwidth-gbs and --tflops")
        profile = custom_profile(memory_gib, bandwidth_gbs, tflops)
    else:
        profile = get_profile(gpu)
    return make_plan(
        dims, profile, parse_precision(precision), tp, parse_kv_dtype(kv_cache_dtype), max_seq_len,
        max_batch_size, prompt_len, max_num_tokens, kv_fraction,
        model_ref=str(model) if model else "Qwen/Qwen2.5-7B-Instruct",
    )


def plan_table(p: Plan):
    from rich.table import Table

    t = Table(title=f"{p.model} · {p.precision} · TP {p.tp} · {p.gpu}", show_header=False)
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    rows = [
        ("parameters", f"{p.total_params / 1e9:.3f} B"),
        ("weights", f"{gb(p.weight_bytes_total)} total, {gb(p.weight_bytes_per_gpu)} per GPU"),
        ("KV cache per token", f"{p.kv_bytes_per_token_per_gpu:,} B per GPU ({p.kv_cache_dtype})"),
        ("runtime overhead", f"{gb(p.overhead_bytes_per_gpu)} per GPU (CUDA context, activations, logits)"),
        ("KV cache pool", f"{gb(p.kv_cache_bytes_per_gpu)} per GPU at fraction {p.kv_cache_free_gpu_mem_fraction}"),
        ("KV tokens that fit", f"{p.kv_tokens:,}"),
        ("concurrent sequences", f"{p.concurrent_sequences} at {p.max_seq_len} tokens each"),
        ("predicted GPU memory", f"{p.predicted_peak_bytes_per_gpu / 2**30:.2f} GiB of {p.gpu_memory_bytes / 2**30:.2f} GiB per GPU"),
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
