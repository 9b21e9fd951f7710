"""What each precision costs on a trained Qwen2.5: build every precision of the trained 0.5B model, `verify` it.

    python bench/real_quality.py [--out bench-results/real_quality.json] [--only int8_sq,fp8]

Makes the model with tests/real_model.py (cached), builds each row with `trtqwen build --until checkpoint` and
compares it with the bf16 HF source (`trtqwen verify`). Prints a Markdown table (docs/PERFORMANCE.md §6 holds it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.real_model import make_real_model  # noqa: E402
from trtqwen.build.pipeline import run_build  # noqa: E402
from trtqwen.build.spec import BuildSpec
from trtqwen.build.verify import verify  # noqa: E402

# (precision, KV cache, calibration samples); AWQ at several sizes: its search is what a CPU waits for
ROWS = [("bf16", "auto", 32), ("fp16", "auto", 32), ("int8_wo", "auto", 32), ("int4_wo", "auto", 32),
        ("int8_sq", "auto", 32), ("fp8", "auto", 32), ("bf16", "int8", 32), ("bf16", "fp8", 32), ("int8_sq", "int8", 32),
        ("int4_awq", "auto", 4), ("int4_awq", "auto", 8), ("int4_awq", "auto", 16), ("int4_awq", "auto", 32)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench-results/real_quality.json"))
    ap.add_argument("--work", type=Path, default=Path("bench-results/real-builds"))
    ap.add_argument("--only", default="", help="comma-separated precisions (default: every row)")
    args = ap.parse_args()
    model = make_real_model()
    rows = [r for r in ROWS if not args.only or r[0] in args.only.split(",")]
    results = []
    for precision, kv, calib in rows:
        out = args.work / f"{precision}-kv{kv}-calib{calib}"
        t0 = time.time()
        run_build(BuildSpec.request(str(model), precision=precision, kv_cache_dtype=kv, calib_size=calib), out=out,
                  until="checkpoint", console=Console(stderr=True, quiet=True))
        build_s = time.time() - t0
        info = json.loads((out / "build.json").read_text())["stages"]["checkpoint"]["info"]
        r = verify(out / "checkpoint", against=model)
        shutil.rmtree(out)  # a 0.5B checkpoint per row adds up
        results.append({"precision": precision, "kv": kv, "calib_size": calib, "quant_algo": r.quant_algo,
                        "cosine_mean": r.cosine_mean, "cosine_min": r.cosine_min, "top1": r.top1_agreement, "ppl_ref": r.ppl_reference,
                        "ppl": r.ppl_checkpoint, "passed": r.passed, "failures": r.failures,
                        "build_seconds": round(build_s, 1), "calib_seconds": info.get("quantize_seconds"),
                        "calib_eta_seconds": info.get("calib_eta_seconds"), "calib_tokens": info.get("calib_tokens")})
        print(json.dumps(results[-1]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # after every row: hours of builds are kept
    print("| precision | KV | calib | mean cosine | min cosine | top-1 | perplexity | verify | build (2 cores) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for x in results:
        ratio = x["ppl"] / x["ppl_ref"] - 1
        calib = x["calib_size"] if x["quant_algo"] not in (None, "W8A16", "W4A16") or x["kv"] != "auto" else "–"
        print(f"| {x['precision']} | {x['kv']} | {calib} | {x['cosine_mean']:.4f} | {x['cosine_min']:.3f} | {x['top1']:.3f} | "
              f"{x['ppl']:.3f} ({ratio:+.1%}) | {'PASS' if x['passed'] else 'FAIL'} | {x['build_seconds']:.0f} s |")


if __name__ == "__main__":
    main()
