"""config.pbtxt for each model, as typed `ModelConfig` messages (never text templates).

Pure functions of RepoSettings; `to_pbtxt` prints them with protobuf's text format, and the tests parse every
file back. Parameter keys are the ones the tensorrtllm_backend models read (for `tensorrt_llm`, the keys the
C++ backend reads after `fill_template.py`: `gpt_model_type` holds ${batching_strategy}, `gpt_model_path`
holds ${engine_dir}).
"""

from __future__ import annotations

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from trtqwen.serve.repo import interface as itf
from trtqwen.serve.repo.interface import Tensor
from trtqwen.serve.repo.settings import RepoSettings

# Executor worker of the C++ backend in NVIDIA's Triton TensorRT-LLM containers (orchestrator mode spawns it).
EXECUTOR_WORKER = "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"


def _b(v: bool) -> str:
    return "true" if v else "false"


def _add_tensors(repeated, tensors: tuple[Tensor, ...], io: str) -> None:
    for t in tensors:
        x = repeated.add(name=t.name, data_type=mc.DataType.Value(t.dtype), dims=list(t.dims))
        if io == "input":
            x.optional = t.optional
            x.allow_ragged_batch = t.ragged
        if t.scalar:
            x.reshape.SetInParent()  # `reshape: { shape: [ ] }`


def _base(name: str, s: RepoSettings, inputs, outputs, backend: str = "python", count: int = 1,
          decoupled: bool | None = None) -> mc.ModelConfig:
    c = mc.ModelConfig(name=name, backend=backend, max_batch_size=s.max_batch_size)
    _add_tensors(c.input, inputs, "input")
    _add_tensors(c.output, outputs, "output")
    c.instance_group.add(count=count, kind=mc.ModelInstanceGroup.KIND_CPU)
    if decoupled is not None:
        c.model_transaction_policy.decoupled = decoupled
    return c


def _params(c: mc.ModelConfig, values: dict[str, str]) -> mc.ModelConfig:
    for k, v in values.items():
        c.parameters[k].string_value = str(v)
    return c


def preprocessing_config(s: RepoSettings) -> mc.ModelConfig:
    c = _base(itf.PREPROCESSING, s, itf.PREPROCESSING_INPUTS, itf.PREPROCESSING_OUTPUTS)
    c.dynamic_batching.SetInParent()
    return _params(c, {"tokenizer_dir": s.tokenizer_dir, "add_special_tokens": _b(s.add_special_tokens),
                       "end_id": s.end_id, "pad_id": s.pad_id, "max_input_len": s.max_input_len})


def postprocessing_config(s: RepoSettings) -> mc.ModelConfig:
    c = _base(itf.POSTPROCESSING, s, itf.POSTPROCESSING_INPUTS, itf.POSTPROCESSING_OUTPUTS)
    c.dynamic_batching.SetInParent()
    return _params(c, {"tokenizer_dir": s.tokenizer_dir, "skip_special_tokens": _b(s.skip_special_tokens)})


ENGINE_HANG_TIMEOUT_S = 60


def _trtllm_common_params(s: RepoSettings) -> dict[str, str]:
    return {
        "max_beam_width": s.max_beam_width,
        "gpt_model_type": s.batching_strategy,
        "gpt_model_path": s.model_dir,
        "batch_scheduler_policy": s.batch_scheduler_policy,
        "kv_cache_free_gpu_mem_fraction": s.kv_cache_free_gpu_mem_fraction,
        "enable_kv_cache_reuse": _b(s.enable_kv_cache_reuse),
        "exclude_input_in_output": _b(s.exclude_input_in_output),
        "enable_chunked_context": _b(s.enable_chunked_context),
        "tokenizer_dir": s.tokenizer_dir,
    }


def _dynamic_batching(c: mc.ModelConfig, s: RepoSettings) -> None:
    c.dynamic_batching.preferred_batch_size.append(s.max_batch_size)
    c.dynamic_batching.max_queue_delay_microseconds = s.max_queue_delay_microseconds


