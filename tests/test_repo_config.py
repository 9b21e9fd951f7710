"""The generated model repository: tensorrtllm_backend names, values from build.json, refusals, llmapi model.yaml."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.checkpoints import write_checkpoint
from trtqwen.build.spec import BuildSpec
from trtqwen.errors import UserError
from trtqwen.serve.repo import check_engine_compatible, check_repo_servable, generate_repo, read_record
from trtqwen.serve.repo import generate as generate_module
from trtqwen.serve.repo.configs import from_pbtxt
from trtqwen.serve.repo.interface import MODELS
from trtqwen.serve.repo.llmapi import model_yaml
from trtqwen.serve.repo.text import IncrementalDecoder, TextDeltas, parse_word_list, to_word_list_format

DATA = Path(__file__).parent / "data"
SPEC = dict(model="Qwen/Qwen2.5-7B-Instruct", precision="int4_awq", tp=1, gpu="rtx4090d", kv_cache_dtype="auto",
            max_batch_size=48, max_input_len=2048, max_seq_len=4096, max_num_tokens=8192)

# FACTS §5 / TensorRT-LLM triton_backend/all_models/inflight_batcher_llm/ensemble/config.pbtxt (1.x names).
ENSEMBLE_INPUTS = {
    "text_input": "TYPE_STRING", "max_tokens": "TYPE_INT32", "bad_words": "TYPE_STRING", "stop_words": "TYPE_STRING",
    "end_id": "TYPE_INT32", "pad_id": "TYPE_INT32", "top_k": "TYPE_INT32", "beam_width": "TYPE_INT32",
    "num_return_sequences": "TYPE_INT32", "min_tokens": "TYPE_INT32", "seed": "TYPE_UINT64", "top_p": "TYPE_FP32",
    "temperature": "TYPE_FP32", "length_penalty": "TYPE_FP32", "repetition_penalty": "TYPE_FP32",
    "presence_penalty": "TYPE_FP32", "frequency_penalty": "TYPE_FP32", "exclude_input_in_output": "TYPE_BOOL",
    "return_log_probs": "TYPE_BOOL", "return_context_logits": "TYPE_BOOL", "return_generation_logits": "TYPE_BOOL",
    "return_perf_metrics": "TYPE_BOOL", "stream": "TYPE_BOOL",
}
ENSEMBLE_OUTPUTS = {"text_output", "cum_log_probs", "output_log_probs", "batch_index", "sequence_index",
                    "num_input_tokens", "num_output_tokens"}
TRTLLM_INPUTS = {
    "input_ids": "TYPE_INT32", "input_lengths": "TYPE_INT32", "request_output_len": "TYPE_INT32",
    "end_id": "TYPE_INT32", "pad_id": "TYPE_INT32", "stop_words_list": "TYPE_INT32", "bad_words_list": "TYPE_INT32",
    "runtime_top_k": "TYPE_INT32", "runtime_top_p": "TYPE_FP32", "temperature": "TYPE_FP32", "len_penalty": "TYPE_FP32",
    "repetition_penalty": "TYPE_FP32", "presence_penalty": "TYPE_FP32", "frequency_penalty": "TYPE_FP32",
    "seed": "TYPE_UINT64", "min_tokens": "TYPE_INT32", "streaming": "TYPE_BOOL", "exclude_input_in_output": "TYPE_BOOL",
}
# Every parameter key of TensorRT-LLM's triton_backend/.../tensorrt_llm/config.pbtxt (what the C++ backend reads).
CPP_BACKEND_PARAMETERS = {
    "max_beam_width", "FORCE_CPU_ONLY_INPUT_TENSORS", "gpt_model_type", "gpt_model_path", "encoder_model_path",
    "max_tokens_in_paged_kv_cache", "max_attention_window_size", "sink_token_length", "batch_scheduler_policy",
    "kv_cache_free_gpu_mem_fraction", "cross_kv_cache_fraction", "kv_cache_host_memory_bytes",
    "kv_cache_onboard_blocks", "enable_trt_overlap", "exclude_input_in_output", "cancellation_check_period_ms",
    "stats_check_period_ms", "iter_stats_max_iterations", "request_stats_max_iterations", "enable_kv_cache_reuse",
    "normalize_log_probs", "enable_chunked_context", "gpu_device_ids", "participant_ids", "num_nodes",
    "lora_cache_optimal_adapter_size", "lora_cache_max_adapter_size", "lora_cache_gpu_memory_fraction",
    "lora_cache_host_memory_bytes", "lora_prefetch_dir", "decoding_mode", "executor_worker_path",
    "lookahead_window_size", "lookahead_ngram_size", "lookahead_verification_set_size", "medusa_choices",
    "eagle_choices", "gpu_weights_percent", "enable_context_fmha_fp32_acc", "multi_block_mode", "cuda_graph_mode",
    "cuda_graph_cache_size", "speculative_decoding_fast_logits", "tokenizer_dir", "guided_decoding_backend",
    "xgrammar_tokenizer_info_path",
}
# tensorrt_llm.LLM() arguments (TensorRT-LLM tensorrt_llm/llmapi/llm_args.py, BaseLlmArgs / TorchLlmArgs fields)
# that trtqwen may write besides the keys of NVIDIA's model.yaml.
LLM_ARGS = {"model", "tokenizer", "backend", "tensor_parallel_size", "pipeline_parallel_size", "max_batch_size",
            "max_seq_len", "max_input_len", "max_num_tokens", "trust_remote_code", "kv_cache_config"}
KV_CACHE_CONFIG_FIELDS = {"free_gpu_memory_fraction", "enable_block_reuse", "max_tokens", "host_cache_size"}


def make_build(root: Path, spec: dict | None = None, ckpt_tp: int | None = None, engine: str | None = None,
               hf_dir: bool = False) -> Path:
    """A build directory as `trtqwen build` writes it, without weights (the config tests never load them)."""
    spec = {**SPEC, **(spec or {})}
    tp = spec["tp"] if ckpt_tp is None else ckpt_tp
    write_checkpoint(root / "checkpoint", BuildSpec.from_dict(spec), tp=tp)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text(json.dumps({"added_tokens": [
        {"id": 151643, "content": "<|endoftext|>"}, {"id": 151644, "content": "<|im_start|>"},
        {"id": 151645, "content": "<|im_end|>"}], "model": {"vocab": {}}}))
    stages = {"checkpoint": {"dir": "checkpoint", "format": "trtllm"}, "engine": {"status": "pending"}}
    if engine:
        (root / "engine").mkdir()
        (root / "engine" / "config.json").write_text(json.dumps(
            {"version": engine, "pretrained_config": {"mapping": {"world_size": tp, "tp_size": tp}}}))
        (root / "engine" / "engine_versions.json").write_text(json.dumps({"tensorrt_llm": engine, "tensorrt": "10.14.1.48"}))
        stages["engine"] = {"status": "built", "dir": "engine", "tensorrt_llm": engine}
    if hf_dir:
        (root / "hf_checkpoint").mkdir()
        (root / "hf_checkpoint" / "config.json").write_text("{}")
        stages["checkpoint"]["hf_dir"] = "hf_checkpoint"
    (root / "build.json").write_text(json.dumps({
        "spec": spec, "plan": {"kv_cache_free_gpu_mem_fraction": 0.87},
        "versions": {"tensorrt_llm": None, "torch": "2.13.0"}, "stages": stages, "tokenizer_dir": "tokenizer",
        "source": {"path": str(root / "nowhere")}}))
    return root


def configs(repo: Path) -> dict:
    return {m: from_pbtxt((repo / m / "config.pbtxt").read_text()) for m in MODELS}


def params(cfg) -> dict:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def dtype_name(t) -> str:
    from tritonclient.grpc import model_config_pb2 as mc

    return mc.DataType.Name(t.data_type)


@pytest.fixture
def build(tmp_path):
    return make_build(tmp_path / "build")


# --- layout and names --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("runtime", ["torch", "trtllm", "llmapi"])
def test_five_models_for_each_runtime(tmp_path, runtime):
    b = make_build(tmp_path / "b", engine="1.2.1", hf_dir=True)
    repo = generate_repo(b, tmp_path / "repo", runtime=runtime, serving={"tensorrt_llm": "1.2.1"})
    cfgs = configs(repo)  # every config.pbtxt parses back into ModelConfig
    assert {c.name for c in cfgs.values()} == set(MODELS)
    for m in MODELS:
        assert (repo / m / "1").is_dir()
    for m in ("preprocessing", "postprocessing", "tensorrt_llm_bls"):
        assert (repo / m / "1" / "model.py").is_file() and (repo / m / "1" / "trtqwen_text.py").is_file()
    trt = cfgs["tensorrt_llm"]
    if runtime == "trtllm":
        assert trt.backend == "tensorrtllm" and not (repo / "tensorrt_llm" / "1" / "model.py").exists()
    elif runtime == "torch":
        assert trt.backend == "python" and (repo / "tensorrt_llm" / "1" / "model.py").is_file()
    else:
        assert trt.backend == "python" and (repo / "tensorrt_llm" / "1" / "model.yaml").is_file()
    record = read_record(repo)
    assert record["runtime"] == runtime and record["spec"] == SPEC and record["build_dir"] == str(b.resolve())
    assert record["created"] and record["versions"]["trtqwen"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_tensor_names_and_types_match_tensorrtllm_backend(build, tmp_path):
    cfgs = configs(generate_repo(build, tmp_path / "repo"))
    for model in ("ensemble", "tensorrt_llm_bls"):
        inputs = {t.name: dtype_name(t) for t in cfgs[model].input}
        assert {k: inputs.get(k) for k in ENSEMBLE_INPUTS} == ENSEMBLE_INPUTS
        assert ENSEMBLE_OUTPUTS <= {t.name for t in cfgs[model].output}
        text_out = next(t for t in cfgs[model].output if t.name == "text_output")
        assert dtype_name(text_out) == "TYPE_STRING" and list(text_out.dims) == [-1]
        required = {t.name for t in cfgs[model].input if not t.optional}
        assert required == {"text_input", "max_tokens"}
        assert not {"min_length", "random_seed"} & set(inputs)  # 0.x names; 1.x clients send min_tokens / seed
    trt = {t.name: t for t in cfgs["tensorrt_llm"].input}
    assert {k: dtype_name(trt[k]) for k in TRTLLM_INPUTS if k in trt} == TRTLLM_INPUTS
    assert list(trt["stop_words_list"].dims) == [2, -1] and list(trt["bad_words_list"].dims) == [2, -1]
    outs = {t.name: list(t.dims) for t in cfgs["tensorrt_llm"].output}
    assert outs["output_ids"] == [-1, -1] and outs["sequence_length"] == [-1]


@pytest.mark.parametrize("runtime", ["torch", "trtllm", "llmapi"])
def test_ensemble_wiring_is_consistent(tmp_path, runtime):
    """Each step reads only ensemble inputs or earlier steps' outputs, through names its model declares."""
    b = make_build(tmp_path / "b", engine="1.2.1", hf_dir=True)
    cfgs = configs(generate_repo(b, tmp_path / "repo", runtime=runtime, serving={}))
    ens = cfgs["ensemble"]
    available = {t.name for t in ens.input}
    steps = [s.model_name for s in ens.ensemble_scheduling.step]
    assert steps == {"llmapi": ["tensorrt_llm_bls"], "torch": ["preprocessing", "tensorrt_llm"],
                     "trtllm": ["preprocessing", "tensorrt_llm", "postprocessing"]}[runtime]
    for step in ens.ensemble_scheduling.step:
        model = cfgs[step.model_name]
        assert set(step.input_map) <= {t.name for t in model.input}, step.model_name
        assert set(step.input_map.values()) <= available, step.model_name
        assert set(step.output_map) <= {t.name for t in model.output}, step.model_name
        available |= set(step.output_map.values())
        for t in model.input:  # what a step requires, the ensemble provides
            assert t.optional or t.name in step.input_map, (step.model_name, t.name)
    produced = set().union(*(s.output_map.values() for s in ens.ensemble_scheduling.step))
    assert {t.name for t in ens.output} <= produced
    assert all(c.max_batch_size == ens.max_batch_size for n, c in cfgs.items() if n != "tensorrt_llm" or runtime != "llmapi")


