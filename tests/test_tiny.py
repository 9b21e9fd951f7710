"""The embedded default: real Qwen2 architecture, real Qwen vocabulary and ChatML, loads offline, generates."""

import hashlib
import json
import socket

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from trtqwen.errors import UserError
from trtqwen.qwen_tokenizer import ADDED_TOKENS, tiktoken_encoding
from trtqwen.build.tiny import PRESETS, make_tiny

TEXTS = ["Hello world! The quick brown fox.", "你好，世界。人工智能正在改变我们的生活。", "日本語のテキストも大丈夫です。",
         "def f(x):\n    return x ** 2\n\n\n", "   spaces\t\ttabs\n\nnewlines  \n \n", '{"a": [1, 2.5, null], "b": "ü"}',
         "I'm sure they'LL go; 1234567 + 0.5 = ?", "café naïve 😀 한국어 Ünïcödé", "for (int i = 0; i < n; ++i) {\r\n\tx[i]++;\r\n}"]
# Qwen2.5's added tokens, ids 151643..151664 in this order.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
            "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
            "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
            "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every test here runs with the hub off and no sockets: nothing may be downloaded."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir, trust_remote_code=False)


def test_special_token_ids(tok):
    assert [t for t, _ in ADDED_TOKENS] == SPECIALS
    assert tok.convert_tokens_to_ids(SPECIALS) == list(range(151643, 151665))
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643 and tok.bos_token_id is None
    assert len(tok) == 151665 and type(tok).__name__ == "Qwen2TokenizerFast"
    assert tok("<|im_start|>user\nhi<|im_end|>")["input_ids"] == [151644, 872, 198, 6023, 151645]
    # As in Qwen2.5: <tool_call> and the FIM tokens are not "special", so decoding keeps them.
    ids = tok("<tool_call>x</tool_call><|im_end|><|endoftext|>")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<tool_call>x</tool_call>"


def test_chat_template_is_qwen25_chatml(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs, tokenize=False).endswith("你好<|im_end|>\n")
    default = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                      tokenize=False)
    assert default == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                       "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n")
    tool = {"type": "function", "function": {"name": "now", "description": "time", "parameters": {"type": "object",
                                                                                                  "properties": {}}}}
    with_tools = tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[tool], tokenize=False,
                                         add_generation_prompt=True)
    assert "# Tools" in with_tools and '"name": "now"' in with_tools and "<tool_call>" in with_tools
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert ids[0] == 151644 and ids[-3:] == [151644, 77091, 198]  # <|im_start|>assistant\n


def test_ids_match_tiktoken_and_round_trip(tok, tiny_dir):
    enc = tiktoken_encoding()
    slow = AutoTokenizer.from_pretrained(tiny_dir, use_fast=False)  # vocab.json + merges.txt
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == enc.encode(text), text
        assert slow(text)["input_ids"] == ids, text
        assert tok.decode(ids) == text
    assert tok("Hello world!")["input_ids"] == [9707, 1879, 0]  # Qwen2.5's real ids
    assert tok("cafe\u0301")["input_ids"] == tok("café")["input_ids"]  # NFC first, as Qwen2.5's tokenizer does


def test_architecture(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    assert cfg["vocab_size"] == 151936 and cfg["rope_theta"] == 1e6 and cfg["rms_norm_eps"] == 1e-6
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "bfloat16"
    assert cfg["bos_token_id"] == 151643 and cfg["eos_token_id"] == 151645
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert cfg["num_attention_heads"] * cfg["head_dim"] % 128 == 0 and cfg["intermediate_size"] % 128 == 0  # AWQ TP 1
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["pad_token_id"] == 151643
    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for p in ("q_proj", "k_proj", "v_proj"):
            assert f.get_tensor(f"model.layers.0.self_attn.{p}.bias").abs().sum() > 0
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
        assert not torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))
    assert "model.layers.0.self_attn.o_proj.bias" not in keys and "model.layers.0.mlp.up_proj.bias" not in keys
    assert not list(tiny_dir.glob("*.bin")) and not list(tiny_dir.glob("*.pt"))


def test_loads_offline_and_generates(tiny_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, trust_remote_code=False, torch_dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
                                  return_tensors="pt")
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert torch.isfinite(logits).all() and logits.std() > 0.1  # not degenerate
    out = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5, pad_token_id=151643)
    assert out.shape[1] == ids.shape[1] + 5


def test_tiny_tp_shapes_shard_at_tp_2_and_4(tiny_tp_dir):
    cfg = json.loads((tiny_tp_dir / "config.json").read_text())
    assert {k: cfg[k] for k in PRESETS["tiny-tp"]} == PRESETS["tiny-tp"]
    h, q, kv, inter = cfg["hidden_size"], cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"], 1536
    for tp in (2, 4):  # FACTS §1: AWQ group 128 per rank; SmoothQuant needs 4 KV heads at TP 4
        assert (q // tp) % 128 == 0 and (inter // tp) % 128 == 0 and kv % tp == 0
    with safe_open(str(tiny_tp_dir / "model.safetensors"), "pt") as f:
        shape = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shape["model.embed_tokens.weight"] == shape["lm_head.weight"] == (151936, h)
    assert shape["model.layers.1.self_attn.q_proj.weight"] == (q, h)
    assert shape["model.layers.1.self_attn.k_proj.weight"] == (kv * 128, h)
    assert shape["model.layers.1.self_attn.k_proj.bias"] == (kv * 128,)
    assert shape["model.layers.1.self_attn.o_proj.weight"] == (h, q)
    assert shape["model.layers.1.mlp.gate_proj.weight"] == (inter, h)
    assert shape["model.layers.1.mlp.down_proj.weight"] == (h, inter)
    assert "model.layers.2.input_layernorm.weight" not in shape


def _weights_hash(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_seeded_idempotent_and_force(tiny_dir, tmp_path):
    again = make_tiny(tmp_path / "again")
    assert _weights_hash(again) == _weights_hash(tiny_dir)
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert make_tiny(tmp_path / "again") == again  # second call reuses it untouched
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="--force"):  # same dir, other seed: not silently replaced
        make_tiny(tmp_path / "again", seed=1)
    other = make_tiny(tmp_path / "again", seed=1, force=True)
    assert _weights_hash(other) != _weights_hash(tiny_dir)
    assert json.loads((other / "trtqwen_tiny.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temp or old dirs left


def test_bad_input(tmp_path):
    with pytest.raises(UserError, match="unknown tiny preset") as e:
        make_tiny(tmp_path / "x", preset="huge")
    assert "tiny, tiny-tp" in str(e.value)
    with pytest.raises(UserError, match="dtype"):
        make_tiny(tmp_path / "x", dtype="int3")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--force"):
        make_tiny(tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"  # nothing lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_cli_tiny_bad_input(tmp_path):
    from typer.testing import CliRunner

    from trtqwen.cli import app

    r = CliRunner().invoke(app, ["tiny", "--out", str(tmp_path / "m"), "--preset", "nope"])
    assert r.exit_code == 2 and "unknown tiny preset" in r.output
