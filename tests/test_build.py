"""`trtqwen build` end to end on the tiny model: manifest, stage skipping, and bad input that leaves nothing half-done."""

import json
from pathlib import Path
import shutil

import pytest
from typer.testing import CliRunner

from trtqwen.build import pipeline as build_mod
from trtqwen.build.spec import BuildSpec
from trtqwen.cli import app
from trtqwen.errors import UserError

runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["build", *map(str, args)])


@pytest.fixture(scope="module")
def built(tiny_dir, module_tmp):
    out = module_tmp("builds") / "tiny-int4"
    r = run("--model", tiny_dir, "--precision", "int4", "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_build_writes_checkpoint_tokenizer_script_and_manifest(built, tiny_dir):
    m = json.loads((built / "build.json").read_text())
    assert m["spec"]["precision"] == "int4_awq" and m["spec"]["tp"] == 1
    assert m["spec"]["max_seq_len"] == 4096 and m["spec"]["max_input_len"] == 2048  # defaults from the plan
    assert 1 <= m["spec"]["max_batch_size"] <= 64
    assert m["spec"]["calib_size"] == 16  # AWQ's CPU default (no GPU here); 32 on a GPU and for the other recipes
    assert m["source"]["files"]["model.safetensors"] and m["versions"]["nvidia-modelopt"].startswith("0.37")
    ck = m["stages"]["checkpoint"]
    assert ck["files"] == ["config.json", "rank0.safetensors"] and ck["bytes"] > 0 and ck["seconds"] > 0
    assert ck["info"]["quant_algo"] == "W4A16_AWQ" and ck["info"]["peak_rss_mb"] > 0
    assert m["stages"]["engine"]["status"] == "pending" and m["complete"] is False  # engines need the 4090D box
    assert (built / "build.sh").is_file() and "trtllm-build" in (built / "build.sh").read_text()
    assert (built / "tokenizer" / "tokenizer.json").is_file()
    assert not list(built.glob(".tmp-*"))


def test_unchanged_inputs_skip_the_stage_and_force_redoes_it(built, tiny_dir):
    before = (built / "checkpoint" / "rank0.safetensors").stat().st_mtime_ns
    r = run("--model", tiny_dir, "--precision", "int4", "--out", built)
    assert r.exit_code == 0 and "reusing" in r.output
    assert (built / "checkpoint" / "rank0.safetensors").stat().st_mtime_ns == before
    assert json.loads((built / "build.json").read_text())["stages"]["checkpoint"]["skipped"] is True


def test_until_checkpoint_is_complete_without_engine(tiny_dir, tmp_path):
    r = run("--model", tiny_dir, "--precision", "bf16", "--until", "checkpoint", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "b" / "build.json").read_text())
    assert m["complete"] is True and "engine" not in m["stages"] and not (tmp_path / "b" / "build.sh").exists()


