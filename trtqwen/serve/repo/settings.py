"""What a model repository is made of, decided once from build.json and the packaging options.

Every number and path in the generated configs comes from here, and everything here comes from the build's
manifest (or an explicit option that overrides it): nothing is typed twice.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from trtqwen.build.trtllm_build import engine_features
from trtqwen.errors import UserError
from trtqwen.build.spec import BuildSpec
from trtqwen.qwen_tokenizer import EOS_ID, EOS_TOKEN, PAD_ID, PAD_TOKEN

RUNTIMES = ("torch", "trtllm", "llmapi")
# Replicas of the model: instances of tensorrt_llm in one tritonserver (tensorrtllm_backend's multi-instance mode),
# or one tritonserver per replica behind a load balancer (`trtqwen serve` starts nginx in front).
LAYOUTS = ("instances", "servers")
# Qwen2.5: <|im_end|> ends an assistant turn, <|endoftext|> pads (FACTS §2); used when the tokenizer lacks them.


@dataclass(frozen=True)
class RepoSettings:
    runtime: str
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    tp: int
    gpu_groups: tuple[tuple[int, ...], ...]  # the GPUs of each replica, tp each (a GPU may repeat: two copies on one)
    kv_cache_free_gpu_mem_fraction: float
    layout: str
    streaming: bool  # decoupled tensorrt_llm / tensorrt_llm_bls: one response per token
    model_dir: str  # engine dir (trtllm), TRT-LLM or HF checkpoint (torch), HF checkpoint (llmapi)
    tokenizer_dir: str
    end_id: int
    pad_id: int
    enable_kv_cache_reuse: bool = True
    enable_chunked_context: bool = True  # both need paged context FMHA in the engine (engine.engine_features)
    exclude_input_in_output: bool = True  # tensorrtllm_backend's default (false) echoes the prompt
    batch_scheduler_policy: str = "guaranteed_no_evict"
    batching_strategy: str = "inflight_fused_batching"
    max_queue_delay_microseconds: int = 0
    max_beam_width: int = 1
    accumulate_tokens: bool = True  # BLS: detokenize the accumulated ids, so multi-byte characters stream whole
    add_special_tokens: bool = False  # prompts arrive already formatted (ChatML); Qwen adds no BOS anyway
    skip_special_tokens: bool = True
    trtqwen_src: str = ""  # where the torch model finds `trtqwen` if it is not installed in the stub's Python
    stream_interval: int = 1  # torch runtime: a streamed response every N tokens (TensorRT-LLM's and vLLM's name)

    @property
    def instances(self) -> int:
        """Model instances of tensorrt_llm in one tritonserver."""
        return len(self.gpu_groups) if self.layout == "instances" else 1

    @property
    def gpu_device_ids(self) -> str:
        """One group of `tp` GPUs per instance, groups separated by ';' (tensorrtllm_backend's format). A server of
        the servers layout sees only its own group (CUDA_VISIBLE_DEVICES), as GPUs 0..tp-1."""
        groups = self.gpu_groups if self.layout == "instances" else [range(self.tp)]
        return ";".join(",".join(str(g) for g in group) for group in groups)

    @property
    def servers(self) -> list[dict]:
        """The tritonservers `serve` starts: one for the instances layout, one per replica for the servers layout."""
        if self.layout == "instances":
            return [{"gpus": sorted({g for group in self.gpu_groups for g in group})}]
        return [{"gpus": list(group)} for group in self.gpu_groups]

    @property
    def world_size(self) -> int:
        """MPI ranks `serve` must launch: TP ranks for one C++-backend instance (leader mode), else one process."""
        return self.tp if self.runtime == "trtllm" and self.instances == 1 else 1

    def template_values(self) -> dict[str, str]:
        """The same settings under tensorrtllm_backend's `fill_template.py` variable names, for the record."""
        b = lambda v: "true" if v else "false"  # noqa: E731
        return {
            "triton_backend": "tensorrtllm" if self.runtime == "trtllm" else "python",
            "triton_max_batch_size": str(self.max_batch_size),
            "decoupled_mode": b(self.streaming),
            "engine_dir": self.model_dir,
            "tokenizer_dir": self.tokenizer_dir,
            "batching_strategy": self.batching_strategy,
            "max_queue_delay_microseconds": str(self.max_queue_delay_microseconds),
            "max_beam_width": str(self.max_beam_width),
            "kv_cache_free_gpu_mem_fraction": str(self.kv_cache_free_gpu_mem_fraction),
            "enable_kv_cache_reuse": b(self.enable_kv_cache_reuse),
            "exclude_input_in_output": b(self.exclude_input_in_output),
            "batch_scheduler_policy": self.batch_scheduler_policy,
            "enable_chunked_context": b(self.enable_chunked_context),
            "gpu_device_ids": self.gpu_device_ids,
            "add_special_tokens": b(self.add_special_tokens),
            "skip_special_tokens": b(self.skip_special_tokens),
            "accumulate_tokens": b(self.accumulate_tokens),
            "tensorrt_llm_model_name": "tensorrt_llm",
            "logits_datatype": "TYPE_FP32",
            "preprocessing_instance_count": "1",
            "postprocessing_instance_count": "1",
            "bls_instance_count": "1",
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def special_token_ids(tokenizer_dir: Path) -> tuple[int, int]:
    """(end_id, pad_id) from the tokenizer files: Qwen's <|im_end|> / <|endoftext|>, else its eos / pad token."""
    ids: dict[str, int] = {}
    tok_json = tokenizer_dir / "tokenizer.json"
    if tok_json.is_file():
        data = json.loads(tok_json.read_text())
        ids = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        vocab = (data.get("model") or {}).get("vocab") or {}
        ids.update({k: vocab[k] for k in (EOS_TOKEN, PAD_TOKEN) if k in vocab})
    cfg_path = tokenizer_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    ids.update({t["content"]: int(i) for i, t in (cfg.get("added_tokens_decoder") or {}).items() if "content" in t})

    def token_name(v):
        return v.get("content") if isinstance(v, dict) else v

    end = ids.get(EOS_TOKEN, ids.get(token_name(cfg.get("eos_token")), EOS_ID))
    pad = ids.get(PAD_TOKEN, ids.get(token_name(cfg.get("pad_token")), PAD_ID))
    return int(end), int(pad)


def read_build_spec(build_dir: Path, manifest: dict) -> BuildSpec:
    """build.json's spec as a BuildSpec, refused when it lacks what a repository is sized by."""
    raw = manifest.get("spec") or {}
    missing = [k for k in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "tp") if k not in raw]
    if missing:
        raise UserError(f"{build_dir / 'build.json'} has no {', '.join(missing)} in its spec",
                        "rebuild with `trtqwen build` (the manifest is incomplete or from another tool)")
    return BuildSpec.from_dict(raw)


def gpu_groups(replicas: int, tp: int, gpus: str | None = None) -> tuple[tuple[int, ...], ...]:
    """`replicas` groups of `tp` GPU ids from `gpus` ("0,1,2,3"; default 0..replicas*tp-1)."""
    if replicas < 1:
        raise UserError(f"replicas must be at least 1, got {replicas}")
    try:
        ids = list(range(replicas * tp)) if gpus is None else [int(g) for g in str(gpus).split(",") if g.strip()]
    except ValueError:
        raise UserError(f"--gpus {gpus!r} is not a list of GPU ids", "give them comma-separated, e.g. --gpus 0,1,2,3")
    if len(ids) != replicas * tp or min(ids) < 0:
        raise UserError(f"{replicas} replica(s) at TP {tp} need {replicas * tp} GPU ids, got --gpus {gpus}",
                        f"give {replicas * tp} ids (a replica's {tp} in a row); repeat one to put two copies on a GPU "
                        "(--gpus 0,0)")
    groups = tuple(tuple(ids[i * tp:(i + 1) * tp]) for i in range(replicas))
    bad = [g for g in groups if len(set(g)) != tp]
    if bad:
        raise UserError(f"a TP {tp} replica needs {tp} different GPUs, got {bad[0]}", "list each replica's GPUs once")
    return groups


def resolve_settings(build_dir: Path, manifest: dict, spec: BuildSpec, runtime: str, model_dir: Path, *,
                     max_batch_size: int | None, replicas: int = 1, gpus: str | None = None, layout: str = "servers",
                     kv_cache_free_gpu_mem_fraction: float | None, streaming: bool,
                     stream_interval: int = 1) -> RepoSettings:
    """Settings from build.json's spec and plan; an option given explicitly wins over the build's value."""
    plan = manifest.get("plan") or {}
    batch = spec.max_batch_size if max_batch_size is None else max_batch_size
    if batch < 1:
        raise UserError(f"max_batch_size must be at least 1, got {batch}")
    if runtime == "trtllm" and batch > spec.max_batch_size:
        raise UserError(f"max_batch_size {batch} is larger than the {spec.max_batch_size} the engine was built for",
                        f"use --max-batch-size {spec.max_batch_size} or less, or rebuild with a larger one")
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}", "use instances (one tritonserver) or servers (one per replica, "
                                                      "nginx in front)")
    groups = gpu_groups(replicas, spec.tp, gpus)
    if runtime == "llmapi" and len(groups) > 1 and layout == "instances":
        raise UserError("the llmapi model runs one instance per tritonserver",
                        "use --layout servers for its replicas (one tritonserver per replica behind nginx)")
    fraction = plan.get("kv_cache_free_gpu_mem_fraction", 0.9) if kv_cache_free_gpu_mem_fraction is None \
        else kv_cache_free_gpu_mem_fraction
    if not 0 < fraction <= 1:
        raise UserError(f"kv_cache_free_gpu_mem_fraction must be in (0, 1], got {fraction}",
                        "it is the share of the GPU memory left after the weights that the KV cache takes")
    if stream_interval < 1:
        raise UserError(f"stream_interval must be at least 1, got {stream_interval}", "1 sends every token as it comes")
    tokenizer_dir = (build_dir / manifest.get("tokenizer_dir", "tokenizer")).resolve()
    end_id, pad_id = special_token_ids(tokenizer_dir)
    paged = engine_features(spec)["paged_context_fmha"] if runtime == "trtllm" else True
    return RepoSettings(
        runtime=runtime, max_batch_size=int(batch), max_input_len=spec.max_input_len,
        max_seq_len=spec.max_seq_len, max_num_tokens=spec.max_num_tokens, tp=spec.tp,
        gpu_groups=groups, layout=layout, kv_cache_free_gpu_mem_fraction=float(fraction), streaming=bool(streaming),
        stream_interval=int(stream_interval),
        model_dir=str(model_dir.resolve()), tokenizer_dir=str(tokenizer_dir), end_id=end_id, pad_id=pad_id,
        enable_kv_cache_reuse=paged, enable_chunked_context=paged,
        trtqwen_src=str(Path(__file__).resolve().parents[3]),
    )
