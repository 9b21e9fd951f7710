"""The one attention over the slot-based KV cache: prefill (chunked or whole prompts) and (graphed) decode."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              rows: torch.Tensor, positions: torch.Tensor, window: tuple[int, int] | None,
              mask: torch.Tensor | None) -> torch.Tensor:
    """Write k, v [B, kv_heads, T, d] into the layer's cache [slots, kv_heads, S, d] at rows [B] × positions [B, T],
    then attend q [B, heads, T, d] → [B, T, heads · d].

    window (first row, length): the cache rows first..first+B-1 and positions 0..length-1 q attends to; None: only k, v themselves (whole fresh prompts,
    already what the cache holds). mask None means plainly causal (the flash kernels).
    """
    B, _, T, _ = q.shape
    k_cache[rows.view(B, 1), :, positions] = k.transpose(1, 2)
    v_cache[rows.view(B, 1), :, positions] = v.transpose(1, 2)
    if window is not None:
        (first, length) = window
        k, v = k_cache[first : first + B, :, :length], v_cache[first : first + B, :, :length]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    return out.transpose(1, 2).reshape(B, T, -1)