def test_tensorrt_llm_parameters_are_the_backends_keys(tmp_path):
    b = make_build(tmp_path / "b", engine="1.2.1")
    cfgs = configs(generate_repo(b, tmp_path / "repo", runtime="trtllm", serving={"tensorrt_llm": "1.2.1"}))
    trt = cfgs["tensorrt_llm"]
    p = params(trt)
    assert set(p) <= CPP_BACKEND_PARAMETERS
    assert p["gpt_model_type"] == "inflight_fused_batching"
    assert p["gpt_model_path"] == str((b / "engine").resolve())
    assert p["kv_cache_free_gpu_mem_fraction"] == "0.87"  # the build's plan
    assert p["enable_kv_cache_reuse"] == "true" and p["exclude_input_in_output"] == "true"
    assert p["batch_scheduler_policy"] == "guaranteed_no_evict"
    assert "gpu_device_ids" not in p  # one instance: leader mode, one MPI rank per GPU
    assert trt.model_transaction_policy.decoupled and trt.max_batch_size == 48
    assert list(trt.dynamic_batching.preferred_batch_size) == [48]
    tok = str((b / "tokenizer").resolve())
    assert params(cfgs["preprocessing"])["tokenizer_dir"] == tok and params(cfgs["postprocessing"])["tokenizer_dir"] == tok
    assert params(cfgs["postprocessing"])["skip_special_tokens"] == "true"
    bls = params(cfgs["tensorrt_llm_bls"])
    assert bls["accumulate_tokens"] == "true" and bls["tensorrt_llm_model_name"] == "tensorrt_llm"
    assert cfgs["tensorrt_llm_bls"].model_transaction_policy.decoupled
    pre = params(cfgs["preprocessing"])
    assert (pre["end_id"], pre["pad_id"]) == ("151645", "151643")  # Qwen's <|im_end|>, <|endoftext|>
    assert read_record(tmp_path / "repo")["serve"]["world_size"] == 1


