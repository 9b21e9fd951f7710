"""The build spec: one typed object decided once (by `plan`) and carried through every stage."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

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


@dataclass(frozen=True)
class PrecisionInfo:
    weight_bits: int  # bits per weight of the quantized linear layers
    quant_algo: str | None  # TensorRT-LLM checkpoint `quantization.quant_algo`
    needs_calibration: bool
    needs_fp8_hardware: bool = False
    group_size: int | None = None  # per-group scales (AWQ), bytes counted by the planner


PRECISIONS: dict[Precision, PrecisionInfo] = {
    Precision.BF16: PrecisionInfo(16, None, False),
    Precision.FP16: PrecisionInfo(16, None, False),
    Precision.INT8_SQ: PrecisionInfo(8, "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", True),  # smoothquant.py
    Precision.INT8_WO: PrecisionInfo(8, "W8A16", False),
    Precision.INT4_AWQ: PrecisionInfo(4, "W4A16_AWQ", True, group_size=128),
    Precision.INT4_WO: PrecisionInfo(4, "W4A16", False),
    Precision.FP8: PrecisionInfo(8, "FP8", True, needs_fp8_hardware=True),
}

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

KV_QUANT_ALGO = {KvDtype.AUTO: None, KvDtype.INT8: "INT8", KvDtype.FP8: "FP8"}
VALID_TP = (1, 2, 4)


def parse_precision(text: str | Precision) -> Precision:
    if isinstance(text, Precision):
        return text
    key = text.strip().lower().replace("-", "_")
    if key not in PRECISION_ALIASES:
        choices = ", ".join(p.value for p in Precision)
        raise UserError(
            f"unknown precision {text!r}",
            f"use one of {choices} (aliases: int4 = int4_awq, int8 = int8_sq)",
        )
    return PRECISION_ALIASES[key]


def parse_kv_dtype(text: str | KvDtype | None) -> KvDtype:
    if text is None:
        return KvDtype.AUTO
    if isinstance(text, KvDtype):
        return text
    key = text.strip().lower()
    if key in ("", "auto", "bf16", "fp16", "none"):
        return KvDtype.AUTO
    try:
        return KvDtype(key)
    except ValueError:
        raise UserError(f"unknown KV-cache dtype {text!r}", "use int8 or fp8, or leave it out for bf16/fp16") from None


def check_tp(tp: int) -> int:
    if tp not in VALID_TP:
        raise UserError(
            f"tensor parallel size {tp} is not supported",
            "use --tp 1, 2 or 4 (Qwen2.5-7B's 28 query and 4 KV heads divide only by these)",
        )
    return tp


@dataclass(frozen=True)
class BuildSpec:
    """Everything a build needs; written into every manifest so later stages never re-derive it."""

    model: str
    precision: Precision = Precision.INT4_AWQ
    tp: int = 1
    gpu: str = "rtx4090d"
    kv_cache_dtype: KvDtype = KvDtype.AUTO
    max_batch_size: int = 32
    max_input_len: int = 2048
    max_seq_len: int = 4096
    max_num_tokens: int = 8192
    calib_size: int = 32
    calib_data: str | None = None  # a user file replacing the bundled calibration set
    calib_seq_len: int = 512
    awq_block_size: int = 128
    sq_alpha: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "precision", parse_precision(self.precision))
        object.__setattr__(self, "kv_cache_dtype", parse_kv_dtype(self.kv_cache_dtype))
        check_tp(self.tp)
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "calib_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_input_len > self.max_seq_len:
            raise UserError(
                f"max_input_len {self.max_input_len} exceeds max_seq_len {self.max_seq_len}",
                "the prompt is part of the sequence: raise --max-seq-len or lower --max-input-len",
            )

    @property
    def info(self) -> PrecisionInfo:
        return PRECISIONS[self.precision]

    @property
    def dtype(self) -> str:
        """Activation / unquantized-weight dtype, as TensorRT-LLM names it."""
        return "float16" if self.precision is Precision.FP16 else "bfloat16"

    @property
    def quant_algo(self) -> str | None:
        return self.info.quant_algo

    @property
    def kv_cache_quant_algo(self) -> str | None:
        return KV_QUANT_ALGO[self.kv_cache_dtype]

    @property
    def kv_bytes_per_value(self) -> int:
        return 2 if self.kv_cache_dtype is KvDtype.AUTO else 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["precision"] = self.precision.value
        d["kv_cache_dtype"] = self.kv_cache_dtype.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BuildSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes) -> "BuildSpec":
        return dataclasses.replace(self, **changes)


def default_output_dir(spec: BuildSpec, root: Path = Path("engines")) -> Path:
    name = Path(spec.model.rstrip("/")).name or "model"
    kv = "" if spec.kv_cache_dtype is KvDtype.AUTO else f"-kv{spec.kv_cache_dtype.value}"
    return root / f"{name}-{spec.precision.value}{kv}-tp{spec.tp}"