def test_interrupted_export_leaves_nothing_that_looks_finished(tiny_dir, tmp_path, monkeypatch):
    from trtqwen.build import quantize
    def crash(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C after the shards were written, before the checkpoint is complete

    monkeypatch.setattr(quantize, "qwen_checkpoint_config", crash)
    out = tmp_path / "b"
    r = run("--model", tiny_dir, "--precision", "bf16", "--until", "checkpoint", "--out", out)
    assert r.exit_code == 130 and "interrupted" in r.output and "rerun the same command" in r.output
    assert not (out / "checkpoint").exists() and not list(out.glob(".tmp-*"))
    assert json.loads((out / "build.json").read_text())["complete"] is False
    monkeypatch.undo()
    r = run("--model", tiny_dir, "--precision", "bf16", "--until", "checkpoint", "--out", out)  # the next run continues
    assert r.exit_code == 0 and (out / "checkpoint" / "rank0.safetensors").is_file()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--precision", "int3"], "unknown precision"),
        (["--tp", "3"], "--tp 1, 2 or 4"),
        (["--until", "serve"], "unknown stage"),
        (["--target", "onnx"], "unknown target"),
        (["--target", "pytorch", "--precision", "int8_sq"], "PyTorch backend"),
        (["--calib-data", "/nonexistent.jsonl"], "does not exist"),
        (["--max-seq-len", "100000"], "exceeds"),
        (["--precision", "fp8", "--gpu", "a100-80g"], "FP8"),
    ],
)
def test_bad_options(tiny_dir, tmp_path, args, needle):
    r = run("--model", tiny_dir, "--out", tmp_path / "b", *args)
    assert r.exit_code == 2 and needle in r.output, r.output
    assert not (tmp_path / "b" / "checkpoint").exists()


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_bad_models(tiny_dir, tmp_path):
    m = _copy(tiny_dir, tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    r = run("--model", m, "--out", tmp_path / "b1")
    assert r.exit_code == 2 and "Qwen2ForCausalLM" in r.output

    (m / "config.json").write_text(json.dumps(cfg))
    w = m / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    r = run("--model", m, "--out", tmp_path / "b2")
    assert r.exit_code == 2 and "truncated" in r.output
    assert not (tmp_path / "b2" / "checkpoint").exists()

    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    w.unlink()
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    r = run("--model", m, "--out", tmp_path / "b3")
    assert r.exit_code == 2 and "missing" in r.output


def test_not_enough_disk(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(build_mod, "free_bytes", lambda path: 10_000_000)
    with pytest.raises(UserError, match="not enough disk"):
        build_mod.run_build(BuildSpec.request(str(tiny_dir)), out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a chosen size (mounting needs root, which CI and `make install`'s apt step have)."""
    import subprocess

    mounts = []

    def mount(size: int) -> Path:
        d = tmp_path / f"disk{len(mounts)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        assert r.returncode == 0, f"cannot mount a tmpfs ({r.stderr.decode().strip()}): the full-disk test needs root"
        mounts.append(d)
        return d

    yield mount
    for d in mounts:
        subprocess.run(["umount", str(d)])


def test_a_filling_disk_is_a_clear_error_and_leaves_nothing_that_looks_done(tiny_dir, small_disk, monkeypatch):
    """The check counts the tokenizer too; and when the disk fills anyway (someone else writes), ENOSPC is an error
    that says what to do, with no checkpoint/ and no temporaries left behind."""
    weights = sum(f.stat().st_size for f in tiny_dir.glob("*.safetensors"))
    others = sum(f.stat().st_size for f in tiny_dir.iterdir() if f.is_file() and f.suffix != ".safetensors")
    disk = small_disk(int(weights * 1.1 + others / 2))  # room for the weights, not for the tokenizer as well
    with pytest.raises(UserError, match="not enough disk"):
        build_mod.run_build(BuildSpec.request(str(tiny_dir), precision="bf16"), out=disk / "b", until="checkpoint")
    monkeypatch.setattr(build_mod, "check_disk", lambda out, needed: None)  # the disk fills after the check
    r = run("--model", tiny_dir, "--precision", "bf16", "--until", "checkpoint", "--out", disk / "b")
    assert r.exit_code == 2 and "filled up" in r.output and "rerun" in r.output
    assert not (disk / "b" / "checkpoint").exists() and not list((disk / "b").glob(".tmp-*"))
    assert json.loads((disk / "b" / "build.json").read_text())["complete"] is False


def test_unreachable_hub_without_local_copy(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    r = run("--model", "Qwen/Qwen2.5-7B-Instruct", "--out", tmp_path / "b")
    assert r.exit_code == 2 and "cannot reach the Hugging Face hub" in r.output
    assert not (tmp_path / "b").exists()


def test_refuses_to_write_into_a_foreign_directory(tiny_dir, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    r = run("--model", tiny_dir, "--out", tmp_path / "mine")
    assert r.exit_code == 2 and "not a trtqwen build directory" in r.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_plan_refusal_blocks_the_build(tmp_path):
    big = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 8192,
           "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 29568,
           "max_position_embeddings": 32768, "rope_theta": 1e6}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(big))
    r = run("--model", tmp_path / "m", "--precision", "bf16", "--out", tmp_path / "b")
    assert r.exit_code == 2 and "does not fit a rtx4090d" in r.output


def test_target_both_writes_the_unified_hf_checkpoint_too(tiny_dir, tmp_path):
    r = run("--model", tiny_dir, "--precision", "fp8", "--target", "both", "--until", "checkpoint", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "b" / "build.json").read_text())
    assert m["stages"]["checkpoint"]["hf_dir"] == "hf_checkpoint" and m["target"] == "both"
    hf = tmp_path / "b" / "hf_checkpoint"
    assert json.loads((hf / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    assert (hf / "model.safetensors").is_file() and (hf / "tokenizer.json").is_file()
    assert (tmp_path / "b" / "checkpoint" / "rank0.safetensors").is_file()


def test_calib_gpu_memory_cap_reaches_calibration_from_the_option_or_the_environment(tiny_dir, tmp_path, monkeypatch):
    """--calib-gpu-memory (or TRTQWEN_CALIB_GPU_MEMORY) is handed to the cap before the model is loaded; on a CPU
    the cap itself does nothing (torch.cuda.set_per_process_memory_fraction needs a GPU: measured on the H200)."""
    from trtqwen.build import quantize

    caps = []
    monkeypatch.setattr(quantize, "cap_gpu_memory", lambda gib, say=None: caps.append(gib))
    r = run("--model", tiny_dir, "--precision", "bf16", "--until", "checkpoint", "--out", tmp_path / "a",
            "--calib-gpu-memory", "24")
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("TRTQWEN_CALIB_GPU_MEMORY", "20.5")
    r = run("--model", tiny_dir, "--precision", "bf16", "--until", "checkpoint", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert caps == [24.0, 20.5]