def test_torch_runtime_parameters(build, tmp_path):
    trt = configs(generate_repo(build, tmp_path / "repo"))["tensorrt_llm"]
    p = params(trt)
    assert p["gpt_model_path"] == str((build / "checkpoint").resolve())
    assert (p["max_input_len"], p["max_seq_len"], p["max_num_tokens"]) == ("2048", "4096", "8192")
    assert p["gpt_model_type"] == "inflight_fused_batching" and p["exclude_input_in_output"] == "true"
    assert trt.model_transaction_policy.decoupled


def test_values_come_from_build_json(tmp_path):
    a = configs(generate_repo(make_build(tmp_path / "a"), tmp_path / "ra"))
    changed = {"max_batch_size": 7, "max_input_len": 100, "max_seq_len": 300, "max_num_tokens": 512}
    b = configs(generate_repo(make_build(tmp_path / "b", spec=changed), tmp_path / "rb"))
    for m in MODELS:
        assert (a[m].max_batch_size, b[m].max_batch_size) == (48, 7)
    pa, pb = params(a["tensorrt_llm"]), params(b["tensorrt_llm"])
    assert (pa["max_seq_len"], pb["max_seq_len"]) == ("4096", "300")
    assert (pa["max_input_len"], pb["max_input_len"]) == ("2048", "100")
    assert pb["max_num_tokens"] == "512"


