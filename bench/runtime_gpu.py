"""Reference runtime on one GPU, Qwen2.5-7B-shaped random bf16 weights: TTFT, batch-1 decode, 8/32 concurrent.

Run on a GPU machine from the repository root: `python bench/runtime_gpu.py [--json out.json]`.
Needs only torch (the runtime's own code is imported from this checkout). Generation never stops early.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trtqwen.runtime import LLMEngine, SamplingParams  # noqa: E402
from trtqwen.runtime.config import ModelConfig  # noqa: E402
from trtqwen.runtime.layers import Linear  # noqa: E402
from trtqwen.runtime.model import LayerWeights, Qwen2Model  # noqa: E402

QWEN25_7B = ModelConfig(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                        intermediate_size=18944, norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768)


def random_model(cfg: ModelConfig, device="cuda", dtype=torch.bfloat16, max_positions=4096) -> Qwen2Model:
    g = torch.Generator(device=device).manual_seed(0)

    def w(*shape):
        return torch.empty(*shape, device=device, dtype=dtype).normal_(0, 0.02, generator=g)

    H, I, qkv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size + 2 * cfg.kv_size
    layers = [LayerWeights(ln1=torch.ones(H, device=device, dtype=dtype), qkv=Linear(w(qkv, H), w(qkv)),
                           o=Linear(w(H, cfg.q_size)), ln2=torch.ones(H, device=device, dtype=dtype),
                           gate=Linear(w(I, H)), up=Linear(w(I, H)), down=Linear(w(H, I)))
              for _ in range(cfg.num_layers)]
    return Qwen2Model(cfg, w(cfg.vocab_size, H), layers, torch.ones(H, device=device, dtype=dtype),
                      Linear(w(cfg.vocab_size, H)), max_positions)


def fixed(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, min_tokens=n, top_k=1, end_id=None)


def timed_run(engine: LLMEngine, prompts: list[list[int]], n: int) -> dict:
    first: dict[int, float] = {}
    t0 = time.perf_counter()
    reqs = [engine.add(p, fixed(n), lambda r, tok, why: first.setdefault(r.id, time.perf_counter())) for p in prompts]
    while engine.has_work():
        engine.step()
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    out = sum(len(r.output) for r in reqs)
    ttfts = sorted(first[r.id] - t0 for r in reqs)
    return {"requests": len(reqs), "output_tokens": out, "seconds": round(total, 3),
            "output_tok_s": round(out / total, 1), "ttft_p50_s": round(ttfts[len(ttfts) // 2], 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = random_model(QWEN25_7B)
    weight_bytes = sum(t.numel() * t.element_size() for t in [model.embed, model.lm_head.weight] +
                       [p for lw in model.layers for lin in (lw.qkv, lw.o, lw.gate, lw.up, lw.down) for p in lin.parameters()])
    engine = LLMEngine(model, max_slots=32, max_seq_len=2048, prefill_chunk=2048)
    rand = lambda n: torch.randint(0, 150000, (n,)).tolist()  # noqa: E731
    timed_run(engine, [rand(64)], 16)  # warm-up
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "weight_gb": round(weight_bytes / 1e9, 2)}
    # TTFT for a 1,024-token prompt: one prefill plus the first sampled token
    t = timed_run(engine, [rand(1024)], 1)
    results["ttft_1024_s"] = t["ttft_p50_s"]
    b1 = timed_run(engine, [rand(128)], 256)
    results["batch1_decode_tok_s"] = b1["output_tok_s"]
    for n in (8, 32):
        results[f"concurrent_{n}"] = timed_run(engine, [rand(128) for _ in range(n)], 256)
    results["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
