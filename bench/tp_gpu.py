"""Tensor parallel in the reference runtime on GPUs: one process per rank (runtime/tp/) against TP 1.

Run from the repository root on a machine with as many GPUs as the largest TP asked for:
    python bench/tp_gpu.py --tp 1,2,4 --json out.json
Needs only torch (the runtime's code is imported from this checkout). Qwen2.5-7B-shaped random bf16 weights:
every rank makes its shard of the same full model (random_model slices one seeded tensor per weight), so TP > 1
must give TP 1's greedy tokens; that is checked in float32 (bf16 sums in another order may flip near-ties).
One JSON row per configuration:
  check  TP n greedy tokens == TP 1 on a short prompt (float32, eager)
  speed  batch-1 decode tok/s and N-stream total tok/s, CUDA graphs (+ torch.compile on every rank)
  allreduce  one decode step's 56 all-reduces of [B, 3584] bf16, captured in a CUDA graph (and eager), B = 1 and N
  independent  n TP-1 engines, one process per GPU, measured at the same time (what n GPUs give without TP)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from trtqwen.runtime import LLMEngine, SamplingParams  # noqa: E402
from trtqwen.runtime.random_model import PRESETS, random_model  # noqa: E402
from trtqwen.runtime.tp import RandomShards, TPModel  # noqa: E402

CHECK_PROMPT = list(range(1000, 1016))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, min_tokens=n, top_k=1, end_id=None)


def emit(row: dict, rows: list[dict]) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


def free_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


# --- measurements -------------------------------------------------------------------------------------------------
def decode_rate(engine: LLMEngine, streams: int, steps: int, prompt_len: int = 64) -> float:
    """Total decode tok/s of `streams` sequences, all prefilled first, over `steps` engine steps."""
    reqs = [engine.add([(7 * i + j) % 30000 + 100 for j in range(prompt_len)], greedy(steps + 4)) for i in range(streams)]
    while any(not r.output for r in reqs):
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()  # samples on rank 0: ends with a host sync, which waits for every rank's collectives
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    while engine.has_work():
        engine.step()
    return streams * steps / elapsed


def speed(model, streams: int, steps: int, seq: int) -> dict:
    t0 = time.perf_counter()
    engine = LLMEngine(model, max_slots=streams, max_seq_len=seq, cuda_graphs=True)  # captures every bucket
    startup = time.perf_counter() - t0
    decode_rate(engine, 1, 8)  # warm the prefill path
    return {"graphs_capture_s": round(startup, 1), "batch1_tok_s": round(decode_rate(engine, 1, steps), 1),
            f"streams{streams}_tok_s": round(decode_rate(engine, streams, steps), 1)}


def allreduce_probe(model, batch: int, layers: int, reps: int = 50) -> dict:
    """Run on every rank at once (TPModel.run_on_ranks): µs per decode step's 2 × layers all-reduces of [batch, H]."""
    import torch.distributed as dist

    x = torch.randn(batch, model.cfg.hidden_size, device=model.device, dtype=torch.bfloat16)

    def step():
        for _ in range(2 * layers):
            dist.all_reduce(x, group=model.group)

    def timed(fn) -> float:
        torch.cuda.synchronize()
        dist.barrier(group=model.group)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps * 1e6

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    eager_us, graph_us = timed(step), timed(graph.replay)
    return {"batch": batch, "allreduces": 2 * layers, "eager_us_per_step": round(eager_us, 1),
            "graph_us_per_step": round(graph_us, 1)}


# --- configurations -----------------------------------------------------------------------------------------------
def tp_model(preset: str, tp: int, dtype, max_positions: int, compile_: bool):
    """TP 1: the plain in-process model; TP n: rank 0's proxy over n rank processes on GPUs 0..n-1."""
    cfg = PRESETS[preset]
    if tp == 1:
        model = random_model(cfg, device="cuda:0", dtype=dtype, max_positions=max_positions)
    else:
        model = TPModel(RandomShards(preset, tp), "cuda", list(range(tp)), dtype, max_positions)
    return model.compile() if compile_ else model


def close(model) -> None:
    if isinstance(model, TPModel):
        model.close()  # the caller drops its reference, then free_memory()


def check_row(args, tp: int, reference: list[int]) -> dict:
    model = tp_model(args.preset, tp, torch.float32, 256, compile_=False)
    try:
        got = LLMEngine(model, max_slots=1, max_seq_len=256, cuda_graphs=False).generate(
            [CHECK_PROMPT], greedy(args.check_tokens))[0].output
    finally:
        close(model)
        del model
        free_memory()
    return {"row": "check", "tp": tp, "dtype": "float32", "tokens_equal_tp1": got == reference,
            "tokens": got, "tp1_tokens": reference}


