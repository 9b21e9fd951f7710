"""Load Qwen2 weights from an HF checkpoint (plain or ModelOpt-quantized) or a TensorRT-LLM checkpoint (any
precision, any TP) into Qwen2Model.

Checkpoints are read only through trtqwen.checkpoint (shape, precision, rank files); an HF checkpoint's tensors are
first put in the TensorRT-LLM checkpoint's names and layout (hf_layout.py), so one reader builds every model.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from trtqwen.checkpoint import Checkpoint, is_trtllm_checkpoint, read_checkpoint, read_hf_checkpoint
from trtqwen.errors import UserError
from trtqwen.precision import SQ_PER_TOKEN_ALGOS
from trtqwen.runtime.hf_layout import rank_shard, trtllm_parts
from trtqwen.runtime.layers.linear import Linear, merge_column, merge_row
from trtqwen.runtime.models.qwen2 import DecoderLayer, Qwen2Model
from trtqwen.shape import ModelShape


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


class LazySafetensors(Mapping):
    """The tensors of safetensors files, each read when asked for (and not kept): a shard taken from them costs
    the shard, not the file."""

    def __init__(self, files: list[Path]):
        self._stack = ExitStack()
        self._where = {}
        for f in files:
            st = self._stack.enter_context(safe_open(str(f), framework="pt"))
            self._where.update(dict.fromkeys(st.keys(), st))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __enter__(self) -> LazySafetensors:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def target_dtype(device, dtype: torch.dtype | None, int4_kernels: bool | None) -> tuple[torch.dtype, bool]:
    """The defaults: float32 on CPU, bf16 on CUDA; int4 kernels on a GPU in bf16."""
    on_cpu = torch.device(device).type == "cpu"
    dtype = dtype or (torch.float32 if on_cpu else torch.bfloat16)
    return dtype, (not on_cpu and dtype == torch.bfloat16) if int4_kernels is None else int4_kernels


def place(model: Qwen2Model, device, dtype: torch.dtype | None, int4_kernels: bool | None) -> Qwen2Model:
    """Cast and move the model; int4 kernels pack AWQ linears on the device first (their float copies never move)."""
    dtype, int4_kernels = target_dtype(device, dtype, int4_kernels)
    if int4_kernels:
        model.use_int4_kernels(device, dtype)
    return model.to(device=device, dtype=dtype)


def load_merged(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                max_positions: int | None = None, int4_kernels: bool | None = None) -> Qwen2Model:
    """HF dir or TensorRT-LLM checkpoint (its TP shards merged) → Qwen2Model on device."""
    model = load_trtllm(path, max_positions) if is_trtllm_checkpoint(Path(path)) else load_hf(Path(path), max_positions)
    return place(model, device, dtype, int4_kernels)


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Two signed 4-bit values per byte, low nibble first, packed along `dim` → int8 values."""
    b = packed.view(torch.uint8).to(torch.int16)
    lo, hi = b & 0x0F, (b >> 4) & 0x0F
    lo, hi = torch.where(lo > 7, lo - 16, lo), torch.where(hi > 7, hi - 16, hi)
    return torch.stack([lo, hi], dim=dim + 1).flatten(dim, dim + 1).to(torch.int8)


def weight_only_roundtrip(w: torch.Tensor, bits: int) -> torch.Tensor:
    """What TensorRT-LLM does to 16-bit weights of a W8A16/W4A16 checkpoint at load: symmetric per-channel."""
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-12)
    return (w / scale).round().clamp(-qmax - 1, qmax) * scale


def dequantize(t: dict[str, torch.Tensor], name: str, quant_algo: str | None, group_size: int) -> torch.Tensor:
    """A TensorRT-LLM checkpoint linear's weight as float [out, in], whatever its storage."""
    w = t[name + ".weight"]
    if quant_algo in ("W8A16", "W4A16") and w.is_floating_point() and not name.startswith("lm_head"):
        return weight_only_roundtrip(w.float(), 8 if quant_algo == "W8A16" else 4)
    if not quant_algo or (w.is_floating_point() and w.dtype != torch.float8_e4m3fn):
        return w  # 16-bit stays 16-bit until the model is cast: a 7B checkpoint never doubles in host memory
    scale = t.get(name + ".weights_scaling_factor")
    if w.dtype == torch.float8_e4m3fn:  # FP8: per-tensor scale
        return w.float() * scale.float()
    if quant_algo in ("W4A16_AWQ", "W4A8_AWQ"):  # int4 packed along out: [out/2, in]; scales [out, in/group]
        q = unpack_int4(w, 0).float()
        return q * scale.float().repeat_interleave(group_size, dim=1)[:, : q.shape[1]]
    if quant_algo in SQ_PER_TOKEN_ALGOS:  # SmoothQuant plugin layout: int8 [out, in], per_channel_scale [1, out]
        return w.float() * t[name + ".per_channel_scale"].float().view(-1, 1)
    if name + ".per_channel_scale" in t:  # TensorRT-LLM weight-only layout: [in, out(/2)], scale [out]
        q = (unpack_int4(w, 1) if quant_algo == "W4A16" else w).float()
        return (q * t[name + ".per_channel_scale"].float().view(1, -1)).t().contiguous()
    if scale is not None:  # SmoothQuant / INT8: per-channel scale [out] or [out, 1]
        return w.float() * scale.float().view(-1, 1)
    raise UserError(f"{name}: cannot read weight of dtype {w.dtype} under quant_algo {quant_algo}")