def tensorrt_llm_config(s: RepoSettings) -> mc.ModelConfig:
    """The C++ `tensorrtllm` backend over the engine (runtime trtllm)."""
    c = _base(itf.TENSORRT_LLM, s, itf.TRTLLM_INPUTS, itf.TRTLLM_OUTPUTS, backend="tensorrtllm", count=s.instances,
              decoupled=s.streaming)
    _dynamic_batching(c, s)
    params = {**_trtllm_common_params(s), "FORCE_CPU_ONLY_INPUT_TENSORS": "no", "executor_worker_path": EXECUTOR_WORKER}
    if s.instances > 1:  # orchestrator mode: Triton balances over instances, each on its own group of GPUs
        params["gpu_device_ids"] = s.gpu_device_ids
    return _params(c, params)


def tensorrt_llm_torch_config(s: RepoSettings) -> mc.ModelConfig:
    """Our python model running the reference runtime, with the C++ backend's tensors and parameter keys."""
    c = _base(itf.TENSORRT_LLM, s, itf.TRTLLM_INPUTS, itf.TORCH_TRTLLM_OUTPUTS, count=s.instances, decoupled=s.streaming)
    _dynamic_batching(c, s)
    return _params(c, {
        **_trtllm_common_params(s),
        "skip_special_tokens": _b(s.skip_special_tokens),  # for its text_output, as postprocessing decodes
        "gpu_device_ids": s.gpu_device_ids,
        # The engine knows these; the reference runtime is told (it serves checkpoints, not engines).
        "max_input_len": s.max_input_len,
        "max_seq_len": s.max_seq_len,
        "max_num_tokens": s.max_num_tokens,
        "tensor_parallel_size": s.tp,  # an HF checkpoint is split at load (a TensorRT-LLM one has its rank files)
        "end_id": s.end_id,
        "pad_id": s.pad_id,
        "trtqwen_src": s.trtqwen_src,
        "stream_interval": s.stream_interval,  # TensorRT-LLM's and vLLM's: a streamed response every N tokens
        "engine_hang_timeout_s": ENGINE_HANG_TIMEOUT_S,  # an engine process silent this long with requests open: hung
    })


