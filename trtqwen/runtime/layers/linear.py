"""Linear layers that know the checkpoint's quantization, and how tensor parallelism slices and merges them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trtqwen.runtime.layers import quant


class Linear(torch.nn.Module):
    """y = quant(x · pre_quant_scale) Wᵀ + b, weights already dequantized on load.

    Quantized activations (SmoothQuant INT8, FP8) are emulated with the checkpoint's static scales (or per token),
    so the reference computes what the engine's quantized GEMM computes, to rounding.
    """

    def __init__(self, weight, bias=None, pre_quant_scale=None, act_quant: str | None = None, act_scale=None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.register_buffer("pre_quant_scale", pre_quant_scale)
        self.register_buffer("act_scale", act_scale)
        self.act_quant = act_quant
        self.int4: tuple | None = None  # (q, scales, group) kept from an AWQ checkpoint for Int4Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        if self.act_quant == "int8":
            x = quant.fake_quant_int8(x, self.act_scale)
        elif self.act_quant == "int8_token":
            x = quant.fake_quant_int8_per_token(x)  # looked up in quant at call time (tests swap it)
        elif self.act_quant == "fp8":
            x = quant.fake_quant_fp8(x, self.act_scale)
        return F.linear(x, self.weight, self.bias)


class Int4Linear(torch.nn.Module):
    """Weight-only INT4 (AWQ groups) on torch's int4 GEMM (tinygemm on CUDA): a quarter of the weight bytes.

    q holds the checkpoint's signed 4-bit values [out, in]; scales [out, in/group]. Packed once at load:
    the kernel computes (u - 8) · scale + zero with u = q + 8 unsigned and zero = 0 (AWQ is symmetric).
    """

    INNER_K_TILES = 8

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, group_size: int, bias=None, pre_quant_scale=None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        u = (q.to(torch.int32) + 8)
        if q.is_cuda:
            packed = torch._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8), self.INNER_K_TILES)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(u, self.INNER_K_TILES)
        s = scales.t().to(dtype)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous())  # [in/g, out, 2]
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        self.register_buffer("pre_quant_scale", None if pre_quant_scale is None else pre_quant_scale.to(dtype))

    @staticmethod
    def supported(q: torch.Tensor, group_size: int) -> bool:
        out, inp = q.shape
        return group_size in (32, 64, 128, 256) and inp % (Int4Linear.INNER_K_TILES * 16) == 0 and out % 8 == 0

    @classmethod
    def packing(cls, lin: Linear, device, dtype: torch.dtype) -> "Int4Linear | None":
        """lin's AWQ values packed on device (never moving its dequantized copy: a quarter of the memory), or None."""
        if getattr(lin, "int4", None) is None or not cls.supported(lin.int4[0], lin.int4[2]):
            return None
        q, scales, group = lin.int4
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return cls(q.to(device), scales.to(device), group, move(lin.bias), move(lin.pre_quant_scale), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        flat = x.reshape(-1, self.in_features)
        mm = torch._weight_int4pack_mm if flat.is_cuda else torch._weight_int4pack_mm_for_cpu
        y = mm(flat, self.packed, self.group_size, self.scales_zeros).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


# --- tensor parallelism: column-parallel linears split along out (fused qkv per part), row-parallel along in -------
def column_shard(t: torch.Tensor, sizes: list[int], tp: int, rank: int, head_dim: int) -> torch.Tensor:
    """This rank's slice of each part (along dim 0) of a fused tensor, e.g. [q; k; v] → [q_r; k_r; v_r].

    Fewer KV heads than ranks: each rank holds a copy of one (ModelShape.shard).
    """
    parts = t.split(sizes)
    ks = [min(tp, max(1, p.shape[0] // head_dim)) for p in parts]
    return torch.cat([p.chunk(k)[rank * k // tp] for p, k in zip(parts, ks)]).contiguous()


def row_shard(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return t.chunk(tp, dim=1)[rank].contiguous()


def merge_column(parts: list[torch.Tensor], split: list[int] | None = None) -> torch.Tensor:
    """Ranks' column shards → the full tensor; split: the full [q, k, v] sizes of a fused qkv ([q_r; k_r; v_r] each)."""
    if split:
        per = [s // len(parts) for s in split]
        parts = [torch.cat(p) for p in zip(*[x.split(per) for x in parts])]
    return torch.cat(parts)


def merge_row(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts, dim=1)
