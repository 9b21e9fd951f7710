"""W4A16 GEMM: y = x · dequant(W)ᵀ with INT4 weights dequantized in registers (Triton), or in torch without Triton.

Layout (one copy serves every M):
  packed  int32 [K/8, N]: word (r, n) holds u[k = 8r + i, n] in bits 4i..4i+3 (i = 0..7), u = q + 8 the unsigned
          nibble of the signed 4-bit value q, so w = (u - 8) · scale. A tile's words are rows of N contiguous int32:
          the kernel's loads are coalesced along N, and each word unpacks into 8 consecutive K rows.
  scales  [K/group, N] in the activation dtype (AWQ is symmetric: no zero point besides the 8).

The Triton kernel runs on CUDA (or on CPU tensors under TRITON_INTERPRET=1); elsewhere w4a16_mm dequantizes with
torch and multiplies: the same math (bf16 (u - 8) · scale, fp32 accumulation). w4a16_mm is a torch custom op, so
torch.compile keeps it opaque and CUDA graphs capture its single launch (no host sync, no allocation but y).
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path below
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pack(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit values q [N, K] (any int dtype, in -8..7) → int32 words [K/8, N]."""
    n, k = q.shape
    u = (q.t().to(torch.int32) + 8).reshape(k // 8, 8, n)
    words = u[:, 0].clone()
    for i in range(1, 8):
        words |= u[:, i] << (4 * i)  # nibble 7 sets bit 31: a negative int32, unpacked with a mask
    return words.contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 words [K/8, N] → unsigned nibbles u [K, N] (int32)."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32).view(1, 8, 1)
    return ((packed.unsqueeze(1) >> shifts) & 0xF).reshape(-1, packed.shape[1])


def dequantize(packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The weight the kernel computes with, transposed: [K, N] in the scales' dtype."""
    return (unpack(packed) - 8).to(scales.dtype) * scales.repeat_interleave(group_size, dim=0)


# (largest M, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)): a fixed set, so startup and graph capture
# compile at most one kernel per bucket and shape. Small M is bandwidth-bound: bytes in flight ≈ N · (stages - 1)
# · BLOCK_K / 2, whatever BLOCK_N, so those configs run deep pipelines; large M takes Hopper-sized MMA tiles.
CONFIGS = [
    (16, (16, 32, 128, 4, 6)),
    (32, (32, 64, 128, 4, 4)),
    (64, (64, 64, 128, 4, 4)),
    (128, (64, 128, 64, 4, 4)),
    (256, (128, 128, 64, 8, 3)),
    (None, (128, 128, 64, 8, 4)),
]


def config(m: int, group_size: int) -> tuple[int, int, int, int, int]:
    bm, bn, bk, warps, stages = next(c for top, c in CONFIGS if top is None or m <= top)
    return bm, bn, min(bk, group_size), warps, stages  # a K tile never straddles two scale groups


if triton is not None:
    @triton.jit(do_not_specialize=["M"])
    def _w4a16_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, UPCAST: tl.constexpr):
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tiles_n  # programs walk GROUP_M row tiles per column tile: weight tiles stay in L2
        first_m = (pid // per_group) * GROUP_M
        rows = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % rows
        pid_n = (pid % per_group) // rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
        w_ptrs = w_ptr + tl.arange(0, BLOCK_K // 8)[:, None] * N + offs_n[None, :]
        s_ptrs = s_ptr + offs_n
        shifts = (tl.arange(0, 8) * 4)[None, :, None]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            words = tl.load(w_ptrs, mask=mask_n[None, :], other=0)
            u = tl.reshape((words[:, None, :] >> shifts) & 0xF, (BLOCK_K, BLOCK_N))  # row 8r + i: word r, nibble i
            scale = tl.load(s_ptrs + (k // GROUP) * N, mask=mask_n, other=0.0)
            w = ((u - 8).to(tl.float32) * scale.to(tl.float32)[None, :]).to(x.dtype)  # q·s rounded once, as torch
            if UPCAST:  # the interpreter multiplies bf16 as raw bits: the same values in fp32 (exact) for it
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
            else:
                acc = tl.dot(x, w, acc)
            x_ptrs += BLOCK_K
            w_ptrs += (BLOCK_K // 8) * N
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def triton_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int,
              cfg: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """The Triton kernel itself: x [M, K] fp16/bf16 with unit stride along K; cfg: CONFIGS' for M unless given."""
    m, k = x.shape
    n = packed.shape[1]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    bm, bn, bk, warps, stages = cfg or config(m, group_size)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # Triton launches on the current GPU
        _w4a16_kernel[grid](x, packed, scales, y, m, n, k, x.stride(0), y.stride(0), GROUP=group_size,
                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, UPCAST=INTERPRET,
                            num_warps=warps, num_stages=stages)
    return y


def torch_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    return torch.matmul(x, dequantize(packed, scales, group_size))


def uses_triton(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or INTERPRET) and x.dtype in (torch.float16, torch.bfloat16)


@torch.library.custom_op("trtqwen::w4a16_mm", mutates_args=())
def w4a16_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int,
             tinygemm: torch.Tensor | None = None, scales_zeros: torch.Tensor | None = None,
             tinygemm_max_m: int = 0) -> torch.Tensor:
    """x [M, K] · dequant(packed, scales)ᵀ → [M, N] in x's dtype; M ≤ tinygemm_max_m on tinygemm's copy if given.

    The choice by M is made here, inside the opaque op, so torch.compile keeps one graph for every batch size."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    if tinygemm is not None and x.shape[0] <= tinygemm_max_m:
        return torch._weight_int4pack_mm(x, tinygemm, group_size, scales_zeros)
    return (triton_mm if uses_triton(x) else torch_mm)(x, packed, scales, group_size)


@w4a16_mm.register_fake
def _(x, packed, scales, group_size, tinygemm=None, scales_zeros=None, tinygemm_max_m=0):
    return x.new_empty(x.shape[0], packed.shape[1])
