"""One table from a gpu_suite.sh run: in-process rows, baselines, served sweeps (`python bench/gpu_table.py DIR`)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def main(d: Path) -> None:
    print("| row | TTFT 1,024 | batch 1 tok/s (of ceiling) | 8 users tok/s | 32 users tok/s (steady decode) | GPU GB (plan) |")
    print("| --- | --- | --- | --- | --- | --- |")
    if (d / "inproc.json").is_file():
        for r in json.loads((d / "inproc.json").read_text())["rows"]:
            print(f"| {r['row']} | {r['ttft_1024_s'] * 1e3:.0f} ms | {r['batch1_tok_s']} ({r['batch1_of_ceiling']:.0%}) | "
                  f"{r['users8_tok_s']} | {r['users32_tok_s']} ({r['users32_decode_tok_s']}) | {r['gpu_used_gb']} ({r['plan_gb']}) |")
    if (d / "compiled_decode.txt").is_file():
        for line in (d / "compiled_decode.txt").read_text().splitlines():
            m = re.match(r"batch\s+(\d+) graphs=(\w+)\s+compiled=(\w+).*?([\d.]+) tok/s total", line)
            if m:
                print(f"| baseline compiled_decode.py batch {m[1]} graphs={m[2]} compile={m[3]} | | "
                      f"{m[4] if m[1] == '1' else ''} | {m[4] if m[1] == '8' else ''} | {m[4] if m[1] == '32' else ''} | |")
    if (d / "hf.json").is_file():
        for r in json.loads((d / "hf.json").read_text()):
            b1 = r["output_tok_s"] if r["row"].endswith(" 1") else ""
            b32 = r["output_tok_s"] if r["row"].endswith(" 32") else ""
            print(f"| {r['row']} | | {b1} | | {b32} | |")
    for served in sorted(d.glob("served-*/bench.json")):
        for lv in json.loads(served.read_text())["levels"]:
            ttft, users = lv["ttft_s"], lv["user_tok_s"]
            print(f"| served {served.parent.name.removeprefix('served-')} ensemble, {lv['concurrency']} streams | "
                  f"p50 {ttft['p50'] * 1e3:.0f} / p95 {ttft['p95'] * 1e3:.0f} ms | per stream p50 {users['p50']:.1f}, "
                  f"min {users['min']:.1f} | | total {lv['total_tok_s']:.1f} | |")

if __name__ == "__main__":
    main(Path(sys.argv[1]))
