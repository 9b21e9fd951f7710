"""Qwen2 forward over a slot-based KV cache: prefill (chunked, any start position) and batched decode.

The cache is one tensor per K and V, [layers, slots, kv_heads, max_seq_len, head_dim]; a sequence owns a
slot for its lifetime, so decode reads the cache in place (no copies per step) and the batch is the
range of slots 0..n, which keeps shapes static for CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trtqwen.runtime.config import ModelConfig
from trtqwen.runtime.layers import Linear, apply_rope, fake_quant_fp8, fake_quant_int8, rms_norm, rope_tables


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    qkv: Linear
    o: Linear
    ln2: torch.Tensor
    gate: Linear  # activated branch (HF gate_proj, TensorRT-LLM mlp.fc)
    up: Linear  # HF up_proj, TensorRT-LLM mlp.gate
    down: Linear
    kv_scale: torch.Tensor | None = None  # KV-cache quantization scale (INT8/FP8 KV)


class KVCache:
    def __init__(self, cfg: ModelConfig, num_slots: int, max_seq_len: int, device, dtype):
        shape = (cfg.num_layers, num_slots, cfg.num_kv_heads, max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_slots, self.max_seq_len = num_slots, max_seq_len


class Qwen2Model(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, layers: list[LayerWeights], norm: torch.Tensor,
                 lm_head: Linear, max_positions: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.max_positions = max_positions or cfg.max_position_embeddings
        self.cos, self.sin = rope_tables(cfg.head_dim, self.max_positions, cfg.rope_theta, embed.device, torch.float32)

    @property
    def device(self):
        return self.embed.device

    @property
    def dtype(self):
        return self.embed.dtype

    def to(self, device=None, dtype=None):
        def move(t):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

        self.embed, self.norm = move(self.embed), move(self.norm)
        for lw in self.layers:
            lw.ln1, lw.ln2, lw.kv_scale = move(lw.ln1), move(lw.ln2), move(lw.kv_scale)
            for lin in (lw.qkv, lw.o, lw.gate, lw.up, lw.down):
                lin.to(device=device, dtype=dtype)
        self.lm_head.to(device=device, dtype=dtype)
        self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        return self

    def new_cache(self, num_slots: int, max_seq_len: int) -> KVCache:
        return KVCache(self.cfg, num_slots, max_seq_len, self.device, self.dtype)

    def _kv_quant(self, lw: LayerWeights, t: torch.Tensor) -> torch.Tensor:
        algo = self.cfg.kv_cache_quant_algo
        if algo == "INT8":
            return fake_quant_int8(t, lw.kv_scale)
        if algo == "FP8":
            return fake_quant_fp8(t, lw.kv_scale)
        return t

    def _qkv(self, lw: LayerWeights, h: torch.Tensor, positions: torch.Tensor):
        """h [B, T, H] → q [B, heads, T, d], k/v [B, kv_heads, T, d], rotary applied."""
        c = self.cfg
        B, T, _ = h.shape
        qkv = lw.qkv(h)
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(B, T, c.num_heads, c.head_dim).transpose(1, 2)
        k = k.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [B, 1, T, d]
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _mlp_and_out(self, lw: LayerWeights, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + lw.o(attn)
        h = rms_norm(x, lw.ln2, self.cfg.norm_eps)
        return x + lw.down(F.silu(lw.gate(h)) * lw.up(h))

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, cache: KVCache, slot: int, start: int = 0, all_logits: bool = False):
        """Run tokens [T] of one sequence at positions start..start+T-1, writing its slot's cache."""
        c = self.cfg
        T = tokens.shape[0]
        end = start + T
        positions = torch.arange(start, end, device=self.device).unsqueeze(0)
        x = self.embed[tokens].unsqueeze(0)
        key_pos = torch.arange(end, device=self.device)
        mask = key_pos.unsqueeze(0) <= positions.view(T, 1)  # [T, end]: causal, offset by start
        for i, lw in enumerate(self.layers):
            h = rms_norm(x, lw.ln1, c.norm_eps)
            q, k, v = self._qkv(lw, h, positions)
            cache.k[i, slot, :, start:end] = self._kv_quant(lw, k[0])
            cache.v[i, slot, :, start:end] = self._kv_quant(lw, v[0])
            kc, vc = cache.k[i, slot : slot + 1, :, :end], cache.v[i, slot : slot + 1, :, :end]
            attn = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
            x = self._mlp_and_out(lw, x, attn.transpose(1, 2).reshape(1, T, c.q_size))
        x = rms_norm(x if all_logits else x[:, -1:], self.norm, c.norm_eps)
        return self.lm_head(x)[0].float()  # [T or 1, V]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, kv_len: int | None = None):
        """One token for each of slots 0..B-1: tokens [B], positions [B] → logits [B, V]."""
        c = self.cfg
        B = tokens.shape[0]
        L = kv_len or int(positions.max()) + 1
        x = self.embed[tokens].unsqueeze(1)  # [B, 1, H]
        pos = positions.view(B, 1)
        rows = torch.arange(B, device=self.device)
        mask = (torch.arange(L, device=self.device).view(1, L) <= pos).view(B, 1, 1, L)
        for i, lw in enumerate(self.layers):
            h = rms_norm(x, lw.ln1, c.norm_eps)
            q, k, v = self._qkv(lw, h, pos)
            cache.k[i, rows, :, positions] = self._kv_quant(lw, k[:, :, 0])
            cache.v[i, rows, :, positions] = self._kv_quant(lw, v[:, :, 0])
            attn = F.scaled_dot_product_attention(q, cache.k[i, :B, :, :L], cache.v[i, :B, :, :L], attn_mask=mask,
                                                  enable_gqa=True)
            x = self._mlp_and_out(lw, x, attn.transpose(1, 2).reshape(B, 1, c.q_size))
        return self.lm_head(rms_norm(x, self.norm, c.norm_eps))[:, 0].float()

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits at every position of one sequence (for verification), [T, V] float32."""
        cache = self.new_cache(1, tokens.shape[0])
        return self.prefill(tokens.to(self.device), cache, 0, 0, all_logits=True)
