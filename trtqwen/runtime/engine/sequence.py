from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from trtqwen.runtime.layers.sampler import SamplingParams

TokenCallback = Callable[["Request", "int | None", "str | None"], None]


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    on_token: TokenCallback | None = None
    id: int = 0
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop (end_id), stop_word, length, cancelled
    slot: int | None = None
    computed: int = 0  # prompt tokens already in the KV cache
    cancelled: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
