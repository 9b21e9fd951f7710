"""Checkpoint export time and peak memory per precision.

  python bench/export_bench.py --tiny                       # CPU, the tiny model, one subprocess per precision
  python bench/export_bench.py --qwen7b --tokenizer DIR     # GPU, a Qwen2.5-7B-shaped model with random weights
Prints a JSON line per run.
"""

from __future__ import annotations

import argparse
import resource
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRECISIONS = ["bf16", "fp16", "int8_wo", "int4_wo", "int8_sq", "fp8", "int4_awq"]


def one_tiny(precision: str, tp: int, model_dir: str) -> dict:
    from trtqwen.build.quantize import export_checkpoint
    from trtqwen.build.spec import BuildSpec

    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        info = export_checkpoint(Path(model_dir), BuildSpec(model=model_dir, precision=precision, tp=tp), Path(d) / "ck")
        size = sum(p.stat().st_size for p in (Path(d) / "ck").iterdir())
    return {"precision": precision, "tp": tp, "seconds": round(time.time() - t0, 2), "quantize_s": info["quantize_seconds"],
            "export_s": info["export_seconds"], "peak_rss_mb": info["peak_rss_mb"], "checkpoint_mb": round(size / 1e6, 1)}


def qwen7b(precisions: list[str], tokenizer_dir: str) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from trtqwen.build.quantize import quantize_model, write_checkpoint
    from trtqwen.build.spec import BuildSpec

    hf = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=3584,
              num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
              max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    for precision in precisions:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(Qwen2Config(**hf, torch_dtype="bfloat16")).to(torch.bfloat16).eval()
        made = time.time() - t0
        spec = BuildSpec(model="qwen2.5-7b-random", precision=precision, tp=1)
        with tempfile.TemporaryDirectory(dir="/tmp") as d:
            info = quantize_model(model, tok, spec)
            info.update(write_checkpoint(model, hf, spec, Path(d) / "ck"))
            info.update(peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
            size = sum(p.stat().st_size for p in (Path(d) / "ck").iterdir())
        print(json.dumps({"model": "Qwen2.5-7B-shaped (random bf16)", "gpu": torch.cuda.get_device_name(),
                          "precision": precision, "make_model_s": round(made, 1), "quantize_s": info["quantize_seconds"],
                          "export_s": info["export_seconds"], "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                          "peak_rss_mb": info["peak_rss_mb"], "checkpoint_gb": round(size / 1e9, 2)}), flush=True)
        del model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--qwen7b", action="store_true")
    ap.add_argument("--tokenizer", default="engines/tiny-qwen2")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--one", nargs=3, metavar=("PRECISION", "TP", "MODEL"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one_tiny(a.one[0], int(a.one[1]), a.one[2])))
    elif a.tiny:
        from trtqwen.build.tiny import make_tiny

        model = make_tiny(Path(tempfile.gettempdir()) / "trtqwen-bench-tiny-tp", preset="tiny-tp")
        for p in a.precisions.split(","):
            for tp in (1, 4):  # a fresh process per run: peak RSS belongs to that run alone
                out = subprocess.run([sys.executable, __file__, "--one", p, str(tp), str(model)], capture_output=True, text=True)
                print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"{p} tp{tp} failed: {out.stderr[-500:]}",
                      flush=True)
    elif a.qwen7b:
        qwen7b(a.precisions.split(","), a.tokenizer)


if __name__ == "__main__":
    main()
