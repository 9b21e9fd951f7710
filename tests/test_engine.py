"""The engine stage, checked by what it would run.

TensorRT-LLM cannot be installed here (FACTS §1), so the trtllm-build command is checked against the 1.2.x flag set
read from TensorRT-LLM's sources (tests/data/trtllm_build_flags.json), build.sh is run for real with stand-in
`trtllm-build`, `docker`, `nvidia-smi` and Python modules, and run_engine_build with a stand-in trtllm-build on PATH.
"""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from trtqwen.build import trtllm_build as engine
from trtqwen.errors import UserError
from tests.checkpoints import write_checkpoint
from trtqwen.serve.repo.checks import check_engine_compatible
from trtqwen.build.spec import BuildSpec, KvDtype, Precision

FLAGS = json.loads((Path(__file__).parent / "data" / "trtllm_build_flags.json").read_text())
KNOWN, REMOVED, DEPRECATED = FLAGS["flags"], FLAGS["removed_in_1x"], FLAGS["deprecated_in_1x"]
SHAPE = dict(max_batch_size=24, max_input_len=1000, max_seq_len=3000, max_num_tokens=4096)


def parse(cmd: list[str]) -> dict:
    """Parse a trtllm-build command line the way its argparse would, against the recorded 1.2.x flag set."""
    assert cmd[0].endswith("trtllm-build")
    args, i = {}, 1
    while i < len(cmd):
        flag = cmd[i]
        assert flag.startswith("--"), f"stray argument {flag!r}"
        assert flag not in REMOVED, f"{flag} was removed in TensorRT-LLM 1.x: {REMOVED[flag]}"
        assert flag not in DEPRECATED, f"{flag} is deprecated in 1.x: {DEPRECATED[flag]}"
        spec = KNOWN.get(flag)
        assert spec is not None, f"{flag} is not a trtllm-build 1.2.x flag"
        assert flag not in args, f"{flag} given twice"
        if not spec["takes_value"]:
            args[flag], i = True, i + 1
            continue
        assert i + 1 < len(cmd) and not cmd[i + 1].startswith("--"), f"{flag} needs a value"
        value = cmd[i + 1]
        if spec["value"] == "choice":
            assert value in spec["choices"], f"{flag} {value!r} not in {spec['choices']}"
        elif spec["value"] == "int":
            assert int(value) >= 0
        args[flag], i = value, i + 2
    return args


def spec_for(precision=Precision.BF16, tp=1, kv=KvDtype.AUTO, **kw) -> BuildSpec:
    return BuildSpec(model="Qwen/Qwen2.5-7B-Instruct", precision=precision, tp=tp, kv_cache_dtype=kv, **{**SHAPE, **kw})


# ── the recorded flag set itself ──────────────────────────────────────────────────────────────────────────────


def test_flag_set_names_its_source_and_keeps_removed_flags_out():
    src = FLAGS["source"]
    assert src["repository"] == "NVIDIA/TensorRT-LLM"
    assert set(src["files"]) >= {"tensorrt_llm/commands/build.py", "tensorrt_llm/plugin/plugin.py"}
    assert all(re.fullmatch(r"[0-9a-f]{40}", src["files"][f])
               for f in ("tensorrt_llm/commands/build.py", "tensorrt_llm/plugin/plugin.py"))
    assert not set(REMOVED) & set(KNOWN)  # a removed flag is never also listed as existing
    assert set(DEPRECATED) <= set(KNOWN)  # deprecated ones still parse (with a warning)
    for flag in ("--use_custom_all_reduce", "--max_output_len", "--use_context_fmha_for_generation",
                 "--multi_block_mode", "--enable_xqa", "--context_fmha_fp32_acc", "--auto_parallel"):
        assert flag in REMOVED
    assert "--paged_kv_cache" in DEPRECATED
    for name, spec in KNOWN.items():
        assert spec["takes_value"] == (spec["value"] != "none"), name
        assert spec["value"] != "choice" or spec["choices"], name


