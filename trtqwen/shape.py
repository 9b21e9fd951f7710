"""The model's shape (one type for the planner, the exporter, the runtime and verify) and the one TP rule."""

from __future__ import annotations

from dataclasses import dataclass, replace

from trtqwen.errors import UserError
from trtqwen.precision import AWQ_GROUP_SIZES, PRECISIONS, Precision

SUPPORTED_TP = (1, 2, 4)  # 4090D boxes hold 1, 2 or 4 cards; Qwen2.5-7B's 28 query / 4 KV heads divide by these


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int = 32768
    norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = False
    name: str = "custom"

    @classmethod
    def from_hf(cls, cfg: dict, name: str = "custom") -> "ModelShape":
        """An HF config.json of a Qwen2 model (transformers 4.x or 5.x layout)."""
        arch = (cfg.get("architectures") or [None])[0]  # configs made in code may name none: then model_type decides
        if arch != "Qwen2ForCausalLM" and (arch is not None or cfg.get("model_type") != "qwen2"):
            raise UserError(f"model architecture is {arch!r}, not Qwen2ForCausalLM",
                            "trtqwen plans and builds Qwen2-architecture checkpoints (Qwen2, Qwen2.5)")
        try:
            heads = cfg["num_attention_heads"]
            return cls(
                vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads", heads),
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, intermediate_size=cfg["intermediate_size"],
                max_position_embeddings=cfg.get("max_position_embeddings", 32768),
                norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=rope_theta(cfg),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), name=name,
            )
        except KeyError as e:
            raise UserError(f"model config lacks {e.args[0]!r}", "pass a Hugging Face config.json of a Qwen2 model") from None

    @classmethod
    def from_trtllm(cls, c: dict, name: str = "custom") -> "ModelShape":
        """A TensorRT-LLM checkpoint's config.json (the full model's shape; its mapping says how it is split)."""
        if c.get("architecture") != "Qwen2ForCausalLM":
            raise UserError(f"TensorRT-LLM checkpoint architecture is {c.get('architecture')!r}, not Qwen2ForCausalLM",
                            "trtqwen reads Qwen2 checkpoints written by `trtqwen build`")
        if "rotary_base" not in c:
            raise UserError("checkpoint config.json has no rotary_base",
                            "TensorRT-LLM would fall back to RoPE base 10000 and produce garbage: rebuild with `trtqwen build`")
        try:
            heads = c["num_attention_heads"]
            return cls(
                vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                num_heads=heads, num_kv_heads=c.get("num_key_value_heads", heads),
                head_dim=c.get("head_size") or c["hidden_size"] // heads, intermediate_size=c["intermediate_size"],
                max_position_embeddings=c.get("max_position_embeddings", 32768), norm_eps=c.get("norm_epsilon", 1e-6),
                rope_theta=float(c["rotary_base"]), tie_word_embeddings=bool(c.get("share_embedding_table", False)),
                name=name,
            )
        except KeyError as e:
            raise UserError(f"checkpoint config.json lacks {e.args[0]!r}", "rebuild the checkpoint with `trtqwen build`") from None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_out(self) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def linear_params_per_layer(self) -> int:
        """Weights of the quantizable linear layers: qkv, o_proj, gate, up, down."""
        h, i = self.hidden_size, self.intermediate_size
        return h * self.qkv_out + self.q_size * h + 3 * h * i

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

    def shard(self, tp: int, precision: Precision = Precision.BF16) -> "ModelShape":
        """One tensor-parallel rank's shape: query heads, KV heads, MLP and (padded) vocabulary split tp ways.

        KV heads fewer than ranks are copied (one per rank), as TensorRT-LLM's exporters do.
        """
        check_tp(self, tp, precision)
        if tp == 1:
            return self
        return replace(self, num_heads=self.num_heads // tp, num_kv_heads=max(1, self.num_kv_heads // tp),
                       intermediate_size=self.intermediate_size // tp, vocab_size=-(-self.vocab_size // tp))


# Qwen2.5-7B(-Instruct) config.json (FACTS §2).
QWEN25_7B = ModelShape(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                       intermediate_size=18944, max_position_embeddings=32768, name="Qwen2.5-7B")


def rope_theta(hf: dict) -> float:
    """RoPE base from either transformers layout (4.x: `rope_theta`; 5.x: `rope_parameters.rope_theta`).

    No default: transformers 4.57 falls back to 10000, TensorRT-LLM's QWenConfig.from_hugging_face to 100000 and
    QWenConfig itself to 10000, while Qwen2/2.5 use 1e6 — a guess here would build an engine that runs and talks
    nonsense. Every config that transformers saves carries the value.
    """
    value = hf.get("rope_theta")
    if value is None:
        value = (hf.get("rope_parameters") or {}).get("rope_theta")
    if value is None:
        raise UserError(
            "the model's config.json has neither rope_theta nor rope_parameters.rope_theta",
            "add the model's RoPE base (Qwen2.5 uses \"rope_theta\": 1000000.0); TensorRT-LLM would otherwise "
            "fall back to 10000 and the engine would produce garbage",
        )
    return float(value)


# ---------------------------------------------------------------- the one TP rule: plan, build, package, verify,
# serve and the runtime all ask it, so a shape that cannot be split is refused with the same words everywhere.


def _kv_splits(shape: ModelShape, tp: int, precision: Precision) -> bool:
    # Fewer KV heads than ranks is fine when the exporter can copy them (tp a multiple of them), except for
    # SmoothQuant, whose per-channel scales ModelOpt 0.37 cannot duplicate.
    return shape.num_kv_heads % tp == 0 or (tp % shape.num_kv_heads == 0 and precision is not Precision.INT8_SQ)


def _heads_split(shape: ModelShape, tp: int, precision: Precision) -> bool:
    return shape.num_heads % tp == 0 and shape.intermediate_size % tp == 0 and _kv_splits(shape, tp, precision)


def awq_inputs_per_rank(shape: ModelShape, tp: int) -> dict[str, int]:
    return {  # input channels each rank's GEMM sees; AWQ groups run along them
        "attention.dense (o_proj, row-parallel)": shape.q_size // tp,
        "mlp.proj (down_proj, row-parallel)": shape.intermediate_size // tp,
        # the input of column-parallel layers is not split, but ModelOpt 0.37's exporter checks hidden/TP for them too
        "attention.qkv / mlp.fc / mlp.gate (column-parallel)": shape.hidden_size // tp,
    }


def _awq_misfit(shape: ModelShape, tp: int, group: int) -> str | None:
    """The first layer whose per-rank input is not a multiple of the AWQ group, or None."""
    for layer, dim in awq_inputs_per_rank(shape, tp).items():
        if dim % group:
            return f"{layer} has {dim} input channels per rank"
    return None


def tp_refusal(shape: ModelShape, tp: int, precision: Precision = Precision.BF16,
               awq_group: int | None = None) -> UserError | None:
    """Why shape cannot be split tp ways in this precision (None: it can)."""
    if tp not in SUPPORTED_TP:
        return UserError(f"tensor parallel size {tp} is not supported",
                         "use --tp 1, 2 or 4 (Qwen2.5-7B's 28 query and 4 KV heads divide only by these)")
    if not _heads_split(shape, tp, precision):
        ok = [t for t in SUPPORTED_TP if _heads_split(shape, t, precision)]
        sq = precision is Precision.INT8_SQ and shape.num_heads % tp == 0 and tp % shape.num_kv_heads == 0
        return UserError(
            f"TP {tp} does not divide the model's {shape.num_heads} query / {shape.num_kv_heads} KV heads"
            + (" for int8_sq (SmoothQuant cannot duplicate KV heads)" if sq else "")
            + ("" if shape.intermediate_size % tp == 0 else f" and MLP size {shape.intermediate_size}"),
            f"use --tp {' or '.join(map(str, ok))}" + (", or another precision" if sq else ""),
        )
    if precision is Precision.INT4_AWQ:
        group = awq_group or PRECISIONS[precision].group_size
        if group not in AWQ_GROUP_SIZES:
            return UserError(f"AWQ group size {group} is not supported", "TensorRT-LLM's W4A16_AWQ takes groups of 128 or 64")
        bad = _awq_misfit(shape, tp, group)
        if bad:
            tps = [t for t in SUPPORTED_TP if t < tp and _heads_split(shape, t, precision) and not _awq_misfit(shape, t, group)]
            groups = [g for g in AWQ_GROUP_SIZES if g != group and not _awq_misfit(shape, tp, g)]
            ways = ([f"--tp {tps[-1]}"] if tps else []) + [f"an AWQ group size of {g} (awq_block_size)" for g in groups]
            ways.append("a precision without input groups (int4_wo, int8_sq, fp8, int8_wo)")
            return UserError(f"INT4-AWQ at TP {tp}: {bad}, not a multiple of the group size {group}", "use " + ", or ".join(ways))
    return None


def check_tp(shape: ModelShape, tp: int, precision: Precision = Precision.BF16, awq_group: int | None = None) -> None:
    refusal = tp_refusal(shape, tp, precision, awq_group)
    if refusal:
        raise refusal

