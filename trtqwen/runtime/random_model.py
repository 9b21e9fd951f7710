"""Models with random weights in the runtime's own layout: GPU benchmarks and GPU tests without a checkpoint on disk."""

from __future__ import annotations

import torch

from trtqwen.runtime.config import ModelConfig
from trtqwen.runtime.layers import Int4Linear, Linear
from trtqwen.runtime.model import LayerWeights, Qwen2Model

QWEN25_7B = ModelConfig(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                        intermediate_size=18944, norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768)
SMALL = ModelConfig(vocab_size=4096, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                    intermediate_size=512, norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096)


def random_model(cfg: ModelConfig, int4: bool = False, device="cuda", dtype=torch.bfloat16, max_positions=4096,
                 std: float = 0.02) -> Qwen2Model:
    """Normal(0, std) weights; int4: random signed 4-bit values with group-128 scales in Int4Linear."""
    g = torch.Generator(device=device).manual_seed(0)

    def w(*shape):
        return torch.empty(*shape, device=device, dtype=dtype).normal_(0, std, generator=g)

    def lin(out, inp, bias=False):
        b = w(out) if bias else None
        if not int4:
            return Linear(w(out, inp), b)
        q = torch.randint(-8, 8, (out, inp), device=device, dtype=torch.int8, generator=g)
        scales = torch.rand(out, inp // 128, device=device, generator=g) * 0.004 + 0.001
        return Int4Linear(q, scales, 128, b, torch.ones(inp, device=device, dtype=dtype))

    H, I, qkv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size + 2 * cfg.kv_size
    layers = [LayerWeights(ln1=torch.ones(H, device=device, dtype=dtype), qkv=lin(qkv, H, bias=True),
                           o=lin(H, cfg.q_size), ln2=torch.ones(H, device=device, dtype=dtype),
                           gate=lin(I, H), up=lin(I, H), down=lin(H, I))
              for _ in range(cfg.num_layers)]
    return Qwen2Model(cfg, w(cfg.vocab_size, H), layers, torch.ones(H, device=device, dtype=dtype),
                      Linear(w(cfg.vocab_size, H)), max_positions)
