"""Qwen2 as torch.nn.Modules over a slot-based KV cache: prefill (chunked, any start position) and batched decode.

The cache is one K and one V tensor per layer, [slots, kv_heads, max_seq_len, head_dim]; a sequence owns a
slot for its lifetime, so decode reads the cache in place (no copies per step) and the batch is the
range of slots 0..n, which keeps shapes static for CUDA graphs (engine/model_runner.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trtqwen.runtime.layers.attention import attention
from trtqwen.runtime.layers.linear import Int4Linear, Linear
from trtqwen.runtime.layers.norm import rms_norm
from trtqwen.runtime.layers.quant import kv_quant
from trtqwen.runtime.layers.rotary import Rotary, apply_rope
from trtqwen.shape import ModelShape

LINEARS = ("qkv", "o", "gate", "up", "down")


def _frozen(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t, requires_grad=False)


class KVCache:
    def __init__(self, shape: ModelShape, num_slots: int, max_seq_len: int, device, dtype):
        size = (num_slots, shape.num_kv_heads, max_seq_len, shape.head_dim)  # one tensor per layer: same shape
        self.k = [torch.zeros(size, device=device, dtype=dtype) for _ in range(shape.num_layers)]  # for every layer,
        self.v = [torch.zeros(size, device=device, dtype=dtype) for _ in range(shape.num_layers)]  # so one compile fits all
        self.num_slots, self.max_seq_len = num_slots, max_seq_len


class DecoderLayer(torch.nn.Module):
    """Attention then SwiGLU MLP, each behind an RMSNorm. gate: HF gate_proj (TensorRT-LLM mlp.fc), up: HF up_proj
    (TensorRT-LLM mlp.gate). kv_scale, kv_algo: the checkpoint's KV-cache quantization (INT8/FP8 KV)."""

    def __init__(self, shape: ModelShape, ln1, qkv: Linear, o: Linear, ln2, gate: Linear, up: Linear, down: Linear,
                 kv_scale: torch.Tensor | None = None, kv_algo: str | None = None):
        super().__init__()
        self.shape, self.kv_algo = shape, kv_algo
        self.ln1, self.ln2 = _frozen(ln1), _frozen(ln2)
        self.qkv, self.o, self.gate, self.up, self.down = qkv, o, gate, up, down
        self.register_buffer("kv_scale", kv_scale)

    def attn(self, x, cos, sin, k_cache, v_cache, rows, positions, window, mask) -> torch.Tensor:
        """x [B, T, H] → the attention output [B, T, H] (before a TP all-reduce), K/V written to the cache."""
        c = self.shape
        B, T, _ = x.shape
        q, k, v = self.qkv(rms_norm(x, self.ln1, c.norm_eps)).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = apply_rope(q.view(B, T, c.num_heads, c.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2), cos, sin)
        v = v.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)
        k, v = kv_quant(k, self.kv_algo, self.kv_scale), kv_quant(v, self.kv_algo, self.kv_scale)  # what the cache holds
        return self.o(attention(q, k, v, k_cache, v_cache, rows, positions, window, mask))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, self.ln2, self.shape.norm_eps)
        return self.down(F.silu(self.gate(h)) * self.up(h))

    def forward(self, x, cos, sin, k_cache, v_cache, rows, positions, window, mask) -> torch.Tensor:
        x = x + self.attn(x, cos, sin, k_cache, v_cache, rows, positions, window, mask)
        return x + self.mlp(x)