def test_flag_set_agrees_with_facts():
    """FACTS §4 lists the 1.x flags the project relies on and those gone in 1.x; the sources must agree."""
    relied_on = {"--checkpoint_dir", "--output_dir", "--max_batch_size", "--max_input_len", "--max_seq_len",
                 "--max_beam_width", "--max_num_tokens", "--opt_num_tokens", "--kv_cache_type",
                 "--gpt_attention_plugin", "--gemm_plugin", "--context_fmha", "--remove_input_padding",
                 "--tokens_per_block", "--use_paged_context_fmha", "--use_fp8_context_fmha", "--multiple_profiles",
                 "--reduce_fusion", "--workers", "--strip_plan", "--weight_streaming", "--fast_build", "--log_level",
                 "--logits_dtype", "--gather_context_logits", "--input_timing_cache", "--output_timing_cache",
                 "--monitor_memory", "--dry_run"}
    facts = Path(__file__).resolve().parents[2] / "shared" / "FACTS.md"
    if facts.is_file():  # the steering checkout; the list above is its copy
        text = facts.read_text()
        exist = text.split("`trtllm-build` 1.x flags that exist:")[1].split("**Gone in 1.x**")[0]
        gone = text.split("**Gone in 1.x**")[1].split("1.x defaults")[0]
        relied_on |= set(re.findall(r"--[a-z_0-9]+", exist))
        assert set(re.findall(r"--[a-z_0-9]+", gone)) - {"--kv_cache_type"} <= set(REMOVED) | set(DEPRECATED)
    assert relied_on <= set(KNOWN)
    assert KNOWN["--kv_cache_type"]["choices"] == ["continuous", "paged", "disabled"]
    assert "fp8" in KNOWN["--gemm_plugin"]["choices"] and "disable" in KNOWN["--gemm_plugin"]["choices"]
    assert KNOWN["--use_paged_context_fmha"]["choices"] == ["enable", "disable"]


# ── the command ───────────────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("kv", list(KvDtype))
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("precision", list(Precision))
def test_build_command_uses_real_flags_with_spec_values(precision, tp, kv):
    spec = spec_for(precision, tp, kv)
    cmd = engine.trtllm_build_command(spec, Path("ck"), Path("eng"))
    args = parse(cmd)
    assert args["--checkpoint_dir"] == "ck" and args["--output_dir"] == "eng"
    assert [args[f] for f in ("--max_batch_size", "--max_input_len", "--max_seq_len", "--max_num_tokens")] == \
        [str(spec.max_batch_size), str(spec.max_input_len), str(spec.max_seq_len), str(spec.max_num_tokens)]
    assert args["--workers"] == str(tp) and args["--kv_cache_type"] == "paged" and args["--tokens_per_block"] == "32"
    assert args["--max_beam_width"] == "1"
    # FP8: NVIDIA's tuning guide says no GEMM plugin; 16-bit and weight-only/SQ/AWQ: the plugin for 16-bit GEMMs
    assert args["--gemm_plugin"] == ("disable" if precision is Precision.FP8 else "auto")
    # the builder forbids paged context FMHA with INT8 KV, and with FP8 KV unless the weights are FP8
    paged = kv is KvDtype.AUTO or (kv is KvDtype.FP8 and precision is Precision.FP8)
    assert args["--use_paged_context_fmha"] == ("enable" if paged else "disable")
    assert args["--use_fp8_context_fmha"] == ("enable" if precision is Precision.FP8 and kv is KvDtype.FP8 else "disable")
    assert engine.engine_features(spec)["kv_cache_reuse"] is paged
    assert "--opt_num_tokens" not in args  # RuntimeError together with --multiple_profiles enable
    assert args["--multiple_profiles"] == "enable"


def test_command_refuses_prompts_longer_than_a_step_without_chunked_context():
    ok = spec_for(Precision.INT4_AWQ, kv=KvDtype.AUTO, max_input_len=3000, max_num_tokens=2048)
    assert parse(engine.trtllm_build_command(ok, Path("c"), Path("e")))["--use_paged_context_fmha"] == "enable"
    for kv in (KvDtype.INT8, KvDtype.FP8):
        bad = ok.replace(kv_cache_dtype=kv)
        with pytest.raises(UserError, match="max_num_tokens 2048 is below max_input_len 3000") as e:
            engine.trtllm_build_command(bad, Path("c"), Path("e"))
        assert "--max-num-tokens" in str(e.value)