def test_options_override_the_build(build, tmp_path):
    repo = generate_repo(build, tmp_path / "repo", max_batch_size=8, kv_cache_free_gpu_mem_fraction=0.5,
                         streaming=False, replicas=2, layout="instances")
    cfgs = configs(repo)
    assert cfgs["ensemble"].max_batch_size == 8
    p = params(cfgs["tensorrt_llm"])
    assert p["kv_cache_free_gpu_mem_fraction"] == "0.5" and p["gpu_device_ids"] == "0;1"
    assert not cfgs["tensorrt_llm"].model_transaction_policy.decoupled
    assert not cfgs["tensorrt_llm_bls"].model_transaction_policy.decoupled
    assert cfgs["tensorrt_llm"].instance_group[0].count == 2


def test_trtllm_instances_use_orchestrator_gpu_groups(tmp_path):
    b = make_build(tmp_path / "b", spec={"tp": 2}, engine="1.2.1")
    repo = generate_repo(b, tmp_path / "repo", runtime="trtllm", replicas=2, layout="instances", serving={"tensorrt_llm": "1.2.1"})
    assert params(configs(repo)["tensorrt_llm"])["gpu_device_ids"] == "0,1;2,3"
    record = read_record(repo)
    assert record["serve"]["world_size"] == 1 and record["serve"]["env"] == {"TRTLLM_ORCHESTRATOR": "1"}
    repo1 = generate_repo(b, tmp_path / "repo1", runtime="trtllm", serving={"tensorrt_llm": "1.2.1"})
    assert read_record(repo1)["serve"]["world_size"] == 2  # leader mode: mpirun, one rank per GPU


