"""Tensor parallel as one process per rank (runtime/tp/), on CPU over gloo: equal to the merged (TP 1) model.

Each rank process loads only its rank{i}.safetensors; rank 0 drives the others with commands. Logits and
greedy tokens must equal what the merged checkpoint gives, for 16-bit and quantized checkpoints; a dead rank
must fail rank 0 within seconds; a served TP 2 package must answer as the TP 1 one and leave no rank behind.
"""

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from trtqwen.errors import UserError
from trtqwen.runtime import LLMEngine, SamplingParams, load_model
from trtqwen.runtime.loader import load_rank, load_trtllm
from trtqwen.runtime.tp import TPError, TPModel, load_tp_model
from trtqwen.serve.supervisor import processes

GREEDY = SamplingParams(max_tokens=16, top_k=1, end_id=None)
PROMPTS = [[1, 2, 3], list(range(200, 290)), [151000 + i for i in range(20)], [5] * 17]  # ids in every vocab shard


def rank_pids_for(path: Path) -> list[int]:
    """Live rank processes started for this checkpoint (their command line names it)."""
    where = str(Path(path).resolve()).encode()
    return [pid for pid, cmd in processes() if b"trtqwen.runtime.tp.worker" in cmd and where in b" ".join(cmd)]


@pytest.mark.parametrize("precision,tp", [("bf16", 2), ("bf16", 4), ("int8_sq", 2), ("fp8", 2), ("int4_awq", 2),
                                          ("int4_awq", 4)])
def test_rank_processes_equal_the_merged_model(exported, precision, tp):
    path = exported(precision, tp)
    merged = load_model(path, max_positions=512)  # load_trtllm: every shard merged in one process
    x = torch.arange(100, 180)
    expect = merged.logits(x)
    want = [r.output for r in LLMEngine(merged, max_slots=4, max_seq_len=256, prefill_chunk=64).generate(PROMPTS, GREEDY)]
    with load_model(path, max_positions=512, tp_ranks=True) as model:
        assert isinstance(model, TPModel) and len(model.procs) == tp - 1
        got = model.logits(x)
        assert got.shape == expect.shape
        cosine = torch.nn.functional.cosine_similarity(expect, got, dim=-1).min()
        if precision == "int8_sq":  # each rank scales its own slice of dense/proj's input per token, as
            assert cosine > 0.995  # TensorRT-LLM's ranks do; the merged model takes one scale over the whole row
        elif precision == "fp8":  # quantized activations: a sum in another order can flip a rounding
            assert cosine > 0.999
        else:
            assert cosine > 0.99999 and torch.allclose(expect, got, atol=1e-4)
        if precision == "int8_sq":  # flat random logits: one flipped rounding changes a greedy token,
            want = None  # so the ranks' own eager tokens are what the graph flow must repeat
        # fp8 stops at the logits: its 3-bit mantissa flips greedy ties between any two GEMM shapes (measured), and
        # the command flow, which tokens would check, is the same for every precision (the other rows check it)
        for graphs in (False, True) if precision != "fp8" else ():  # True: the bucketed graph runner's command flow
            engine = LLMEngine(model, max_slots=4, max_seq_len=256, prefill_chunk=64, cuda_graphs=graphs)
            out = [r.output for r in engine.generate(PROMPTS, GREEDY)]
            want = want or out
            assert out == want, graphs
    assert all(p.poll() == 0 for p in model.procs)  # shut down cleanly


def test_tp2_equals_a_tp1_checkpoint(exported):
    """Rank processes of the TP 2 export give the TP 1 export's tokens (not only its own merged self's)."""
    tp1 = LLMEngine(load_model(exported("bf16", 1), max_positions=512), max_slots=4, max_seq_len=256)
    with load_tp_model(exported("bf16", 2), max_positions=512) as model:
        got = LLMEngine(model, max_slots=4, max_seq_len=256).generate(PROMPTS, GREEDY)
    assert [r.output for r in got] == [r.output for r in tp1.generate(PROMPTS, GREEDY)]


