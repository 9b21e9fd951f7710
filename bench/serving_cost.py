"""The serving path's own cost: first token and tokens/s through Triton (`ensemble`, `tensorrt_llm_bls`) vs the
reference runtime called in-process, same model, same prompt, greedy, fixed output length.

  python bench/serving_cost.py --build engines/tiny-qwen2-int4_awq-tp1 --repo model_repo --url 127.0.0.1:8001
(the repository must be served: `trtqwen serve model_repo --background`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trtqwen.clients.client import GenerationParams, TritonLLMClient  # noqa: E402
from trtqwen.runtime import LLMEngine, SamplingParams, load_model  # noqa: E402

PROMPT = "Explain in one paragraph why memory bandwidth limits token generation speed on GPUs."


def in_process(build: Path, prompt_ids: list[int], n: int, runs: int) -> dict:
    engine = LLMEngine(load_model(build / "checkpoint"), max_slots=1, max_seq_len=1024)
    ttfts, rates = [], []
    for _ in range(runs + 1):
        times = []
        t0 = time.perf_counter()
        req = engine.add(prompt_ids, SamplingParams(max_tokens=n, min_tokens=n, top_k=1),
                         lambda r, tok, why: times.append(time.perf_counter()) if tok is not None else None)
        while not req.finished:
            engine.step()
        ttfts.append(times[0] - t0)
        rates.append((len(times) - 1) / (times[-1] - times[0]))
    return {"ttft_ms": statistics.median(ttfts[1:]) * 1e3, "tok_s": statistics.median(rates[1:])}


def served(url: str, model: str, n: int, runs: int) -> dict:
    client = TritonLLMClient(url, model)
    ttfts, rates = [], []
    for _ in range(runs + 1):
        r = client.generate(PROMPT, GenerationParams(max_tokens=n, min_tokens=n, top_k=1, stop_words=[]))
        ttfts.append(r.timing.ttft)
        rates.append(r.timing.tokens_per_s)
    return {"ttft_ms": statistics.median(ttfts[1:]) * 1e3, "tok_s": statistics.median(rates[1:])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", type=Path, required=True)
    ap.add_argument("--url", default="127.0.0.1:8001")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=10)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(a.build / "tokenizer")(PROMPT)["input_ids"]
    rows = {"in-process": in_process(a.build, ids, a.tokens, a.runs)}
    for model in ("ensemble", "tensorrt_llm_bls"):
        rows[model] = served(a.url, model, a.tokens, a.runs)
    base = rows["in-process"]
    for name, r in rows.items():
        r["added_ttft_ms"] = r["ttft_ms"] - base["ttft_ms"]
        r["tok_s_lost_pct"] = 100 * (1 - r["tok_s"] / base["tok_s"])
        print(f"{name:18s} first token {r['ttft_ms']:7.1f} ms (+{r['added_ttft_ms']:5.1f})   "
              f"{r['tok_s']:7.1f} tok/s ({r['tok_s_lost_pct']:+5.1f} % lost)")
    print(json.dumps({"prompt_tokens": len(ids), "output_tokens": a.tokens, **rows}))


if __name__ == "__main__":
    main()