# --- refusals ----------------------------------------------------------------------------------------------------
def test_refuses_a_directory_without_build_json(tmp_path):
    with pytest.raises(UserError, match="not a trtqwen build directory"):
        generate_repo(tmp_path, tmp_path / "repo")


def test_refuses_a_build_without_checkpoint(build, tmp_path):
    (build / "checkpoint" / "config.json").unlink()
    with pytest.raises(UserError, match="no checkpoint") as e:
        generate_repo(build, tmp_path / "repo")
    assert "trtqwen build" in str(e.value)


def test_refuses_trtllm_without_a_built_engine(build, tmp_path):
    with pytest.raises(UserError, match="no built TensorRT engine") as e:
        generate_repo(build, tmp_path / "repo", runtime="trtllm")
    assert "4090D" in str(e.value) and "build.sh" in str(e.value)


def test_refuses_an_engine_from_another_tensorrt_llm(tmp_path):
    b = make_build(tmp_path / "b", engine="1.2.1")
    with pytest.raises(UserError) as e:
        generate_repo(b, tmp_path / "repo", runtime="trtllm", serving={"tensorrt_llm": "1.3.0rc2"})
    assert "1.2.1" in str(e.value) and "1.3.0rc2" in str(e.value)
    with pytest.raises(UserError, match="1.1.0.*1.2.1"):
        check_engine_compatible({"tensorrt_llm": "1.1.0"}, {"tensorrt_llm": "1.2.1"})
    check_engine_compatible({"tensorrt_llm": "1.2.1"}, {"tensorrt_llm": "1.2.1"})
    check_engine_compatible({"tensorrt_llm": "1.2.1"}, {})  # TensorRT-LLM absent here: `serve` checks again where it runs


def test_serving_version_is_read_lazily_from_the_installed_tensorrt_llm(tmp_path, monkeypatch):
    b = make_build(tmp_path / "b", engine="1.2.1")
    monkeypatch.setattr("trtqwen.serve.repo.checks.serving_environment", lambda: {"tensorrt_llm": "1.0.0"})
    with pytest.raises(UserError, match="1.2.1.*1.0.0"):
        generate_repo(b, tmp_path / "repo", runtime="trtllm")
    monkeypatch.setattr("trtqwen.serve.repo.checks.serving_environment", lambda: {})
    repo = generate_repo(b, tmp_path / "repo", runtime="trtllm")
    assert read_record(repo)["versions"]["tensorrt_llm"] == "1.2.1"
    assert any("serve" in n for n in read_record(repo)["notes"])
    with pytest.raises(UserError, match="1.2.1.*1.3.0"):
        check_repo_servable(repo, serving={"tensorrt_llm": "1.3.0"})
    assert check_repo_servable(repo, serving={"tensorrt_llm": "1.2.1"})["runtime"] == "trtllm"


def test_refuses_tp_mismatch(tmp_path):
    b = make_build(tmp_path / "b", spec={"tp": 2}, ckpt_tp=1)
    with pytest.raises(UserError, match="tp 2.*tp 1"):
        generate_repo(b, tmp_path / "repo")


def test_refuses_unknown_runtime(build, tmp_path):
    with pytest.raises(UserError, match="unknown runtime 'vllm'") as e:
        generate_repo(build, tmp_path / "repo", runtime="vllm")
    assert "torch" in str(e.value) and "trtllm" in str(e.value) and "llmapi" in str(e.value)


