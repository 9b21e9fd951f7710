"""Validation of HF checkpoints happens before any time is spent, with errors that say what to do."""

import json
import shutil

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from trtqwen.build import hf
from trtqwen.errors import UserError


@pytest.fixture(scope="module")
def small_hf(module_tmp):
    d = module_tmp("hf")
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=128, architectures=["Qwen2ForCausalLM"], torch_dtype="bfloat16")
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(d, safe_serialization=True, max_shard_size="200KB")
    (d / "tokenizer.json").write_text("{}")
    return d


def copy(src, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


def test_valid_sharded_checkpoint(small_hf):
    ck = hf.validate(small_hf)
    assert len(ck.weight_files) > 1  # sharded with an index
    assert ck.dtype == "float32" and ck.config["architectures"] == ["Qwen2ForCausalLM"]
    assert set(ck.fingerprints) >= set(ck.weight_files) | {"config.json"}


def test_fingerprint_changes_with_content_and_size(small_hf, tmp_path):
    m = copy(small_hf, tmp_path)
    f = m / hf.validate(m).weight_files[0]
    before = hf.fingerprint(f)
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    assert hf.fingerprint(f) != before
    f.write_bytes(bytes(data) + b"\0")
    assert len({before, hf.fingerprint(f)}) == 2


def test_missing_shard(small_hf, tmp_path):
    m = copy(small_hf, tmp_path)
    (m / hf.validate(m).weight_files[-1]).unlink()
    with pytest.raises(UserError, match="missing"):
        hf.validate(m)


def test_truncated_safetensors(small_hf, tmp_path):
    m = copy(small_hf, tmp_path)
    f = m / hf.validate(m).weight_files[0]
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        hf.validate(m)


def test_not_qwen2(small_hf, tmp_path):
    m = copy(small_hf, tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UserError, match="not Qwen2ForCausalLM"):
        hf.validate(m)


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_custom_code_refused(small_hf, tmp_path, name):
    m = copy(small_hf, tmp_path)
    f = m / name
    cfg = json.loads(f.read_text()) if f.is_file() else {}
    f.write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"}}))
    with pytest.raises(UserError, match=f"auto_map in {name}"):
        hf.validate(m)


def test_pytorch_bin_weights_refused(small_hf, tmp_path):
    m = copy(small_hf, tmp_path)
    for p in list(m.glob("*.safetensors*")):
        p.unlink()
    (m / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(UserError, match="safetensors") as e:
        hf.validate(m)
    assert "pytorch_model.bin" in str(e.value)


def test_no_tokenizer(small_hf, tmp_path):
    m = copy(small_hf, tmp_path)
    (m / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="tokenizer"):
        hf.validate(m)


def test_unknown_dtype(small_hf, tmp_path):
    m = copy(small_hf, tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "int3"}))
    with pytest.raises(UserError, match="dtype"):
        hf.validate(m)


def test_hub_unreachable_without_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hfhome" / "hub"))
    with pytest.raises(UserError, match="cannot reach the Hugging Face hub"):
        hf.fetch("Qwen/Qwen2.5-7B-Instruct")


def test_hub_id_detection(tmp_path):
    assert hf.is_hub_id("Qwen/Qwen2.5-7B-Instruct")
    assert not hf.is_hub_id(str(tmp_path))
    with pytest.raises(UserError, match="neither a local directory nor a hub id"):
        hf.fetch("not a model")
