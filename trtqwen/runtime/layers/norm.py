from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda:  # one fused kernel that accumulates in fp32 (on CPU the op would round in bf16)
        return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)