def test_refuses_bad_options(tmp_path):
    b = make_build(tmp_path / "b", engine="1.2.1")
    with pytest.raises(UserError, match="larger than the 48"):
        generate_repo(b, tmp_path / "r", runtime="trtllm", max_batch_size=64, serving={})
    with pytest.raises(UserError, match="kv_cache_free_gpu_mem_fraction"):
        generate_repo(b, tmp_path / "r", kv_cache_free_gpu_mem_fraction=1.5)
    with pytest.raises(UserError, match="llmapi"):
        generate_repo(b, tmp_path / "r", runtime="llmapi")  # no HF-format checkpoint anywhere
    assert not (tmp_path / "r").exists()


def test_existing_output_needs_force_and_is_replaced_whole(build, tmp_path):
    out = generate_repo(build, tmp_path / "repo")
    (out / "stale.txt").write_text("old")
    with pytest.raises(UserError, match="--force"):
        generate_repo(build, out)
    generate_repo(build, out, force=True, max_batch_size=3)
    assert not (out / "stale.txt").exists() and configs(out)["ensemble"].max_batch_size == 3


def test_a_failed_write_leaves_nothing_behind(build, tmp_path, monkeypatch):
    def boom(config):
        raise RuntimeError("disk full")

    monkeypatch.setattr(generate_module, "to_pbtxt", boom)
    with pytest.raises(RuntimeError):
        generate_repo(build, tmp_path / "repo")
    assert not (tmp_path / "repo").exists() and not list(tmp_path.glob(".tmp-*"))


# --- llmapi ------------------------------------------------------------------------------------------------------
def test_llmapi_model_yaml_keys_are_nvidias_and_llm_args(tmp_path, monkeypatch):
    monkeypatch.setattr("trtqwen.serve.repo.llmapi.find_llmapi_model_code", lambda explicit=None: None)
    b = make_build(tmp_path / "b", spec={"tp": 2}, ckpt_tp=2, hf_dir=True)
    repo = generate_repo(b, tmp_path / "repo", runtime="llmapi", serving={})
    ours = yaml.safe_load((repo / "tensorrt_llm" / "1" / "model.yaml").read_text())
    theirs = yaml.safe_load((DATA / "llmapi_model.yaml").read_text())
    assert set(theirs) <= set(ours)
    assert set(ours) - {"triton_config"} <= LLM_ARGS
    assert set(ours["triton_config"]) == set(theirs["triton_config"])
    assert set(ours["kv_cache_config"]) <= KV_CACHE_CONFIG_FIELDS
    assert ours["model"] == str((b / "hf_checkpoint").resolve())
    assert ours["tensor_parallel_size"] == 2 and ours["backend"] == "pytorch"
    assert (ours["max_batch_size"], ours["max_seq_len"], ours["max_num_tokens"]) == (48, 4096, 8192)
    assert ours["kv_cache_config"]["free_gpu_memory_fraction"] == 0.87
    trt = configs(repo)["tensorrt_llm"]  # config.pbtxt agrees with triton_config (valid with or without auto-complete)
    assert trt.max_batch_size == ours["triton_config"]["max_batch_size"] == 0
    assert trt.model_transaction_policy.decoupled == ours["triton_config"]["decoupled"] is True
    assert {"text_input", "streaming", "sampling_param_max_tokens"} <= {t.name for t in trt.input}
    assert any("model.py" in n for n in read_record(repo)["notes"])  # NVIDIA's model code is not shipped here


def test_llmapi_model_code_is_copied_when_found(tmp_path):
    b = make_build(tmp_path / "b", hf_dir=True)
    src = tmp_path / "nv"
    src.mkdir()
    (src / "model.py").write_text("# NVIDIA's\n")
    (src / "helpers.py").write_text("# NVIDIA's\n")
    repo = generate_repo(b, tmp_path / "repo", runtime="llmapi", llmapi_model_src=src, serving={})
    assert (repo / "tensorrt_llm" / "1" / "model.py").read_text() == "# NVIDIA's\n"
    assert (repo / "tensorrt_llm" / "1" / "helpers.py").is_file() and not read_record(repo)["notes"]


