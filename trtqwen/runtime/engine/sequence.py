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
    finish_reason: str | None = None  # stop (end_id), stop_word, length, cancelled, error (see `error`)
    slot: int | None = None
    computed: int = 0  # prompt tokens already in the KV cache
    cancelled: bool = False
    error: str | None = None  # why this request failed alone (finish_reason "error"); the others went on
    scheduled_ns: int | None = None  # time.monotonic_ns() when it took its KV slot (perf metrics)
    fault_at: int | None = None  # test hook (LLMEngine.add): the batched step raises at this output token

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
