"""INT8 SmoothQuant as TensorRT-LLM's per-token plugin runs it (W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN).

Why not ModelOpt's own export (W8A8_SQ_PER_CHANNEL: one static activation scale per tensor): on a trained Qwen2.5
the few massive activations make that scale so coarse that ordinary tokens round to zero (perplexity +61 %, some
positions' logits pointing the other way; docs/PERFORMANCE.md). Quantizing each token's activations with its own
scale, as TensorRT-LLM's Qwen guide builds SmoothQuant (`--per_channel --per_token`), costs ~2 %.

The plugin layers (tensorrt_llm/quantization/layers.py: SmoothQuantRmsNorm, SmoothQuantColumnLinear /
SmoothQuantRowLinear, SmoothQuantAttention, SmoothQuantGatedMLP) read other tensors than ModelOpt writes and
TensorRT-LLM renames none of them on load, so the exported ranks are rewritten here:
- qkv and fc/gate have no smoother of their own: their smoothing is folded into the RMSNorm before them, so
  q/k/v (and gate/up) must share one smoothing vector — `share_smoothing` re-smooths them in ModelOpt before export;
- attention.dense / mlp.proj divide their input by `smoother` (= 1 / ModelOpt's prequant_scaling_factor);
- weight scales are `per_channel_scale` [1, out]; no activation scale (per-token scales are computed at run time);
- every quantized RMSNorm carries a `scale_to_int` [1] that the per-token kernel ignores but the loader requires.
tests/data/trtllm_sq_per_token_layout.json lists these names with their sources.
"""

from __future__ import annotations

import torch

QUANT_ALGO = "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
MODELOPT_QUANT_ALGO = "W8A8_SQ_PER_CHANNEL"  # what ModelOpt 0.37 exports before the rewrite
FOLDED = {"attention.qkv": "input_layernorm", "mlp.fc": "post_layernorm", "mlp.gate": "post_layernorm"}
SMOOTHED = ("attention.dense", "mlp.proj")


@torch.no_grad()
def share_smoothing(model, alpha: float) -> None:
    """Give q/k/v, and gate/up, of every layer one SmoothQuant vector (they read one RMSNorm's output).

    As ModelOpt's smoothquant computes it (s = max|W|^(1-α) / max|x|^α per input channel), with max|W| taken over
    the group's weights together, the way TensorRT-LLM's own Qwen converter smooths gate and up.
    """
    from modelopt.torch.quantization.model_calib import (apply_pre_quant_scale_and_smooth,
                                                         disable_pre_quant_scale_and_resmooth)

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
            act_amax = group[0].input_quantizer._amax_for_smoothing.float().flatten()  # same input for the group
            for linear in group:
                disable_pre_quant_scale_and_resmooth(linear)  # weights back to unsmoothed
            w_amax = torch.stack([lin.weight.abs().amax(dim=0).float().cpu() for lin in group]).amax(dim=0)
            scale = w_amax.pow(1 - alpha) / act_amax.pow(alpha)
            scale[act_amax <= 1.0 / (1 << 31)] = 1  # channels never active: leave them alone, as ModelOpt does
            scale = scale.clamp(min=1e-4, max=1e4).to(group[0].weight.device)
            for linear in group:
                apply_pre_quant_scale_and_smooth(linear, scale)


def to_per_token_layout(t: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """One rank's tensors: ModelOpt's W8A8_SQ_PER_CHANNEL names → the per-token plugin's (pure; returns a new dict)."""
    out = dict(t)
    for n in range(num_layers):
        p = f"transformer.layers.{n}."
        for linear, norm in FOLDED.items():
            pre = out.pop(p + linear + ".prequant_scaling_factor").float()
            if linear != "mlp.gate":  # fc and gate share the vector (share_smoothing); fold it once
                ln = out[p + norm + ".weight"]
                out[p + norm + ".weight"] = (ln.float() * pre).to(ln.dtype)
            elif not torch.equal(pre, t[p + "mlp.fc.prequant_scaling_factor"].float()):
                raise RuntimeError(f"layer {n}: mlp.fc and mlp.gate were smoothed differently; run share_smoothing")
        for linear in SMOOTHED:
            pre = out.pop(p + linear + ".prequant_scaling_factor").float()
            out[p + linear + ".smoother"] = (1.0 / pre).reshape(1, -1).contiguous()
        for linear in (*FOLDED, *SMOOTHED):
            out.pop(p + linear + ".activation_scaling_factor")
            out[p + linear + ".per_channel_scale"] = out.pop(p + linear + ".weights_scaling_factor").float().reshape(1, -1)
        for norm in ("input_layernorm", "post_layernorm"):
            out[p + norm + ".scale_to_int"] = torch.ones(1, dtype=out[p + norm + ".weight"].dtype)
    return out
