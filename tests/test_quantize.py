"""Quantize + export: every precision × TP 1, 2, 4 gives what TensorRT-LLM 1.2's Qwen loader expects.

A small Qwen2 is made here (vocab 1024, hidden 512, 4 heads × 128, 4 KV heads, intermediate 1536, 2 layers) with a
byte-level BPE tokenizer trained on a few strings. Each precision is calibrated once and written at TP 1, 2 and 4
(the split happens at export, so this is what export_checkpoint does, minus re-loading); a few tests go through
export_checkpoint end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from trtqwen.build import quantize
from tests.checkpoints import checkpoint_factory
from trtqwen.build.calib import bundled_path, load_calibration_texts
from trtqwen.errors import UserError
from trtqwen.build.spec import BuildSpec
from trtqwen.build.trtllm_config import qwen_checkpoint_config, rotary_scaling
from trtqwen.shape import rope_theta

FIELDS = json.loads((Path(__file__).parent / "data" / "trtllm_qwen_config_fields.json").read_text())
ALGO = FIELDS["quant_algo_by_precision"]
V, H, HEADS, KV_HEADS, HEAD_DIM, I, LAYERS = 1024, 512, 4, 4, 128, 1536, 2
Q, KV = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
CALIB = dict(calib_size=4, calib_seq_len=48)  # enough to exercise every code path, fast on 2 CPU cores
JSON_TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict, "dict|null": (dict, type(None))}


# ---------------------------------------------------------------- fixtures


def make_model_dir(out: Path, **overrides) -> Path:
    """A small real-architecture Qwen2 with random weights (non-zero q/k/v biases) and a tiny BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    seed_text = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x * 2", "SELECT id FROM t;",
                 "你好，世界。量化模型", '{"key": [1, 2, 3]}', "<|im_start|>user\nhi<|im_end|>"]
    tok.train_from_iterator(seed_text * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
    shape = dict(vocab_size=V, hidden_size=H, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                 intermediate_size=I, num_hidden_layers=LAYERS, rope_theta=1e6, rms_norm_eps=1e-6,
                 max_position_embeddings=2048, tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{**shape, **overrides}, torch_dtype="bfloat16"))
    with torch.no_grad():  # HF init zeroes biases: give them values so their split is checked
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.02)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def model_dir(module_tmp) -> Path:
    return make_model_dir(module_tmp("hf") / "qwen2-small")