def _act(t: dict, name: str, quant_algo: str | None):
    """(activation quantization kind, scale) the engine applies before this GEMM."""
    if quant_algo in SQ_PER_TOKEN_ALGOS and not name.startswith("lm_head"):
        return "int8_token", None  # each token's scale is computed at run time
    s = t.get(name + ".activation_scaling_factor")
    if s is None:
        return None, None
    return ("fp8" if quant_algo == "FP8" else "int8"), s.float().reshape(())


def _pre_quant_scale(t: dict, name: str) -> torch.Tensor | None:
    """What the engine multiplies this GEMM's input by: AWQ's / ModelOpt's pre-quant scale, or 1 / SmoothQuant's smoother."""
    if name + ".smoother" in t:
        return 1.0 / t[name + ".smoother"].float().flatten()
    return t.get(name + ".prequant_scaling_factor")


class _Shards:
    """Linears of a TensorRT-LLM checkpoint from one or more of its rank files: column-parallel ones merged
    along out, row-parallel ones along in (one rank file: that rank's own shard, as it is)."""

    def __init__(self, ranks: list[dict[str, torch.Tensor]], ck: Checkpoint):
        self.ranks, self.qa, self.g, self.kv_algo = ranks, ck.quant_algo, ck.group_size, ck.kv_cache_quant_algo

    def _int4_parts(self, name: str, merge) -> tuple | None:
        """AWQ's signed 4-bit values and group scales, merged like the weights, for the int4 GEMM."""
        if self.qa != "W4A16_AWQ":
            return None
        return merge([unpack_int4(r[name + ".weight"], 0) for r in self.ranks]), \
            merge([r[name + ".weights_scaling_factor"].float() for r in self.ranks]), self.g

    def column(self, name: str, split: list[int] | None = None) -> Linear:
        """split: the full model's [q, k, v] sizes of a fused qkv (to merge ranks' [q_r; k_r; v_r])."""
        merge = lambda parts: merge_column(parts, split)  # noqa: E731
        int4 = None if name == "lm_head" else self._int4_parts(name, merge)
        b = merge([r[name + ".bias"].float() for r in self.ranks]) if name + ".bias" in self.ranks[0] else None
        return self._linear(name, self._weight(name, merge, int4), b,
                            _pre_quant_scale(self.ranks[0], name), int4)

    def row(self, name: str) -> Linear:
        merge = merge_row
        int4 = self._int4_parts(name, merge)
        pre = [_pre_quant_scale(r, name) for r in self.ranks]
        return self._linear(name, self._weight(name, merge, int4), None, torch.cat(pre) if pre[0] is not None else None,
                            int4)

    def _weight(self, name: str, merge, int4: tuple | None) -> torch.Tensor:
        """The float weight, from the int4 parts when there are some (unpacked once, not again per rank)."""
        if int4 is None:
            return merge([dequantize(r, name, self.qa, self.g) for r in self.ranks])
        q, scales, group = int4
        return q.float() * scales.repeat_interleave(group, dim=1)[:, : q.shape[1]]

    def _linear(self, name, w, b, pre, int4=None) -> Linear:
        kind, scale = _act(self.ranks[0], name, self.qa)
        lin = Linear(w, b, None if pre is None else pre.float(), kind, scale)
        lin.int4 = int4
        return lin

    def layers(self, cfg: ModelShape) -> list[DecoderLayer]:
        """cfg: the full model's (merged ranks) or one rank's (its own shard) dims."""
        first, out = self.ranks[0], []
        for i in range(cfg.num_layers):
            p = f"transformer.layers.{i}."
            kv = first.get(p + "attention.kv_cache_scaling_factor")
            out.append(DecoderLayer(
                cfg, ln1=first[p + "input_layernorm.weight"].float(),
                qkv=self.column(p + "attention.qkv", [cfg.q_size, cfg.kv_size, cfg.kv_size]),
                o=self.row(p + "attention.dense"),
                ln2=first[p + "post_layernorm.weight"].float(),
                gate=self.column(p + "mlp.fc"), up=self.column(p + "mlp.gate"), down=self.row(p + "mlp.proj"),
                kv_scale=None if kv is None else kv.float().reshape(()), kv_algo=self.kv_algo,
            ))
        return out


