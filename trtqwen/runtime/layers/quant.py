"""Fake-quantized activations: what the engine's quantized GEMMs and KV cache round to, computed in float."""

from __future__ import annotations

import torch

FP8_MAX = 448.0


def fake_quant_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).round().clamp(-128, 127) * scale


def fake_quant_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Each row (token) on its own scale, max|x| / 127, as TensorRT-LLM's quantize_per_token computes it."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / 127).clamp_min(1e-12).to(x.dtype)
    return (x / scale).round().clamp(-128, 127) * scale


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


def kv_quant(x: torch.Tensor, algo: str | None, scale: torch.Tensor | None) -> torch.Tensor:
    """What an INT8 / FP8 KV cache holds of x (checkpoint's kv_cache_quant_algo, per-layer scale)."""
    if algo == "INT8":
        return fake_quant_int8(x, scale)
    if algo == "FP8":
        return fake_quant_fp8(x, scale)
    return x
