"""The build spec: one typed object decided once (by `plan`) and carried through every stage."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from trtqwen.errors import UserError
from trtqwen.precision import KV_QUANT_ALGO, PRECISIONS, KvDtype, Precision, PrecisionInfo, parse_kv_dtype, parse_precision
from trtqwen.shape import ModelShape, check_tp

__all__ = ["BuildSpec", "KvDtype", "Precision", "check_spec", "default_output_dir", "parse_kv_dtype", "parse_precision"]


PLANNED = ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "calib_size")  # decide_spec fills these


@dataclass(frozen=True)
class BuildSpec:
    """Everything a build needs; written into every manifest so later stages never re-derive it."""

    model: str
    precision: Precision = Precision.INT4_AWQ
    tp: int = 1
    gpu: str = "rtx4090d"
    kv_cache_dtype: KvDtype = KvDtype.AUTO
    # None: the plan decides (decide_spec fills them in before anything is built)
    max_batch_size: int | None = 32
    max_input_len: int | None = 2048
    max_seq_len: int | None = 4096
    max_num_tokens: int | None = 8192
    calib_size: int | None = 32
    calib_data: str | None = None  # a user file replacing the bundled calibration set
    calib_seq_len: int = 512
    awq_block_size: int = 128
    sq_alpha: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "precision", parse_precision(self.precision))
        object.__setattr__(self, "kv_cache_dtype", parse_kv_dtype(self.kv_cache_dtype))
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "calib_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_input_len and self.max_seq_len and self.max_input_len > self.max_seq_len:
            raise UserError(
                f"max_input_len {self.max_input_len} exceeds max_seq_len {self.max_seq_len}",
                "the prompt is part of the sequence: raise --max-seq-len or lower --max-input-len",
            )

    @classmethod
    def request(cls, model: str, **given) -> "BuildSpec":
        """What a user asks for: the sizes and calibration count left out (or None) are decided by the plan."""
        planned = dict.fromkeys(PLANNED)
        return cls(model=model, **{**planned, **{k: v for k, v in given.items() if v is not None or k not in planned}})

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


def check_spec(spec: BuildSpec, shape: ModelShape, gpu=None) -> None:
    """The one validator of a spec against the model (and the GPU it targets): plan, build, package, verify and
    serve call it, so a spec that cannot work is refused with the same words at every stage."""
    check_tp(shape, spec.tp, spec.precision, spec.awq_block_size)
    if spec.max_seq_len > shape.max_position_embeddings:
        raise UserError(f"max sequence length {spec.max_seq_len} exceeds the model's {shape.max_position_embeddings} positions",
                        f"use --max-seq-len {shape.max_position_embeddings} or less")
    if gpu is not None and (spec.info.needs_fp8_hardware or spec.kv_cache_dtype is KvDtype.FP8) and not gpu.has_fp8:
        raise UserError(
            f"FP8 needs an Ada (sm_89) or Hopper GPU; {gpu.name} (sm_{gpu.compute_capability.replace('.', '')}) has none",
            "use int8_sq or int4_awq with the default 16-bit KV cache (an INT8 KV cache breaks Qwen2.5: README)",
        )


def default_output_dir(spec: BuildSpec, root: Path = Path("engines")) -> Path:
    name = Path(spec.model.rstrip("/")).name or "model"
    kv = "" if spec.kv_cache_dtype is KvDtype.AUTO else f"-kv{spec.kv_cache_dtype.value}"
    return root / f"{name}-{spec.precision.value}{kv}-tp{spec.tp}"