def test_load_rank_has_the_shard_dims(exported):
    path = exported("bf16", 4)
    full = load_trtllm(path)
    shard = load_rank(path, 3)
    c = shard.cfg
    assert (c.num_heads, c.num_kv_heads, c.intermediate_size, shard.tp_size) == (1, 1, 384, 4)
    assert shard.embed.shape[0] == shard.lm_head.weight.shape[0] == -(-full.cfg.vocab_size // 4)
    assert torch.equal(shard.layers[0].down.weight, full.layers[0].down.weight[:, 3 * 384:])  # row-parallel: along in
    assert shard.layers[0].qkv.weight.shape[0] == 3 * 128  # [q_r; k_r; v_r] of one head each


def test_a_killed_rank_fails_rank_0_quickly(exported):
    path = exported("bf16", 4)
    model = load_tp_model(path, max_positions=512)
    try:
        engine = LLMEngine(model, max_slots=2, max_seq_len=256)
        engine.generate([[1, 2, 3]], GREEDY)
        victim = model.procs[1]
        os.kill(victim.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(TPError, match=f"rank 2 \\(pid {victim.pid}\\) exited"):
            engine.generate([[4, 5, 6]], GREEDY)
        assert time.monotonic() - t0 < 5
        with pytest.raises(TPError):  # dead for good: every later call says so at once
            model.new_cache(1, 16)
    finally:
        t0 = time.monotonic()
        model.close()
    assert time.monotonic() - t0 < 5
    assert all(p.poll() is not None for p in model.procs) and not rank_pids_for(path)


def test_a_worker_that_cannot_load_fails_the_start(exported, tmp_path):
    src = exported("bf16", 2)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "rank1.safetensors").unlink()
    (bad / "rank1.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(TPError, match="rank 1 .* exited with code 1"):
        load_tp_model(bad)
    assert not rank_pids_for(bad)


def test_bad_requests_are_user_errors(exported, tmp_path):
    with pytest.raises(UserError, match="2 distinct GPUs"):
        load_tp_model(exported("bf16", 2), device="cuda", gpu_ids=[0, 0])
    with pytest.raises(UserError, match="TP 2 .* 3 GPU id"):
        load_tp_model(exported("bf16", 2), device="cuda", gpu_ids=[0, 1, 2])
    missing = tmp_path / "missing"
    missing.mkdir()
    for f in exported("bf16", 2).iterdir():
        if f.name != "rank1.safetensors":
            (missing / f.name).symlink_to(f)
    with pytest.raises(UserError, match="rank file"):
        load_tp_model(missing)
    with pytest.raises(UserError, match="ranks 0..1, not rank 2"):
        load_rank(exported("bf16", 2), 2)
    single = load_model(exported("bf16", 1), tp_ranks=True)  # TP 1: the plain model, nothing started
    assert not isinstance(single, TPModel)


# --- served: one tritonserver, the python model owns its rank processes ------------------------------------------
PORTS = {1: 19610, 2: 19620}  # http, grpc, metrics = base, base+1, base+2


@pytest.fixture(scope="module")
def served(tiny_tp_dir, module_tmp):
    """TP 1 and TP 2 packages of the tiny-tp model (bf16 checkpoints, torch runtime), served side by side."""
    from conftest import started_together  # here, not at the top: rank workers import this module too
    from trtqwen.serve import server
    from trtqwen.build.pipeline import run_build
    from trtqwen.build.spec import BuildSpec
    from trtqwen.serve.repo import generate_repo

    root = module_tmp("served_tp")

    for tp in PORTS:
        run_build(BuildSpec.request(str(tiny_tp_dir), precision="bf16", tp=tp), out=root / f"build{tp}", until="checkpoint")

    def start(tp):
        repo = generate_repo(root / f"build{tp}", root / f"repo{tp}", runtime="torch")
        base = PORTS[tp]
        server.start(repo, ["ensemble"], "127.0.0.1", base, base + 1, base + 2, timeout=150)
        return repo

    with started_together({tp: (lambda tp=tp: start(tp)) for tp in PORTS}, server.stop) as repos:
        yield repos, root


def generate_stream(tp: int, prompt: str, max_tokens: int) -> str:
    body = {"text_input": prompt, "max_tokens": max_tokens, "stream": True, "top_k": 1}
    req = urllib.request.Request(f"http://127.0.0.1:{PORTS[tp]}/v2/models/ensemble/generate_stream",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [json.loads(line[5:]) for line in r.read().decode().splitlines() if line.startswith("data:")]
    assert events and not any("error" in e for e in events), events
    return "".join(e.get("text_output", "") for e in events)


def test_served_tp2_answers_as_tp1_and_leaves_no_rank_behind(served):
    from trtqwen.serve import server
    repos, root = served
    checkpoint = (root / "build2" / "checkpoint").resolve()
    assert json.loads((checkpoint / "config.json").read_text())["mapping"]["tp_size"] == 2
    workers = rank_pids_for(checkpoint)
    assert len(workers) == 1, workers  # rank 1; rank 0 is the engine process itself
    state = json.loads((repos[2] / server.STATE_FILE).read_text())
    assert state["command"][0].endswith("tritonserver")  # one server process, no mpirun
    for prompt in ("Hello, who are you?", "你好"):
        one, two = generate_stream(1, prompt, 12), generate_stream(2, prompt, 12)
        assert two and two == one, (prompt, one, two)
    log = (repos[2] / "tritonserver.log").read_text(errors="replace")
    assert "TP 2: one process per rank" in log

    os.kill(workers[0], signal.SIGKILL)  # a dead rank: the request that meets it fails loudly, naming it
    with pytest.raises(urllib.error.HTTPError) as e:
        generate_stream(2, "Hello", 4)
    assert "rank 1" in e.value.read().decode(), "the error names the dead rank"
    with urllib.request.urlopen(f"http://127.0.0.1:{PORTS[2]}/v2/health/live", timeout=5) as r:
        assert r.status == 200  # the server stays up
    assert "TP rank 1" in (repos[2] / "tritonserver.log").read_text(errors="replace")
    # then a new engine process starts its ranks afresh: refused as "starting again" meanwhile, answered after
    deadline = time.monotonic() + 120
    while True:
        try:
            assert generate_stream(2, "Hello, who are you?", 12) == generate_stream(1, "Hello, who are you?", 12)
            break
        except urllib.error.HTTPError as e:
            assert "starting again" in e.read().decode() and time.monotonic() < deadline
            time.sleep(0.5)
    assert len(rank_pids_for(checkpoint)) == 1 and rank_pids_for(checkpoint) != workers  # a fresh rank 1
    server.stop(repos[2])
    deadline = time.monotonic() + 10
    while rank_pids_for(checkpoint) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not rank_pids_for(checkpoint)


def shard_heads(model, plus: int = 0) -> int:
    """Run on every rank by TPModel.run_on_ranks."""
    return model.cfg.num_heads + plus


def test_random_shards_are_slices_of_the_tp1_random_model():
    """What bench/tp_gpu.py relies on: random rank shards made apart add up to random_model's TP 1 model."""
    from trtqwen.runtime.random_model import SMALL, random_model
    from trtqwen.runtime.tp import RandomShards

    full = random_model(SMALL, device="cpu", dtype=torch.float32, max_positions=256)
    x = torch.arange(10, 60)
    with TPModel(RandomShards("small", 2), dtype=torch.float32, max_positions=256) as model:
        assert torch.allclose(model.logits(x), full.logits(x), atol=1e-4)
        assert model.run_on_ranks("tests.test_tp:shard_heads", plus=10) == 12