def test_warnings_name_what_the_build_loses():
    assert engine.build_warnings(spec_for(Precision.INT4_AWQ)) == []
    int8 = engine.build_warnings(spec_for(Precision.INT4_AWQ, kv=KvDtype.INT8))
    assert any("no chunked context" in w for w in int8)
    fp8 = engine.build_warnings(spec_for(Precision.FP8, kv=KvDtype.FP8))
    assert any("#4218" in w for w in fp8) and not any("chunked" in w for w in fp8)
    tp2 = engine.build_warnings(spec_for(tp=2))
    assert any("NCCL_P2P_DISABLE=1" in w for w in tp2)
    assert engine.build_warnings(spec_for(tp=2, gpu="h100")) == []  # NVLink: no such warning


# ── build.sh ──────────────────────────────────────────────────────────────────────────────────────────────────


def command_in(script: str) -> list[str]:
    """The trtllm-build invocation build.sh runs, joined across its line continuations."""
    start = script.index("\ntrtllm-build ") + 1
    text = script[start:script.index("2>&1 | tee", start)]
    return shlex.split(text.replace("\\\n", " "))


@pytest.mark.parametrize("precision,tp,kv", [("int4_awq", 1, "auto"), ("fp8", 2, "fp8"), ("int8_sq", 4, "int8")])
def test_build_script_is_valid_bash_with_the_command_and_pinned_image(tmp_path, precision, tp, kv):
    spec = spec_for(precision, tp, kv)
    script = engine.build_script(spec, Path("checkpoint"), Path("engine"))
    (tmp_path / "build.sh").write_text(script)
    syntax = subprocess.run(["bash", "-n", str(tmp_path / "build.sh")], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    assert script.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in script
    assert engine.TRTLLM_IMAGE == "nvcr.io/nvidia/tensorrt-llm/release:1.2.1"
    assert f"IMAGE={engine.TRTLLM_IMAGE}\n" in script and "docker run --rm --gpus all" in script
    assert command_in(script) == engine.trtllm_build_command(spec, Path("checkpoint"), Path("engine.partial"))
    assert 'mv "$PARTIAL" "$ENGINE"' in script and "PARTIAL=engine.partial" in script
    assert "/work" not in script and str(tmp_path) not in script  # relative paths: the directory can move
    for w in engine.build_warnings(spec):
        assert w in script


def test_build_script_wants_relative_paths():
    with pytest.raises(ValueError, match="relative"):
        engine.build_script(spec_for(), Path("/abs/checkpoint"), Path("engine"))


def _fake_tools(root: Path, trtllm_version: str = "1.2.1", cc=(8, 9)) -> tuple[Path, Path]:
    """A stand-in trtllm-build (makes rank engines, or fails on FAKE_FAIL) and stand-in tensorrt_llm/tensorrt/torch."""
    bin_dir, py = root / "fakebin", root / "fakepy"
    bin_dir.mkdir(parents=True)
    (bin_dir / "trtllm-build").write_text("""#!/usr/bin/env bash
printf '%s\\n' "$@" > "${FAKE_ARGS:-/dev/null}"
out=""; n=1
while [ $# -gt 0 ]; do case "$1" in --output_dir) out="$2"; shift 2;; --workers) n="$2"; shift 2;; *) shift;; esac; done
echo "[TRT-LLM] building into $out"
mkdir -p "$out"; echo half > "$out/rank0.engine"
if [ -n "${FAKE_FAIL:-}" ]; then echo "[TRT-LLM] [E] Assertion failed: fake failure"; exit 3; fi
echo '{}' > "$out/config.json"
for ((i = 0; i < ${FAKE_RANKS:-$n}; i++)); do echo engine > "$out/rank$i.engine"; done
""")
    (bin_dir / "trtllm-build").chmod(0o755)
    for name, body in {
        "tensorrt_llm": f"__version__ = {trtllm_version!r}\n",
        "tensorrt": "__version__ = '10.14.1.48'\n",
        "torch": ("class version:\n    cuda = '13.1'\n\n"
                  "class cuda:\n    is_available = staticmethod(lambda: True)\n"
                  f"    get_device_capability = staticmethod(lambda i=0: {tuple(cc)!r})\n"
                  "    get_device_name = staticmethod(lambda i=0: 'NVIDIA GeForce RTX 4090 D')\n"),
    }.items():
        (py / name).mkdir(parents=True)
        (py / name / "__init__.py").write_text(body)
    return bin_dir, py


def _build_dir(root: Path, spec: BuildSpec) -> Path:
    d = root / "build"
    write_checkpoint(d / "checkpoint", spec)
    (d / "build.sh").write_text(engine.build_script(spec, Path("checkpoint"), Path("engine")))
    return d


def _run(script: Path, bin_dir: Path, py: Path, *args, **env) -> subprocess.CompletedProcess:
    environ = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(py), "HOME": str(script.parent), **env}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=environ, timeout=60)


