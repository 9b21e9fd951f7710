"""The one precision table: what each precision is, from the user's word for it to TensorRT-LLM's quant_algo.

Shared vocabulary of the build (what to calibrate, which path supports it), the checkpoint format (quant_algo
strings), the runtime (how to read the weights) and verify (how close it must come to the source).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from trtqwen.errors import UserError


class Precision(str, Enum):
    BF16 = "bf16"
    FP16 = "fp16"
    INT8_SQ = "int8_sq"
    INT8_WO = "int8_wo"
    INT4_AWQ = "int4_awq"
    INT4_WO = "int4_wo"
    FP8 = "fp8"


class KvDtype(str, Enum):
    AUTO = "auto"  # same as the activation dtype (bf16/fp16)
    INT8 = "int8"
    FP8 = "fp8"


Thresholds = tuple[float, float, float]  # minimum mean cosine, minimum top-1 agreement, maximum perplexity ratio


@dataclass(frozen=True)
class PrecisionInfo:
    weight_bits: int  # bits per weight of the quantized linear layers
    quant_algo: str | None  # TensorRT-LLM checkpoint `quantization.quant_algo`
    calibrated: bool  # ModelOpt calibrates it (else exported as 16-bit weights)
    trained: Thresholds  # verify: just below what the trained Qwen2.5-Coder-0.5B measures (docs/PERFORMANCE.md §6)
    random_weights: Thresholds  # verify: just below what honest exports of the random tiny models measure
    needs_fp8_hardware: bool = False
    group_size: int | None = None  # per-group scales (AWQ)
    # why `--target pytorch` (ModelOpt's unified HF checkpoint for TensorRT-LLM's PyTorch backend) refuses it; None: it runs
    not_on_pytorch_backend: str | None = None

    @property
    def weight_only(self) -> bool:
        """16-bit weights in the checkpoint, quantized per channel by TensorRT-LLM when it loads them."""
        return self.weight_bits < 16 and not self.calibrated


# TensorRT-LLM 1.2.1 (tests/data/trtllm_serve_1.2.1.json): _torch/modules/linear.py has no W8A8 method, and its
# quantization table lists SmoothQuant for the engine flow only.
NO_SQ = ("its linear layers have no INT8 SmoothQuant (W8A8) method (TensorRT-LLM 1.2.1: 'unsupported quant mode'); "
         "SmoothQuant exists only on the engine path")
NO_WO = ("trtqwen's weight-only recipes are quantized by trtllm-build while it builds the engine (their checkpoint "
         "holds 16-bit weights), so the PyTorch backend would get nothing but bf16")

PRECISIONS: dict[Precision, PrecisionInfo] = {
    # bf16 / fp16: only the rounding of the export dtype (measured exact)
    Precision.BF16: PrecisionInfo(16, None, False, (0.9999, 0.99, 1.01), (0.9999, 0.99, 1.01)),
    Precision.FP16: PrecisionInfo(16, None, False, (0.9999, 0.99, 1.01), (0.9999, 0.99, 1.01)),
    # per-token dynamic activation scales (TensorRT-LLM's plugin path; build/smoothquant.py); measured 0.9987 / 0.923 / 1.023
    Precision.INT8_SQ: PrecisionInfo(8, "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", True, (0.995, 0.90, 1.04),
                                     (0.99, 0.70, 1.05), not_on_pytorch_backend=NO_SQ),
    # measured 0.9998 / 0.968 / 1.006
    Precision.INT8_WO: PrecisionInfo(8, "W8A16", False, (0.999, 0.95, 1.02), (0.998, 0.85, 1.03),
                                     not_on_pytorch_backend=NO_WO),
    # 0.981-0.982 / 0.871-0.884 / 1.074-1.100 over 4-32 calibration samples
    Precision.INT4_AWQ: PrecisionInfo(4, "W4A16_AWQ", True, (0.97, 0.85, 1.12), (0.88, 0.15, 1.10), group_size=128),
    # per-channel INT4 measured 0.916 / 0.690 / 1.371 on trained weights: it fails, as it should
    Precision.INT4_WO: PrecisionInfo(4, "W4A16", False, (0.95, 0.80, 1.15), (0.85, 0.15, 1.10),
                                     not_on_pytorch_backend=NO_WO),
    # 0.9981 / 0.929 / 0.985
    Precision.FP8: PrecisionInfo(8, "FP8", True, (0.995, 0.90, 1.05), (0.98, 0.55, 1.05), needs_fp8_hardware=True),
}

# quant_algo strings a checkpoint may carry → the precision they are (ModelOpt writes the per-tensor SmoothQuant name
# before build/smoothquant.py rewrites it; the per-tensor-per-token plugin variant reads like the per-token one).
PRECISION_OF_ALGO: dict[str | None, Precision] = {
    **{info.quant_algo: p for p, info in PRECISIONS.items() if p is not Precision.FP16},
    "W8A8_SQ_PER_CHANNEL": Precision.INT8_SQ,
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN": Precision.INT8_SQ,
}
SQ_PER_TOKEN_ALGOS = ("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN")
AWQ_GROUP_SIZES = (128, 64)  # what TensorRT-LLM's W4A16_AWQ kernels take

KV_QUANT_ALGO = {KvDtype.AUTO: None, KvDtype.INT8: "INT8", KvDtype.FP8: "FP8"}

# What users type → canonical precision.
PRECISION_ALIASES: dict[str, Precision] = {
    "int4": Precision.INT4_AWQ,
    "awq": Precision.INT4_AWQ,
    "int8": Precision.INT8_SQ,
    "sq": Precision.INT8_SQ,
    "smoothquant": Precision.INT8_SQ,
    "bfloat16": Precision.BF16,
    "float16": Precision.FP16,
    "half": Precision.FP16,
    **{p.value: p for p in Precision},
}
KV_ALIASES: dict[str, KvDtype] = {"": KvDtype.AUTO, "bf16": KvDtype.AUTO, "fp16": KvDtype.AUTO, "none": KvDtype.AUTO,
                                  **{k.value: k for k in KvDtype}}


def parse_precision(text: str | Precision) -> Precision:
    if isinstance(text, Precision):
        return text
    key = text.strip().lower().replace("-", "_")
    if key not in PRECISION_ALIASES:
        choices = ", ".join(p.value for p in Precision)
        raise UserError(f"unknown precision {text!r}", f"use one of {choices} (aliases: int4 = int4_awq, int8 = int8_sq)")
    return PRECISION_ALIASES[key]


def parse_kv_dtype(text: str | KvDtype | None) -> KvDtype:
    if text is None or isinstance(text, KvDtype):
        return text or KvDtype.AUTO
    key = text.strip().lower()
    if key not in KV_ALIASES:
        raise UserError(f"unknown KV-cache dtype {text!r}", "use int8 or fp8, or leave it out for bf16/fp16")
    return KV_ALIASES[key]


def precision_of_algo(quant_algo: str | None) -> Precision:
    if quant_algo not in PRECISION_OF_ALGO:
        raise UserError(f"unknown quant_algo {quant_algo!r}",
                        f"trtqwen reads {', '.join(str(a) for a in PRECISION_OF_ALGO)}: rebuild with `trtqwen build`")
    return PRECISION_OF_ALGO[quant_algo]
