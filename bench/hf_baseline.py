"""Hugging Face `generate` on the same checkpoint and GPU: the baseline every runtime row is set beside.

`python bench/hf_baseline.py MODEL_DIR [--json out.json]`: batch 1 and batch 32, 64 new tokens each
(min_new_tokens = max_new_tokens), greedy, bf16, eager (transformers' default dynamic cache).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map="cuda").eval()
    n = args.new_tokens
    rows = []
    for batch in (1, 32):
        ids = torch.randint(0, 150000, (batch, 128), device="cuda")
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        rows.append({"row": f"HF generate batch {batch}", "output_tok_s": round(batch * n / (time.perf_counter() - t), 1)})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
