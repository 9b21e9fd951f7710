"""The few layers Qwen2 needs: a linear that knows the checkpoint's quantization, RMSNorm, rotary embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_MAX = 448.0


def fake_quant_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).round().clamp(-128, 127) * scale


def fake_quant_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Each row (token) on its own scale, max|x| / 127, as TensorRT-LLM's quantize_per_token computes it."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / 127).clamp_min(1e-12).to(x.dtype)
    return (x / scale).round().clamp(-128, 127) * scale


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


class Linear(torch.nn.Module):
    """y = quant(x · pre_quant_scale) Wᵀ + b, weights already dequantized on load.

    Quantized activations (SmoothQuant INT8, FP8) are emulated with the checkpoint's static scales (or per token),
    so the reference computes what the engine's quantized GEMM computes, to rounding.
    """

    def __init__(self, weight, bias=None, pre_quant_scale=None, act_quant: str | None = None, act_scale=None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.pre_quant_scale = pre_quant_scale
        self.act_quant = act_quant
        self.act_scale = act_scale
        self.int4: tuple | None = None  # (q, scales, group) kept from an AWQ checkpoint for Int4Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        if self.act_quant == "int8":
            x = fake_quant_int8(x, self.act_scale)
        elif self.act_quant == "int8_token":
            x = fake_quant_int8_per_token(x)
        elif self.act_quant == "fp8":
            x = fake_quant_fp8(x, self.act_scale)
        return F.linear(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):  # move the plain-tensor scales along with .to(device/dtype)
        super()._apply(fn, recurse)
        for name in ("pre_quant_scale", "act_scale"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        return self


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda:  # one fused kernel that accumulates in fp32 (on CPU the op would round in bf16)
        return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def rope_tables(head_dim: int, max_pos: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    ang = torch.outer(torch.arange(max_pos, device=device, dtype=torch.float64), inv)
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotary (rotate halves), as Qwen2 and TensorRT-LLM's rope_gpt_neox do."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


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
            self.packed = torch._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8), self.INNER_K_TILES)
        else:
            self.packed = torch._convert_weight_to_int4pack_for_cpu(u, self.INNER_K_TILES)
        s = scales.t().to(dtype)
        self.scales_zeros = torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()  # [in/group, out, 2]
        self.bias = None if bias is None else bias.to(dtype)
        self.pre_quant_scale = None if pre_quant_scale is None else pre_quant_scale.to(dtype)

    @staticmethod
    def supported(q: torch.Tensor, group_size: int) -> bool:
        out, inp = q.shape
        return group_size in (32, 64, 128, 256) and inp % (Int4Linear.INNER_K_TILES * 16) == 0 and out % 8 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        flat = x.reshape(-1, self.in_features)
        mm = torch._weight_int4pack_mm if flat.is_cuda else torch._weight_int4pack_mm_for_cpu
        y = mm(flat, self.packed, self.group_size, self.scales_zeros).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
