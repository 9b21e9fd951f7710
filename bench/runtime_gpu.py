"""Reference runtime on one GPU, Qwen2.5-7B-shaped random weights: every speed path, in-process.

Run on a GPU machine from the repository root: `python bench/runtime_gpu.py [--json out.json] [--quick]`.
Needs only torch (the runtime's code is imported from this checkout). Rows: bf16 eager / CUDA graphs /
graphs + torch.compile, and INT4-AWQ (packed int4 GEMMs) with graphs + compile. Each row: first token of a
1,024-token prompt, batch-1 decode, 8, 32 and 64 concurrent streams; generation never stops early (min_tokens).
GPU memory used is set beside what `trtqwen plan`'s memory model gives for the same weights and KV slots.

Rates (rates()): *_tok_s is every output token over the wall time from submitting to the last token (first token
and prefill included: `trtqwen bench`'s total_tok_s); batch1_user_tok_s is the decode rate after the first token
((n - 1) / (last - first): `trtqwen bench`'s per-stream user_tok_s, client.Timing.tokens_per_s). Every timed
workload runs once untimed first (WORKLOADS): a prefill of a new row count picks another W4A16 Triton config
(int4_triton.CONFIGS), which JIT-compiles on first use (≈ 0.5 s) — issue 31: the int4 batch-1 row's 128-token
prompt was the only 65..128-row GEMM of the run, so its compile sat inside the timed batch-1 region.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trtqwen.build.plan import CUDA_CONTEXT_BYTES, QWEN25_7B as DIMS, activation_bytes, kv_bytes_per_token, weight_bytes  # noqa: E402
from trtqwen.runtime import LLMEngine, SamplingParams, load_model  # noqa: E402
from trtqwen.runtime.random_model import QWEN25_7B  # noqa: E402
from trtqwen.runtime.random_model import random_model  # noqa: E402
from trtqwen.build.spec import Precision  # noqa: E402

CEILING_BYTES_PER_S = 3.0e12  # H100 SXM measured copy bandwidth (FACTS §3): the batch-1 roofline's numerator
SLOTS, SEQ = 64, 2048  # as the served repository (package --max-batch-size 64)


def fixed(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, min_tokens=n, top_k=1, end_id=None)


# Prompt lengths of each timed run, in the order measure() times them; each also runs once untimed first (warm-up),
# so every prefill shape (hence every Triton config and torch kernel) a timed run uses was compiled before it.
USERS = (8, 32, 64)
WORKLOADS = {"ttft_1024": [1024], "batch1": [128]} | {f"users{u}": [128] * u for u in USERS}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rates(t0: float, end: float, reqs: list[tuple[int, float, float]]) -> dict:
    """Rates of one run from its start t0, its end and each request's (output tokens, first-token time, last-token
    time). output_tok_s: all tokens over the whole wall time (prefill and first token included); decode_tok_s: the
    aggregate rate once every stream has its first token; user_tok_s_p50: the median per-stream decode rate after
    the first token, (n - 1) / (last - first), which is what `trtqwen bench` reports per stream."""
    out = sum(n for n, _, _ in reqs)
    ttfts = sorted(first - t0 for _, first, _ in reqs)
    steady = (out - len(reqs)) / max(end - t0 - ttfts[-1], 1e-9)
    users = [(n - 1) / max(last - first, 1e-9) for n, first, last in reqs if n > 1]
    return {"output_tok_s": round(out / (end - t0), 1), "decode_tok_s": round(steady, 1),
            "user_tok_s_p50": round(statistics.median(users), 1) if users else None,
            "ttft_p50_s": round(ttfts[len(ttfts) // 2], 4), "ttft_max_s": round(ttfts[-1], 4)}


def timed_run(engine: LLMEngine, prompts: list[list[int]], n: int) -> dict:
    first: dict[int, float] = {}
    last: dict[int, float] = {}

    def on_token(r, tok, why) -> None:
        if tok is not None:
            now = time.perf_counter()
            first.setdefault(r.id, now)
            last[r.id] = now

    sync()
    t0 = time.perf_counter()
    reqs = [engine.add(p, fixed(n), on_token) for p in prompts]
    while engine.has_work():
        engine.step()
    sync()
    end = time.perf_counter()
    return rates(t0, end, [(len(r.output), first[r.id], last[r.id]) for r in reqs])


def predicted_bytes(precision: Precision) -> float:
    """The plan's memory model for this engine: weights + KV slots × positions + activations + CUDA context."""
    return (weight_bytes(DIMS, precision) + kv_bytes_per_token(DIMS) * SLOTS * SEQ
            + activation_bytes(DIMS, 1, SEQ, SLOTS) + CUDA_CONTEXT_BYTES)


