"""The PyTorch-backend target (issue 18): ModelOpt's unified HF checkpoint, written by `build --target pytorch|both`
from the same calibration as the TensorRT-LLM checkpoint, read by the runtime in the TensorRT-LLM layout, split per
TP rank at load, verified and served like the TensorRT-LLM checkpoint; precisions that backend lacks are refused."""

import json
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from tests.checkpoints import pytorch_view, used
from trtqwen.build.pipeline import run_build
from trtqwen.build.spec import BuildSpec
from trtqwen.build.verify import verify
from trtqwen.checkpoint import read_model_dir
from trtqwen.errors import UserError
from trtqwen.runtime import LLMEngine, SamplingParams, load_model

GREEDY = SamplingParams(max_tokens=8, top_k=1)
PROMPTS = [[100, 200, 300, 400], [9707, 11, 1879, 0, 5, 7, 9]]
X = torch.arange(100, 164)


@pytest.fixture(scope="module")
def both(tiny_tp_dir, module_tmp):
    """both(precision, kv) → a `--target both` build dir of the tiny-tp model (one calibration, two checkpoints); the two
    used last stay on disk (~660 MB each), the tests are ordered so that only fp8 and bf16 (no
    calibration) are built twice."""
    root, cache = module_tmp("both"), {}

    def get(precision: str, kv: str = "auto"):
        if (precision, kv) not in cache:
            out = root / f"{precision}-{kv}"
            run_build(BuildSpec.request(str(tiny_tp_dir), precision=precision, kv_cache_dtype=kv, calib_size=8),
                      out=out, until="checkpoint", target="both")
            cache[precision, kv] = out
        return used(cache, (precision, kv), keep=2)

    return get


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


def effective(lin) -> torch.Tensor:
    """What a linear multiplies its (normed) input by: dequantized weight × AWQ's pre-quant scale."""
    return lin.weight * (1 if lin.pre_quant_scale is None else lin.pre_quant_scale)


@pytest.mark.parametrize("precision,kv", [("fp8", "fp8"), ("fp8", "auto"), ("bf16", "auto"), ("int4_awq", "auto")])
def test_the_hf_checkpoint_means_what_the_tensorrt_llm_one_means(both, precision, kv):
    b = both(precision, kv)
    m = json.loads((b / "build.json").read_text())
    assert m["target"] == "both" and m["stages"]["checkpoint"]["hf_dir"] == "hf_checkpoint"
    trt, hf = read_model_dir(b / "checkpoint"), read_model_dir(b / "hf_checkpoint")
    assert (hf.kind, trt.kind) == ("hf", "trtllm")
    assert (hf.precision, hf.quant_algo, hf.kv_cache_quant_algo) == (trt.precision, trt.quant_algo, trt.kv_cache_quant_algo)
    a, h = load_model(b / "checkpoint"), load_model(b / "hf_checkpoint")
    # o_proj and down_proj: the same int4 values and scales in both layouts; FP8 rounds the HF export's weights in
    # bf16 (one fp8 step apart on ~3 % of them). q/k/v: the HF export folds AWQ's scale into the norm, and FP8
    # requantizes q, k, v to one scale when fused.
    exact = {"bf16": 1e-6, "fp8": 0.03, "int4_awq": 1e-6}[precision]
    for la, lh in zip(a.layers, h.layers):
        assert rel_diff(effective(la.o), effective(lh.o)) < exact
        assert rel_diff(effective(la.down), effective(lh.down)) < exact
        assert rel_diff(effective(la.qkv) * la.ln1, effective(lh.qkv) * lh.ln1) < max(exact, 0.03 * (precision != "bf16"))
        if kv == "fp8":
            assert lh.kv_algo == "FP8" and torch.allclose(la.kv_scale, lh.kv_scale)
    cosine = torch.nn.functional.cosine_similarity(a.logits(X), h.logits(X), dim=-1).min().item()
    assert cosine > (0.99999 if precision == "bf16" else 0.95), cosine
    report = verify(b / "hf_checkpoint")
    assert report.passed and report.quant_algo == hf.quant_algo, report.failures


@pytest.mark.parametrize("precision,tp", [("fp8", 2), ("int4_awq", 2), ("int4_awq", 4), ("bf16", 2), ("bf16", 4)])
def test_hf_checkpoint_split_per_rank_at_load_equals_the_whole(both, precision, tp):
    path = both(precision) / "hf_checkpoint"
    whole = load_model(path, max_positions=512)
    want = [r.output for r in LLMEngine(whole, max_slots=4, max_seq_len=256).generate(PROMPTS, GREEDY)]
    with load_model(path, max_positions=512, tp_ranks=True, tp=tp) as model:
        assert len(model.procs) == tp - 1
        got = model.logits(X)
        assert torch.nn.functional.cosine_similarity(whole.logits(X), got, dim=-1).min() > 0.9999
        if precision != "fp8":  # fp8's 3-bit mantissa flips greedy ties between GEMM shapes (test_tp.py)
            assert [r.output for r in LLMEngine(model, max_slots=4, max_seq_len=256).generate(PROMPTS, GREEDY)] == want