class Qwen2Model(torch.nn.Module):
    """cfg: the shape this process runs (one TP rank's shard in a rank process)."""

    def __init__(self, cfg: ModelShape, embed: torch.Tensor, layers: list[DecoderLayer], norm: torch.Tensor,
                 lm_head: Linear, max_positions: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed = _frozen(embed)
        self.layers = torch.nn.ModuleList(layers)
        self.norm = _frozen(norm)
        self.lm_head = lm_head
        self.max_positions = max_positions or cfg.max_position_embeddings
        self.rotary = Rotary(cfg.head_dim, self.max_positions, cfg.rope_theta, embed.device)
        self.reduce = lambda t: t  # tensor parallel: the all-reduce after the row-parallel o and down projections
        self.tp_size = 1  # set by the tensor-parallel runner, with reduce
        self.attn_block, self.mlp_block = DecoderLayer.attn, DecoderLayer.mlp  # compiled ones after compile()
        self.layer_block = None

    @property
    def device(self):
        return self.embed.device

    @property
    def dtype(self):
        return self.embed.dtype

    def use_int4_kernels(self, device, dtype: torch.dtype) -> "Qwen2Model":
        """Swap AWQ linears for packed Int4Linear on device: the speed and the memory a 4-bit checkpoint is for."""
        for layer in self.layers:
            for name in LINEARS:
                packed = Int4Linear.packing(getattr(layer, name), device, dtype)
                if packed is not None:
                    setattr(layer, name, packed)
        return self

    def compile(self) -> "Qwen2Model":
        """torch.compile the per-layer decode blocks (one compile serves every layer and batch size).

        Without tensor parallelism a whole layer is one block (residual adds fuse with the norms); with it,
        attention and MLP are blocks of their own with the all-reduce between them left to NCCL.
        """
        limit = 64  # a specialization per (batch 1 or more) × (KV bucket = cache length or shorter) × int4 shapes
        torch._dynamo.config.recompile_limit = max(limit, getattr(torch._dynamo.config, "recompile_limit", 0))
        if self.tp_size == 1:
            self.layer_block = torch.compile(DecoderLayer.forward, dynamic=True)
        else:
            self.attn_block = torch.compile(DecoderLayer.attn, dynamic=True)
            self.mlp_block = torch.compile(DecoderLayer.mlp, dynamic=True)
        return self

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed[tokens]  # a tensor-parallel rank looks up its vocabulary shard (tp/shards.py)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)  # a tensor-parallel rank gathers every rank's vocabulary shard (tp/shards.py)

    def new_cache(self, num_slots: int, max_seq_len: int) -> KVCache:
        return KVCache(self.cfg, num_slots, max_seq_len, self.device, self.dtype)

    def _layers(self, x, cos, sin, cache: KVCache, rows, positions, window, mask, blocks=True) -> torch.Tensor:
        """Every layer; blocks: through the compiled decode blocks when compile() made them (prefill runs eager)."""
        attn, mlp = (self.attn_block, self.mlp_block) if blocks else (DecoderLayer.attn, DecoderLayer.mlp)
        for i, layer in enumerate(self.layers):
            args = (cos, sin, cache.k[i], cache.v[i], rows, positions, window, mask)
            if blocks and self.layer_block is not None:
                x = self.layer_block(layer, x, *args)
                continue
            x = x + self.reduce(attn(layer, x, *args))
            x = x + self.reduce(mlp(layer, x))
        return x

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, cache: KVCache, slot: int, start: int = 0, all_logits: bool = False):
        """Run tokens [T] of one sequence at positions start..start+T-1, writing its slot's cache."""
        T = tokens.shape[0]
        end = start + T
        positions = torch.arange(start, end, device=self.device).unsqueeze(0)
        cos, sin = self.rotary(positions, self.dtype)
        # A first chunk is plainly causal (flash kernels); a later one sees the cached prefix through a mask.
        mask = None if start == 0 else torch.arange(end, device=self.device).unsqueeze(0) <= positions.view(T, 1)
        rows = torch.tensor([slot], device=self.device)
        x = self._layers(self.embed_tokens(tokens).unsqueeze(0), cos, sin, cache, rows, positions,
                         (slot, end), mask, blocks=False)
        x = rms_norm(x if all_logits else x[:, -1:], self.norm, self.cfg.norm_eps)
        return self.head(x)[0].float()  # [T or 1, V]

    @torch.inference_mode()
    def prefill_fresh(self, prompts: list[torch.Tensor], cache: KVCache, slots: list[int]) -> torch.Tensor:
        """Whole prompts of new sequences in one padded, causal forward → last-token logits [n, V].

        Padding sits after each prompt, so causal attention never lets a real token see it; the K/V it
        writes past a prompt's end are overwritten by that sequence's decode steps before they are read.
        """
        n, T = len(prompts), max(p.shape[0] for p in prompts)
        tokens = torch.zeros(n, T, dtype=torch.long, device=self.device)
        for row, p in enumerate(prompts):
            tokens[row, : p.shape[0]] = p
        positions = torch.arange(T, device=self.device).unsqueeze(0).expand(n, T)
        cos, sin = self.rotary(positions, self.dtype)
        rows = torch.tensor(slots, device=self.device)
        x = self._layers(self.embed_tokens(tokens), cos, sin, cache, rows, positions, None, None, blocks=False)
        last = torch.tensor([p.shape[0] - 1 for p in prompts], device=self.device)
        x = rms_norm(x[torch.arange(n, device=self.device), last].unsqueeze(1), self.norm, self.cfg.norm_eps)
        return self.head(x)[:, 0].float()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, kv_len: int | None = None):
        """One token for each of slots 0..B-1: tokens [B], positions [B] → logits [B, V].

        Attention reads the first kv_len cache positions (default: just enough); shapes depend only on
        (B, kv_len), so a CUDA graph captured for them replays with new tokens and positions.
        """
        B = tokens.shape[0]
        L = kv_len or int(positions.max()) + 1
        pos = positions.view(B, 1)
        cos, sin = self.rotary(pos, self.dtype)
        rows = torch.arange(B, device=self.device)
        mask = (torch.arange(L, device=self.device).view(1, L) <= pos).view(B, 1, 1, L)
        x = self._layers(self.embed_tokens(tokens).unsqueeze(1), cos, sin, cache, rows, pos, (0, L), mask)
        return self.head(rms_norm(x, self.norm, self.cfg.norm_eps))[:, 0].float()

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits at every position of one sequence (for verification), [T, V] float32."""
        cache = self.new_cache(1, tokens.shape[0])
        return self.prefill(tokens.to(self.device), cache, 0, 0, all_logits=True)
