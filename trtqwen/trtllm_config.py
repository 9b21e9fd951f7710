"""The TensorRT-LLM 1.2.x checkpoint `config.json` for a Qwen2 model, as QWenConfig.to_dict() writes it.

ModelOpt 0.37 builds this through `tensorrt_llm.models.QWenConfig`, which cannot be imported here, so we
write it ourselves. Field names: tensorrt_llm/models/modeling_utils.py (PretrainedConfig, QuantConfig) and
tensorrt_llm/models/qwen/config.py (QWenConfig); the list tests check against is
tests/data/trtllm_qwen_config_fields.json.
"""

from __future__ import annotations

from trtqwen.errors import UserError
from trtqwen.spec import BuildSpec, Precision

# Weight-only formats: TensorRT-LLM quantizes 16-bit weights itself when it loads the checkpoint.
WEIGHT_ONLY = {Precision.INT8_WO: "W8A16", Precision.INT4_WO: "W4A16"}


def rope_theta(hf: dict) -> float:
    """RoPE base from either transformers layout (4.x: rope_theta; 5.x: rope_parameters.rope_theta)."""
    value = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
    if not value:
        raise UserError("the model's config.json has no rope_theta",
                        "add it (Qwen2.5 uses 1000000.0): TensorRT-LLM would silently fall back to 10000 and produce garbage")
    return float(value)


def rotary_scaling(hf: dict) -> dict | None:
    scaling = hf.get("rope_scaling") or {k: v for k, v in (hf.get("rope_parameters") or {}).items() if k != "rope_theta"}
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return None
    scaling = dict(scaling)
    scaling["type"] = scaling.pop("rope_type", scaling.get("type"))
    return scaling


def quantization_section(spec: BuildSpec, exported: dict | None) -> dict:
    """QuantConfig.to_dict(): ModelOpt's algorithm names, plus the weight-only and KV formats we choose."""
    exported = exported or {}
    algo = exported.get("quant_algo") or spec.quant_algo
    if spec.precision in WEIGHT_ONLY:
        algo = WEIGHT_ONLY[spec.precision]
    return {
        "quant_algo": algo,
        "kv_cache_quant_algo": exported.get("kv_cache_quant_algo") or spec.kv_cache_quant_algo,
        "group_size": exported.get("group_size", spec.awq_block_size),
        "smoothquant_val": spec.sq_alpha if spec.precision is Precision.INT8_SQ else 0.5,
        "clamp_val": None,
        "use_meta_recipe": False,
        "has_zero_point": exported.get("has_zero_point", False),
        "pre_quant_scale": exported.get("pre_quant_scale", spec.precision is Precision.INT4_AWQ),
        "exclude_modules": exported.get("exclude_modules") or (["lm_head"] if algo else None),
    }


def qwen_checkpoint_config(hf: dict, spec: BuildSpec, exported_quant: dict | None = None,
                           parallel_embedding: bool = False) -> dict:
    heads = hf["num_attention_heads"]
    tp = spec.tp
    return {
        "architecture": "Qwen2ForCausalLM",
        "dtype": spec.dtype,
        "logits_dtype": "float32",
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "num_hidden_layers": hf["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": hf.get("num_key_value_heads", heads),
        "head_size": hf.get("head_dim") or hf["hidden_size"] // heads,
        "hidden_act": hf.get("hidden_act", "silu"),
        "intermediate_size": hf["intermediate_size"],
        "norm_epsilon": hf.get("rms_norm_eps", 1e-6),
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": hf.get("max_position_embeddings", 32768),
        "rotary_embedding_dim": hf.get("head_dim") or hf["hidden_size"] // heads,  # PretrainedConfig: head_size × rotary_pct
        "qk_layernorm": False,
        "use_parallel_embedding": parallel_embedding,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "mapping": {"world_size": tp, "gpus_per_node": 8, "cp_size": 1, "tp_size": tp, "pp_size": 1,
                    "moe_tp_size": tp, "moe_ep_size": 1},
        "quantization": quantization_section(spec, exported_quant),
        # QWenConfig
        "qwen_type": hf.get("model_type", "qwen2"),
        "rotary_base": rope_theta(hf),
        "rotary_scaling": rotary_scaling(hf),
        "attn_bias": True,
        "mlp_bias": False,
        "disable_weight_only_quant_plugin": False,
        "use_logn_attn": False,
        "seq_length": hf.get("seq_length", 8192),
        "num_labels": 1,
        "moe_intermediate_size": 0,
        "moe_shared_expert_intermediate_size": 0,
        "moe": {"num_experts": 0, "shared_expert_intermediate_size": 0, "top_k": 0, "normalization_mode": 0,
                "sparse_mixer_epsilon": 0.01, "tp_mode": 0, "device_limited_n_group": 0,
                "device_limited_topk_group": 0, "device_limited_routed_scaling_factor": 1.0},
        "mlp_only_layers": [],
        "decoder_sparse_step": 1,
    }