def test_build_sh_builds_into_partial_then_renames_and_records_versions(tmp_path):
    spec = spec_for(Precision.INT4_AWQ, tp=2)
    d = _build_dir(tmp_path, spec)
    bin_dir, py = _fake_tools(tmp_path)
    done = _run(d / "build.sh", bin_dir, py, "--host", FAKE_ARGS=str(tmp_path / "args"))
    assert done.returncode == 0, done.stderr + done.stdout
    assert sorted(p.name for p in (d / "engine").iterdir()) == \
        ["config.json", engine.ENGINE_RECORD, "rank0.engine", "rank1.engine"]
    assert not (d / "engine.partial").exists()
    record = json.loads((d / "engine" / engine.ENGINE_RECORD).read_text())
    assert record == engine.engine_record({"tensorrt_llm": "1.2.1", "tensorrt": "10.14.1.48", "cuda": "13.1"},
                                          {"name": "NVIDIA GeForce RTX 4090 D", "compute_capability": "8.9"})
    check_engine_compatible(record, dict(record))
    ran = (tmp_path / "args").read_text().split("\n")[:-1]
    assert ["trtllm-build", *ran] == engine.trtllm_build_command(spec, Path("checkpoint"), Path("engine.partial"))
    assert "building into engine.partial" in (d / engine.BUILD_LOG).read_text()
    assert "WARNING" not in done.stderr  # an sm_89 GPU for an rtx4090d build

    (d / "engine" / "stale").write_text("from the previous build")
    again = _run(d / "build.sh", bin_dir, py, "--host")  # a rebuild replaces the engine directory whole
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (d / "engine").iterdir()) == \
        ["config.json", engine.ENGINE_RECORD, "rank0.engine", "rank1.engine"]


def test_build_sh_failure_leaves_no_engine_and_keeps_the_previous_one(tmp_path):
    spec = spec_for(Precision.INT4_AWQ, tp=2)
    d = _build_dir(tmp_path, spec)
    bin_dir, py = _fake_tools(tmp_path)
    failed = _run(d / "build.sh", bin_dir, py, "--host", FAKE_FAIL="1")
    assert failed.returncode != 0
    assert not (d / "engine").exists() and not (d / "engine.partial").exists()
    assert "fake failure" in (d / engine.BUILD_LOG).read_text()

    (d / "engine").mkdir()
    (d / "engine" / "old").write_text("a previous, complete engine")
    short = _run(d / "build.sh", bin_dir, py, "--host", FAKE_RANKS="1")  # rank1.engine missing
    assert short.returncode != 0 and "left no rank1.engine" in short.stderr
    assert (d / "engine" / "old").is_file() and not (d / "engine.partial").exists()


def test_build_sh_refuses_another_tensorrt_llm_and_warns_on_another_gpu(tmp_path):
    spec = spec_for(Precision.BF16)
    d = _build_dir(tmp_path, spec)
    bin_dir, py = _fake_tools(tmp_path / "old", trtllm_version="1.1.0")
    wrong = _run(d / "build.sh", bin_dir, py, "--host", FAKE_ARGS=str(tmp_path / "args"))
    assert wrong.returncode != 0 and "TensorRT-LLM 1.1.0 found" in wrong.stderr and engine.TRTLLM_IMAGE in wrong.stderr
    assert not (tmp_path / "args").exists()  # trtllm-build never ran

    bin_dir, py = _fake_tools(tmp_path / "h100", cc=(9, 0))
    other = _run(d / "build.sh", bin_dir, py, "--host")
    assert other.returncode == 0, other.stderr
    assert "sm_90 but the build targets sm_89" in other.stderr
    assert json.loads((d / "engine" / engine.ENGINE_RECORD).read_text())["compute_capability"] == "9.0"