def test_a_tp_the_model_cannot_split_is_refused(both):
    with pytest.raises(UserError, match="TP|tp"):
        load_model(both("bf16") / "hf_checkpoint", tp_ranks=True, tp=3)


@pytest.mark.parametrize("precision", ["int8_sq", "int8_wo", "int4_wo"])
def test_precisions_the_pytorch_backend_lacks_are_refused_before_any_work(tiny_dir, tmp_path, precision):
    with pytest.raises(UserError, match="PyTorch backend") as e:
        run_build(BuildSpec.request(str(tiny_dir), precision=precision), out=tmp_path / "b", target="pytorch")
    assert "--target engine" in e.value.hint and not (tmp_path / "b").exists()


def test_pytorch_target_writes_only_the_hf_checkpoint_with_both_stop_ids(tiny_dir, tmp_path):
    r = run_build(BuildSpec.request(str(tiny_dir), precision="int4_awq"), out=tmp_path / "b", target="pytorch")
    assert r.manifest["complete"] and r.manifest["target"] == "pytorch" and "engine" not in r.manifest["stages"]
    assert not (tmp_path / "b" / "checkpoint").exists() and not (tmp_path / "b" / "build.sh").exists()
    gen = json.loads((tmp_path / "b" / "hf_checkpoint" / "generation_config.json").read_text())
    assert {151645, 151643} <= set(gen["eos_token_id"])  # the PyTorch backend stops on these
    again = run_build(BuildSpec.request(str(tiny_dir), precision="int4_awq"), out=tmp_path / "b", target="pytorch")
    assert again.manifest["stages"]["checkpoint"].get("skipped")


