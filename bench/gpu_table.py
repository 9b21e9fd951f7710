"""The tables of a gpu_suite.sh run (`python bench/gpu_table.py DIR`): in-process rows, baselines, the served sweep
as a share of in-process, and where a served token's time goes (the server's profile counters, per level)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def inproc_rows(d: Path) -> list[dict]:
    return [r for f in sorted(d.glob("inproc*.json")) for r in json.loads(f.read_text())["rows"]]


def print_inproc(rows: list[dict]) -> None:
    print("| row | TTFT 1,024 | batch 1 tok/s (of ceiling) | 8 streams | 32 streams (steady decode) | 64 streams | GPU GB (plan) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['row']} | {r['ttft_1024_s'] * 1e3:.0f} ms | {r['batch1_tok_s']} ({r['batch1_of_ceiling']:.0%}) | "
              f"{r['users8_tok_s']} | {r['users32_tok_s']} ({r['users32_decode_tok_s']}) | {r.get('users64_tok_s', '–')} | "
              f"{r['gpu_used_gb']} ({r['plan_gb']}) |")


def print_baselines(d: Path) -> None:
    if (d / "compiled_decode.txt").is_file():
        for line in (d / "compiled_decode.txt").read_text().splitlines():
            m = re.match(r"batch\s+(\d+) graphs=(\w+)\s+compiled=(\w+).*?([\d.]+) tok/s total", line)
            if m:
                print(f"| baseline compiled_decode.py batch {m[1]} graphs={m[2]} compile={m[3]} | {m[4]} tok/s |")
    if (d / "hf.json").is_file():
        for r in json.loads((d / "hf.json").read_text()):
            print(f"| {r['row']} | {r['output_tok_s']} tok/s |")


def levels(served: Path) -> list[tuple[int, dict, dict]]:
    """(concurrency, bench level, profile totals of every model) per level run, in order."""
    out = []
    for sub in sorted(served.glob("c*/bench.json"), key=lambda p: int(p.parent.name[1:])):
        prof = {}
        for f in sub.parent.glob("*.json"):
            if f.name != "bench.json":
                prof[f.stem] = json.loads(f.read_text())
        for lv in json.loads(sub.read_text())["levels"]:
            out.append((lv["concurrency"], lv, prof))
    return out


def inproc_at(row: dict | None, c: int) -> float | None:
    if row is None:
        return None
    return row.get("batch1_tok_s") if c == 1 else row.get(f"users{c}_tok_s")


def print_served(d: Path, rows: list[dict]) -> None:
    print("\n| served (ensemble) | streams | TTFT p50 / p95 ms | per stream p50 / min tok/s | total tok/s | of in-process |")
    print("| --- | --- | --- | --- | --- | --- |")
    for served in sorted(d.glob("served-*")):
        p = served.name.removeprefix("served-")
        row = next((r for r in rows if r["row"].startswith("int4" if "int4" in p else "bf16 graphs + compile")), None)
        for c, lv, _ in levels(served):
            ref = inproc_at(row, c)
            share = f"{lv['total_tok_s'] / ref:.0%} of {ref}" if ref else "–"
            t, u = lv["ttft_s"], lv["user_tok_s"]
            print(f"| {p} | {c} | {t['p50'] * 1e3:.0f} / {t['p95'] * 1e3:.0f} | {u['p50']:.1f} / {u['min']:.1f} | "
                  f"{lv['total_tok_s']:.1f} | {share} |")


def _diff(now: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in now.items()}


def print_breakdown(d: Path) -> None:
    """Per level, from the tensorrt_llm model's counters (TRTQWEN_PROFILE_DIR): the engine process's step (engine.step
    wall, GPU included, as carried by each step message; steps = step messages, one per step that had news), the
    hand-off (the stub's receiving thread taking a step message: tokens to their streams, the sender woken), the
    sender's IPC per response (ResponseSender.send), the character-boundary decode, postprocessing's execute (none
    in the torch ensemble: tensorrt_llm answers text_output itself)."""
    print("\n| served | streams | steps/s | tokens/step | engine step ms | engine busy | "
          "hand-off (receive step message) µs/step | responses/s | "
          "tokens/response | send µs/response | sender busy | detok µs/response | postprocessing µs/response |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for served in sorted(d.glob("served-*")):
        before: dict = {}
        for c, lv, prof in levels(served):
            trt = next((v for k, v in prof.items() if k.startswith("tensorrt_llm")), {})
            post = next((v for k, v in prof.items() if k.startswith("postprocessing")), {})
            t, q = _diff(trt, before.get("t", {})), _diff(post, before.get("p", {}))
            before = {"t": trt, "p": post}
            el = lv["elapsed_s"]
            steps, sends = max(t.get("steps", 0), 1), max(t.get("sends", 0), 1)
            print(f"| {served.name.removeprefix('served-')} | {c} | {steps / el:.0f} | {t.get('step_tokens', 0) / steps:.1f} | "
                  f"{t.get('step_s', 0) / steps * 1e3:.2f} | {t.get('step_s', 0) / el:.0%} | "
                  f"{t.get('publish_s', 0) / steps * 1e6:.0f} | {sends / el:.0f} | {t.get('step_tokens', 0) / sends:.1f} | "
                  f"{t.get('send_s', 0) / sends * 1e6:.0f} | {t.get('send_s', 0) / el:.0%} | "
                  f"{t.get('detok_s', 0) / sends * 1e6:.0f} | "
                  f"{q.get('execute_s', 0) / max(q.get('requests', 0), 1) * 1e6:.0f} |")


def main(d: Path) -> None:
    rows = inproc_rows(d)
    print_inproc(rows)
    print_baselines(d)
    print_served(d, rows)
    print_breakdown(d)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