def speed_row(args, tp: int) -> list[dict]:
    torch.cuda.reset_peak_memory_stats(0)
    t0 = time.perf_counter()
    model = tp_model(args.preset, tp, torch.bfloat16, args.seq, compile_=args.compile)
    rows = []
    try:
        row = {"row": "speed", "tp": tp, "preset": args.preset, "compiled": args.compile,
               "startup_s": round(time.perf_counter() - t0, 1), **speed(model, args.streams, args.steps, args.seq)}
        row["gpu_mem_gb_rank0"] = round(torch.cuda.max_memory_allocated(0) / 1e9, 2)
        rows.append(row)
        if isinstance(model, TPModel):
            for batch in (1, args.streams):
                probe = model.run_on_ranks("bench.tp_gpu:allreduce_probe", batch=batch, layers=model.cfg.num_layers)
                rows.append({"row": "allreduce", "tp": tp, **probe})
    finally:
        close(model)
        del model
        free_memory()
    return rows


def single_instance(args) -> None:
    """One TP-1 engine on this process's GPU, measured when every sibling is ready (--barrier)."""
    model = tp_model(args.preset, 1, torch.bfloat16, args.seq, compile_=args.compile)
    engine = LLMEngine(model, max_slots=args.streams, max_seq_len=args.seq, cuda_graphs=True)
    decode_rate(engine, 1, 8)
    out = {}
    for name, streams in (("batch1_tok_s", 1), (f"streams{args.streams}_tok_s", args.streams)):
        wait_for_all(Path(args.barrier), f"{name}.{args.instance}", args.instances)
        out[name] = round(decode_rate(engine, streams, args.steps), 1)
    print("RESULT " + json.dumps(out), flush=True)


def wait_for_all(folder: Path, name: str, n: int, timeout: float = 1800) -> None:
    (folder / name).touch()
    stem = name.rsplit(".", 1)[0]
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(stem + ".*"))) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"siblings never reached {stem}")
        time.sleep(0.05)


def independent_row(args, n: int) -> dict:
    with tempfile.TemporaryDirectory() as barrier:
        procs = []
        for i in range(n):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--single", "--instance", str(i), "--instances", str(n),
                   "--barrier", barrier, "--preset", args.preset, "--streams", str(args.streams), "--steps",
                   str(args.steps), "--seq", str(args.seq)] + ([] if args.compile else ["--no-compile"])
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(i), "NCCL_NVLS_ENABLE": "0"}
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
        results = []
        for p in procs:
            out, _ = p.communicate()
            line = [l for l in out.splitlines() if l.startswith("RESULT ")]
            if p.returncode or not line:
                raise RuntimeError(f"independent instance failed (exit {p.returncode}): {out[-2000:]}")
            results.append(json.loads(line[-1][7:]))
    total = {k: round(sum(r[k] for r in results), 1) for k in results[0]}
    return {"row": "independent", "instances": n, "preset": args.preset, "compiled": args.compile,
            "total": total, "per_instance": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", default="1,2,4", help="TP sizes, comma-separated")
    ap.add_argument("--json", help="write every row here too")
    ap.add_argument("--preset", default="qwen2.5-7b", choices=sorted(PRESETS))
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--steps", type=int, default=128, help="decode steps timed per measurement")
    ap.add_argument("--seq", type=int, default=1024, help="max_seq_len of the engines (KV buckets up to it)")
    ap.add_argument("--check-tokens", type=int, default=16)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--skip", default="", help="comma-separated row kinds to skip: check,speed,independent")
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # one independent instance
    ap.add_argument("--instance", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--instances", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--barrier", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        return single_instance(args)
    tps = [int(t) for t in args.tp.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    gpus = torch.cuda.device_count()
    rows: list[dict] = []
    emit({"row": "machine", "gpus": gpus, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
          "nccl": ".".join(map(str, torch.cuda.nccl.version())), "tp": tps}, rows)
    reference = None
    if "check" not in skip and any(t > 1 for t in tps):
        model = tp_model(args.preset, 1, torch.float32, 256, compile_=False)
        reference = LLMEngine(model, max_slots=1, max_seq_len=256, cuda_graphs=False).generate(
            [CHECK_PROMPT], greedy(args.check_tokens))[0].output
        del model
        free_memory()
    for tp in tps:
        if tp > gpus:
            emit({"row": "skipped", "tp": tp, "why": f"{gpus} GPU(s) present"}, rows)
            continue
        try:
            if reference is not None and tp > 1:
                emit(check_row(args, tp, reference), rows)
            if "speed" not in skip:
                for row in speed_row(args, tp):
                    emit(row, rows)
            if "independent" not in skip and tp > 1:
                emit(independent_row(args, tp), rows)
        except Exception as e:  # noqa: BLE001 - one failed size must not cost the others' rows
            emit({"row": "failed", "tp": tp, "error": repr(e)[:2000]}, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