@pytest.fixture(scope="module")
def hf_config(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def checkpoint(model_dir, module_tmp):
    """checkpoint(precision, tp, kv="auto") → directory; each (precision, kv) is calibrated once, each tp written once."""
    return checkpoint_factory(model_dir, module_tmp("ckpt"), **CALIB)


def tensors(path: Path) -> dict[str, tuple[tuple, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def expected_layout(precision: str, tp: int, kv: str = "auto") -> dict[str, tuple[tuple, str]]:
    """Every tensor of one rank, its shape and safetensors dtype, as TensorRT-LLM's Qwen loader takes them."""
    f16 = "F16" if precision == "fp16" else "BF16"
    # (out, in) per rank of each linear: column-parallel split the output, row-parallel the input
    dims = {"attention.qkv": ((Q + 2 * KV) // tp, H), "attention.dense": (H, Q // tp),
            "mlp.fc": (I // tp, H), "mlp.gate": (I // tp, H), "mlp.proj": (H, I // tp)}
    t = {"transformer.vocab_embedding.weight": ((V // tp, H), f16),  # use_parallel_embedding: split by vocab
         "transformer.ln_f.weight": ((H,), f16), "lm_head.weight": ((V // tp, H), f16)}
    for n in range(LAYERS):
        p = f"transformer.layers.{n}."
        t[p + "input_layernorm.weight"] = ((H,), f16)
        t[p + "post_layernorm.weight"] = ((H,), f16)
        t[p + "attention.qkv.bias"] = (((Q + 2 * KV) // tp,), f16)
        if kv != "auto":  # ModelOpt 0.37 writes k and v scales too; TensorRT-LLM folds them into kv = max(k, v)
            for name in ("kv", "k", "v"):
                t[p + f"attention.{name}_cache_scaling_factor"] = ((1,), "F32")
        for name, (out, inp) in dims.items():
            w = p + name
            if precision == "int4_awq":  # int4 packed two per int8 along the output dim; group-128 scales
                t[w + ".weight"] = ((out // 2, inp), "I8")
                t[w + ".weights_scaling_factor"] = ((out, inp // 128), "F32")
                t[w + ".prequant_scaling_factor"] = ((inp,), f16)
            elif precision == "int8_sq":  # the per-token plugin's layout (trtllm_sq_per_token_layout.json)
                t[w + ".weight"] = ((out, inp), "I8")
                t[w + ".per_channel_scale"] = ((1, out), "F32")
                if name in ("attention.dense", "mlp.proj"):
                    t[w + ".smoother"] = ((1, inp), "F32")
            elif precision == "fp8":  # per-tensor scales
                t[w + ".weight"] = ((out, inp), "F8_E4M3")
                t[w + ".weights_scaling_factor"] = ((1,), "F32")
                t[w + ".activation_scaling_factor"] = ((1,), "F32")
            else:  # bf16 / fp16 / int8_wo / int4_wo: 16-bit; TensorRT-LLM quantizes weight-only at load
                t[w + ".weight"] = ((out, inp), f16)
        if precision == "int8_sq":
            t[p + "input_layernorm.scale_to_int"] = ((1,), f16)
            t[p + "post_layernorm.scale_to_int"] = ((1,), f16)
    return t


def check_config(cfg: dict, hf: dict, precision: str, tp: int, kv: str = "auto") -> None:
    """Field by field against tests/data/trtllm_qwen_config_fields.json (read from TensorRT-LLM 1.2.x sources)."""
    groups = ("pretrained_config", "qwen_from_hugging_face_kwargs", "qwen_config")
    known = {f for g in groups for f in FIELDS[g]}
    assert known <= set(cfg), f"missing: {sorted(known - set(cfg))}"
    assert set(cfg) - known <= {"producer", "share_embedding_table"}, sorted(set(cfg) - known)
    for group in groups:
        for field, kind in FIELDS[group].items():
            assert isinstance(cfg[field], JSON_TYPES[kind]), f"{field}: {cfg[field]!r} is not {kind}"
    for field, value in FIELDS["expected_for_qwen2"].items():
        assert cfg[field] == value, field
    for field, key in FIELDS["from_hf_config"].items():
        want = hf.get(key) if hf.get(key) is not None else (H // HEADS if key == "head_dim" else None)
        if key == "rope_theta":
            want = rope_theta(hf)
        assert cfg[field] == want, f"{field} = {cfg[field]!r}, HF {key} = {want!r}"
    for field, allowed in FIELDS["one_of"].items():
        assert cfg[field] in allowed, field
    assert cfg["dtype"] == ("float16" if precision == "fp16" else "bfloat16")
    assert cfg["mapping"] == {k: tp if v == "tp" else v for k, v in FIELDS["mapping_values"].items()}
    q = cfg["quantization"]
    assert list(q) == FIELDS["quant_config"]
    assert q["quant_algo"] == ALGO[precision] and q["quant_algo"] in FIELDS["quant_algo_values"]
    assert q["kv_cache_quant_algo"] == {"auto": None, "int8": "INT8", "fp8": "FP8"}[kv]
    assert q["kv_cache_quant_algo"] in FIELDS["kv_cache_quant_algo_values"]
    assert q["group_size"] == 128 and q["has_zero_point"] is False
    assert q["pre_quant_scale"] is (precision == "int4_awq")
    if precision in ("int4_awq", "int8_sq", "fp8"):
        assert q["exclude_modules"] == ["lm_head"]  # ModelOpt leaves lm_head in 16 bits
    else:  # None: TensorRT-LLM's own defaults (lm_head, embeddings) apply to weight-only
        assert q["exclude_modules"] is None
    assert cfg["moe"] == FIELDS["moe_config_for_dense_qwen2"]


# ---------------------------------------------------------------- every precision × TP


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("precision", list(ALGO))
def test_checkpoint_layout_and_config(checkpoint, hf_config, precision, tp):
    d = checkpoint(precision, tp)
    assert sorted(p.name for p in d.iterdir()) == ["config.json"] + [f"rank{r}.safetensors" for r in range(tp)]
    want = expected_layout(precision, tp)
    for r in range(tp):
        got = tensors(d / f"rank{r}.safetensors")
        assert set(got) == set(want), f"rank {r}: extra {set(got) - set(want)}, missing {set(want) - set(got)}"
        for name, (shape, dtype) in want.items():
            assert got[name] == (shape, dtype), f"rank {r} {name}: {got[name]} != {(shape, dtype)}"
    check_config(json.loads((d / "config.json").read_text()), hf_config, precision, tp)


@pytest.mark.parametrize("tp", [2, 4])
def test_bf16_shards_hold_the_right_slices(checkpoint, model_dir, tp):
    """Column-parallel layers split the output (qkv per rank = [q_r; k_r; v_r]), row-parallel the input, lm_head and
    the embedding the vocabulary; fc is gate_proj (the SiLU branch) and gate is up_proj, as in TensorRT-LLM's GatedMLP."""
    hf = load_file(str(model_dir / "model.safetensors"))
    d = checkpoint("bf16", tp)

    def part(w, r, dim=0):
        return w.chunk(tp, dim=dim)[r]

    for r in range(tp):
        t = load_file(str(d / f"rank{r}.safetensors"))
        for n in range(LAYERS):
            a, m, p = f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp.", f"transformer.layers.{n}."
            qkv = torch.cat([part(hf[a + x + "_proj.weight"], r) for x in "qkv"])
            assert torch.equal(t[p + "attention.qkv.weight"], qkv)
            assert torch.equal(t[p + "attention.qkv.bias"], torch.cat([part(hf[a + x + "_proj.bias"], r) for x in "qkv"]))
            assert torch.equal(t[p + "attention.dense.weight"], part(hf[a + "o_proj.weight"], r, 1))
            assert torch.equal(t[p + "mlp.fc.weight"], part(hf[m + "gate_proj.weight"], r))
            assert torch.equal(t[p + "mlp.gate.weight"], part(hf[m + "up_proj.weight"], r))
            assert torch.equal(t[p + "mlp.proj.weight"], part(hf[m + "down_proj.weight"], r, 1))
            assert torch.equal(t[p + "input_layernorm.weight"], hf[f"model.layers.{n}.input_layernorm.weight"])
        assert torch.equal(t["lm_head.weight"], part(hf["lm_head.weight"], r))
        assert torch.equal(t["transformer.vocab_embedding.weight"], part(hf["model.embed_tokens.weight"], r))


def test_awq_weights_decode_to_the_original(checkpoint, model_dir):
    """Unpacking the int4 nibbles with the group scales and undoing the pre-quant scale gives back the HF weight."""
    hf = load_file(str(model_dir / "model.safetensors"))
    t = load_file(str(checkpoint("int4_awq", 1) / "rank0.safetensors"))
    p = "transformer.layers.0.attention.dense."
    packed = t[p + "weight"]  # (out/2, in): two int4 per byte along the output dim, low nibble first
    low, high = (packed << 4) >> 4, packed >> 4
    q = torch.stack([low, high], dim=1).reshape(packed.shape[0] * 2, -1).float()
    scale = t[p + "weights_scaling_factor"].repeat_interleave(128, dim=1)
    w = q * scale / t[p + "prequant_scaling_factor"].float()
    ref = hf["model.layers.0.self_attn.o_proj.weight"].float()
    assert (w - ref).abs().mean() < 0.25 * ref.abs().mean()  # 4-bit error, not a layout mismatch


@pytest.mark.parametrize("precision,kv", [("bf16", "int8"), ("int4_wo", "fp8"), ("int8_sq", "int8"), ("fp8", "fp8")])
def test_kv_cache_quantization(checkpoint, hf_config, precision, kv):
    d = checkpoint(precision, 2, kv)
    want = expected_layout(precision, 2, kv)
    for r in range(2):
        assert tensors(d / f"rank{r}.safetensors") == want
        t = load_file(str(d / f"rank{r}.safetensors"))
        for n in range(LAYERS):
            a = f"transformer.layers.{n}.attention."
            k, v, both = (t[a + x + "_cache_scaling_factor"] for x in "k v kv".split())
            assert torch.equal(both, torch.maximum(k, v)) and both.item() > 0
    check_config(json.loads((d / "config.json").read_text()), hf_config, precision, 2, kv)


# ---------------------------------------------------------------- end to end through export_checkpoint


def test_export_checkpoint_end_to_end(model_dir, hf_config, tmp_path):
    messages = []
    spec = BuildSpec(model=str(model_dir), precision="int8_sq", tp=2, kv_cache_dtype="int8", **CALIB)
    info = quantize.export_checkpoint(model_dir, spec, tmp_path / "ck", progress=messages.append)
    assert info["device"] == quantize.pick_device()
    assert info["quant_algo"] == "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN" and info["kv_cache_quant_algo"] == "INT8"
    assert info["calib_samples"] == CALIB["calib_size"] and 0 < info["calib_tokens"] <= 4 * (CALIB["calib_seq_len"] + 1)  # + EOS
    assert set(info["files"]) == {"config.json", "rank0.safetensors", "rank1.safetensors"}
    assert all(size > 0 for size in info["files"].values()) and info["peak_rss_mb"] > 0
    assert all(info[k] >= 0 for k in ("load_seconds", "quantize_seconds", "export_seconds"))
    assert any("calibrating" in m for m in messages) and any("wrote" in m for m in messages)
    check_config(json.loads((tmp_path / "ck" / "config.json").read_text()), hf_config, "int8_sq", 2, "int8")
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary directory left behind


def test_failed_export_keeps_the_previous_checkpoint(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "ck"
    quantize.export_checkpoint(model_dir, BuildSpec(model="m", precision="bf16"), out)
    before = (out / "rank0.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure while writing config.json")

    monkeypatch.setattr(quantize, "qwen_checkpoint_config", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        quantize.export_checkpoint(model_dir, BuildSpec(model="m", precision="bf16", tp=2), out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "rank0.safetensors"]
    assert (out / "rank0.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    import modelopt.torch.export.model_config_export as mce
    from modelopt.torch.export.tensorrt_llm_utils import convert_to_tensorrt_llm_config

    assert mce.convert_to_tensorrt_llm_config is convert_to_tensorrt_llm_config  # the stand-in is gone again


def test_modelopt_alone_cannot_write_a_qwen_config(model_dir, tmp_path):
    """Why the stand-in exists: ModelOpt 0.37 without TensorRT-LLM refuses Qwen in its config step."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    model = quantize.load_hf_model(model_dir, BuildSpec(model="m", precision="bf16"), "cpu")
    with pytest.raises(NotImplementedError, match="qwen"):
        export_tensorrt_llm_checkpoint(model, "qwen", torch.bfloat16, export_dir=tmp_path, inference_tensor_parallel=1)


@pytest.mark.parametrize("theta", [12345.0, 1e6])
def test_rotary_base_is_the_models_rope_theta(tmp_path, theta):
    d = make_model_dir(tmp_path / "m", rope_theta=theta)
    quantize.export_checkpoint(d, BuildSpec(model=str(d), precision="bf16"), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["rotary_base"] == theta and cfg["qwen_type"] == "qwen2"
    assert cfg["attn_bias"] is True and cfg["mlp_bias"] is False


def test_transformers5_config_layout_keeps_the_rope_base(model_dir, tmp_path):
    """transformers 5.x moved rope_theta into rope_parameters: the exported rotary_base must still be the model's."""
    d = tmp_path / "v5"
    d.mkdir()
    for f in model_dir.iterdir():
        (d / f.name).symlink_to(f)
    hf = json.loads((model_dir / "config.json").read_text())
    del hf["rope_theta"], hf["rope_scaling"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 54321.0}
    (d / "config.json").unlink()
    (d / "config.json").write_text(json.dumps(hf))
    quantize.export_checkpoint(d, BuildSpec(model=str(d), precision="bf16"), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["rotary_base"] == 54321.0 and cfg["rotary_scaling"] is None


# ---------------------------------------------------------------- config.json, pure


BASE_HF = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
           "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def test_rope_base_from_either_transformers_layout_and_never_a_default():
    assert rope_theta({**BASE_HF, "rope_theta": 12345.0}) == 12345.0
    assert rope_theta({**BASE_HF, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}) == 1e6
    with pytest.raises(UserError, match="rope_theta"):
        rope_theta(BASE_HF)  # no silent 10000 (TensorRT-LLM's fallback) that would make the engine talk nonsense
    with pytest.raises(UserError, match="rope_theta"):
        qwen_checkpoint_config(BASE_HF, BuildSpec(model="m", precision="bf16"))


def test_rope_scaling_from_either_layout():
    yarn4 = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert rotary_scaling({**BASE_HF, "rope_scaling": yarn4}) == yarn4
    yarn5 = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768}
    assert rotary_scaling({**BASE_HF, "rope_parameters": yarn5}) == {
        "rope_type": "yarn", "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert rotary_scaling({**BASE_HF, "rope_scaling": None}) is None
    assert rotary_scaling({**BASE_HF, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}) is None


def test_qwen25_7b_config_matches_tensorrt_llm_fields():
    hf = {**BASE_HF, "rope_theta": 1e6}
    for precision in ALGO:
        for tp in (1, 2, 4):
            cfg = qwen_checkpoint_config(hf, BuildSpec(model="Qwen/Qwen2.5-7B-Instruct", precision=precision, tp=tp))
            assert cfg["head_size"] == 128 and cfg["rotary_embedding_dim"] == 128 and cfg["num_key_value_heads"] == 4
            assert cfg["quantization"]["quant_algo"] == ALGO[precision]
            assert cfg["mapping"]["tp_size"] == cfg["mapping"]["world_size"] == tp
    assert json.loads(json.dumps(cfg)) == cfg  # plain JSON


def test_exporter_fields_never_override_the_qwen_ones():
    """With TensorRT-LLM importable ModelOpt writes its own config; rotary_base & co still come from the HF config."""
    native = {"producer": {"name": "modelopt", "version": "0.37.0"}, "rank": 1, "decoder": "qwen", "rmsnorm": True,
              "rotary_base": 10000.0, "qwen_type": "qwen", "attn_bias": False, "mlp_bias": True,
              "logits_dtype": "float16", "vocab_size": 152064,
              "quantization": {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 128,
                               "has_zero_point": False, "pre_quant_scale": True, "exclude_modules": ["lm_head"]}}
    cfg = qwen_checkpoint_config({**BASE_HF, "rope_theta": 1e6}, BuildSpec(model="m", tp=2), native)
    assert (cfg["rotary_base"], cfg["qwen_type"], cfg["attn_bias"], cfg["mlp_bias"]) == (1e6, "qwen2", True, False)
    assert cfg["producer"] == native["producer"] and cfg["rmsnorm"] is True
    assert "rank" not in cfg and "decoder" not in cfg
    assert cfg["quantization"]["quant_algo"] == "W4A16_AWQ" and cfg["quantization"]["pre_quant_scale"] is True


def test_native_modelopt_path_is_left_alone_when_tensorrt_llm_is_importable(monkeypatch):
    import importlib.util

    import modelopt.torch.export.model_config_export as mce

    original, find_spec = mce.convert_to_tensorrt_llm_config, importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tensorrt_llm" else find_spec(name, *a))
    with quantize._config_step_without_tensorrt_llm():
        assert mce.convert_to_tensorrt_llm_config is original
    monkeypatch.undo()
    with quantize._config_step_without_tensorrt_llm():
        assert mce.convert_to_tensorrt_llm_config is not original
    assert mce.convert_to_tensorrt_llm_config is original


def test_other_model_types_are_refused():
    with pytest.raises(UserError, match="qwen3"):
        qwen_checkpoint_config({**BASE_HF, "model_type": "qwen3", "rope_theta": 1e6}, BuildSpec(model="m"))


# ---------------------------------------------------------------- shapes that cannot shard


def fake_model_dir(tmp_path: Path, **shape) -> Path:
    d = tmp_path / "fake"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**BASE_HF, "rope_theta": 1e6, **shape}))
    (d / "model.safetensors").write_bytes(b"not loaded")
    return d


def test_awq_shape_that_cannot_shard_is_refused_before_loading(tmp_path, monkeypatch):
    d = fake_model_dir(tmp_path, hidden_size=512, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                       intermediate_size=1536)  # attention.dense: 4 × 64 / 4 = 64 inputs per rank at TP 4

    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded or calibrated a model that cannot be exported")

    monkeypatch.setattr(quantize, "load_hf_model", must_not_run)
    monkeypatch.setattr(quantize, "calibrate", must_not_run)
    with pytest.raises(UserError, match="attention.dense.*64 input channels per rank.*group size 128") as e:
        quantize.export_checkpoint(d, BuildSpec(model="m", precision="int4_awq", tp=4), tmp_path / "out")
    assert "--tp 2" in str(e.value) and "int4_wo" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_missing_weights_or_tokenizer_are_user_errors(tmp_path, model_dir):
    d = tmp_path / "bin-only"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**BASE_HF, "rope_theta": 1e6}))
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="safetensors"):
        quantize.export_checkpoint(d, BuildSpec(model="m", precision="bf16"), tmp_path / "out")
    e = tmp_path / "no-tokenizer"
    e.mkdir()
    for name in ("config.json", "model.safetensors"):
        (e / name).symlink_to(model_dir / name)
    with pytest.raises(UserError, match="tokenizer"):
        quantize.export_checkpoint(e, BuildSpec(model="m", precision="fp8"), tmp_path / "out")


# ---------------------------------------------------------------- the unified HF checkpoint


def test_hf_format_export(model_dir, tmp_path):
    spec = BuildSpec(model=str(model_dir), precision="fp8", **CALIB)
    info = quantize.export_checkpoint(model_dir, spec, None, hf_out_dir=tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(info["hf_files"]) and "files" not in info
    with pytest.raises(UserError, match="PyTorch backend"):
        quantize.export_checkpoint(model_dir, BuildSpec(model="m", precision="int8_wo"), None, hf_out_dir=tmp_path / "wo")
    assert not (tmp_path / "wo").exists()


# ---------------------------------------------------------------- calibration texts


def test_bundled_calibration_set_is_varied():
    rows = [json.loads(line) for line in bundled_path().read_text(encoding="utf-8").splitlines()]
    kinds = {r["kind"] for r in rows}
    assert len(rows) >= 64
    assert {"en", "zh", "code_py", "code_js", "code_sql", "json", "chat"} <= kinds
    texts = [r["text"] for r in rows]
    assert sum("<|im_start|>" in t and "<|im_end|>" in t for t in texts) >= 10  # ChatML exchanges
    assert min(map(len, texts)) < 20 and max(map(len, texts)) > 1500  # short and long
    assert len(set(texts)) == len(texts)
    first = load_calibration_texts(None, 24)
    assert len(first) == 24 and len({r["kind"].split("_")[0] for r in rows[:24]}) >= 6  # interleaved by kind
    assert load_calibration_texts(None, 10_000) == texts  # never repeats a sample to reach n


def test_user_calibration_files_replace_the_bundled_set(tmp_path):
    j = tmp_path / "c.jsonl"
    j.write_text('{"text": "first sample"}\n\n{"text": "second", "source": "x"}\n', encoding="utf-8")
    assert load_calibration_texts(j, 5) == ["first sample", "second"]
    assert load_calibration_texts(str(j), 1) == ["first sample"]
    t = tmp_path / "c.txt"
    t.write_text("para one\nstill one\n\n  \npara two\n\n\n中文段落\n", encoding="utf-8")
    assert load_calibration_texts(t, 10) == ["para one\nstill one", "para two", "中文段落"]


@pytest.mark.parametrize("name,content,match", [
    ("missing.jsonl", None, "does not exist"),
    ("empty.jsonl", "", "no samples"),
    ("blank.txt", "\n\n   \n", "no samples"),
    ("bad.jsonl", '{"text": "ok"}\n{"prompt": "no text field"}\n', "line 2"),
    ("notjson.jsonl", "plain text\n", "line 1"),
    ("data.csv", "a,b\n", "unknown format"),
])
def test_bad_calibration_files_are_user_errors(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=match):
        load_calibration_texts(path, 8)


def test_calibration_is_packed_into_rows_of_calib_seq_len(model_dir):
    tokenizer = quantize.load_tokenizer(model_dir)
    spec = BuildSpec(model="m", precision="fp8", calib_size=40, calib_seq_len=16)
    texts = quantize.load_calibration_texts(None, 40)
    batches = quantize.calibration_batches(texts, tokenizer, spec, "cpu")
    tokens = sum(len(tokenizer(t, truncation=True, max_length=16)["input_ids"]) + 1 for t in texts)  # + EOS each
    assert all(b.shape[-1] <= 16 for b in batches) and sum(b.numel() for b in batches) >= tokens - 1
    assert len(batches) <= 2 and max(b.shape[0] for b in batches) > 1  # full rows share one forward, then the tail