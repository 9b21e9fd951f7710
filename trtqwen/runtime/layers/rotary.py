"""GPT-NeoX rotary embedding (rotate halves), as Qwen2 and TensorRT-LLM's rope_gpt_neox do."""

from __future__ import annotations

import torch


class Rotary(torch.nn.Module):
    """cos/sin tables in float32 for positions 0..max_pos-1; .to(dtype) moves them but never casts them."""

    def __init__(self, head_dim: int, max_pos: int, theta: float, device=None):
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
        ang = torch.outer(torch.arange(max_pos, device=device, dtype=torch.float64), inv)
        emb = torch.cat([ang, ang], dim=-1)
        self.cos, self.sin = emb.cos().float(), emb.sin().float()

    def _apply(self, fn, recurse=True):
        device = fn(self.cos[:0]).device  # where this .to() moves tensors (an empty probe, never a copy)
        self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, T, d] for positions [B, T]: gathered once per forward, shared by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
