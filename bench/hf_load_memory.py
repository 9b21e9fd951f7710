"""Peak host memory of one TP rank loading an HF checkpoint with the reference runtime (`load_hf`).

`python bench/hf_load_memory.py [--layers 24] [--hidden 1024] [--tp 1 2 4]`: writes a random Qwen2 of that shape
(bf16, the real vocabulary) to a temporary directory, then for each TP loads rank 0 in a fresh process and prints
the size of its tensors, the peak RSS while reading them (what a GPU rank holds on the host before its weights
go to the device; it includes the file's page-cache pages it touched) and the peak RSS of the whole CPU load. A rank
that held the whole checkpoint on its way to its shard would read at least the checkpoint's size at every TP.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = """
import json, re, sys
from pathlib import Path
import torch
from trtqwen.runtime.loader import hf_rank_tensors, load_hf
torch.set_num_threads(1)
kb = lambda key: int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
base = kb("VmRSS")  # not ru_maxrss: it survives exec and would report the parent's peak
path, tp = Path(sys.argv[1]), int(sys.argv[2])
_, t = hf_rank_tensors(path, tp, 0)
shard = {"shard_peak_kb": kb("VmHWM"), "shard_kb": sum(x.untyped_storage().nbytes() for x in t.values()) // 1024}
del t
model = load_hf(path, tp=tp, rank=0)
print(json.dumps({"base_kb": base, "peak_kb": kb("VmHWM"), "held_kb": kb("VmRSS"), **shard}))
"""


def load_mb(model: Path, tp: int) -> dict[str, float]:
    """MB: the rank's tensors, the peak RSS reading them, the peak RSS loading the model (above the process before)."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(tp)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"shard": r["shard_kb"] / 1024, "read": (r["shard_peak_kb"] - r["base_kb"]) / 1024,
            "model": (r["peak_kb"] - r["base_kb"]) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    from trtqwen.build.tiny import make_tiny

    with tempfile.TemporaryDirectory() as d:
        model = make_tiny(Path(d) / "m", "tiny-tp", overrides={
            "num_hidden_layers": args.layers, "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
            "num_attention_heads": args.hidden // 128, "num_key_value_heads": 4, "head_dim": 128})
        size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
        print(f"checkpoint: {args.layers} layers, hidden {args.hidden}, {size:,.0f} MB of safetensors")
        for tp in args.tp:
            m = load_mb(model, tp)
            print(f"TP {tp}: rank 0's tensors {m['shard']:,.0f} MB; peak RSS reading them {m['read']:,.0f} MB; "
                  f"building the model (CPU: float32) {m['model']:,.0f} MB")


if __name__ == "__main__":
    main()