def tensorrt_llm_llmapi_config(s: RepoSettings) -> mc.ModelConfig:
    """TensorRT-LLM's llmapi model (PyTorch backend): text in, text out, `sampling_param_*` inputs.

    Its batch size and decoupling also live in model.yaml's triton_config; both say the same (written from the
    same settings) so the config is valid with or without Triton's auto-complete.
    """
    c = mc.ModelConfig(name=itf.TENSORRT_LLM, backend="python", max_batch_size=0)
    c.model_transaction_policy.decoupled = s.streaming
    c.instance_group.add(count=s.instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    inputs = [("text_input", "STRING", [-1], False), ("streaming", "BOOL", [1], True)] + [
        (f"sampling_param_{n}", t, [1], True) for n, t in LLMAPI_SAMPLING_INPUTS] + [
        ("sampling_param_stop", "STRING", [-1], True), ("return_finish_reason", "BOOL", [1], True),
        ("return_stop_reason", "BOOL", [1], True), ("return_cumulative_logprob", "BOOL", [1], True),
        ("stop", "BOOL", [1], True)]
    for name, dtype, dims, optional in inputs:
        c.input.add(name=name, data_type=mc.DataType.Value(f"TYPE_{dtype}"), dims=dims, optional=optional)
    for name, dtype in (("text_output", "STRING"), ("finish_reason", "STRING"), ("stop_reason", "STRING"),
                        ("cumulative_logprob", "FP32")):
        c.output.add(name=name, data_type=mc.DataType.Value(f"TYPE_{dtype}"), dims=[-1])
    if s.instances > 1:
        c.parameters["gpu_device_ids"].string_value = s.gpu_device_ids
    return c


# TensorRT-LLM triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt: sampling_param_<SamplingParams field>.
LLMAPI_SAMPLING_INPUTS = (
    ("best_of", "INT32"), ("temperature", "FP32"), ("top_k", "INT32"), ("top_p", "FP32"),
    ("frequency_penalty", "FP32"), ("presence_penalty", "FP32"), ("max_tokens", "INT32"), ("seed", "UINT64"),
    ("exclude_input_from_output", "BOOL"), ("return_perf_metrics", "BOOL"),
)


def bls_config(s: RepoSettings) -> mc.ModelConfig:
    c = _base(itf.BLS, s, itf.TEXT_INPUTS, itf.TEXT_OUTPUTS, decoupled=s.streaming)
    return _params(c, {
        "accumulate_tokens": _b(s.accumulate_tokens),
        "tensorrt_llm_model_name": itf.TENSORRT_LLM,
        "tensorrt_llm_interface": "llmapi" if s.runtime == "llmapi" else "tokens",
        "tokenizer_dir": s.tokenizer_dir,
        "skip_special_tokens": _b(s.skip_special_tokens),
    })


def _step(c: mc.ModelConfig, model: str, inputs: dict[str, str], outputs: dict[str, str]) -> None:
    step = c.ensemble_scheduling.step.add(model_name=model, model_version=-1)
    for k, v in inputs.items():
        step.input_map[k] = v
    for k, v in outputs.items():
        step.output_map[k] = v


def ensemble_config(s: RepoSettings) -> mc.ModelConfig:
    """preprocessing → tensorrt_llm → postprocessing, wired as NVIDIA's ensemble is.

    The torch runtime's tensorrt_llm answers in text itself, so its ensemble ends there (one python hop less per
    response; postprocessing stays in the repository for callers of it). With the llmapi runtime the tensorrt_llm
    step speaks text (its own inputs), so the ensemble's one step is tensorrt_llm_bls, which adapts the same text
    interface to it.
    """
    c = mc.ModelConfig(name=itf.ENSEMBLE, platform="ensemble", max_batch_size=s.max_batch_size)
    _add_tensors(c.input, itf.TEXT_INPUTS, "input")
    _add_tensors(c.output, itf.TEXT_OUTPUTS, "output")
    if s.runtime == "llmapi":
        names = {t.name: t.name for t in itf.TEXT_INPUTS}
        _step(c, itf.BLS, names, {t.name: t.name for t in itf.TEXT_OUTPUTS})
        return c
    _step(c, itf.PREPROCESSING, itf.ENSEMBLE_PREPROCESSING_INPUTS, itf.ENSEMBLE_PREPROCESSING_OUTPUTS)
    if s.runtime == "torch":
        _step(c, itf.TENSORRT_LLM, itf.ENSEMBLE_TRTLLM_INPUTS, itf.ENSEMBLE_TORCH_TRTLLM_OUTPUTS)
        return c
    _step(c, itf.TENSORRT_LLM, itf.ENSEMBLE_TRTLLM_INPUTS, itf.ENSEMBLE_TRTLLM_OUTPUTS)
    _step(c, itf.POSTPROCESSING, itf.ENSEMBLE_POSTPROCESSING_INPUTS, itf.ENSEMBLE_POSTPROCESSING_OUTPUTS)
    return c


def model_configs(s: RepoSettings) -> dict[str, mc.ModelConfig]:
    trtllm = {"trtllm": tensorrt_llm_config, "torch": tensorrt_llm_torch_config,
              "llmapi": tensorrt_llm_llmapi_config}[s.runtime]
    return {
        itf.ENSEMBLE: ensemble_config(s),
        itf.PREPROCESSING: preprocessing_config(s),
        itf.TENSORRT_LLM: trtllm(s),
        itf.POSTPROCESSING: postprocessing_config(s),
        itf.BLS: bls_config(s),
    }


def to_pbtxt(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def from_pbtxt(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())
