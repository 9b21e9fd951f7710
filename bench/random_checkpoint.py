"""A Qwen2.5-7B-shaped Hugging Face checkpoint with random bf16 weights and the real Qwen2.5 tokenizer.

`python bench/random_checkpoint.py OUT [--device cuda]`: what `trtqwen build` takes on a machine that cannot
download Qwen2.5-7B. Weights ~N(0, 0.02), made on the GPU layer by layer, one safetensors file per 4 layers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trtqwen.qwen_tokenizer import write_qwen_tokenizer  # noqa: E402

CONFIG = {  # Qwen/Qwen2.5-7B-Instruct's config.json shapes
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 152064,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False, "sliding_window": 131072,
    "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151645, "attention_dropout": 0.0,
    "initializer_range": 0.02, "use_cache": True,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    c, out = CONFIG, args.out
    out.mkdir(parents=True, exist_ok=True)
    write_qwen_tokenizer(out)  # first: it fails fast where tiktoken or blobfile is missing
    g = torch.Generator(device=args.device).manual_seed(0)
    w = lambda *s: torch.empty(*s, device=args.device, dtype=torch.bfloat16).normal_(0, 0.02, generator=g).cpu()  # noqa: E731
    ones = lambda n: torch.ones(n, dtype=torch.bfloat16)  # noqa: E731
    H, I, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    q, kv = H, c["num_key_value_heads"] * H // c["num_attention_heads"]
    index, part = {}, {}

    def flush(name: str) -> None:
        save_file(part, str(out / name), metadata={"format": "pt"})
        index.update({k: name for k in part})
        part.clear()

    part.update({"model.embed_tokens.weight": w(c["vocab_size"], H), "lm_head.weight": w(c["vocab_size"], H),
                 "model.norm.weight": ones(H)})
    flush("model-embed.safetensors")
    for i in range(L):
        p = f"model.layers.{i}."
        part.update({p + "input_layernorm.weight": ones(H), p + "post_attention_layernorm.weight": ones(H),
                     p + "self_attn.q_proj.weight": w(q, H), p + "self_attn.q_proj.bias": w(q),
                     p + "self_attn.k_proj.weight": w(kv, H), p + "self_attn.k_proj.bias": w(kv),
                     p + "self_attn.v_proj.weight": w(kv, H), p + "self_attn.v_proj.bias": w(kv),
                     p + "self_attn.o_proj.weight": w(H, q), p + "mlp.gate_proj.weight": w(I, H),
                     p + "mlp.up_proj.weight": w(I, H), p + "mlp.down_proj.weight": w(H, I)})
        if i % 4 == 3 or i == L - 1:
            flush(f"model-layers-{i // 4:02d}.safetensors")
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    (out / "config.json").write_text(json.dumps(c, indent=2))  # last: its presence marks a complete checkpoint
    print(f"wrote {out}: {len(index)} tensors")


if __name__ == "__main__":
    main()
