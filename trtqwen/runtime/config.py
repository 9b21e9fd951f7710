"""Model shape and quantization, read from either a TensorRT-LLM checkpoint or an HF config."""

from __future__ import annotations

from dataclasses import dataclass, replace

from trtqwen.errors import UserError


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    quant_algo: str | None = None  # None = unquantized
    kv_cache_quant_algo: str | None = None
    group_size: int = 128
    tp_size: int = 1
    dtype: str = "bfloat16"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def shard(self, tp: int) -> "ModelConfig":
        """One tensor-parallel rank's dims: query heads, KV heads, MLP and (padded) vocabulary split tp ways.

        KV heads fewer than ranks are copied (one per rank), as TensorRT-LLM's exporters do.
        """
        if tp == 1:
            return self
        kv_ok = self.num_kv_heads % tp == 0 or tp % self.num_kv_heads == 0
        if self.num_heads % tp or self.intermediate_size % tp or not kv_ok:
            raise UserError(f"TP {tp} does not divide the model's {self.num_heads} query heads, {self.num_kv_heads} KV "
                            f"heads and MLP size {self.intermediate_size}",
                            "TP is fixed when the checkpoint is written: rebuild with a TP that divides them")
        return replace(self, num_heads=self.num_heads // tp, num_kv_heads=max(1, self.num_kv_heads // tp),
                       intermediate_size=self.intermediate_size // tp, vocab_size=-(-self.vocab_size // tp), tp_size=tp)

    @classmethod
    def from_hf(cls, c: dict) -> "ModelConfig":
        from trtqwen.build.plan import ModelDims
        from trtqwen.build.trtllm_config import rope_theta

        arch = (c.get("architectures") or ["?"])[0]
        if arch != "Qwen2ForCausalLM":
            raise UserError(f"checkpoint architecture is {arch}, not Qwen2ForCausalLM", "the reference runtime runs Qwen2 models")
        d = ModelDims.from_hf_config(c)  # one parser of HF shapes for the planner and the runtime
        return cls(
            vocab_size=d.vocab_size, hidden_size=d.hidden_size, num_layers=d.num_layers, num_heads=d.num_heads,
            num_kv_heads=d.num_kv_heads, head_dim=d.head_dim, intermediate_size=d.intermediate_size,
            norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=rope_theta(c),
            max_position_embeddings=d.max_position_embeddings,
            dtype=str(c.get("torch_dtype") or c.get("dtype") or "bfloat16"),
        )

    @classmethod
    def from_trtllm(cls, c: dict) -> "ModelConfig":
        arch = c.get("architecture")
        if arch != "Qwen2ForCausalLM":
            raise UserError(f"TensorRT-LLM checkpoint architecture is {arch!r}, not Qwen2ForCausalLM",
                            "the reference runtime runs Qwen2 checkpoints written by `trtqwen build`")
        if "rotary_base" not in c:
            raise UserError("checkpoint config.json has no rotary_base",
                            "TensorRT-LLM would fall back to RoPE base 10000 and produce garbage: rebuild with `trtqwen build`")
        q = c.get("quantization") or {}
        mapping = c.get("mapping") or {}
        return cls(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"], num_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
            head_dim=c.get("head_size") or c["hidden_size"] // c["num_attention_heads"],
            intermediate_size=c["intermediate_size"], norm_eps=c.get("norm_epsilon", 1e-6),
            rope_theta=float(c["rotary_base"]), max_position_embeddings=c.get("max_position_embeddings", 32768),
            quant_algo=q.get("quant_algo"), kv_cache_quant_algo=q.get("kv_cache_quant_algo"),
            group_size=q.get("group_size") or 128, tp_size=mapping.get("tp_size", mapping.get("world_size", 1)),
            dtype=c.get("dtype", "bfloat16"),
        )
