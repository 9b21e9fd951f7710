"""Reference runtime on one GPU, Qwen2.5-7B-shaped random weights: every speed path, in-process.

Run on a GPU machine from the repository root: `python bench/runtime_gpu.py [--json out.json] [--quick]`.
Needs only torch (the runtime's code is imported from this checkout). Rows: bf16 eager / CUDA graphs /
graphs + torch.compile, and INT4-AWQ (packed int4 GEMMs) with graphs + compile. Each row: first token of a
1,024-token prompt, batch-1 decode, 8, 32 and 64 concurrent streams; generation never stops early (min_tokens).
GPU memory used is set beside what `trtqwen plan`'s memory model gives for the same weights and KV slots.
"""

from __future__ import annotations

import argparse
import gc
import json
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


def timed_run(engine: LLMEngine, prompts: list[list[int]], n: int) -> dict:
    first: dict[int, float] = {}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reqs = [engine.add(p, fixed(n), lambda r, tok, why: first.setdefault(r.id, time.perf_counter())) for p in prompts]
    while engine.has_work():
        engine.step()
    torch.cuda.synchronize()
    end = time.perf_counter()
    out = sum(len(r.output) for r in reqs)
    ttfts = sorted(first[r.id] - t0 for r in reqs)
    steady = (out - len(reqs)) / max(end - t0 - ttfts[-1], 1e-9)  # once every stream has its first token
    return {"output_tok_s": round(out / (end - t0), 1), "decode_tok_s": round(steady, 1),
            "ttft_p50_s": round(ttfts[len(ttfts) // 2], 4), "ttft_max_s": round(ttfts[-1], 4)}


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
    timed_run(engine, [rand(1024)], 4)  # warm-up: prefill kernels, sampling
    timed_run(engine, [rand(64) for _ in range(8)], 4)
    row = {"row": name, "startup_s": round(time.perf_counter() - t0, 1)}
    row["ttft_1024_s"] = min(timed_run(engine, [rand(1024)], 1)["ttft_p50_s"] for _ in range(3))
    n = 64 if quick else tokens
    row["batch1_tok_s"] = timed_run(engine, [rand(128)], n)["output_tok_s"]
    for users in (8, 32, 64):
        r = timed_run(engine, [rand(128) for _ in range(users)], n)
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