def test_build_sh_runs_in_the_pinned_container_and_checks_the_driver(tmp_path):
    d = _build_dir(tmp_path, spec_for())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_ARGS"\n')
    (bin_dir / "nvidia-smi").write_text('#!/usr/bin/env bash\necho "$FAKE_DRIVER"\n')
    for tool in ("docker", "nvidia-smi"):
        (bin_dir / tool).chmod(0o755)
    old = _run(d / "build.sh", bin_dir, tmp_path, FAKE_DRIVER="575.64.05", FAKE_ARGS=str(tmp_path / "args"))
    assert old.returncode == 1 and "R580" in old.stderr and not (tmp_path / "args").exists()
    ok = _run(d / "build.sh", bin_dir, tmp_path, FAKE_DRIVER="580.95.05", FAKE_ARGS=str(tmp_path / "args"))
    assert ok.returncode == 0, ok.stderr
    args = (tmp_path / "args").read_text().split("\n")[:-1]
    assert args[:4] == ["run", "--rm", "--gpus", "all"]
    assert f"{d}:/build" in args and args[-4:] == [engine.TRTLLM_IMAGE, "bash", "build.sh", "--host"]


# ── TensorRT-LLM here, and running the build ──────────────────────────────────────────────────────────────────


def test_tensorrt_llm_absent_here_and_engine_build_says_where_to_go(tmp_path):
    assert importlib.util.find_spec("tensorrt_llm") is None  # FACTS §1: cannot be installed here
    assert engine.trtllm_versions() is None
    with pytest.raises(engine.EngineToolsMissing) as e:
        engine.run_engine_build(spec_for(), tmp_path / "ck", tmp_path / "eng", tmp_path / "log")
    assert isinstance(e.value, UserError)
    text = str(e.value)
    assert "TensorRT-LLM" in e.value.message and "TensorRT-LLM 1.2.1" in text and "NVIDIA GPU" in text
    assert "build.sh" in text and "4090D" in text
    assert not (tmp_path / "eng").exists() and not (tmp_path / "log").exists()


def test_trtllm_versions_reads_an_installed_tensorrt_llm(tmp_path, monkeypatch):
    _, py = _fake_tools(tmp_path)
    monkeypatch.syspath_prepend(str(py))
    try:
        versions = engine.trtllm_versions()
    finally:
        for name in ("tensorrt_llm", "tensorrt"):
            sys.modules.pop(name, None)
    import torch  # the real one: imported before the stand-in path was added

    assert versions == {"tensorrt_llm": "1.2.1", "tensorrt": "10.14.1.48", "cuda": torch.version.cuda}


@pytest.fixture
def tools_here(tmp_path, monkeypatch):
    """TensorRT-LLM 1.2.1, a GPU and a stand-in trtllm-build, as run_engine_build would find them on the 4090D box."""
    bin_dir, _ = _fake_tools(tmp_path / "tools")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(engine, "trtllm_versions",
                        lambda: {"tensorrt_llm": "1.2.1", "tensorrt": "10.14.1.48", "cuda": "13.1"})
    gpu = {"name": "NVIDIA GeForce RTX 4090 D", "compute_capability": "8.9"}
    monkeypatch.setattr(engine, "_gpus", lambda: [gpu])
    return gpu


def test_run_engine_build_records_versions_next_to_complete_engines(tmp_path, tools_here, monkeypatch):
    spec = spec_for(Precision.INT4_AWQ, tp=2)
    d = _build_dir(tmp_path, spec)
    monkeypatch.setenv("FAKE_ARGS", str(tmp_path / "args"))
    record = engine.run_engine_build(spec, d / "checkpoint", d / "engine", d / engine.BUILD_LOG)
    assert sorted(p.name for p in (d / "engine").iterdir()) == \
        ["config.json", engine.ENGINE_RECORD, "rank0.engine", "rank1.engine"]
    written = json.loads((d / "engine" / engine.ENGINE_RECORD).read_text())
    assert written == {"tensorrt_llm": "1.2.1", "tensorrt": "10.14.1.48", "cuda": "13.1",
                       "gpu": "NVIDIA GeForce RTX 4090 D", "compute_capability": "8.9"}
    assert {k: record[k] for k in written} == written
    assert record["features"]["kv_cache_reuse"] is True
    assert any("NCCL_P2P_DISABLE" in w for w in record["warnings"])
    ran = (tmp_path / "args").read_text().split("\n")[:-1]
    assert ran[ran.index("--output_dir") + 1] == str(d / "engine.partial") and not (d / "engine.partial").exists()
    assert ran[ran.index("--workers") + 1] == "2"


