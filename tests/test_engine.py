"""The engine stage is checked by what it would run: real trtllm-build 1.x flag names and values, never removed flags."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from trtqwen import engine
from trtqwen.errors import UserError
from trtqwen.spec import BuildSpec, KvDtype, Precision

FLAGS = json.loads((Path(__file__).parent / "data" / "trtllm_build_flags.json").read_text())


def parse(cmd: list[str]) -> dict:
    assert cmd[0] == "trtllm-build"
    args, i = {}, 1
    while i < len(cmd):
        flag = cmd[i]
        assert flag.startswith("--"), flag
        kind = FLAGS["flags"].get(flag)
        assert kind is not None, f"{flag} is not a trtllm-build 1.x flag"
        assert flag not in FLAGS["removed_in_1x"]
        if kind == "flag":
            args[flag] = True
            i += 1
            continue
        value = cmd[i + 1]
        if isinstance(kind, list):
            assert value in kind, f"{flag} {value} not in {kind}"
        elif kind == "int":
            int(value)
        args[flag] = value
        i += 2
    return args


@pytest.mark.parametrize("kv", list(KvDtype))
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("precision", list(Precision))
def test_build_command_uses_real_flags_with_spec_values(precision, tp, kv):
    spec = BuildSpec(model="m", precision=precision, tp=tp, kv_cache_dtype=kv, max_batch_size=24, max_input_len=1000,
                     max_seq_len=3000, max_num_tokens=4096)
    args = parse(engine.trtllm_build_command(spec, Path("ck"), Path("eng")))
    assert args["--checkpoint_dir"] == "ck" and args["--output_dir"] == "eng"
    assert (args["--max_batch_size"], args["--max_input_len"], args["--max_seq_len"], args["--max_num_tokens"]) == \
        ("24", "1000", "3000", "4096")
    assert args["--workers"] == str(tp) and args["--kv_cache_type"] == "paged"
    assert args["--use_paged_context_fmha"] == "enable"
    assert ("--use_fp8_context_fmha" in args) == (precision is Precision.FP8 and kv is KvDtype.FP8)


def test_build_script_is_valid_bash_with_pinned_image(tmp_path):
    spec = BuildSpec(model="m", precision="int4", tp=2)
    script = engine.build_script(spec, Path("checkpoint"), Path("engine"))
    (tmp_path / "build.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "build.sh")]).returncode == 0
    assert engine.TRTLLM_IMAGE in script and "docker run" in script and "--gpus all" in script
    assert "trtllm-build --checkpoint_dir checkpoint --output_dir engine.partial" in script
    assert "mv engine.partial engine" in script  # engines appear only when complete
    assert engine.ENGINE_RECORD in script


def test_tensorrt_llm_absent_here_and_engine_build_says_where_to_go(tmp_path):
    assert importlib.util.find_spec("tensorrt_llm") is None  # FACTS §1: cannot be installed here
    assert engine.trtllm_versions() is None
    with pytest.raises(engine.EngineToolsMissing) as e:
        engine.run_engine_build(BuildSpec(model="m"), tmp_path / "ck", tmp_path / "eng", tmp_path / "log")
    assert "TensorRT-LLM 1.2.1" in str(e.value) and "build.sh" in str(e.value)
    assert not (tmp_path / "eng").exists()


def test_version_gate_names_both_versions():
    built = {"tensorrt_llm": "1.2.1", "tensorrt": "10.14.1.48", "compute_capability": "8.9"}
    engine.check_engine_compatible(built, dict(built))
    with pytest.raises(UserError, match="1.2.1.*1.1.0"):
        engine.check_engine_compatible(built, {**built, "tensorrt_llm": "1.1.0"})
    with pytest.raises(UserError, match="TensorRT 10.14.1.48 .* 10.13.3.9"):
        engine.check_engine_compatible(built, {**built, "tensorrt": "10.13.3.9"})
    with pytest.raises(UserError, match="8.9 .* 9.0"):
        engine.check_engine_compatible(built, {**built, "compute_capability": "9.0"})
