"""INT4-AWQ W4A16 GEMM: the Triton kernel checked against dequantize + matmul, timed against tinygemm and bf16.

GPU: `python3 bench/int4_kernel.py` (only torch and its bundled Triton needed): for M in 1 … 4096 on Qwen2.5-7B's
linear shapes, checks the kernel, a CUDA graph replay and a torch.compile(fullgraph) call, then prints µs per GEMM
for Triton, tinygemm and bf16 F.linear and the 28-layer sums per M. CPU: `python3 bench/int4_kernel.py --interpret`
runs the kernel in Triton's interpreter on small shapes (pip install triton; no GPU). `--sweep` (GPU) times a few
candidate tile configs per M and shape against int4_triton.CONFIGS' choice.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--interpret", action="store_true", help="CPU: Triton's interpreter, small correctness checks")
ARGS.add_argument("--sweep", action="store_true", help="GPU: time candidate tile configs per M and shape, to tune CONFIGS")
ARGS = ARGS.parse_args()
if ARGS.interpret:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LAYERS, GROUP = 28, 128
SHAPES = {"qkv": (3584, 4608, 1), "o": (3584, 3584, 1), "gate/up": (3584, 18944, 2), "down": (18944, 3584, 1)}
GPU_MS = (1, 8, 32, 64, 256, 1024, 4096)
INTERPRET_CASES = [((1, 3, 16, 33, 128), 256, 4608, 128, torch.bfloat16), ((1, 33), 18944, 128, 128, torch.bfloat16),
                   ((3, 128), 384, 640, 64, torch.float16)]  # (Ms, K, N, group, dtype): every M bucket ≤ 128


def kernel_module():
    """int4_triton by path: importing the trtqwen.runtime package would pull the runtime's other dependencies."""
    path = Path(__file__).resolve().parents[1] / "trtqwen" / "runtime" / "layers" / "int4_triton.py"
    spec = importlib.util.spec_from_file_location("int4_triton", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


it = kernel_module()


def case(m, k, n, group, device, dtype, seed=0):
    """x [m, k], AWQ values q [n, k], scales [n, k/group], and the packed weight with its [k/group, n] scales."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), device=device, dtype=torch.int8, generator=g)
    scales = torch.rand(n, k // group, device=device, generator=g) * 0.004 + 0.001
    x = torch.randn(m, k, device=device, generator=g).to(dtype)
    return x, q, scales, it.pack(q), scales.t().to(dtype).contiguous()


def rel_err(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


def check(x, packed, s, group) -> float:
    """The kernel's relative error against x · dequant(W)ᵀ in fp32: bf16 output rounding, ~1e-3 (the interpreter
    truncates fp32 → bf16 where a GPU rounds to nearest: ~5e-3 there)."""
    err = rel_err(it.triton_mm(x, packed, s, group), x.float() @ it.dequantize(packed, s, group).float())
    assert err < (1e-2 if it.INTERPRET else 4e-3), f"W4A16 kernel off: relative error {err:.2e} at M={x.shape[0]} K={x.shape[1]} N={packed.shape[1]}"
    return err


def check_compile_and_graph(device):
    """The custom op traces whole under dynamo (no graph break) and, on CUDA, replays inside a graph."""
    x, _, _, packed, s = case(8, 256, 384, GROUP, device, torch.bfloat16)
    fn = torch.compile(lambda t: it.w4a16_mm(t * 2, packed, s, GROUP) + 1, fullgraph=True, dynamic=True,
                       backend="inductor" if device == "cuda" else "aot_eager")
    assert torch.allclose(fn(x), it.w4a16_mm(x * 2, packed, s, GROUP) + 1, atol=1e-2, rtol=1e-2)
    if device == "cuda":
        static = x.clone()
        it.triton_mm(static, packed, s, GROUP)  # compiled before capture, as the engine's warm-up does
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = it.triton_mm(static, packed, s, GROUP)
        static.copy_(torch.randn_like(static))
        graph.replay()
        assert torch.equal(out, it.triton_mm(static, packed, s, GROUP))
    print("torch.compile(fullgraph) ok" + (", CUDA graph replay ok" if device == "cuda" else ""))


def interpret():
    start = time.time()
    for ms, k, n, group, dtype in INTERPRET_CASES:
        for m in ms:
            x, _, _, packed, s = case(m, k, n, group, "cpu", dtype, seed=m)
            print(f"M={m:4d} K={k:6d} N={n:5d} group={group} {str(dtype)[6:]:9s} config={it.config(m, group)} "
                  f"rel err {check(x, packed, s, group):.1e}")
    check_compile_and_graph("cpu")
    print(f"interpreter checks passed in {time.time() - start:.0f} s")


SWEEP = [(16, 16, 128, 4, 8), (16, 32, 128, 4, 4), (16, 32, 128, 4, 8), (16, 64, 128, 4, 6), (32, 64, 128, 4, 4),
         (32, 128, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3), (128, 128, 64, 8, 3),
         (128, 128, 64, 8, 4), (128, 256, 64, 8, 3)]  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)


def sweep():
    from triton.testing import do_bench

    print(f"{'M':>5} {'shape':>8} {'CONFIGS µs':>10} {'best µs':>8}  best config")
    for name, (k, n, _) in SHAPES.items():
        _, _, _, packed, s = case(1, k, n, GROUP, "cuda", torch.bfloat16)
        for m in (1, 8, 32, 256, 1024):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            timed = {cfg: 1e3 * do_bench(lambda: it.triton_mm(x, packed, s, GROUP, cfg), warmup=5, rep=20)
                     for cfg in {it.config(m, GROUP), *(c for c in SWEEP if c[0] <= max(16, m))}}
            best = min(timed, key=timed.get)
            print(f"{m:5d} {name:>8} {timed[it.config(m, GROUP)]:10.1f} {timed[best]:8.1f}  {best}")


def tinygemm_pack(q, scales):
    u = q.to(torch.int32) + 8
    packed = torch._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8), 8)
    s = scales.t().to(torch.bfloat16)
    return packed, torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()


def gpu():
    from triton.testing import do_bench

    check_compile_and_graph("cuda")
    print(f"{'M':>5} {'shape':>8} {'K×N':>12} {'triton µs':>10} {'tinygemm':>9} {'bf16':>8} {'÷bf16':>6} "
          f"{'÷tiny':>6} {'GB/s':>6} {'err':>7}")
    totals = {m: [0.0, 0.0, 0.0] for m in GPU_MS}
    for name, (k, n, per_layer) in SHAPES.items():
        _, q, scales, packed, s = case(1, k, n, GROUP, "cuda", torch.bfloat16)
        tiny, tiny_sz = tinygemm_pack(q, scales)
        w = it.dequantize(packed, s, GROUP).t().contiguous()  # [n, k] bf16: F.linear's weight
        for m in GPU_MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            err = check(x, packed, s, GROUP)
            us = [1e3 * do_bench(fn, warmup=10, rep=40) for fn in (
                lambda: it.triton_mm(x, packed, s, GROUP),
                lambda: torch._weight_int4pack_mm(x, tiny, GROUP, tiny_sz),
                lambda: F.linear(x, w))]
            totals[m] = [t + LAYERS * per_layer * u / 1e3 for t, u in zip(totals[m], us)]
            gbs = (packed.nbytes + s.nbytes) / us[0] / 1e3
            print(f"{m:5d} {name:>8} {f'{k}×{n}':>12} {us[0]:10.1f} {us[1]:9.1f} {us[2]:8.1f} {us[0] / us[2]:6.2f} "
                  f"{us[0] / us[1]:6.2f} {gbs:6.0f} {err:7.1e}")
    print(f"\n{LAYERS} layers' linears (ms): goals: triton ≤ bf16 at M=32, ≤ 2× bf16 at M=1024, ≤ tinygemm at M=1")
    print(f"{'M':>5} {'triton':>8} {'tinygemm':>9} {'bf16':>8} {'÷bf16':>6} {'÷tiny':>6}")
    for m, (tr, tg, bf) in totals.items():
        print(f"{m:5d} {tr:8.2f} {tg:9.2f} {bf:8.2f} {tr / bf:6.2f} {tr / tg:6.2f}")


if __name__ == "__main__":
    if ARGS.interpret:
        interpret()
    elif torch.cuda.is_available():
        sweep() if ARGS.sweep else gpu()
    else:
        sys.exit("no CUDA device: run with --interpret for the CPU checks")
