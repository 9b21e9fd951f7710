"""The embedded default: real Qwen2 architecture, real Qwen vocabulary and ChatML, loads offline, generates."""

import hashlib
import json

import pytest
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe
from transformers import AutoModelForCausalLM, AutoTokenizer

from trtqwen.errors import UserError
from trtqwen.qwen_tokenizer import QWEN2_PATTERN, ranks_file
from trtqwen.tiny import make_tiny

TEXTS = ["Hello world! The quick brown fox.", "你好，世界。人工智能正在改变我们的生活。", "日本語のテキストも大丈夫です。",
         "def f(x):\n    return x ** 2\n\n\n", "   spaces\t\ttabs\n\nnewlines  ", '{"a": [1, 2.5, null], "b": "ü"}']


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(tiny, trust_remote_code=False)


def test_special_token_ids(tok):
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "<|file_sep|>"])
    assert ids == [151643, 151644, 151645, 151657, 151664]
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643 and tok.bos_token_id is None
    assert len(tok) == 151665


def test_chat_template_is_chatml(tok):
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    default = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert default.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_ids_match_tiktoken_and_round_trip(tok):
    enc = tiktoken.Encoding("q", pat_str=QWEN2_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(ranks_file())), special_tokens={})
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == enc.encode(text), text
        assert tok.decode(ids) == text
    assert tok("Hello world!")["input_ids"] == [9707, 1879, 0]  # Qwen2.5's real ids
    assert tok("<|im_start|>user")["input_ids"][0] == 151644


def test_architecture(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["vocab_size"] == 151936
    assert cfg["rope_theta"] == 1e6 and cfg["tie_word_embeddings"] is False
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    from safetensors import safe_open

    with safe_open(str(tiny / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.bias").abs().sum() > 0
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    for p in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{p}.bias" in keys
    assert "model.layers.0.self_attn.o_proj.bias" not in keys
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    assert not list(tiny.glob("*.bin"))


def test_loads_offline_and_generates(tiny, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(tiny, trust_remote_code=False, torch_dtype=torch.float32)
    ids = tok("你好", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=151643)
    assert out.shape[1] == ids.shape[1] + 5


def _weights_hash(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_seeded_and_idempotent(tiny, tmp_path):
    again = make_tiny(tmp_path / "again")
    assert _weights_hash(again) == _weights_hash(tiny)
    assert make_tiny(tmp_path / "again") == again  # second call reuses it
    other = make_tiny(tmp_path / "other", seed=1)
    assert _weights_hash(other) != _weights_hash(tiny)


def test_bad_input(tmp_path):
    with pytest.raises(UserError, match="unknown tiny preset"):
        make_tiny(tmp_path / "x", preset="huge")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--force"):
        make_tiny(tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"  # nothing lost
    assert not list(tmp_path.glob(".tmp-*"))


def test_cli_tiny_bad_input(tmp_path):
    from typer.testing import CliRunner

    from trtqwen.cli import app

    r = CliRunner().invoke(app, ["tiny", "--out", str(tmp_path / "m"), "--preset", "nope"])
    assert r.exit_code == 2 and "unknown tiny preset" in r.output
