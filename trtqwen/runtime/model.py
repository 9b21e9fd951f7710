"""Qwen2 forward over a slot-based KV cache: prefill (chunked, any start position) and batched decode.

The cache is one K and one V tensor per layer, [slots, kv_heads, max_seq_len, head_dim]; a sequence owns a
slot for its lifetime, so decode reads the cache in place (no copies per step) and the batch is the
range of slots 0..n, which keeps shapes static for CUDA graphs (runtime/cuda_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trtqwen.runtime.config import ModelConfig
from trtqwen.runtime.layers import Int4Linear, Linear, apply_rope, fake_quant_fp8, fake_quant_int8, rms_norm, rope_tables

LINEARS = ("qkv", "o", "gate", "up", "down")


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
        shape = (num_slots, cfg.num_kv_heads, max_seq_len, cfg.head_dim)  # one tensor per layer: same shape
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]  # for every layer,
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]  # so one compile fits all
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
        self.reduce = lambda t: t  # tensor parallel: the all-reduce after the row-parallel o and down projections
        self.tp_size = 1  # set by the tensor-parallel runner, with reduce
        self.attn_block, self.mlp_block = self._attn_decode, self._mlp  # swapped for compiled versions by compile()
        self.layer_block = None

    @property
    def device(self):
        return self.embed.device

    @property
    def dtype(self):
        return self.embed.dtype

    def to(self, device=None, dtype=None, int4_kernels: bool = False):
        """Move (and cast) the weights; int4_kernels swaps AWQ linears for packed Int4Linear on the device."""
        def move(t):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

        self.embed, self.norm = move(self.embed), move(self.norm)
        for lw in self.layers:
            lw.ln1, lw.ln2, lw.kv_scale = move(lw.ln1), move(lw.ln2), move(lw.kv_scale)
            for name in LINEARS:
                lin = getattr(lw, name)
                if int4_kernels and getattr(lin, "int4", None) is not None and Int4Linear.supported(lin.int4[0], lin.int4[2]):
                    q, scales, group = lin.int4  # never moves the dequantized copy: a quarter of the memory
                    setattr(lw, name, Int4Linear(q.to(device), scales.to(device), group, move(lin.bias),
                                                 move(lin.pre_quant_scale), dtype or torch.bfloat16))
                elif isinstance(lin, Linear):
                    lin.to(device=device, dtype=dtype)
        self.lm_head.to(device=device, dtype=dtype)
        self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        return self

    def compile(self) -> "Qwen2Model":
        """torch.compile the per-layer decode blocks (one compile serves every layer and batch size).

        Without tensor parallelism a whole layer is one block (residual adds fuse with the norms); with it,
        attention and MLP are blocks of their own with the all-reduce between them left to NCCL.
        """
        limit = 64  # a specialization per (batch 1 or more) × (KV bucket = cache length or shorter) × int4 shapes
        torch._dynamo.config.recompile_limit = max(limit, getattr(torch._dynamo.config, "recompile_limit", 0))
        if self.tp_size == 1:
            self.layer_block = torch.compile(self._layer_decode, dynamic=True)
        else:
            self.attn_block = torch.compile(self._attn_decode, dynamic=True)
            self.mlp_block = torch.compile(self._mlp, dynamic=True)
        return self

    def _layer_decode(self, lw: LayerWeights, x, pos, cos, sin, rows, mask, k_cache, v_cache) -> torch.Tensor:
        x = x + self._attn_decode(lw, x, pos, cos, sin, rows, mask, k_cache, v_cache)
        return x + self._mlp(lw, x)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed[tokens]  # a tensor-parallel rank looks up its vocabulary shard (runtime/tp.py)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)  # a tensor-parallel rank gathers every rank's vocabulary shard (runtime/tp.py)

    def new_cache(self, num_slots: int, max_seq_len: int) -> KVCache:
        return KVCache(self.cfg, num_slots, max_seq_len, self.device, self.dtype)

    def _kv_quant(self, lw: LayerWeights, t: torch.Tensor) -> torch.Tensor:
        algo = self.cfg.kv_cache_quant_algo
        if algo == "INT8":
            return fake_quant_int8(t, lw.kv_scale)
        if algo == "FP8":
            return fake_quant_fp8(t, lw.kv_scale)
        return t

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, T, d] for positions [B, T]: gathered once per forward, shared by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

    def _qkv(self, lw: LayerWeights, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h [B, T, H] → q [B, heads, T, d], k/v [B, kv_heads, T, d], rotary applied."""
        c = self.cfg
        B, T, _ = h.shape
        qkv = lw.qkv(h)
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(B, T, c.num_heads, c.head_dim).transpose(1, 2)
        k = k.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _mlp(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, lw.ln2, self.cfg.norm_eps)
        return lw.down(F.silu(lw.gate(h)) * lw.up(h))

    def _attn_decode(self, lw: LayerWeights, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     rows: torch.Tensor, mask: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """One new token per row: write its K/V at pos into the layer's cache [slots, kv_heads, S, d], attend."""
        c = self.cfg
        B = x.shape[0]
        L = mask.shape[-1]
        q, k, v = self._qkv(lw, rms_norm(x, lw.ln1, c.norm_eps), cos, sin)
        positions = pos.view(B)
        k_cache[rows, :, positions] = self._kv_quant(lw, k[:, :, 0])
        v_cache[rows, :, positions] = self._kv_quant(lw, v[:, :, 0])
        attn = F.scaled_dot_product_attention(q, k_cache[:B, :, :L], v_cache[:B, :, :L], attn_mask=mask, enable_gqa=True)
        return lw.o(attn.transpose(1, 2).reshape(B, 1, c.q_size))

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, cache: KVCache, slot: int, start: int = 0, all_logits: bool = False):
        """Run tokens [T] of one sequence at positions start..start+T-1, writing its slot's cache."""
        c = self.cfg
        T = tokens.shape[0]
        end = start + T
        positions = torch.arange(start, end, device=self.device).unsqueeze(0)
        cos, sin = self._rope(positions, self.dtype)
        x = self.embed_tokens(tokens).unsqueeze(0)
        # A first chunk is plainly causal (flash kernels); a later one sees the cached prefix through a mask.
        mask = None if start == 0 else torch.arange(end, device=self.device).unsqueeze(0) <= positions.view(T, 1)
        for i, lw in enumerate(self.layers):
            q, k, v = self._qkv(lw, rms_norm(x, lw.ln1, c.norm_eps), cos, sin)
            cache.k[i][slot, :, start:end] = self._kv_quant(lw, k[0])
            cache.v[i][slot, :, start:end] = self._kv_quant(lw, v[0])
            kc, vc = cache.k[i][slot : slot + 1, :, :end], cache.v[i][slot : slot + 1, :, :end]
            attn = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            x = x + self.reduce(lw.o(attn.transpose(1, 2).reshape(1, T, c.q_size)))
            x = x + self.reduce(self._mlp(lw, x))
        x = rms_norm(x if all_logits else x[:, -1:], self.norm, c.norm_eps)
        return self.head(x)[0].float()  # [T or 1, V]

    @torch.inference_mode()
    def prefill_fresh(self, prompts: list[torch.Tensor], cache: KVCache, slots: list[int]) -> torch.Tensor:
        """Whole prompts of new sequences in one padded, causal forward → last-token logits [n, V].

        Padding sits after each prompt, so causal attention never lets a real token see it; the K/V it
        writes past a prompt's end are overwritten by that sequence's decode steps before they are read.
        """
        c = self.cfg
        n, T = len(prompts), max(p.shape[0] for p in prompts)
        tokens = torch.zeros(n, T, dtype=torch.long, device=self.device)
        for row, p in enumerate(prompts):
            tokens[row, : p.shape[0]] = p
        positions = torch.arange(T, device=self.device).unsqueeze(0).expand(n, T)
        cos, sin = self._rope(positions, self.dtype)
        idx = torch.tensor(slots, device=self.device)
        x = self.embed_tokens(tokens)
        for i, lw in enumerate(self.layers):
            q, k, v = self._qkv(lw, rms_norm(x, lw.ln1, c.norm_eps), cos, sin)
            k, v = self._kv_quant(lw, k), self._kv_quant(lw, v)  # attend to what the cache holds
            cache.k[i][idx, :, :T] = k
            cache.v[i][idx, :, :T] = v
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.reduce(lw.o(attn.transpose(1, 2).reshape(n, T, c.q_size)))
            x = x + self.reduce(self._mlp(lw, x))
        last = torch.tensor([p.shape[0] - 1 for p in prompts], device=self.device)
        x = rms_norm(x[torch.arange(n, device=self.device), last].unsqueeze(1), self.norm, c.norm_eps)
        return self.head(x)[:, 0].float()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, kv_len: int | None = None):
        """One token for each of slots 0..B-1: tokens [B], positions [B] → logits [B, V].

        Attention reads the first kv_len cache positions (default: just enough); shapes depend only on
        (B, kv_len), so a CUDA graph captured for them replays with new tokens and positions.
        """
        B = tokens.shape[0]
        L = kv_len or int(positions.max()) + 1
        x = self.embed_tokens(tokens).unsqueeze(1)  # [B, 1, H]
        pos = positions.view(B, 1)
        cos, sin = self._rope(pos, self.dtype)
        rows = torch.arange(B, device=self.device)
        mask = (torch.arange(L, device=self.device).view(1, L) <= pos).view(B, 1, 1, L)
        for i, lw in enumerate(self.layers):
            if self.layer_block is not None:
                x = self.layer_block(lw, x, pos, cos, sin, rows, mask, cache.k[i], cache.v[i])
                continue
            x = x + self.reduce(self.attn_block(lw, x, pos, cos, sin, rows, mask, cache.k[i], cache.v[i]))
            x = x + self.reduce(self.mlp_block(lw, x))
        return self.head(rms_norm(x, self.norm, self.cfg.norm_eps))[:, 0].float()

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits at every position of one sequence (for verification), [T, V] float32."""
        cache = self.new_cache(1, tokens.shape[0])
        return self.prefill(tokens.to(self.device), cache, 0, 0, all_logits=True)
