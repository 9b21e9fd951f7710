"""`trtqwen verify`: does a checkpoint (TensorRT-LLM, or ModelOpt's unified HF) compute what its HF source computes?

Both run in the reference runtime on the same prompts; we compare next-token logits at every position.
Thresholds differ by precision because quantization is meant to change the numbers a little (README).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trtqwen.build.manifest import read_manifest
from trtqwen.build.spec import BuildSpec, check_spec
from trtqwen.checkpoint import Checkpoint, read_model_dir
from trtqwen.errors import UserError
from trtqwen.precision import PRECISIONS, Precision
from trtqwen.qwen_tokenizer import load_tokenizer

# Thresholds per precision live in the precision table (trtqwen/precision.py): "trained" just below what the
# trained Qwen2.5-Coder-0.5B measures (a 7B loses less to quantization, so it passes with room, and conversion bugs
# fall far below); "random-weights" for the random test models, whose flat logits make top-1 a toss-up.
TABLES = ("trained", "random-weights")
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

    def table(self):
        from rich.table import Table

        lim = self.thresholds
        t = Table(title=f"verify {self.checkpoint} ({self.quant_algo or 'unquantized'}, TP {self.tp}; {lim['table']} thresholds)")
        for c in ("metric", "value", "threshold"):
            t.add_column(c)
        t.add_row("logits cosine (mean)", f"{self.cosine_mean:.6f}", f"≥ {lim['cosine_mean']}")
        t.add_row("logits cosine (min)", f"{self.cosine_min:.6f}", "")
        t.add_row("max abs error", f"{self.max_abs_error:.4g}", "")
        t.add_row("top-1 agreement", f"{self.top1_agreement:.3f}", f"≥ {lim['top1_agreement']}")
        t.add_row("perplexity (reference → checkpoint)", f"{self.ppl_reference:.3f} → {self.ppl_checkpoint:.3f}",
                  f"ratio ≤ {lim['ppl_ratio']}")
        return t

    @property
    def verdict(self) -> str:
        return "[green]PASS[/]" if self.passed else "[red]FAIL[/]: " + "; ".join(self.failures)


def thresholds_for(precision: Precision, kv_algo: str | None, table: str = "trained") -> dict:
    if table not in TABLES:
        raise UserError(f"no threshold table {table!r}", f"choose one of: auto, {', '.join(TABLES)}")
    info = PRECISIONS[precision]
    cos, top1, ppl = info.trained if table == "trained" else info.random_weights
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


def resolve_inputs(checkpoint: Path, against: Path | None) -> tuple[Checkpoint, Path]:
    """The checkpoint through the one reader (and, in a build directory, the one spec validator); --against defaults
    to the source recorded in the build manifest next to it."""
    ck = read_model_dir(checkpoint)
    manifest = read_manifest(ck.path.parent)
    if manifest and "spec" in manifest:
        check_spec(BuildSpec.from_dict(manifest["spec"]), ck.shape)
    if against is None:
        if not manifest:
            raise UserError("no --against given and no build.json next to the checkpoint", "pass --against <HF model dir>")
        against = Path(manifest["source"]["path"])
    if not (Path(against) / "config.json").is_file():
        raise UserError(f"--against {against} is not an HF model directory")
    return ck, Path(against)


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
    from trtqwen.runtime import load_model

    ck, against = resolve_inputs(checkpoint, against)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    thresholds_for(ck.precision, None, "trained" if thresholds == "auto" else thresholds)  # refuse early
    tok = load_tokenizer(against)
    reference = load_model(against, device=device, dtype=torch.float32)
    candidate = load_model(ck.path, device=device, dtype=torch.float32)
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
    limits = thresholds_for(ck.precision, ck.kv_cache_quant_algo, pick_table(thresholds, ppl_ref))
    report = VerifyReport(
        checkpoint=str(ck.path), against=str(against), quant_algo=ck.quant_algo,
        kv_cache_quant_algo=ck.kv_cache_quant_algo, tp=ck.tp,
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