# --- served: the torch runtime over the HF checkpoint through a real tritonserver ------------------------------------
def stream(http: str, prompt: str, max_tokens: int = 10) -> str:
    body = {"text_input": prompt, "max_tokens": max_tokens, "stream": True, "top_k": 1}
    req = urllib.request.Request(f"http://{http}/v2/models/ensemble/generate_stream", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        events = [json.loads(line[5:]) for line in r.read().decode().splitlines() if line.startswith("data:")]
    assert events and not any("error" in e for e in events), events
    return "".join(e.get("text_output", "") for e in events)


@pytest.mark.parametrize("precision,tp", [("bf16", 4), ("int4_awq", 2)])
def test_served_hf_checkpoint_answers_as_the_tensorrt_llm_path(both, tmp_path, precision, tp):
    """bf16: the HF and TensorRT-LLM checkpoints served side by side give the same text; int4 (whose HF export
    resmooths gate/up onto one scale, so its values differ): the served TP ranks give the in-process model's tokens."""
    from conftest import serving

    from trtqwen.qwen_tokenizer import load_tokenizer
    from trtqwen.serve.repo import generate_repo

    src = both(precision)
    repo = generate_repo(pytorch_view(src, tmp_path / "b", tp), tmp_path / "repo", runtime="torch")
    prompts = ("Hello, who are you?", "你好，世界")
    with serving(repo, models=("ensemble",)) as (_, http, _):
        served = [stream(http, p) for p in prompts]
    assert all(served)
    if precision == "bf16":
        trt = generate_repo(src, tmp_path / "repo-trt", runtime="torch")
        with serving(trt, models=("ensemble",)) as (_, http, _):
            assert [stream(http, p) for p in prompts] == served
    else:
        tok = load_tokenizer(src / "tokenizer")
        with load_model(src / "hf_checkpoint", max_positions=512, tp_ranks=True, tp=tp) as model:
            engine = LLMEngine(model, max_slots=2, max_seq_len=256)
            out = engine.generate([tok(p)["input_ids"] for p in prompts], SamplingParams(max_tokens=10, top_k=1))
        assert [tok.decode(r.output, skip_special_tokens=True) for r in out] == served


# --- launching TensorRT-LLM's PyTorch backend: contract-checked against its 1.2.1 sources (tests/data) ----------------
SERVE_FACTS = json.loads((Path(__file__).parent / "data" / "trtllm_serve_1.2.1.json").read_text())
LLMAPI_FACTS = json.loads((Path(__file__).parent / "data" / "trtllm_llmapi_1.2.1.json").read_text())


def test_trtllm_serve_script_uses_only_flags_trtllm_serve_has(tiny_dir, tmp_path):
    import subprocess

    from tests.test_repo_config import KV_CACHE_CONFIG_FIELDS, LLM_ARGS

    r = run_build(BuildSpec.request(str(tiny_dir), precision="bf16", tp=2), out=tmp_path / "b", target="pytorch")
    flags = {name for key in SERVE_FACTS["trtllm_serve_options"] for name in key.split(" / ") if name.startswith("--")}
    script = (tmp_path / "b" / "trtllm-serve.sh").read_text()
    subprocess.run(["bash", "-n", str(tmp_path / "b" / "trtllm-serve.sh")], check=True)
    for line in (l for l in script.splitlines() if "trtllm-serve " in l and "exec" in l):
        words = line.split("trtllm-serve ", 1)[1].split()
        assert words[0].endswith("hf_checkpoint")  # the positional MODEL: the unified HF checkpoint
        used = {w for w in words if w.startswith("--")}
        assert used <= flags, used - flags
        assert words[words.index("--tp_size") + 1] == "2" and words[words.index("--backend") + 1] == "pytorch"
        fraction = r.manifest["plan"]["kv_cache_free_gpu_mem_fraction"]
        assert float(words[words.index("--kv_cache_free_gpu_memory_fraction") + 1]) == fraction
    assert "--host 127.0.0.1" in script  # 0.0.0.0 only inside the container, published on 127.0.0.1
    opts = yaml.safe_load((tmp_path / "b" / "trtllm_serve.yaml").read_text())
    assert set(opts) <= LLM_ARGS | {"enable_chunked_prefill"} and set(opts["kv_cache_config"]) <= KV_CACHE_CONFIG_FIELDS
    assert opts["enable_chunked_prefill"] and opts["kv_cache_config"]["enable_block_reuse"]


def test_serve_engine_trtllm_serve_shows_the_script_or_refuses(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from trtqwen.cli import app

    run_build(BuildSpec.request(str(tiny_dir), precision="bf16"), out=tmp_path / "b", target="pytorch")
    shown = CliRunner().invoke(app, ["serve", str(tmp_path / "b"), "--engine", "trtllm-serve", "--print-command"])
    assert shown.exit_code == 0 and "exec trtllm-serve hf_checkpoint" in shown.output
    run_build(BuildSpec.request(str(tiny_dir), precision="bf16"), out=tmp_path / "e", until="checkpoint")
    refused = CliRunner().invoke(app, ["serve", str(tmp_path / "e"), "--engine", "trtllm-serve"])
    assert refused.exit_code == 2 and "--target pytorch" in refused.output


def test_llmapi_repository_is_launched_under_trtllm_llmapi_launch_and_refused_without_it(both, tmp_path):
    from trtqwen.serve import server
    from trtqwen.serve.repo import generate_repo, read_record

    repo = generate_repo(both("int4_awq"), tmp_path / "repo", runtime="llmapi", serving={})
    yml = yaml.safe_load((repo / "tensorrt_llm" / "1" / "model.yaml").read_text())
    assert set(LLMAPI_FACTS["model_yaml_keys"]) <= set(yml)
    assert set(yml["triton_config"]) == set(LLMAPI_FACTS["triton_config_keys"])
    assert yml["model"].endswith("hf_checkpoint")  # the quantized export, never the source model
    plan = read_record(repo)["serve"]
    install = server.TritonInstall("system", Path("/opt/tritonserver"))
    cmd = server.server_command(install, repo, "127.0.0.1", 1, 2, 3, plan["world_size"], plan["launcher"])
    # launch_triton_server.py --trtllm_llmapi_launch: mpirun -n 1 trtllm-llmapi-launch tritonserver (LLMAPI_FACTS)
    assert cmd[:6] == ["mpirun", "--allow-run-as-root", "-n", "1", "trtllm-llmapi-launch", "/opt/tritonserver/bin/tritonserver"]
    assert "trtllm-llmapi-launch" in LLMAPI_FACTS["launch"]["command_with_llmapi_launch"]
    with pytest.raises(UserError, match="trtllm-llmapi-launch.*tensorrt_llm") as e:
        server.serve_repo(repo, "127.0.0.1", 1, 2, 3, None, 5)
    assert "--print-command" in e.value.hint and not (repo / server.STATE_FILE).exists()
    shown = server.describe_commands(repo, "127.0.0.1", 8000, 8001, 8002)
    assert any("docker run" in line and "trtllm-llmapi-launch /opt/tritonserver/bin/tritonserver" in line for line in shown)
