"""The planner reproduces the published/derived numbers (FACTS §2, §3) and refuses what cannot work."""

import json

import pytest

from trtqwen.errors import UserError
from trtqwen.build.hardware import PROFILES, get_profile
from trtqwen.build.plan import (calibration_peak_bytes, kv_bytes_per_token, make_plan, read_model_shape,
                                recommended_max_batch_size, weight_bytes)
from trtqwen.build.spec import BuildSpec, KvDtype, Precision
from trtqwen.shape import QWEN25_7B, ModelShape

R4090D = get_profile("rtx4090d")


def plan(precision=Precision.INT4_AWQ, gpu=R4090D, shape=QWEN25_7B, prompt_len=1024, **spec):
    return make_plan(shape, gpu, BuildSpec("Qwen/Qwen2.5-7B-Instruct", precision, **spec), prompt_len)


def within(value, target, rel):
    return abs(value - target) <= rel * target


def test_qwen25_7b_parameter_count_and_bf16_size():
    assert within(QWEN25_7B.total_params, 7.615e9, 0.001)
    assert within(QWEN25_7B.non_embedding_params, 7.07e9, 0.005)
    assert within(weight_bytes(QWEN25_7B, Precision.BF16), 15.23e9, 0.001)


def test_kv_bytes_per_token():
    assert kv_bytes_per_token(QWEN25_7B) == 57_344
    assert kv_bytes_per_token(QWEN25_7B, KvDtype.INT8) == 28_672
    assert plan(Precision.BF16, tp=2).kv_bytes_per_token_per_gpu == 28_672


@pytest.mark.parametrize(
    "precision,ceiling",
    [(Precision.BF16, 71), (Precision.INT8_SQ, 132), (Precision.FP8, 132), (Precision.INT8_WO, 132), (Precision.INT4_AWQ, 226)],
)
def test_4090d_batch1_decode_ceilings_within_3_percent(precision, ceiling):
    p = plan(precision, tp=1)
    assert within(p.decode_ceiling_tok_s, ceiling, 0.03)
    assert 0.6 * ceiling < p.decode_estimate_tok_s < ceiling


def test_prefill_estimate_in_published_range():
    p = plan(Precision.BF16, prompt_len=1024)
    assert 0.10 < p.ttft_estimate_s < 0.20  # FACTS §3: ~130–170 ms for a 1K prompt in BF16


def test_memory_budget_adds_up_and_stays_under_the_card():
    for precision in (Precision.BF16, Precision.INT8_SQ, Precision.INT4_AWQ):
        p = plan(precision)
        assert p.fits
        assert p.predicted_peak_bytes_per_gpu < R4090D.memory_bytes
        assert p.kv_tokens * p.kv_bytes_per_token_per_gpu <= p.kv_cache_bytes_per_gpu
        assert p.concurrent_sequences == p.kv_tokens // p.max_seq_len
    # smaller weights leave more room for KV
    assert (plan(Precision.INT4_AWQ).kv_tokens
            > plan(Precision.INT8_SQ).kv_tokens
            > plan(Precision.BF16).kv_tokens)
    assert plan(Precision.BF16).concurrent_sequences >= 5


def test_tp_over_pcie_without_p2p_costs_time_and_says_so():
    p1 = plan(Precision.BF16, tp=1)
    p2 = plan(Precision.BF16, tp=2)
    assert p1.allreduce_per_decode_step_s == 0
    assert p2.allreduce_per_decode_step_s > 1e-3  # 56 all-reduces through host memory
    assert p2.weight_bytes_per_gpu == pytest.approx(p1.weight_bytes_per_gpu / 2)
    assert any("peer-to-peer" in n for n in p2.notes)
    nvlink = plan(Precision.BF16, get_profile("h100"), tp=2)
    assert nvlink.allreduce_per_decode_step_s < p2.allreduce_per_decode_step_s


def test_does_not_fit_says_why():
    small = ModelShape(152064, 8192, 80, 64, 8, 128, 29568, 32768, name="72B-like")
    p = plan(Precision.BF16, shape=small)
    assert not p.fits and "exceed" in p.reasons[0] and p.suggested_build == ""


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(tp=3), "--tp 1, 2 or 4"),
        (dict(precision=Precision.FP8, gpu="a100-80g"), "FP8"),
        (dict(kv_cache_dtype=KvDtype.FP8, gpu="a100-40g"), "FP8"),
        (dict(max_seq_len=40000), "32768"),
        (dict(prompt_len=0), "prompt length"),
    ],
)
def test_invalid_combinations(kwargs, needle):
    gpu = get_profile(kwargs.pop("gpu", "rtx4090d"))
    with pytest.raises(UserError) as e:
        plan(gpu=gpu, **kwargs)
    assert needle in str(e.value)


def test_tp_must_divide_kv_heads():
    two_kv = ModelShape(151936, 896, 24, 14, 2, 64, 4864, 32768)  # Qwen2.5-0.5B
    with pytest.raises(UserError, match="does not divide"):
        plan(Precision.BF16, shape=two_kv, tp=4)


def test_model_shape_from_hf_config(tmp_path):
    cfg = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064, "hidden_size": 3584, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
           "max_position_embeddings": 32768, "tie_word_embeddings": False, "rope_theta": 1e6}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = read_model_shape(tmp_path)
    assert shape.total_params == QWEN25_7B.total_params and shape == read_model_shape(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(UserError, match="Qwen2ForCausalLM"):
        read_model_shape(tmp_path)
    with pytest.raises(UserError, match="no config.json"):
        read_model_shape(tmp_path / "missing")


def test_every_profile_plans_int4():
    for name, gpu in PROFILES.items():
        p = plan(Precision.INT4_AWQ, gpu)
        assert p.fits, name
        assert 1 <= recommended_max_batch_size(p) <= 64


@pytest.mark.parametrize("precision,measured_gib", [(Precision.INT4_AWQ, 17.04), (Precision.INT8_SQ, 16.63),
                                                    (Precision.FP8, 16.44)])
def test_calibration_peak_is_what_the_h200_measured_at_24_gb(precision, measured_gib):
    """The lent H200 capped at 24 GB calibrated a Qwen2.5-7B-shaped model at these peaks (docs/PERFORMANCE.md §1):
    a 4090D calibrates a 7B on its own, and the plan says so instead of the old 47 GB."""
    p = plan(precision)
    assert p.calibration_peak_bytes / 2**30 == pytest.approx(measured_gib, abs=0.05)
    assert p.calibration_peak_bytes < R4090D.memory_bytes and not any("calibration" in n for n in p.notes)
    assert json.loads(json.dumps(p.to_dict()))["precision"] == precision.value


def test_calibration_peak_only_for_calibrated_recipes_and_warns_when_it_cannot_fit():
    assert plan(Precision.BF16).calibration_peak_bytes is None and plan(Precision.INT4_WO).calibration_peak_bytes is None
    assert plan(Precision.BF16, kv_cache_dtype=KvDtype.FP8).calibration_peak_bytes is not None  # KV scales are calibrated
    big = ModelShape(152064, 5120, 48, 40, 8, 128, 13824, 32768, name="14B-like")  # 16-bit weights alone ≈ 29 GB
    assert calibration_peak_bytes(big, Precision.INT4_AWQ) > R4090D.memory_bytes
    assert any("calibration peaks" in n for n in plan(Precision.INT4_AWQ, shape=big).notes)