@pytest.mark.parametrize("precision", ["bf16", "int4_awq"])
def test_llmapi_falls_back_to_the_source_model_only_when_unquantized(tmp_path, precision):
    b = make_build(tmp_path / "b", spec={"precision": precision})
    src = tmp_path / "b" / "nowhere"
    src.mkdir()
    (src / "config.json").write_text("{}")
    if precision != "bf16":  # serving the source would serve other weights than the build's
        with pytest.raises(UserError, match="--target pytorch"):
            generate_repo(b, tmp_path / "repo", runtime="llmapi", serving={})
        return
    repo = generate_repo(b, tmp_path / "repo", runtime="llmapi", serving={})
    assert yaml.safe_load((repo / "tensorrt_llm" / "1" / "model.yaml").read_text())["model"] == str(src.resolve())


def test_model_yaml_is_pure_settings():
    from trtqwen.serve.repo.settings import RepoSettings

    s = RepoSettings(runtime="llmapi", max_batch_size=4, max_input_len=8, max_seq_len=16, max_num_tokens=32, tp=1,
                     gpu_groups=((0,),), layout="instances", kv_cache_free_gpu_mem_fraction=0.5, streaming=False, model_dir="/m",
                     tokenizer_dir="/t", end_id=1, pad_id=2)
    y = model_yaml(s)
    assert y["triton_config"] == {"max_batch_size": 0, "decoupled": False} and y["model"] == "/m"


# --- the text helpers the python models use ------------------------------------------------------------------------
def test_word_lists_in_tensorrt_llm_format():
    vocab = {"<|im_end|>": [151645], "\n\n": [271], "Hello world": [9707, 1879]}
    arr = to_word_list_format([["<|im_end|>", "Hello world"], [], ["\n\n"]], lambda w: vocab[w])
    assert arr.shape == (3, 2, 3) and arr.dtype == np.int32
    assert arr[0].tolist() == [[151645, 9707, 1879], [1, 3, -1]]
    assert arr[1].tolist() == [[0, 0, 0], [-1, -1, -1]]  # no words: offsets all -1
    assert parse_word_list(arr[0]) == [[151645], [9707, 1879]]
    assert parse_word_list(arr[1]) == [] and parse_word_list(arr[2:3]) == [[271]]
    assert parse_word_list(None) == []


@pytest.fixture(scope="module")
def qwen_tokenizer(module_tmp):
    from transformers import AutoTokenizer

    from trtqwen.qwen_tokenizer import write_qwen_tokenizer

    d = module_tmp("tok")
    write_qwen_tokenizer(d, 4096)
    return AutoTokenizer.from_pretrained(d)


def byte_tokens(tokenizer, text: str) -> list[int]:
    """The byte-level tokens of text, one per UTF-8 byte: every CJK character split across three tokens."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    b2u = bytes_to_unicode()
    return [tokenizer.convert_tokens_to_ids(b2u[b]) for b in text.encode("utf-8")]


def test_incremental_decoding_never_splits_a_character(qwen_tokenizer):
    text = "Qwen说：你好，世界！🙂"
    ids = byte_tokens(qwen_tokenizer, text)
    dec = IncrementalDecoder(qwen_tokenizer)
    deltas = [dec.push([i]) for i in ids] + [dec.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert [d for d in deltas if d][:4] == ["Q", "w", "e", "n"] and "🙂" in deltas
    normal = qwen_tokenizer.encode(text)  # ordinary tokens stream one delta per token
    dec = IncrementalDecoder(qwen_tokenizer)
    assert "".join(dec.push([i]) for i in normal) + dec.flush() == text


def test_incremental_decoding_skips_special_tokens(qwen_tokenizer):
    ids = qwen_tokenizer.encode("好<|im_end|>")
    dec = IncrementalDecoder(qwen_tokenizer, skip_special_tokens=True)
    assert "".join(dec.push([i]) for i in ids) + dec.flush() == "好"


def test_cumulative_text_becomes_clean_deltas():
    d = TextDeltas()
    pushed = [d.push("你"), d.push("你好\ufffd"), d.push("你好世"), d.push("你好世界", final=True)]
    assert pushed == ["你", "好", "世", "界"]
    d = TextDeltas()  # a backend that streams deltas instead
    assert [d.push("Hel"), d.push("lo"), d.push(" 世"), d.push("界", final=True)] == ["Hel", "lo", " 世", "界"]


@pytest.mark.parametrize("kv,precision,on", [("auto", "int4_awq", True), ("int8", "int4_awq", False),
                                             ("fp8", "fp8", True), ("fp8", "bf16", False)])
def test_kv_reuse_and_chunked_context_follow_the_engine(tmp_path, kv, precision, on):
    """Engines without paged context FMHA (INT8 KV, FP8 KV without FP8 weights) can't reuse KV or chunk context."""
    b = make_build(tmp_path / "b", spec={"kv_cache_dtype": kv, "precision": precision}, engine="1.2.1")
    repo = generate_repo(b, tmp_path / "repo", runtime="trtllm", serving={"tensorrt_llm": "1.2.1"})
    params = from_pbtxt((repo / "tensorrt_llm" / "config.pbtxt").read_text()).parameters
    want = "true" if on else "false"
    assert params["enable_kv_cache_reuse"].string_value == want
    assert params["enable_chunked_context"].string_value == want


