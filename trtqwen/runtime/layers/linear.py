"""Linear layers that know the checkpoint's quantization, and how tensor parallelism slices and merges them."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from trtqwen.runtime.layers import int4_triton, quant


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


TINYGEMM_MAX_M = "16"


class Int4Linear(torch.nn.Module):
    """Weight-only INT4 (AWQ groups) on a W4A16 GEMM that dequantizes in registers: a quarter of the weight bytes.

    q holds the checkpoint's signed 4-bit values [out, in]; scales [out, in/group]. Packed once at load into the one
    layout every batch size reads (int4_triton: int32 words of 8 nibbles along in, [in/8, out]; scales [in/g, out]):
    Triton on CUDA from GEMV-like decode to long prefills, the same math in torch on CPU.
    """

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, group_size: int, bias=None, pre_quant_scale=None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.register_buffer("packed", int4_triton.pack(q))
        self.register_buffer("scales", scales.t().to(dtype).contiguous())
        # Small decode batches on tinygemm (3× faster than our Triton kernel at 1-8 rows on an H200: bench/int4_kernel.py),
        # at the cost of a second int4 copy; TRTQWEN_INT4_TINYGEMM_MAX_M=0 keeps one copy and Triton for every M.
        self.tinygemm_max_m = int(os.environ.get("TRTQWEN_INT4_TINYGEMM_MAX_M", TINYGEMM_MAX_M)) if q.is_cuda else 0
        if self.in_features % 128 or self.out_features % 8:  # tinygemm's tiles
            self.tinygemm_max_m = 0
        tinygemm = scales_zeros = None
        if self.tinygemm_max_m:
            u = (q.to(torch.int32) + 8)
            tinygemm = torch._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8), 8)
            scales_zeros = torch.stack([self.scales, torch.zeros_like(self.scales)], -1).contiguous()
        self.register_buffer("tinygemm", tinygemm)
        self.register_buffer("scales_zeros", scales_zeros)
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        self.register_buffer("pre_quant_scale", None if pre_quant_scale is None else pre_quant_scale.to(dtype))

    @staticmethod
    def supported(q: torch.Tensor, group_size: int) -> bool:
        return group_size in (32, 64, 128, 256) and q.shape[1] % group_size == 0

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
        y = int4_triton.w4a16_mm(flat, self.packed, self.scales, self.group_size, self.tinygemm, self.scales_zeros,
                                 self.tinygemm_max_m)
        y = y.reshape(*x.shape[:-1], self.out_features)
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