def load_trtllm(path: Path, max_positions: int | None = None) -> Qwen2Model:
    """Merge the TP shards of a TensorRT-LLM Qwen2 checkpoint: column-parallel along out, row-parallel along in."""
    ck = read_checkpoint(path)
    cfg = ck.shape
    ranks = [read_safetensors([f]) for f in ck.rank_files]
    shards = _Shards(ranks, ck)
    layers = shards.layers(cfg)
    embeds = [r["transformer.vocab_embedding.weight"] for r in ranks]
    split_vocab = len(ranks) > 1 and embeds[0].shape[0] < cfg.vocab_size  # use_parallel_embedding along the vocab
    embed = (torch.cat(embeds) if split_vocab else embeds[0]).float()[: cfg.vocab_size]
    lm_head = shards.column("lm_head")
    lm_head.weight.data = lm_head.weight.data[: cfg.vocab_size]  # vocab padded to a multiple of TP
    return Qwen2Model(cfg, embed, layers, ranks[0]["transformer.ln_f.weight"].float(), lm_head, max_positions)


def hf_rank_tensors(path: Path, tp: int = 1, rank: int = 0) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """Rank `rank`'s tensors of an HF checkpoint at TP `tp`, in TensorRT-LLM checkpoint names, read a part at a
    time: the rank holds its shard (and one layer), never the whole checkpoint."""
    ck = read_hf_checkpoint(path)
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors weights", "the runtime loads safetensors only")
    t = {}
    with LazySafetensors(files) as lazy:
        for part in trtllm_parts(lazy, ck.shape):
            t.update(rank_shard(part, ck.shape, tp, rank))
    return ck, t


def load_hf(path: Path, max_positions: int | None = None, tp: int = 1, rank: int = 0,
            cls: type[Qwen2Model] = Qwen2Model) -> Qwen2Model:
    """An HF checkpoint (plain or ModelOpt's unified export) → the whole model, or rank `rank`'s shard at TP `tp`
    (split here at load, as TensorRT-LLM's PyTorch backend splits it)."""
    ck, t = hf_rank_tensors(path, tp, rank)
    model = _from_rank_tensors(t, ck, ck.shape.shard(tp, ck.precision) if tp > 1 else ck.shape, max_positions, cls)
    model.tp_size = tp
    return model


def load_rank(path: Path, rank: int, max_positions: int | None = None, cls: type[Qwen2Model] = Qwen2Model) -> Qwen2Model:
    """Only rank{rank}.safetensors of a TP checkpoint → a model of that rank's shard (cfg: Checkpoint.rank_shape).

    Its embedding and lm_head hold the rank's slice of the padded vocabulary (the embedding all of it where the
    checkpoint does not split it); runtime/tp/ wires the collectives that make the shards one model.
    """
    ck = read_checkpoint(path)
    cfg = ck.rank_shape
    t = read_safetensors([ck.rank_file(rank)])
    qkv_rows = t["transformer.layers.0.attention.qkv.weight"].shape[0] * (2 if ck.quant_algo == "W4A16_AWQ" else 1)
    if ck.quant_algo not in ("W8A16", "W4A16") and qkv_rows != cfg.q_size + 2 * cfg.kv_size:
        raise UserError(f"{ck.rank_file(rank)}: fused qkv has {qkv_rows} rows, not the {cfg.q_size + 2 * cfg.kv_size} "
                        f"of a TP {ck.tp} shard", "the rank files do not match config.json: rebuild the checkpoint")
    model = _from_rank_tensors(t, ck, cfg, max_positions, cls)
    model.tp_size = ck.tp
    return model


def _from_rank_tensors(t: dict, ck: Checkpoint, cfg, max_positions: int | None, cls: type[Qwen2Model]) -> Qwen2Model:
    """One rank file's tensors (or a whole TP-1 model's) → the model; cfg: that rank's dims."""
    shards = _Shards([t], ck)
    return cls(cfg, t["transformer.vocab_embedding.weight"].float(), shards.layers(cfg),
               t["transformer.ln_f.weight"].float(), shards.column("lm_head"), max_positions)
