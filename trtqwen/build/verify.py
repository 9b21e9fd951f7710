"""`trtqwen verify`: does a TensorRT-LLM checkpoint compute what its HF source computes?

Both run in the reference runtime on the same prompts; we compare next-token logits at every position.
Thresholds differ by precision because quantization is meant to change the numbers a little (README).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trtqwen.errors import UserError
from trtqwen.build.manifest import read_manifest

# Per quant_algo: minimum mean cosine, minimum top-1 agreement, maximum perplexity ratio (checkpoint / HF).
# Trained weights (the default): just below what the trained Qwen2.5-Coder-0.5B measures (docs/PERFORMANCE.md §6);
# a 7B loses less to quantization than a 0.5B, so it passes with room, and conversion bugs fall far below.
TRAINED: dict[str | None, tuple[float, float, float]] = {
    None: (0.9999, 0.99, 1.01),  # bf16 / fp16: only the rounding of the export dtype (measured exact)
    "W8A16": (0.999, 0.95, 1.02),  # measured 0.9998 / 0.968 / 1.006
    "W8A8_SQ_PER_CHANNEL": (0.995, 0.90, 1.04),
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": (0.995, 0.90, 1.04),  # 0.9987 / 0.923 / 1.023
    "FP8": (0.995, 0.90, 1.05),  # 0.9981 / 0.929 / 0.985
    "W4A16_AWQ": (0.97, 0.85, 1.12),  # 0.981-0.982 / 0.871-0.884 / 1.074-1.100 over 4-32 calibration samples
    "W4A16": (0.95, 0.80, 1.15),  # per-channel INT4 measured 0.916 / 0.690 / 1.371: it fails, as it should
}
# Random weights (`trtqwen tiny`, the test models): flat logits make top-1 a toss-up between near-ties, so these sit
# just below what honest exports of the random tiny models measure.
RANDOM_WEIGHTS: dict[str | None, tuple[float, float, float]] = {
    None: (0.9999, 0.99, 1.01),
    "W8A16": (0.998, 0.85, 1.03),
    "W8A8_SQ_PER_CHANNEL": (0.99, 0.70, 1.05),
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": (0.99, 0.70, 1.05),
    "FP8": (0.98, 0.55, 1.05),
    "W4A16_AWQ": (0.88, 0.15, 1.10),
    "W4A16": (0.85, 0.15, 1.10),
}
TABLES = {"trained": TRAINED, "random-weights": RANDOM_WEIGHTS}
UNTRAINED_PPL = 1000.0  # "auto": a trained LM reads the default prompts at perplexity ~10, random weights at ~vocab size
KV_QUANT_ALLOWANCE = (0.005, 0.10, 0.02)  # an INT8/FP8 KV cache costs about what INT8 weights cost

DEFAULT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog. Large language models predict the next token from the previous ones, "
    "and quantization trades a little accuracy for a lot of memory bandwidth.",
    "人工智能正在改变我们的生活方式。大型语言模型可以回答问题、写代码、翻译文章，还能帮助我们学习新的知识。",
    "def fibonacci(n: int) -> list[int]:\n    seq = [0, 1]\n    while len(seq) < n:\n        seq.append(seq[-1] + seq[-2])\n    return seq[:n]\n",
    '{"model": "Qwen2.5-7B-Instruct", "precision": "int4_awq", "tp": 1, "max_batch_size": 32, "users": ["alice", "bob"]}',
]


@dataclass
class Metrics:
    """Checkpoint vs reference logits: per prompt, and averaged (min of minimums) over the prompts."""
    cosine_mean: float
    cosine_min: float
    max_abs_error: float
    top1_agreement: float
    ppl_reference: float
    ppl_checkpoint: float


@dataclass
class PromptResult(Metrics):
    tokens: int


@dataclass
class VerifyReport(Metrics):
    checkpoint: str
    against: str
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    tp: int
    thresholds: dict
    passed: bool
    failures: list[str]
    prompts: list[PromptResult]

    def to_dict(self) -> dict:
        return asdict(self)


def thresholds_for(quant_algo: str | None, kv_algo: str | None, table: str = "trained") -> dict:
    if table not in TABLES:
        raise UserError(f"no threshold table {table!r}", f"choose one of: auto, {', '.join(TABLES)}")
    if quant_algo not in TABLES[table]:
        raise UserError(f"no verification thresholds for quant_algo {quant_algo!r}",
                        f"known: {', '.join(str(k) for k in TABLES[table])}")
    cos, top1, ppl = TABLES[table][quant_algo]
    if kv_algo:
        cos, top1, ppl = cos - KV_QUANT_ALLOWANCE[0], top1 - KV_QUANT_ALLOWANCE[1], ppl + KV_QUANT_ALLOWANCE[2]
    return {"table": table, "cosine_mean": cos, "top1_agreement": top1, "ppl_ratio": ppl}


def pick_table(requested: str, ppl_reference: float) -> str:
    """'auto' judges random-weight references (flat logits) by their own table; anything else is taken as asked."""
    if requested != "auto":
        return requested
    return "random-weights" if ppl_reference > UNTRAINED_PPL else "trained"


def perplexity(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), tokens[1:].to(logits.device))
    return math.exp(nll.item())


def compare(ref_logits: torch.Tensor, ck_logits: torch.Tensor, tokens: torch.Tensor) -> PromptResult:
    v = min(ref_logits.shape[-1], ck_logits.shape[-1])  # the checkpoint's vocab may be padded for TP
    a, b = ref_logits[:, :v].float(), ck_logits[:, :v].float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return PromptResult(
        tokens=int(tokens.numel()), cosine_mean=cos.mean().item(), cosine_min=cos.min().item(),
        max_abs_error=(a - b).abs().max().item(), top1_agreement=(a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        ppl_reference=perplexity(a, tokens), ppl_checkpoint=perplexity(b, tokens),
    )


def resolve_inputs(checkpoint: Path, against: Path | None) -> tuple[Path, Path]:
    """--against defaults to the source recorded in the build manifest next to the checkpoint."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise UserError(f"{checkpoint} is not a TensorRT-LLM checkpoint (no config.json)",
                        "pass the checkpoint/ directory of a `trtqwen build` output")
    if against is None:
        manifest = read_manifest(checkpoint.parent)
        if not manifest:
            raise UserError("no --against given and no build.json next to the checkpoint", "pass --against <HF model dir>")
        against = Path(manifest["source"]["path"])
    if not (Path(against) / "config.json").is_file():
        raise UserError(f"--against {against} is not an HF model directory")
    return checkpoint, Path(against)


