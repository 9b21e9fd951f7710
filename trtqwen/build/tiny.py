"""The embedded default model: a tiny Qwen2 with the real architecture, the real Qwen vocabulary, random weights."""

from __future__ import annotations

import json
from pathlib import Path

from trtqwen.errors import UserError
from trtqwen.files import publishing
from trtqwen.qwen_tokenizer import EOS_ID, PAD_ID, write_qwen_tokenizer

COMMON = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936,  # Qwen2.5's padding for small models
    rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
    max_position_embeddings=4096,  # enough for every test and the demo; keeps RoPE tables and max_seq_len small
    bos_token_id=PAD_ID, eos_token_id=EOS_ID, use_sliding_window=False, attention_dropout=0.0,
    initializer_range=0.08,  # ≈ 1/√hidden: attention matters, so conversion bugs show in the logits
)
PRESETS: dict[str, dict] = {
    # AWQ group 128 needs every row-parallel input dim to be a multiple of 128 (TP 1 here).
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=384),
    # Shards at TP 2 and 4 for AWQ (512/4 and 1536/4 are multiples of 128) and SmoothQuant (4 KV heads).
    "tiny-tp": dict(hidden_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=128,
                    intermediate_size=1536, initializer_range=0.04),
}
DTYPES = ("bfloat16", "float16", "float32")
RECORD = "trtqwen_tiny.json"
# Qwen2.5-Instruct's generation_config.json.
GENERATION = dict(bos_token_id=PAD_ID, eos_token_id=[EOS_ID, PAD_ID], pad_token_id=PAD_ID, do_sample=True,
                  temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         RECORD)


def _is_same(out: Path, record: dict) -> bool:
    """True when `out` is a complete tiny model made with the same preset, seed, dtype and overrides."""
    try:
        return all((out / f).is_file() for f in FILES) and json.loads((out / RECORD).read_text()) == record
    except (OSError, ValueError):
        return False


def make_tiny(out: Path, preset: str = "tiny", seed: int = 0, dtype: str = "bfloat16", overrides: dict | None = None,
              force: bool = False) -> Path:
    """Write the tiny model to `out` (HF layout, safetensors); reuse it when it is already there.

    Same preset/seed/dtype/overrides → byte-identical model.safetensors. The directory appears only when complete.
    """
    if preset not in PRESETS:
        raise UserError(f"unknown tiny preset {preset!r}", f"use one of: {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}", f"use one of: {', '.join(DTYPES)}")
    out = Path(out)
    record = {"preset": preset, "seed": seed, "dtype": dtype, "overrides": overrides or {}}
    if out.exists() and not force:
        if _is_same(out, record):
            return out
        if out.is_file() or any(out.iterdir()):
            raise UserError(f"{out} already exists and is not this tiny model ({preset}, seed {seed}, {dtype})",
                            "pass --force to overwrite it, or choose another --out")

    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    try:
        config = Qwen2Config(**{**COMMON, **PRESETS[preset], **(overrides or {})}, torch_dtype=dtype)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad tiny model overrides {overrides}: {e}") from e
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # HF init zeroes biases: give q/k/v biases values so their handling is tested
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.02)
    model = model.to(getattr(torch, dtype))

    with publishing(out) as tmp:  # --force: the old directory is replaced only once the new one is complete
        model.save_pretrained(tmp, safe_serialization=True)
        # transformers 4.57 writes "dtype"; Qwen2.5's own config.json (and older tools) say torch_dtype
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["torch_dtype"] = dtype
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        GenerationConfig(**GENERATION).save_pretrained(tmp)
        write_qwen_tokenizer(tmp, config.max_position_embeddings)
        (tmp / RECORD).write_text(json.dumps(record) + "\n")  # last: marks the directory complete
    return out
