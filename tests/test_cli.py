"""The CLI as users meet it: every command has help; bad input exits non-zero with a message."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from trtqwen.cli import app

COMMANDS = ["plan", "tiny", "build", "package", "serve", "chat", "ui", "smoke", "bench", "verify", "doctor", "openai"]
runner = CliRunner()


def test_top_level_help_lists_every_command():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for c in COMMANDS:
        assert c in r.output


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command):
    r = runner.invoke(app, [command, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output and len(r.output) > 200


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "trtqwen.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "plan" in out.stdout


def test_plan_json_matches_facts():
    r = runner.invoke(app, ["plan", "--precision", "bf16", "--json", "--target", "engine"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    assert p["kv_bytes_per_token_per_gpu"] == 57344 and p["fits"] and p["target"] == "engine"
    assert abs(p["decode_ceiling_tok_s"] - 71) < 71 * 0.03


def test_plan_knows_both_targets_and_what_each_runs():
    both = json.loads(runner.invoke(app, ["plan", "--precision", "int4", "--json"]).output)
    engine, pytorch = both["engine"], both["pytorch"]
    assert engine["fits"] and pytorch["fits"] and "--target pytorch" in pytorch["suggested_build"]
    assert pytorch["overhead_bytes_per_gpu"] > engine["overhead_bytes_per_gpu"]  # torch's context, graph pools
    assert pytorch["decode_estimate_tok_s"] < engine["decode_estimate_tok_s"]
    sq = runner.invoke(app, ["plan", "--precision", "int8"])
    assert sq.exit_code == 0 and "PyTorch backend" in sq.output and "SmoothQuant" in sq.output
    only = runner.invoke(app, ["plan", "--precision", "int8", "--target", "pytorch"])
    assert only.exit_code == 1 and "does not fit" in only.output and "SmoothQuant" in only.output


def test_plan_table_has_a_verdict_and_build_command():
    r = runner.invoke(app, ["plan", "--precision", "int4"])
    assert r.exit_code == 0
    assert "fits" in r.output and "trtqwen build" in r.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["plan", "--tp", "3"], "--tp 1, 2 or 4"),
        (["plan", "--precision", "int3"], "unknown precision"),
        (["plan", "--gpu", "rtx9090"], "unknown GPU profile"),
        (["plan", "--precision", "fp8", "--gpu", "a100-80g"], "FP8"),
        (["plan", "--max-seq-len", "100000"], "exceeds"),
        (["plan", "--model", "/nonexistent/dir"], "has no config.json"),
        (["plan", "--gpu", "custom"], "--memory-gib"),
    ],
)
def test_plan_bad_input(args, needle):
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    assert needle in r.output
    assert "Traceback" not in r.output


def test_plan_that_does_not_fit_exits_1(tmp_path):
    cfg = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 152064, "hidden_size": 8192, "num_hidden_layers": 80,
           "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 29568, "max_position_embeddings": 32768,
           "rope_theta": 1e6}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["plan", "--model", str(tmp_path), "--precision", "bf16"])
    assert r.exit_code == 1 and "does not fit" in r.output


def test_doctor_reports_this_machine():
    r = runner.invoke(app, ["doctor", "--json"])
    assert r.exit_code == 0
    rep = json.loads(r.output)
    assert rep["torch"]["installed"] and rep["transformers"].startswith("4.57")
    assert rep["tensorrt_llm"] is None  # cannot be installed here (FACTS §1)
    assert any(p.endswith("tritonserver") for p in rep["tritonserver"])  # the nvidia-pytriton one
    assert rep["disk_free_gb"] > 0
    r = runner.invoke(app, ["doctor"])
    assert r.exit_code == 0 and "build TensorRT engines" in r.output


@pytest.mark.parametrize("args,needle", [(["bench", "--concurrency", "0"], "concurrency"),
                                         (["bench", "--concurrency", "a,b"], "not a list of integers"),
                                         (["bench", "--url", "127.0.0.1:1"], "cannot reach")])
def test_bench_bad_input(args, needle):
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and needle in r.output, r.output
