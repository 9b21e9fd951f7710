"""Which layout for a box of N GPUs: R replicas of a TP-t copy (R × t = N), and what the box delivers in total.

Replicas need no all-reduce and share nothing, so when one card holds the model they give the most tokens per
second and users (PERFORMANCE §5: 4 TP-1 copies 17,219 tok/s vs TP 4's 5,846); TP is for a model that does not fit
one card, or for the fastest single stream. One copy per GPU: two on one GPU time-slice it (PERFORMANCE §8).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from trtqwen.build.hardware import GpuProfile
from trtqwen.build.plan import PREFILL_EFFICIENCY, Plan, allreduce_seconds, make_plan, prefill_tflops
from trtqwen.build.spec import BuildSpec
from trtqwen.errors import UserError
from trtqwen.shape import ModelShape

TP_SIZES = (1, 2, 4)


@dataclass
class BoxLayout:
    tp: int
    replicas: int
    fits: bool
    users: int  # full-length sequences the box holds at once (replicas × each copy's)
    batch: int  # streams per copy the totals are estimated at
    total_tok_s: float  # decode estimate for the whole box at `batch` streams per copy
    per_user_tok_s: float
    single_stream_tok_s: float
    ttft_s: float
    why_not: str = ""


def copy_throughput(plan: Plan, shape: ModelShape, gpu: GpuProfile, batch: int) -> float:
    """Tokens/s of one copy decoding `batch` streams: a step reads every weight once and each stream's KV once, or
    does the batch's matrix work, whichever takes longer, plus TP's all-reduces (which grow with the batch)."""
    memory = plan.weight_read_s + batch * plan.kv_read_s_per_stream
    compute = 2 * shape.non_embedding_params * batch / (
        prefill_tflops(gpu, plan.precision) * 1e12 * PREFILL_EFFICIENCY * plan.tp)
    return batch / (max(memory, compute) + allreduce_seconds(gpu, plan.tp, batch, shape, 2 * shape.num_layers))


def box_layouts(shape: ModelShape, gpu: GpuProfile, spec: BuildSpec, gpus: int, prompt_len: int = 1024,
                kv_fraction: float | None = None, target: str = "engine") -> list[BoxLayout]:
    """Every TP that divides the box, as replicas: fits, users and estimated totals."""
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}")
    out = []
    for tp in [t for t in TP_SIZES if t <= gpus and gpus % t == 0]:
        try:
            p = make_plan(shape, gpu, replace(spec, tp=tp), prompt_len, kv_fraction, target)
        except UserError as e:  # e.g. a TP the model's heads do not divide
            out.append(BoxLayout(tp, gpus // tp, False, 0, 0, 0.0, 0.0, 0.0, 0.0, e.message))
            continue
        batch = max(1, min(p.concurrent_sequences, spec.max_batch_size))
        per_copy = copy_throughput(p, shape, gpu, batch) if p.fits else 0.0
        out.append(BoxLayout(tp, gpus // tp, p.fits, p.concurrent_sequences * (gpus // tp), batch,
                             per_copy * (gpus // tp), per_copy / batch, p.decode_estimate_tok_s, p.ttft_estimate_s,
                             "; ".join(p.reasons)))
    return out


def recommend(layouts: list[BoxLayout], latency: bool = False) -> BoxLayout | None:
    """The most total throughput among those that fit (fewest GPUs per copy on a tie); with latency, the fastest
    single stream."""
    fitting = [lay for lay in layouts if lay.fits]
    if not fitting:
        return None
    if latency:
        return max(fitting, key=lambda lay: (lay.single_stream_tok_s, -lay.tp))
    return max(fitting, key=lambda lay: (lay.total_tok_s, -lay.tp))


def commands(best: BoxLayout, gpus: int, spec: BuildSpec, build_dir: str = "engines/<build>") -> list[str]:
    ids = ",".join(str(i) for i in range(gpus))
    pkg = f"trtqwen package {build_dir} --runtime trtllm"
    if best.replicas > 1:
        pkg += f" --replicas {best.replicas} --gpus {ids} --layout servers"
    return [f"trtqwen build --model {spec.model} --precision {spec.precision.value} --tp {best.tp} --gpu {spec.gpu}",
            pkg, "trtqwen serve model_repo" + ("   # nginx in front of the replicas" if best.replicas > 1 else "")]


def box_table(layouts: list[BoxLayout], best: BoxLayout | None, gpus: int, gpu_name: str, spec: BuildSpec):
    from rich.table import Table

    t = Table(title=f"{gpus} × {gpu_name}: replicas × TP (estimates)")
    for col in ("layout", "fits", "users", "total tok/s", "per user tok/s", "single stream tok/s", "first token"):
        t.add_column(col)
    for lay in layouts:
        mark = " ←" if lay is best else ""
        t.add_row(f"{lay.replicas} × TP {lay.tp}{mark}", "yes" if lay.fits else f"no: {lay.why_not}",
                  str(lay.users), f"{lay.total_tok_s:,.0f}" if lay.fits else "-",
                  f"{lay.per_user_tok_s:.0f} at {lay.batch} streams/copy" if lay.fits else "-",
                  f"{lay.single_stream_tok_s:.0f}" if lay.fits else "-", f"{lay.ttft_s * 1e3:.0f} ms" if lay.fits else "-")
    if best:
        t.caption = "then: " + " && ".join(commands(best, gpus, spec)).split("   #")[0]
    return t


def to_dict(layouts: list[BoxLayout], best: BoxLayout | None, gpus: int, spec: BuildSpec) -> dict:
    return {"gpus": gpus, "layouts": [asdict(lay) for lay in layouts],
            "recommended": None if best is None else {**asdict(best), "commands": commands(best, gpus, spec)}}
