"""The TensorRT-LLM 1.2.x checkpoint `config.json` for a Qwen2 model, as `QWenConfig.to_dict()` writes it.

ModelOpt 0.37 builds this through `tensorrt_llm.models.QWenConfig.from_hugging_face`, which cannot be imported
here, so it is written from the HF config instead. Field names and values follow tensorrt_llm/models/qwen/config.py
(QWenConfig), tensorrt_llm/models/modeling_utils.py (PretrainedConfig, QuantConfig), tensorrt_llm/mapping.py and
the Qwen fix-ups of tensorrt_llm/quantization/quantize_by_modelopt.py; tests check the result against
tests/data/trtllm_qwen_config_fields.json.
"""

from __future__ import annotations

from trtqwen.errors import UserError
from trtqwen.build.spec import BuildSpec, Precision
from trtqwen.shape import rope_theta

def rotary_scaling(hf: dict) -> dict | None:
    """HF rope scaling (4.x `rope_scaling`, 5.x `rope_parameters`) as TensorRT-LLM's `rotary_scaling`, which reads `type`."""
    scaling = hf.get("rope_scaling")
    if scaling is None:
        scaling = {k: v for k, v in (hf.get("rope_parameters") or {}).items() if k != "rope_theta"}
    kind = (scaling or {}).get("type") or (scaling or {}).get("rope_type")
    if kind in (None, "default"):
        return None
    return {**scaling, "type": kind}


def mapping_section(tp: int) -> dict:
    """Mapping(world_size=tp, tp_size=tp, pp_size=1).to_dict() without `rank`, as PretrainedConfig.to_dict writes it."""
    return {
        "world_size": tp, "gpus_per_node": 8, "cp_size": 1, "tp_size": tp, "pp_size": 1,
        "moe_tp_size": tp, "moe_cluster_size": 1, "moe_ep_size": 1, "attn_tp_size": tp, "attn_cp_size": 1,
        "cp_config": {}, "enable_attention_dp": False, "enable_lm_head_tp_in_adp": False,
    }


def quantization_section(spec: BuildSpec, exported: dict | None = None) -> dict:
    """QuantConfig.to_dict(). `exported` is the `quantization` ModelOpt's exporter reported (None: derive from spec)."""
    exported = exported or {}
    # weight-only formats: 16-bit weights, quantized per channel by TensorRT-LLM when it loads the checkpoint
    # (examples/quantization/quantize.py exports them unquantized and sets only quant_algo); bf16 / fp16 stay full
    # precision even when only the KV cache is quantized; the calibrated ones as quantize.py checked ModelOpt wrote them
    calibrated = spec.info.calibrated
    algo = spec.quant_algo
    awq = spec.precision is Precision.INT4_AWQ
    return {
        "quant_algo": algo,
        "kv_cache_quant_algo": spec.kv_cache_quant_algo,
        "group_size": exported.get("group_size") or (spec.awq_block_size if awq else 128),
        "smoothquant_val": spec.sq_alpha if spec.precision is Precision.INT8_SQ else 0.5,
        "clamp_val": None,
        "use_meta_recipe": False,
        "has_zero_point": bool(exported.get("has_zero_point", False)),
        "pre_quant_scale": bool(exported.get("pre_quant_scale", awq)),
        # None lets TensorRT-LLM apply its own default exclusions (lm_head, embeddings, routers) for weight-only.
        "exclude_modules": (exported.get("exclude_modules") or ["lm_head"]) if calibrated else None,
    }


def qwen_checkpoint_config(hf_config: dict, spec: BuildSpec, exporter_config: dict | None = None) -> dict:
    """The checkpoint config.json for a Qwen2 HF config (a config.json dict) built per `spec`.

    `exporter_config` is the config ModelOpt's exporter produced (native TensorRT-LLM one, or the stand-in
    quantize.py gives it): its quantization report, padded vocab size and extra keys are kept; every field below
    is computed from the HF config, so rotary_base, qwen_type, attn_bias and mlp_bias never depend on the exporter.
    """
    hf, exp = hf_config, dict(exporter_config or {})
    qwen_type = hf.get("model_type", "qwen2")
    if qwen_type != "qwen2":
        raise UserError(f"model_type is {qwen_type!r}, not 'qwen2'", "trtqwen builds Qwen2 / Qwen2.5 checkpoints")
    heads = hf["num_attention_heads"]
    head_size = hf.get("kv_channels") or hf.get("head_dim") or hf["hidden_size"] // heads
    tp = spec.tp
    for internal in ("rank", "decoder", "mapping", "quantization"):  # per-rank / ModelOpt-internal, or rebuilt below
        exp.pop(internal, None)
    config = {
        # PretrainedConfig
        "architecture": "Qwen2ForCausalLM",
        "dtype": spec.dtype,
        "vocab_size": exp.get("vocab_size") or hf["vocab_size"],  # ModelOpt pads it for AWQ when not a multiple of 64
        "hidden_size": hf["hidden_size"],
        "num_hidden_layers": hf["num_hidden_layers"],
        "num_attention_heads": heads,
        "hidden_act": hf.get("hidden_act", "silu"),
        # TensorRT-LLM's default; ModelOpt would write float16 for bf16 models (trtllm-build --logits_dtype overrides)
        "logits_dtype": "float32",
        "norm_epsilon": hf.get("rms_norm_eps", 1e-6),
        "runtime_defaults": None,
        "position_embedding_type": "rope_gpt_neox",
        "num_key_value_heads": hf.get("num_key_value_heads", heads),
        "intermediate_size": hf["intermediate_size"],
        "max_position_embeddings": hf.get("max_position_embeddings", 32768),
        "mapping": mapping_section(tp),
        "quantization": quantization_section(spec, exporter_config.get("quantization") if exporter_config else None),
        "use_parallel_embedding": bool(exp.get("use_parallel_embedding", True)),  # ModelOpt splits it by vocab
        "embedding_sharding_dim": 0,
        "head_size": head_size,
        "qk_layernorm": False,
        "rotary_embedding_dim": head_size,  # head_size × rotary_pct (1.0)
        # QWenConfig.from_hugging_face extras (stored as attributes, so to_dict writes them)
        "seq_length": hf.get("seq_length", 8192),
        "qwen_type": qwen_type,
        "moe_intermediate_size": hf.get("moe_intermediate_size", 0),
        "moe_shared_expert_intermediate_size": hf.get("shared_expert_intermediate_size", 0),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        # QWenConfig.to_dict
        "mlp_bias": False,
        "attn_bias": True,
        "rotary_base": rope_theta(hf),
        "rotary_scaling": rotary_scaling(hf),
        "disable_weight_only_quant_plugin": False,
        "num_labels": 1,
        "use_logn_attn": bool(hf.get("use_logn_attn", False)),
        "moe": {"num_experts": 0, "shared_expert_intermediate_size": 0, "top_k": 0, "normalization_mode": 0,
                "sparse_mixer_epsilon": 0.01, "tp_mode": 0, "device_limited_n_group": 0,
                "device_limited_topk_group": 0, "device_limited_routed_scaling_factor": 1.0},
    }
    config.update({k: v for k, v in exp.items() if k not in config})  # e.g. producer, share_embedding_table
    return config