def test_python_models_refuse_numpy2_under_the_wheels_stub(monkeypatch):
    """The wheel's stubs garble BYTES tensors under numpy 2 (reproduced): the models must refuse to load, saying why."""
    import numpy as np

    from trtqwen.serve.repo import text
    from trtqwen.serve.server import _stub_env

    assert _stub_env(Path("/nowhere"))["TRTQWEN_PYTRITON_STUB"] == "1"  # `trtqwen serve` sets it for that server
    monkeypatch.setattr(np, "__version__", "2.2.6")
    monkeypatch.delenv("TRTQWEN_PYTRITON_STUB", raising=False)
    text.check_stub_numpy()  # NVIDIA's containers: not ours to judge
    monkeypatch.setenv("TRTQWEN_PYTRITON_STUB", "1")
    with pytest.raises(RuntimeError, match=r"numpy<2.*PYTHONPATH does not reach the stubs"):
        text.check_stub_numpy()
    monkeypatch.setattr(np, "__version__", "1.26.4")
    text.check_stub_numpy()


def test_serve_refuses_an_engine_built_for_another_gpu_or_tensorrt_naming_both(tmp_path, monkeypatch):
    """`trtqwen serve` (the CLI, before any tritonserver starts) refuses an engine built on an sm_89 4090D when this
    machine's GPU is an sm_90 H100, or its TensorRT another one, and says both sides."""
    from typer.testing import CliRunner

    from trtqwen.cli import app

    b = make_build(tmp_path / "b", engine="1.2.1")
    record = {"tensorrt_llm": "1.2.1", "tensorrt": "10.14.1.48", "gpu": "NVIDIA GeForce RTX 4090 D", "compute_capability": "8.9"}
    (b / "engine" / "engine_versions.json").write_text(json.dumps(record))
    repo = generate_repo(b, tmp_path / "repo", runtime="trtllm", serving={"tensorrt_llm": "1.2.1"})
    assert read_record(repo)["versions"]["engine"]["compute_capability"] == "8.9"
    started = []
    monkeypatch.setattr("trtqwen.serve.server.start",
                        lambda *a, **k: started.append(a) or {"server": "stand-in", "log": "-", "pid": 0})
    for here, needles in [({"tensorrt_llm": "1.2.1", "compute_capability": "9.0"}, ["8.9 (sm_89)", "9.0 (sm_90)"]),
                          ({"tensorrt_llm": "1.2.1", "tensorrt": "10.13.3.9"}, ["10.14.1.48", "10.13.3.9"])]:
        monkeypatch.setattr("trtqwen.serve.repo.checks.serving_environment", lambda here=here: here)
        r = CliRunner().invoke(app, ["serve", str(repo), "--background"])
        assert r.exit_code == 2 and all(n in r.output for n in needles) and "build.sh" in r.output, r.output
    assert not started
    monkeypatch.setattr("trtqwen.serve.repo.checks.serving_environment", lambda: {**record, "compute_capability": "8.9"})
    r = CliRunner().invoke(app, ["serve", str(repo), "--background"])
    assert started and r.exit_code == 0, r.output  # the same engine on the same architecture and versions starts
