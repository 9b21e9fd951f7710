"""Sampling as the tensorrtllm_backend inputs describe it, vectorized over the batch.

Randomness is counter-based: the noise for a request's n-th token depends only on (seed, n, token id),
so a seeded request samples the same tokens alone or in any batch, on CPU or GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trtqwen.qwen_tokenizer import EOS_ID, PAD_ID


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 0.0  # 0 = off; TensorRT-LLM: top_k 0 and top_p 0 → greedy
    seed: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    end_id: int | None = EOS_ID  # <|im_end|>
    pad_id: int = PAD_ID  # <|endoftext|>
    stop_words: list[list[int]] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1 or (self.top_k == 0 and self.top_p <= 0)


def on_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (a list or a tensor) on the device without a stream sync: a plain copy to a GPU waits for the
    queued work, a non-blocking one from pinned memory does not (the overlapped decode relies on it)."""
    t = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping arithmetic), a good counter-based hash."""
    x = x ^ ((x >> 30) & 0x3FFFFFFFF)
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as signed int64
    x = x ^ ((x >> 27) & 0x1FFFFFFFFF)
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0,1) of shape [B, vocab], a pure function of (seed, step, token id)."""
    dev = seeds.device
    base = _mix(seeds.view(-1, 1) * -7046029254386353131 + steps.view(-1, 1))  # golden-ratio stride
    x = _mix(base + torch.arange(vocab, device=dev, dtype=torch.int64).view(1, -1) * 0x632BE59BD9B4E019)
    return ((x >> 11) & ((1 << 53) - 1)).double().div_(2.0**53).clamp_(1e-12, 1 - 1e-12).float()


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, out_counts: torch.Tensor, rep: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Repetition over prompt + output (divide positive, multiply negative); presence/frequency over output."""
    seen = counts > 0
    penalised = torch.where(logits > 0, logits / rep.view(-1, 1), logits * rep.view(-1, 1))
    logits = torch.where(seen, penalised, logits)
    return logits - presence.view(-1, 1) * (out_counts > 0) - frequency.view(-1, 1) * out_counts


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: torch.Tensor, counts: torch.Tensor | None = None,
           out_counts: torch.Tensor | None = None, generated: list[int] | None = None) -> torch.Tensor:
    """Next token for each row of logits [B, V] under each row's params; returns int64 [B]."""
    B, V = logits.shape
    dev = logits.device
    f = lambda attr: on_device([getattr(p, attr) for p in params], dev, torch.float32)  # noqa: E731
    logits = logits.float()
    if counts is not None and any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
        logits = apply_penalties(logits, counts, out_counts, f("repetition_penalty"), f("presence_penalty"),
                                 f("frequency_penalty"))
    if generated is not None:  # min_tokens: end_id is not allowed before it
        for i, p in enumerate(params):
            if p.end_id is not None and generated[i] < p.min_tokens and p.end_id < V:
                logits[i, p.end_id] = float("-inf")
    greedy_tok = logits.argmax(-1)
    if all(p.greedy for p in params):  # decided on the host: no wait for the device
        return greedy_tok

    temp = f("temperature").clamp_min(1e-5).view(-1, 1)
    scaled = logits / temp
    sorted_logits, order = scaled.sort(-1, descending=True)
    ranks = torch.arange(V, device=dev).view(1, -1)
    top_k = on_device([p.top_k if p.top_k > 0 else V for p in params], dev).view(-1, 1)
    top_p = on_device([p.top_p if p.top_p > 0 else 1.0 for p in params], dev).view(-1, 1)
    probs = sorted_logits.softmax(-1)
    cum_before = probs.cumsum(-1) - probs  # mass of strictly better tokens; the best token always stays
    keep_sorted = (ranks < top_k) & (cum_before < top_p)
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    filtered = scaled.masked_fill(~keep, float("-inf"))
    seeds = on_device([p.seed & ((1 << 62) - 1) for p in params], dev, torch.int64)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, on_device(steps, dev, torch.int64), V)))
    sampled = (filtered + gumbel).argmax(-1)
    return torch.where(on_device([p.greedy for p in params], dev), greedy_tok, sampled)
