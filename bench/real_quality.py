"""What each precision costs on a trained Qwen2.5: build every precision of the trained 0.5B model, `verify` it.

    python bench/real_quality.py [--out bench-results/real_quality.json] [--only int8_sq,fp8]

Makes the model with tests/real_model.py (cached), builds each row with `trtqwen build --until checkpoint` and
compares it with the bf16 HF source (`trtqwen verify`). Prints a Markdown table (docs/PERFORMANCE.md §6 holds it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.real_model import make_real_model  # noqa: E402
from trtqwen.build import run_build  # noqa: E402
from trtqwen.verify import verify  # noqa: E402

ROWS = [("bf16", "auto"), ("fp16", "auto"), ("fp8", "auto"), ("int8_sq", "auto"), ("int8_wo", "auto"),
        ("int4_wo", "auto"), ("int4_awq", "auto"), ("bf16", "int8"), ("bf16", "fp8"), ("int8_sq", "int8")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-results/real_quality.json"))
    ap.add_argument("--work", type=Path, default=Path("bench-results/real-builds"))
    ap.add_argument("--only", default="", help="comma-separated precisions (default: every row)")
    args = ap.parse_args()
    model = make_real_model()
    rows = [r for r in ROWS if not args.only or r[0] in args.only.split(",")]
    results = []
    for precision, kv in rows:
        out = args.work / f"{precision}-kv{kv}"
        t0 = time.time()
        run_build(model=str(model), precision=precision, kv_cache_dtype=kv, out=out, until="checkpoint",
                  console=Console(stderr=True, quiet=True))
        build_s = time.time() - t0
        r = verify(out / "checkpoint", against=model)
        results.append({"precision": precision, "kv": kv, "quant_algo": r.quant_algo, "cosine_mean": r.cosine_mean,
                        "cosine_min": r.cosine_min, "top1": r.top1_agreement, "ppl_ref": r.ppl_reference,
                        "ppl": r.ppl_checkpoint, "passed": r.passed, "failures": r.failures,
                        "build_seconds": round(build_s, 1)})
        print(json.dumps(results[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("| precision | KV | mean cosine | min cosine | top-1 | perplexity | verify | build (2 cores) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for x in results:
        ratio = x["ppl"] / x["ppl_ref"] - 1
        print(f"| {x['precision']} | {x['kv']} | {x['cosine_mean']:.4f} | {x['cosine_min']:.3f} | {x['top1']:.3f} | "
              f"{x['ppl']:.3f} ({ratio:+.1%}) | {'PASS' if x['passed'] else 'FAIL'} | {x['build_seconds']:.0f} s |")


if __name__ == "__main__":
    main()
