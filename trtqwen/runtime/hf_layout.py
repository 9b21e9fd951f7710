"""A Hugging Face Qwen2 checkpoint (plain, or quantized by ModelOpt's unified export) in the TensorRT-LLM
checkpoint's tensor names and layout, whole or as one TP rank's shard: the runtime then has one loader for both.

ModelOpt's HF layout (checked on its 0.37 export): `*.weight` FP8 [out, in] with scalar `weight_scale` and
`input_scale`; INT4-AWQ uint8 [out/2, in] (two signed nibbles along out, low first) with `weight_scale`
[out, in/group] and `pre_quant_scale` [in] where the scale was not folded into the RMSNorm before it (q/k/v and
gate/up share their norm's, so only o_proj and down_proj keep one); KV cache `k_proj.k_scale`, `v_proj.v_scale`.
Fused q/k/v in FP8 get one weight scale and one input scale, the largest of the three, with the weights
requantized to it: what TensorRT-LLM's PyTorch backend does when it fuses them at load.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from trtqwen.errors import UserError
from trtqwen.runtime.layers.linear import column_shard, row_shard
from trtqwen.shape import ModelShape

# HF module → TensorRT-LLM's (its Qwen names the gate projection mlp.fc and the up projection mlp.gate)
COLUMN = {"mlp.gate_proj": "mlp.fc", "mlp.up_proj": "mlp.gate"}
ROW = {"self_attn.o_proj": "attention.dense", "mlp.down_proj": "mlp.proj"}
QUANT_NAMES = {"weight_scale": "weights_scaling_factor", "input_scale": "activation_scaling_factor",
               "pre_quant_scale": "prequant_scaling_factor"}


def _linear(t: dict, src: str, dst: str, out: dict) -> None:
    for suffix in ("weight", "bias", *QUANT_NAMES):
        if f"{src}.{suffix}" in t:
            out[f"{dst}.{QUANT_NAMES.get(suffix, suffix)}"] = t[f"{src}.{suffix}"]


def _fused_qkv(t: dict, a: str, dst: str, out: dict) -> None:
    parts = [f"{a}{n}_proj" for n in "qkv"]
    weights = [t[p + ".weight"] for p in parts]
    if weights[0].dtype == torch.float8_e4m3fn:
        scales = [t[p + ".weight_scale"].float() for p in parts]
        top = torch.stack(scales).max()
        weights = [(w.float() * s / top).to(torch.float8_e4m3fn) for w, s in zip(weights, scales)]
        out[dst + ".weights_scaling_factor"] = top
        out[dst + ".activation_scaling_factor"] = torch.stack([t[p + ".input_scale"].float() for p in parts]).max()
    elif parts[0] + ".weight_scale" in t:  # AWQ: group scales per output row, concatenated like the rows
        out[dst + ".weights_scaling_factor"] = torch.cat([t[p + ".weight_scale"] for p in parts])
    out[dst + ".weight"] = torch.cat(weights)
    out[dst + ".bias"] = torch.cat([t[p + ".bias"] for p in parts])
    pre = [t.get(p + ".pre_quant_scale") for p in parts]
    if pre[0] is not None:
        if any(x is None or not torch.equal(x, pre[0]) for x in pre):
            raise UserError(f"{a}: q, k and v have different AWQ pre-quant scales and cannot be fused",
                            "re-export the checkpoint with `trtqwen build --target pytorch` (ModelOpt resmooths them)")
        out[dst + ".prequant_scaling_factor"] = pre[0]
    ks, vs = t.get(parts[1] + ".k_scale"), t.get(parts[2] + ".v_scale")
    if ks is not None and vs is not None:  # one scale for the layer's K and V, as TensorRT-LLM's KV cache has
        out[dst.rsplit(".", 1)[0] + ".kv_cache_scaling_factor"] = torch.maximum(ks.float(), vs.float()).reshape(1)


def trtllm_parts(t: Mapping[str, torch.Tensor], shape: ModelShape) -> Iterator[dict[str, torch.Tensor]]:
    """The whole model (TP 1) in TensorRT-LLM checkpoint names, a part at a time: the embedding, final norm and
    lm_head, then each layer. Read from a lazy `t`, a rank that keeps only its shard of each part never holds the
    whole checkpoint."""
    yield {"transformer.vocab_embedding.weight": t["model.embed_tokens.weight"],
           "transformer.ln_f.weight": t["model.norm.weight"],
           "lm_head.weight": t["lm_head.weight"] if "lm_head.weight" in t else t["model.embed_tokens.weight"]}
    for i in range(shape.num_layers):
        src, dst, out = f"model.layers.{i}.", f"transformer.layers.{i}.", {}
        out[dst + "input_layernorm.weight"] = t[src + "input_layernorm.weight"]
        out[dst + "post_layernorm.weight"] = t[src + "post_attention_layernorm.weight"]
        _fused_qkv(t, src + "self_attn.", dst + "attention.qkv", out)
        for hf, ours in {**COLUMN, **ROW}.items():
            _linear(t, src + hf, dst + ours, out)
        yield out


def rank_shard(t: dict[str, torch.Tensor], shape: ModelShape, tp: int, rank: int) -> dict:
    """Rank `rank`'s shard of the whole model's tensors (trtllm_parts), laid out as its rank file would be:
    column-parallel linears split along out (fused qkv per part), row-parallel along in, the lm_head along the
    vocabulary padded to a multiple of TP; norms, the embedding and per-tensor scales stay whole on every rank."""
    if tp == 1:
        return dict(t)
    out = {}
    for name, x in t.items():
        module, _, suffix = name.rpartition(".")
        rows = 2 if suffix == "weight" and x.dtype == torch.uint8 else 1  # int4 two per byte along out
        if x.dim() == 0 or x.numel() == 1 or "layernorm" in module or module in ("transformer.ln_f",
                                                                               "transformer.vocab_embedding"):
            out[name] = x
        elif module.endswith("attention.qkv"):
            sizes = [shape.q_size // rows, shape.kv_size // rows, shape.kv_size // rows]
            out[name] = column_shard(x, sizes, tp, rank, shape.head_dim // rows)
        elif module == "lm_head":
            pad = -x.shape[0] % tp
            out[name] = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]).chunk(tp)[rank].contiguous()
        elif module.rsplit(".", 1)[-1] in ("dense", "proj"):  # row-parallel: along in
            out[name] = x.chunk(tp, dim=-1)[rank].contiguous() if suffix == "prequant_scaling_factor" else row_shard(x, tp, rank)
        else:  # mlp.fc / mlp.gate: along out
            out[name] = x.chunk(tp)[rank]
    return {name: _own(x) for name, x in out.items()}


def _own(x: torch.Tensor) -> torch.Tensor:
    """x in storage of its own: a slice along dim 0 is a view that would keep the whole tensor alive."""
    return x.clone() if x.untyped_storage().nbytes() > x.numel() * x.element_size() else x
