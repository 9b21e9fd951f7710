"""Tensor parallel on CPUs (gloo): batch-1 greedy decode of the small random preset at TP 1 and TP 2.

`python bench/tp_cpu.py` from the repository root; what the rank processes and their command channel cost
where no GPU hides them. Same tokens at both TP sizes, or it says so.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trtqwen.runtime import LLMEngine, SamplingParams  # noqa: E402
from trtqwen.runtime.random_model import SMALL, random_model  # noqa: E402
from trtqwen.runtime.tp import RandomShards, TPModel  # noqa: E402

STEPS = 200


def decode_rate(model) -> tuple[float, list[int]]:
    engine = LLMEngine(model, max_slots=4, max_seq_len=512, cuda_graphs=True)
    sp = SamplingParams(max_tokens=STEPS, min_tokens=STEPS, top_k=1, end_id=None)
    engine.generate([[1, 2, 3]], sp)  # warm-up
    t = time.perf_counter()
    out = engine.generate([[1, 2, 3]], sp)[0].output
    return STEPS / (time.perf_counter() - t), out


tp1, ref = decode_rate(random_model(SMALL, device="cpu", dtype=torch.float32, max_positions=512))
with TPModel(RandomShards("small", 2), dtype=torch.float32, max_positions=512) as model:
    tp2, out = decode_rate(model)
print(f"small preset, {torch.get_num_threads()} threads: TP 1 {tp1:.1f} tok/s, TP 2 {tp2:.1f} tok/s, "
      f"tokens {'equal' if out == ref else 'DIFFERENT'}")
