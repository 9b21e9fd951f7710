"""bench/runtime_gpu.py (issue 31): its rate formulas, and that its warm-up compiles every INT4 GEMM config a timed
run uses (the int4 batch-1 row once timed a Triton JIT compile: 115.5 tok/s in-process vs 218.2 served)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from trtqwen.runtime import LLMEngine
from trtqwen.runtime.layers import int4_triton
from trtqwen.runtime.random_model import SMALL, random_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("runtime_gpu_bench", ROOT / "bench" / "runtime_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rates_separate_first_token_from_decode(bench):
    # The 2026-12-06 H100 int4 batch-1 numbers: 128 tokens, a ~0.53 s first token (a Triton compile in the timed
    # region), then 127 tokens at 218.2 tok/s: the whole-run rate reads 115.5, the per-stream decode rate 218.2.
    first = 0.526
    last = first + 127 / 218.2
    r = bench.rates(0.0, last, [(128, first, last)])
    assert r["output_tok_s"] == pytest.approx(115.5, abs=0.2)
    assert r["user_tok_s_p50"] == pytest.approx(218.2, abs=0.1)
    assert r["ttft_p50_s"] == pytest.approx(first, abs=1e-4)
    # two streams: total over wall time, steady rate once both have a first token, median per-stream rate
    r = bench.rates(0.0, 2.0, [(101, 0.5, 1.5), (101, 1.0, 2.0)])
    assert r["output_tok_s"] == 101.0 and r["decode_tok_s"] == 200.0 and r["user_tok_s_p50"] == 100.0
    assert r["ttft_max_s"] == 1.0


def gemm_rows(bench, engine, runs, n=2) -> set[int]:
    """The row counts (M) of every INT4 GEMM that runs of these prompt lengths give the engine, in order."""
    seen: set[int] = set()
    real = int4_triton.w4a16_mm

    def spy(x, *a, **k):
        seen.add(x.reshape(-1, x.shape[-1]).shape[0])
        return real(x, *a, **k)

    int4_triton.w4a16_mm = spy
    try:
        for lengths in runs:
            bench.timed_run(engine, [torch.randint(0, SMALL.vocab_size, (k,)).tolist() for k in lengths], n)
    finally:
        int4_triton.w4a16_mm = real
    return seen


@pytest.mark.slow
def test_warmup_compiles_every_config_the_timed_runs_use(bench):
    torch.manual_seed(0)
    model = random_model(SMALL, int4=True, device="cpu", max_positions=bench.SEQ)  # bf16, as Int4Linear
    engine = LLMEngine(model, max_slots=bench.SLOTS, max_seq_len=bench.SEQ, prefill_chunk=bench.SEQ, cuda_graphs=False)
    cfg = lambda rows: {int4_triton.config(m, 128) for m in rows}  # noqa: E731
    warm = gemm_rows(bench, engine, bench.WORKLOADS.values())
    timed = gemm_rows(bench, engine, bench.WORKLOADS.values())
    assert cfg(timed) <= cfg(warm)
    old_warm = gemm_rows(bench, engine, [[1024], [64] * 8])  # the warm-up of the 2026-12-06 run
    batch1 = gemm_rows(bench, engine, [bench.WORKLOADS["batch1"]])
    assert int4_triton.config(128, 128) in cfg(batch1) - cfg(old_warm)  # the compile the batch-1 row timed