def load_prompts(path: Path | None) -> list[str]:
    if path is None:
        return DEFAULT_PROMPTS
    if not Path(path).is_file():
        raise UserError(f"prompts file {path} does not exist", "one prompt per line, or a .jsonl with a 'text' field")
    lines = [l for l in Path(path).read_text().splitlines() if l.strip()]
    prompts = [json.loads(l)["text"] if path.suffix == ".jsonl" else l for l in lines]
    if not prompts:
        raise UserError(f"prompts file {path} is empty")
    return prompts


def verify(checkpoint: Path, against: Path | None = None, prompts_file: Path | None = None, device: str | None = None,
           thresholds: str = "auto") -> VerifyReport:
    from transformers import AutoTokenizer

    from trtqwen.runtime import load_model

    checkpoint, against = resolve_inputs(checkpoint, against)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ck_cfg = json.loads((checkpoint / "config.json").read_text())
    quant = ck_cfg.get("quantization") or {}
    thresholds_for(quant.get("quant_algo"), None, "trained" if thresholds == "auto" else thresholds)  # refuse early
    tok = AutoTokenizer.from_pretrained(against, trust_remote_code=False)
    reference = load_model(against, device=device, dtype=torch.float32)
    candidate = load_model(checkpoint, device=device, dtype=torch.float32)
    results = []
    for text in load_prompts(prompts_file):
        ids = torch.tensor(tok(text)["input_ids"][: reference.max_positions], dtype=torch.long)
        if ids.numel() < 2:
            continue
        results.append(compare(reference.logits(ids), candidate.logits(ids), ids))
    if not results:
        raise UserError("no prompt had two or more tokens to compare")
    w = [r.tokens for r in results]
    avg = lambda f: sum(getattr(r, f) * n for r, n in zip(results, w)) / sum(w)  # noqa: E731
    ppl_ref = math.exp(sum(math.log(r.ppl_reference) * n for r, n in zip(results, w)) / sum(w))
    ppl_ck = math.exp(sum(math.log(r.ppl_checkpoint) * n for r, n in zip(results, w)) / sum(w))
    limits = thresholds_for(quant.get("quant_algo"), quant.get("kv_cache_quant_algo"), pick_table(thresholds, ppl_ref))
    report = VerifyReport(
        checkpoint=str(checkpoint), against=str(against), quant_algo=quant.get("quant_algo"),
        kv_cache_quant_algo=quant.get("kv_cache_quant_algo"), tp=(ck_cfg.get("mapping") or {}).get("tp_size", 1),
        cosine_mean=avg("cosine_mean"), cosine_min=min(r.cosine_min for r in results),
        max_abs_error=max(r.max_abs_error for r in results), top1_agreement=avg("top1_agreement"),
        ppl_reference=ppl_ref, ppl_checkpoint=ppl_ck, thresholds=limits, passed=True, failures=[], prompts=results,
    )
    if report.cosine_mean < limits["cosine_mean"]:
        report.failures.append(f"mean logits cosine {report.cosine_mean:.6f} < {limits['cosine_mean']}")
    if report.top1_agreement < limits["top1_agreement"]:
        report.failures.append(f"top-1 agreement {report.top1_agreement:.3f} < {limits['top1_agreement']}")
    if ppl_ck / ppl_ref > limits["ppl_ratio"]:
        report.failures.append(f"perplexity ratio {ppl_ck / ppl_ref:.3f} > {limits['ppl_ratio']}")
    report.passed = not report.failures
    return report