def measure(name: str, int4: bool, graphs: bool, compiled: bool, quick: bool, checkpoint: str | None = None,
            tokens: int = 256) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = load_model(checkpoint, "cuda", max_positions=4096) if checkpoint else random_model(QWEN25_7B, int4=int4)
    if compiled:
        model.compile()
    engine = LLMEngine(model, max_slots=SLOTS, max_seq_len=SEQ, prefill_chunk=SEQ, cuda_graphs=graphs)
    rand = lambda n: torch.randint(0, 150000, (n,)).tolist()  # noqa: E731
    for lengths in WORKLOADS.values():  # warm-up: every timed run's prefill shapes (Triton JIT), decode, sampling
        timed_run(engine, [rand(k) for k in lengths], 4)
    row = {"row": name, "startup_s": round(time.perf_counter() - t0, 1)}
    row["ttft_1024_s"] = min(timed_run(engine, [rand(k) for k in WORKLOADS["ttft_1024"]], 1)["ttft_p50_s"]
                             for _ in range(3))
    n = 64 if quick else tokens
    r = timed_run(engine, [rand(k) for k in WORKLOADS["batch1"]], n)
    row["batch1_tok_s"], row["batch1_user_tok_s"], row["batch1_ttft_s"] = (r["output_tok_s"], r["user_tok_s_p50"],
                                                                           r["ttft_p50_s"])
    if r["ttft_p50_s"] > max(3 * row["ttft_1024_s"], 0.05):  # 128 tokens slower than 1,024: a compile
        print(f"SUSPECT {name}: batch-1 first token {r['ttft_p50_s']} s (1,024 tokens: {row['ttft_1024_s']} s): "
              "something compiled inside the timed region", flush=True)  # gpu_suite.sh drops lines with "warn"
    for users in USERS:
        r = timed_run(engine, [rand(k) for k in WORKLOADS[f"users{users}"]], n)
        row[f"users{users}_tok_s"], row[f"users{users}_ttft_max_s"] = r["output_tok_s"], r["ttft_max_s"]
        row[f"users{users}_decode_tok_s"] = r["decode_tok_s"]
    free, total = torch.cuda.mem_get_info()
    row["gpu_used_gb"] = round((total - free) / 1e9, 2)
    row["plan_gb"] = round(predicted_bytes(Precision.INT4_AWQ if int4 else Precision.BF16) / 1e9, 2)
    read = weight_bytes(DIMS, Precision.INT4_AWQ if int4 else Precision.BF16) - DIMS.embedding_params * 2
    row["ceiling_tok_s"] = round(CEILING_BYTES_PER_S / read, 1)
    row["batch1_of_ceiling"] = round(row["batch1_tok_s"] / row["ceiling_tok_s"], 3)
    print(json.dumps(row), flush=True)
    del engine, model
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="64 tokens per stream")
    ap.add_argument("--tokens", type=int, default=256, help="output tokens per stream (gpu_suite.sh: 128, as served)")
    ap.add_argument("--rows", default="eager,graphs,compiled,int4", help="which of eager,graphs,compiled,int4")
    ap.add_argument("--checkpoints", default="", help="bf16,int4 checkpoints from `trtqwen build` for the compiled rows "
                    "(default: random weights in memory)")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    bf16_ckpt, int4_ckpt = (args.checkpoints.split(",") + [None, None])[:2] if args.checkpoints else (None, None)
    src = lambda ckpt: " (trtqwen build)" if ckpt else " (random)"  # noqa: E731
    configs = {"eager": ("bf16 eager (random)", False, False, False, True),
               "graphs": ("bf16 CUDA graphs (random)", False, True, False, False),
               "compiled": ("bf16 graphs + compile" + src(bf16_ckpt), False, True, True, False, bf16_ckpt),
               "int4": ("int4-awq graphs + compile" + src(int4_ckpt), True, True, True, False, int4_ckpt)}
    rows = [measure(*configs[r][:4], args.quick or configs[r][4], *configs[r][5:], tokens=args.tokens)
            for r in args.rows.split(",")]
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
