"""Models with random weights in the runtime's own layout: GPU benchmarks and GPU tests without a checkpoint on disk."""

from __future__ import annotations

import torch

from trtqwen import shape
from trtqwen.runtime.layers.linear import Int4Linear, Linear, column_shard, row_shard
from trtqwen.runtime.models.qwen2 import DecoderLayer, Qwen2Model
from trtqwen.shape import ModelShape

QWEN25_7B = shape.QWEN25_7B
SMALL = ModelShape(vocab_size=4096, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                   intermediate_size=512, norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096, name="small")
PRESETS = {"qwen2.5-7b": QWEN25_7B, "small": SMALL}


def random_model(cfg: ModelShape, int4: bool = False, device="cuda", dtype=torch.bfloat16, max_positions=4096,
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

    def w(*size):
        g.manual_seed(next(seeds))
        return torch.empty(*size, device=device, dtype=dtype).normal_(0, std, generator=g)

    def lin(out, inp, split=None, along_in=False, bias=False):
        weight, b = w(out, inp), (w(out) if bias else None)
        if not int4:
            if along_in:  # row-parallel: the rank's input columns
                return Linear(row_shard(weight, tp, rank), b)
            cols = lambda t: column_shard(t, split or [out], tp, rank, cfg.head_dim)  # noqa: E731
            return Linear(cols(weight), None if b is None else cols(b))
        g.manual_seed(next(seeds))
        q = torch.randint(-8, 8, (out, inp), device=device, dtype=torch.int8, generator=g)
        scales = torch.rand(out, inp // 128, device=device, generator=g) * 0.004 + 0.001
        return Int4Linear(q, scales, 128, b, torch.ones(inp, device=device, dtype=dtype))

    def vocab(t: torch.Tensor) -> torch.Tensor:  # padded to a multiple of TP, as TensorRT-LLM does
        padded = torch.nn.functional.pad(t, (0, 0, 0, shard.vocab_size * tp - t.shape[0]))
        return padded.chunk(tp)[rank].contiguous()

    H, I, qkv = cfg.hidden_size, cfg.intermediate_size, [cfg.q_size, cfg.kv_size, cfg.kv_size]
    ones = lambda: torch.ones(H, device=device, dtype=dtype)  # noqa: E731
    layers = [DecoderLayer(shard, ln1=ones(), qkv=lin(sum(qkv), H, qkv, bias=True), o=lin(H, cfg.q_size, along_in=True),
                           ln2=ones(), gate=lin(I, H), up=lin(I, H), down=lin(H, I, along_in=True))
              for _ in range(cfg.num_layers)]
    return cls(shard, vocab(w(cfg.vocab_size, H)), layers, ones(), Linear(vocab(w(cfg.vocab_size, H))), max_positions)
