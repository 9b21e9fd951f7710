"""The one reader of a checkpoint directory: a TensorRT-LLM checkpoint (config.json + rank{i}.safetensors, the
engine target's) or a Hugging Face one, quantized by ModelOpt (hf_quant_config.json: the PyTorch backend's). The
build writes them; the runtime, the engine stage, the repository checks, verify and the UI read them here, and a
checkpoint that cannot be what its config says is refused here, in the TP rule's words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trtqwen.errors import UserError
from trtqwen.precision import Precision, precision_of_algo
from trtqwen.shape import ModelShape, check_tp


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict  # config.json as written (QWenConfig.to_dict())
    shape: ModelShape  # the full model's
    precision: Precision
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    group_size: int
    tp: int  # TensorRT-LLM: its rank files; HF: 1 (the PyTorch backend and the runtime split it at load, any TP)
    dtype: str
    kind: str = "trtllm"  # or "hf"

    @property
    def rank_files(self) -> list[Path]:
        return [self.path / f"rank{r}.safetensors" for r in range(self.tp)]

    def rank_file(self, rank: int) -> Path:
        if not 0 <= rank < self.tp:
            raise UserError(f"{self.path} has ranks 0..{self.tp - 1}, not rank {rank}")
        return self.rank_files[rank]

    @property
    def rank_shape(self) -> ModelShape:
        return self.shape.shard(self.tp, self.precision)


def read_config(path: Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise UserError(f"{path} has no config.json",
                        "pass an HF model directory or a TensorRT-LLM checkpoint written by `trtqwen build`")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg} is not valid JSON ({e})", "rebuild it with `trtqwen build --force`") from None


def is_trtllm_checkpoint(path: Path) -> bool:
    """A TensorRT-LLM checkpoint (else an HF model directory)."""
    cfg = read_config(path)
    return "architecture" in cfg and "mapping" in cfg


def read_shape(path: Path) -> tuple[ModelShape, Checkpoint | None]:
    """The shape of either kind of model directory, and the checkpoint when it is a TensorRT-LLM one."""
    if is_trtllm_checkpoint(path):
        ck = read_checkpoint(path)
        return ck.shape, ck
    return ModelShape.from_hf(read_config(path)), None


def read_model_dir(path: Path) -> Checkpoint:
    """Either kind of checkpoint (an unquantized HF model is one too: precision bf16 / fp16)."""
    return read_checkpoint(path) if is_trtllm_checkpoint(path) else read_hf_checkpoint(path)


def hf_quantization(path: Path, cfg: dict) -> dict:
    """ModelOpt's record of how an HF checkpoint is quantized ({} when it is not): hf_quant_config.json's
    `quantization`, or config.json's `quantization_config` (quant_method "modelopt") when only that was kept."""
    f = Path(path) / "hf_quant_config.json"
    if f.is_file():
        return json.loads(f.read_text()).get("quantization") or {}
    q = cfg.get("quantization_config") or {}
    if q and q.get("quant_method") != "modelopt":
        raise UserError(f"{path} is quantized by {q.get('quant_method')!r}, not ModelOpt",
                        "trtqwen reads ModelOpt's unified HF checkpoints (`trtqwen build --target pytorch`)")
    return {"quant_algo": q.get("quant_algo"), "kv_cache_quant_algo": q.get("kv_cache_quant_algo")} if q else {}


def read_hf_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    cfg = read_config(path)
    shape = ModelShape.from_hf(cfg, name=path.parent.name if path.name == "hf_checkpoint" else path.name)
    q = hf_quantization(path, cfg)
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").replace("torch.", "")
    algo = q.get("quant_algo")
    precision = Precision.FP16 if algo is None and dtype == "float16" else precision_of_algo(algo)
    return Checkpoint(path=path, config=cfg, shape=shape, precision=precision, quant_algo=algo,
                      kv_cache_quant_algo=q.get("kv_cache_quant_algo"), group_size=q.get("group_size") or 128, tp=1,
                      dtype=dtype, kind="hf")


def read_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    cfg = read_config(path)
    if "mapping" not in cfg:
        raise UserError(f"{path} is not a TensorRT-LLM checkpoint (its config.json has no mapping)",
                        "pass the checkpoint/ directory of a `trtqwen build` output")
    shape = ModelShape.from_trtllm(cfg, name=path.parent.name if path.name == "checkpoint" else path.name)
    q = cfg.get("quantization") or {}
    mapping = cfg["mapping"]
    world = mapping.get("world_size", 1)
    tp = mapping.get("tp_size", world)
    if mapping.get("pp_size", 1) != 1 or tp != world:
        raise UserError(f"{path}: mapping has tp_size {tp}, pp_size {mapping.get('pp_size', 1)}, world_size {world}",
                        "trtqwen builds and serves tensor parallelism only (pp_size 1): rebuild with `trtqwen build`")
    ck = Checkpoint(path=path, config=cfg, shape=shape, precision=precision_of_algo(q.get("quant_algo")),
                    quant_algo=q.get("quant_algo"), kv_cache_quant_algo=q.get("kv_cache_quant_algo"),
                    group_size=q.get("group_size") or 128, tp=tp, dtype=cfg.get("dtype", "bfloat16"))
    check_tp(shape, tp, ck.precision, ck.group_size)
    present = sorted(path.glob("rank*.safetensors"))
    if len(present) != tp:
        raise UserError(f"{path}: config.json says world_size {world} (tp {tp}) but {len(present)} rank file(s) exist",
                        "rebuild the checkpoint (`trtqwen build --force`) or copy the missing rank*.safetensors")
    missing = [f.name for f in ck.rank_files if not f.is_file()]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)}", "rebuild the checkpoint with `trtqwen build --force`")
    return ck
