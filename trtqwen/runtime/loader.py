"""Load Qwen2 weights from an HF checkpoint or a TensorRT-LLM checkpoint (any precision, any TP) into Qwen2Model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from trtqwen.errors import UserError
from trtqwen.runtime.config import ModelConfig
from trtqwen.runtime.layers import Linear
from trtqwen.runtime.model import LayerWeights, Qwen2Model


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def checkpoint_kind(path: Path) -> str:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{path} has no config.json", "pass an HF model directory or a TensorRT-LLM checkpoint from `trtqwen build`")
    cfg = json.loads(cfg_path.read_text())
    return "trtllm" if "architecture" in cfg and "mapping" in cfg else "hf"


def load_model(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               max_positions: int | None = None) -> Qwen2Model:
    """HF dir or TensorRT-LLM checkpoint → Qwen2Model on device (float32 on CPU, bf16 on CUDA by default)."""
    path = Path(path)
    dtype = dtype or (torch.float32 if str(device) == "cpu" else torch.bfloat16)
    kind = checkpoint_kind(path)
    model = load_hf(path, max_positions) if kind == "hf" else load_trtllm(path, max_positions)
    return model.to(device=device, dtype=dtype)


def load_hf(path: Path, max_positions: int | None = None) -> Qwen2Model:
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors weights", "the runtime loads safetensors only")
    t = {k: v.float() for k, v in read_safetensors(files).items()}
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        qkv_w = torch.cat([t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"]])
        qkv_b = torch.cat([t[a + "q_proj.bias"], t[a + "k_proj.bias"], t[a + "v_proj.bias"]])
        layers.append(LayerWeights(
            ln1=t[p + "input_layernorm.weight"], qkv=Linear(qkv_w, qkv_b), o=Linear(t[a + "o_proj.weight"]),
            ln2=t[p + "post_attention_layernorm.weight"], gate=Linear(t[p + "mlp.gate_proj.weight"]),
            up=Linear(t[p + "mlp.up_proj.weight"]), down=Linear(t[p + "mlp.down_proj.weight"]),
        ))
    embed = t["model.embed_tokens.weight"]
    lm_head = Linear(t.get("lm_head.weight", embed))
    return Qwen2Model(cfg, embed, layers, t["model.norm.weight"], lm_head, max_positions)


def load_trtllm(path: Path, max_positions: int | None = None) -> Qwen2Model:
    raise UserError("TensorRT-LLM checkpoints: not yet")
