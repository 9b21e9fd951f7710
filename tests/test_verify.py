"""`trtqwen verify` passes honest checkpoints of every precision and TP, and catches real conversion bugs."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from trtqwen.cli import app
from trtqwen.errors import UserError
from trtqwen.runtime import LLMEngine, SamplingParams, load_model
from trtqwen.build.verify import thresholds_for, verify


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_bf16_checkpoint_matches_hf_logits_at_every_tp(exported, tiny_tp_dir, tp):
    r = verify(exported("bf16", tp), tiny_tp_dir)
    assert r.passed and r.cosine_min > 0.9999 and r.top1_agreement > 0.99


@pytest.mark.parametrize("precision,tp", [("fp16", 2), ("int8_wo", 2), ("int4_wo", 4), ("int8_sq", 4), ("fp8", 2),
                                          ("int4_awq", 4), ("int4_awq", 1)])
def test_quantized_checkpoints_within_thresholds(exported, tiny_tp_dir, precision, tp):
    r = verify(exported(precision, tp), tiny_tp_dir)
    assert r.passed, r.failures
    assert r.thresholds["table"] == "random-weights" and r.ppl_reference > 1000  # "auto" saw flat logits
    if precision != "fp16":
        assert r.cosine_mean < 0.99999  # quantization really happened (and is emulated)


def test_kv_cache_quantization_is_emulated(exported, tiny_tp_dir):
    r = verify(exported("bf16", 1, "int8"), tiny_tp_dir)
    assert r.passed and r.kv_cache_quant_algo == "INT8" and r.cosine_mean < 0.999999


def corrupt(src, dst, fn):
    shutil.copytree(src, dst)
    fn(dst)
    return dst


def swap_q_and_k(d):
    cfg = json.loads((d / "config.json").read_text())
    tp = cfg["mapping"]["tp_size"]
    q = cfg["num_attention_heads"] * cfg["head_size"] // tp
    kv = cfg["num_key_value_heads"] * cfg["head_size"] // tp
    for f in d.glob("rank*.safetensors"):
        t = load_file(f)
        for layer in range(cfg["num_hidden_layers"]):
            name = f"transformer.layers.{layer}.attention.qkv.weight"
            w = t[name]
            nq, nk = w.shape[0] * q // (q + 2 * kv), w.shape[0] * kv // (q + 2 * kv)  # int4 packs 2 rows per byte
            qk = w.clone()
            qk[:nk], qk[nq : nq + nk] = w[nq : nq + nk], w[:nk]
            t[name] = qk
        save_file(t, f)


def double_a_scale(d):
    for f in d.glob("rank*.safetensors"):
        t = load_file(f)
        name = next(k for k in t if k.endswith(("layers.0.mlp.proj.weights_scaling_factor",
                                                 "layers.0.mlp.proj.per_channel_scale")))
        t[name] = t[name] * 2
        save_file(t, f)


def swap_shards(d):
    (d / "rank0.safetensors").rename(d / "tmp")
    (d / "rank1.safetensors").rename(d / "rank0.safetensors")
    (d / "tmp").rename(d / "rank1.safetensors")


@pytest.mark.parametrize(
    "precision,tp,fn",
    [("bf16", 1, swap_q_and_k), ("int4_awq", 1, swap_q_and_k), ("int8_sq", 2, double_a_scale),
     ("int4_awq", 2, double_a_scale), ("bf16", 2, swap_shards), ("int4_awq", 2, swap_shards)],
)
def test_corrupted_checkpoints_fail(exported, tiny_tp_dir, tmp_path, precision, tp, fn):
    bad = corrupt(exported(precision, tp), tmp_path / "bad", fn)
    r = verify(bad, tiny_tp_dir)
    assert not r.passed and r.failures


def test_cli_exit_codes(exported, tiny_tp_dir, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(exported("bf16", 2)), "--against", str(tiny_tp_dir)])
    assert ok.exit_code == 0 and "PASS" in ok.output
    bad = corrupt(exported("bf16", 2), tmp_path / "bad", swap_shards)
    r = runner.invoke(app, ["verify", str(bad), "--against", str(tiny_tp_dir), "--json"])
    assert r.exit_code == 1 and json.loads(r.output)["passed"] is False


def test_trained_thresholds_are_the_stricter_table(exported, tiny_tp_dir):
    """Forcing the trained-weights table on a random tiny AWQ export fails it: top-1 among near-ties is a toss-up."""
    r = verify(exported("int4_awq", 1), tiny_tp_dir, thresholds="trained")
    assert r.thresholds["table"] == "trained" and not r.passed and any("top-1" in f for f in r.failures)
    with pytest.raises(UserError, match="threshold table"):
        verify(exported("bf16", 1), tiny_tp_dir, thresholds="strict")


def test_bad_checkpoints(exported, tmp_path):
    src = exported("bf16", 2)
    missing = corrupt(src, tmp_path / "missing", lambda d: (d / "rank1.safetensors").unlink())
    with pytest.raises(UserError, match="rank file"):
        load_model(missing)

    def claim_tp4(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["mapping"].update(world_size=4, tp_size=4)
        (d / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(UserError, match="world_size 4"):
        load_model(corrupt(src, tmp_path / "tp", claim_tp4))

    def make_llama(d):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "architecture": "LlamaForCausalLM"}))

    with pytest.raises(UserError, match="not Qwen2ForCausalLM"):
        load_model(corrupt(src, tmp_path / "llama", make_llama))

    def drop_rotary(d):
        cfg = json.loads((d / "config.json").read_text())
        del cfg["rotary_base"]
        (d / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(UserError, match="rotary_base"):
        load_model(corrupt(src, tmp_path / "norope", drop_rotary))
    with pytest.raises(UserError, match="no config.json"):
        verify(tmp_path / "nothing")


def test_prompt_longer_than_positions(exported):
    model = load_model(exported("bf16", 1), max_positions=64)
    with pytest.raises(UserError, match="does not fit"):
        LLMEngine(model, max_slots=1).add(list(range(100)), SamplingParams())


def test_tiny_greedy_matches_transformers_generate(tiny_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32).eval()
    ours = LLMEngine(load_model(tiny_dir, dtype=torch.float32), max_slots=2, max_seq_len=256)
    prompts = [[9707, 1879, 0], [108386, 3837, 99489, 1773, 151645, 198]]
    outs = ours.generate(prompts, SamplingParams(max_tokens=16, top_k=1, end_id=None))
    for p, r in zip(prompts, outs):
        want = ref.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=151643)
        assert r.output == want[0, len(p):].tolist()


def test_trained_thresholds_are_stricter_than_random_weight_ones():
    from trtqwen.precision import PRECISIONS

    for precision, info in PRECISIONS.items():  # peaked trained logits: top-1 and cosine hold better
        assert info.trained[0] >= info.random_weights[0] and info.trained[1] >= info.random_weights[1], precision
        assert thresholds_for(precision, "FP8")["cosine_mean"] < thresholds_for(precision, None)["cosine_mean"]
