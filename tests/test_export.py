"""Every precision × TP 1, 2, 4 exports what TensorRT-LLM 1.2.1's Qwen loader expects (names, shapes, dtypes, config)."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from trtqwen.errors import UserError
from trtqwen.build.quantize import check_shardable, export_checkpoint
from trtqwen.build.spec import BuildSpec
from trtqwen.build.trtllm_config import qwen_checkpoint_config

FIELDS = json.loads((Path(__file__).parent / "data" / "trtllm_qwen_config_fields.json").read_text())
PRECISIONS = {"bf16": None, "fp16": None, "int8_wo": "W8A16", "int4_wo": "W4A16", "int8_sq": "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
              "fp8": "FP8", "int4_awq": "W4A16_AWQ"}
# tiny-tp: hidden 512, 4 heads × 128, 4 KV heads, intermediate 1536, vocab 151936, 2 layers
H, Q, KV, I, V = 512, 512, 512, 1536, 151936


def tensors(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_checkpoint_layout(exported, precision, tp):
    d = exported(precision, tp)
    assert sorted(p.name for p in d.iterdir()) == ["config.json"] + [f"rank{r}.safetensors" for r in range(tp)]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["mapping"]["world_size"] == cfg["mapping"]["tp_size"] == tp
    assert cfg["quantization"]["quant_algo"] == PRECISIONS[precision]
    assert cfg["dtype"] == ("float16" if precision == "fp16" else "bfloat16")
    t = tensors(d / "rank0.safetensors")
    L = "transformer.layers.0."
    for name in ("attention.qkv.weight", "attention.qkv.bias", "attention.dense.weight", "mlp.fc.weight", "mlp.gate.weight",
                 "mlp.proj.weight", "input_layernorm.weight", "post_layernorm.weight"):
        assert L + name in t, name
    assert "transformer.layers.1.mlp.proj.weight" in t and "transformer.ln_f.weight" in t
    assert t["lm_head.weight"][0] == (V // tp, H)  # split by vocab
    assert t[L + "attention.qkv.bias"][0] == ((Q + 2 * KV) // tp,)
    qkv, dense, proj = t[L + "attention.qkv.weight"], t[L + "attention.dense.weight"], t[L + "mlp.proj.weight"]
    if precision == "int4_awq":  # int4 packed two per byte along the output dim, group-128 scales, pre-quant scale
        assert qkv == (((Q + 2 * KV) // tp // 2, H), "I8")
        assert proj == ((H // 2, I // tp), "I8")
        assert t[L + "attention.qkv.weights_scaling_factor"][0] == ((Q + 2 * KV) // tp, H // 128)
        assert t[L + "mlp.proj.weights_scaling_factor"][0] == (H, I // tp // 128)
        assert t[L + "attention.qkv.prequant_scaling_factor"][0] == (H,)
        assert cfg["quantization"]["group_size"] == 128 and cfg["quantization"]["pre_quant_scale"] is True
    elif precision == "int8_sq":  # int8 with per-channel weight scales; activations scaled per token at run time
        assert qkv == (((Q + 2 * KV) // tp, H), "I8") and dense == ((H, Q // tp), "I8")
        assert t[L + "attention.qkv.per_channel_scale"][0] == (1, (Q + 2 * KV) // tp)
        assert t[L + "attention.dense.smoother"][0] == (1, Q // tp)
        assert not any(k.endswith("activation_scaling_factor") for k in t)
    elif precision == "fp8":
        assert qkv == (((Q + 2 * KV) // tp, H), "F8_E4M3") and proj == ((H, I // tp), "F8_E4M3")
        assert t[L + "attention.qkv.weights_scaling_factor"][0] in ((), (1,))
        assert L + "attention.qkv.activation_scaling_factor" in t
    else:  # 16-bit weights; for int8_wo/int4_wo TensorRT-LLM quantizes them per channel when it loads the checkpoint
        want = "F16" if precision == "fp16" else "BF16"
        assert qkv == (((Q + 2 * KV) // tp, H), want) and dense == ((H, Q // tp), want) and proj == ((H, I // tp), want)
    if precision in ("int8_sq", "fp8", "int4_awq"):
        assert cfg["quantization"]["exclude_modules"] and "lm_head" in cfg["quantization"]["exclude_modules"]
        assert t["lm_head.weight"][1] == "BF16"


def test_config_fields_match_tensorrt_llm(exported, tiny_tp_dir):
    cfg = json.loads((exported("int4_awq", 2) / "config.json").read_text())
    hf = json.loads((tiny_tp_dir / "config.json").read_text())
    for group in ("pretrained_config", "qwen_config", "qwen_from_hugging_face_kwargs"):
        for field, kind in FIELDS[group].items():
            assert field in cfg, f"{group}.{field} missing"
            types = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict, "dict|null": (dict, type(None))}
            assert isinstance(cfg[field], types[kind]), f"{field}: {cfg[field]!r} is not {kind}"
    for field, value in FIELDS["expected_for_qwen2"].items():
        assert cfg[field] == value, field
    assert set(FIELDS["mapping"]) <= set(cfg["mapping"])
    assert set(cfg["quantization"]) == set(FIELDS["quant_config"])
    assert cfg["quantization"]["quant_algo"] in FIELDS["quant_algo_values"]
    assert cfg["rotary_base"] == hf["rope_theta"] == 1e6
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]) == (V, H, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"], cfg["intermediate_size"]) == (4, 4, 128, I)
    assert cfg["use_parallel_embedding"] is True  # ModelOpt splits the embedding by vocab at TP > 1


@pytest.mark.parametrize("kv,algo", [("int8", "INT8"), ("fp8", "FP8")])
def test_kv_cache_quantization(exported, kv, algo):
    d = exported("bf16", 1, kv)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quantization"]["kv_cache_quant_algo"] == algo
    assert "transformer.layers.0.attention.kv_cache_scaling_factor" in tensors(d / "rank0.safetensors")


def test_rotary_base_from_either_transformers_layout():
    base = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 100, "hidden_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
    spec = BuildSpec(model="m", precision="bf16")
    assert qwen_checkpoint_config({**base, "rope_theta": 12345.0}, spec)["rotary_base"] == 12345.0
    v5 = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}  # transformers 5.x layout
    cfg = qwen_checkpoint_config(v5, spec)
    assert cfg["rotary_base"] == 1e6 and cfg["rotary_scaling"] is None and cfg["qwen_type"] == "qwen2"
    yarn = {**base, "rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    assert qwen_checkpoint_config(yarn, spec)["rotary_scaling"]["factor"] == 4.0
    with pytest.raises(UserError, match="rope_theta"):
        qwen_checkpoint_config(base, spec)  # never a silent fallback to 10000


def test_awq_shape_that_cannot_shard_is_refused_before_calibration(tiny_dir, tmp_path):
    hf = json.loads((tiny_dir / "config.json").read_text())  # hidden 128: dense has 64 inputs per rank at TP 2
    with pytest.raises(UserError, match="multiple of the group size 128"):
        check_shardable(hf, BuildSpec(model="m", precision="int4_awq", tp=2))
    with pytest.raises(UserError, match="does not divide"):
        check_shardable(hf, BuildSpec(model="m", precision="int8_sq", tp=4))  # 2 KV heads
    with pytest.raises(UserError, match="multiple of the group size"):
        export_checkpoint(tiny_dir, BuildSpec(model="m", precision="int4_awq", tp=2), tmp_path / "out")
    assert not (tmp_path / "out").exists()