def test_run_engine_build_failure_keeps_no_half_engine(tmp_path, tools_here, monkeypatch):
    spec = spec_for()
    d = _build_dir(tmp_path, spec)
    monkeypatch.setenv("FAKE_FAIL", "1")
    with pytest.raises(UserError, match=r"trtllm-build failed \(exit 3\)") as e:
        engine.run_engine_build(spec, d / "checkpoint", d / "engine", d / engine.BUILD_LOG)
    assert "fake failure" in str(e.value)  # the log's tail is in the message
    assert not (d / "engine").exists() and not (d / "engine.partial").exists()


def test_run_engine_build_warns_when_this_gpu_is_not_the_target(tmp_path, tools_here, monkeypatch):
    monkeypatch.setattr(engine, "_gpus", lambda: [{"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}])
    spec = spec_for()
    d = _build_dir(tmp_path, spec)
    record = engine.run_engine_build(spec, d / "checkpoint", d / "engine", d / engine.BUILD_LOG)
    assert record["compute_capability"] == "9.0"
    arch = [w for w in record["warnings"] if "sm_90" in w]
    assert arch and "rtx4090d (sm_89)" in arch[0] and "load only on sm_90" in arch[0]
    assert arch[0] in (d / engine.BUILD_LOG).read_text()


def test_run_engine_build_refuses_other_versions_and_mismatched_checkpoints(tmp_path, tools_here, monkeypatch):
    spec = spec_for(tp=2)
    d = _build_dir(tmp_path, spec)
    with pytest.raises(UserError, match="sharded for TP 2, the spec says TP 1"):
        engine.run_engine_build(spec.replace(tp=1), d / "checkpoint", d / "engine", d / "log")
    with pytest.raises(UserError, match="no TensorRT-LLM checkpoint"):
        engine.run_engine_build(spec, d / "nothing", d / "engine", d / "log")
    monkeypatch.setattr(engine, "trtllm_versions", lambda: {"tensorrt_llm": "1.1.0", "tensorrt": "10.13.3.9"})
    with pytest.raises(UserError, match="TensorRT-LLM 1.1.0 is installed.*pinned to 1.2.1") as e:
        engine.run_engine_build(spec, d / "checkpoint", d / "engine", d / "log")
    assert not isinstance(e.value, engine.EngineToolsMissing) and engine.TRTLLM_IMAGE in str(e.value)
    assert not (d / "engine").exists()


# ── the version gate ──────────────────────────────────────────────────────────────────────────────────────────


def test_engine_record_normalises_the_gpu():
    rec = engine.engine_record({"tensorrt_llm": "1.2.1", "tensorrt": "10.14.1.48", "cuda": "13.1"},
                               {"name": "NVIDIA GeForce RTX 4090 D", "compute_capability": (8, 9), "index": 0})
    assert rec == {"tensorrt_llm": "1.2.1", "tensorrt": "10.14.1.48", "cuda": "13.1",
                   "gpu": "NVIDIA GeForce RTX 4090 D", "compute_capability": "8.9"}


def test_version_gate_names_both_versions():
    built = {"tensorrt_llm": "1.2.1", "tensorrt": "10.14.1.48", "cuda": "13.1", "compute_capability": "8.9"}
    check_engine_compatible(built, dict(built))
    check_engine_compatible(built, {**built, "compute_capability": "sm_89", "cuda": "13.0"})  # same SM
    with pytest.raises(UserError, match=r"TensorRT-LLM: built with 1\.2\.1, this machine has 1\.1\.0") as e:
        check_engine_compatible(built, {**built, "tensorrt_llm": "1.1.0"})
    assert "Version tag does not match" in str(e.value) and "build.sh" in str(e.value)
    with pytest.raises(UserError, match=r"TensorRT: built with 10\.14\.1\.48, this machine has 10\.13\.3\.9"):
        check_engine_compatible(built, {**built, "tensorrt": "10.13.3.9"})
    with pytest.raises(UserError, match=r"8\.9 \(sm_89\), this machine has 9\.0 \(sm_90\)"):
        check_engine_compatible(built, {**built, "compute_capability": "9.0"})
    with pytest.raises(UserError) as both:
        check_engine_compatible(built, {**built, "tensorrt_llm": "1.1.0", "tensorrt": "10.13.3.9"})
    assert "1.1.0" in str(both.value) and "10.13.3.9" in str(both.value)
