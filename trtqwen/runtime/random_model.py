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
PRESETS = {"qwen2.5-7b": QWEN25_7B, "small": SMALL}


def random_model(cfg: ModelConfig, int4: bool = False, device="cuda", dtype=torch.bfloat16, max_positions=4096,
                 std: float = 0.02, tp: int = 1, rank: int = 0, cls: type[Qwen2Model] = Qwen2Model) -> Qwen2Model:
    """Normal(0, std) weights; int4: random signed 4-bit values with group-128 scales in Int4Linear.

    tp, rank: that rank's shard (cfg.shard(tp) dims) of the very same model: every full tensor is drawn from a
    seed of its own and then sliced, so the ranks of any TP size together are exactly the TP 1 model.
    """
    if int4 and tp > 1:
        raise ValueError("random int4 shards are not supported: use tp=1 for int4")
    g = torch.Generator(device=device)
    seeds = iter(range(1 << 20))
    shard = cfg.shard(tp)

    def w(*shape):
        g.manual_seed(next(seeds))
        return torch.empty(*shape, device=device, dtype=dtype).normal_(0, std, generator=g)

    def rows(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """This rank's slice of each part (along dim 0) of a fused tensor, e.g. [q; k; v] → [q_r; k_r; v_r]."""
        parts = t.split(sizes)
        # fewer KV heads than ranks: each rank holds a copy of one (ModelConfig.shard)
        ks = [min(tp, max(1, p.shape[0] // cfg.head_dim)) for p in parts]
        return torch.cat([p.chunk(k)[rank * k // tp] for p, k in zip(parts, ks)]).contiguous()

    def lin(out, inp, split=None, along_in=False, bias=False):
        weight, b = w(out, inp), (w(out) if bias else None)
        if not int4:
            if along_in:  # row-parallel: the rank's input columns
                return Linear(weight.chunk(tp, dim=1)[rank].contiguous(), b)
            return Linear(rows(weight, split or [out]), None if b is None else rows(b, split or [out]))
        g.manual_seed(next(seeds))
        q = torch.randint(-8, 8, (out, inp), device=device, dtype=torch.int8, generator=g)
        scales = torch.rand(out, inp // 128, device=device, generator=g) * 0.004 + 0.001
        return Int4Linear(q, scales, 128, b, torch.ones(inp, device=device, dtype=dtype))

    def vocab(t: torch.Tensor) -> torch.Tensor:  # padded to a multiple of TP, as TensorRT-LLM does
        padded = torch.nn.functional.pad(t, (0, 0, 0, shard.vocab_size * tp - t.shape[0]))
        return padded.chunk(tp)[rank].contiguous()

    H, I, qkv = cfg.hidden_size, cfg.intermediate_size, [cfg.q_size, cfg.kv_size, cfg.kv_size]
    layers = [LayerWeights(ln1=torch.ones(H, device=device, dtype=dtype), qkv=lin(sum(qkv), H, qkv, bias=True),
                           o=lin(H, cfg.q_size, along_in=True), ln2=torch.ones(H, device=device, dtype=dtype),
                           gate=lin(I, H), up=lin(I, H), down=lin(H, I, along_in=True))
              for _ in range(cfg.num_layers)]
    return cls(shard, vocab(w(cfg.vocab_size, H)), layers, torch.ones(H, device=device, dtype=dtype),
               Linear(vocab(w(cfg.vocab_size, H))), max_positions)
