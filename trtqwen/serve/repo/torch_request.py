"""A `tensorrt_llm` request (Triton's tensors and parameters, the C++ backend's names) → what the engine runs, with
every refusal: pure, so tests call it without a server (the way Triton's vllm_backend keeps utils/request.py apart
from its model.py). Copied next to the torch runtime's model.py as trtqwen_request.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

try:  # inside the served model: the copy beside it; elsewhere (tests): the package's
    from trtqwen_text import (SAMPLING_RULES, BadRequest, as_bool, check_parameters, check_sampling, check_token_id,
                              check_token_ids, parse_word_list)
except ImportError:
    from trtqwen.serve.repo.text import (SAMPLING_RULES, BadRequest, as_bool, check_parameters, check_sampling,
                                         check_token_id, check_token_ids, parse_word_list)

UNSUPPORTED = {  # inputs the torch runtime cannot honour: refused, never silently ignored
    "return_log_probs": "log probabilities", "return_context_logits": "context logits",
    "return_generation_logits": "generation logits",
}
# TRTQWEN_TEST_FAULTS=1 in the server's environment (tests only): a request id `trtqwen-test-fault-at-<n>` makes the
# engine's batched step raise at that request's n-th output token (LLMEngine.add fault_at), to show it fails alone.
FAULT_PREFIX = "trtqwen-test-fault-at-"


@dataclass(frozen=True)
class Limits:
    """What the served model allows (its config and its engine)."""
    vocab: int
    max_input_len: int
    max_seq_len: int
    end_id: int
    pad_id: int
    decoupled: bool = True
    exclude_input: bool = True  # exclude_input_in_output's default
    has_tokenizer: bool = True
    faults: bool = False  # the test hook (FAULT_PREFIX)


@dataclass
class Translated:
    prompt: list[int]
    params: dict  # SamplingParams' fields
    streaming: bool
    exclude_input: bool
    want_in: bool
    want_out: bool
    perf: bool
    fault_at: int | None = None
    notes: list[str] = field(default_factory=list)  # warnings for the server log


def scalar(arr, default=None):
    """The first value of an input tensor, or default when it is absent or empty."""
    if arr is None:
        return default
    a = np.asarray(arr)
    return default if a.size == 0 else a.reshape(-1)[0].item()


def translate(inputs: Callable[[str], np.ndarray | None], parameters: str | None, requested: frozenset,
              limits: Limits, request_id: str = "") -> Translated:
    """inputs(name): the request's tensor of that name or None. Raises BadRequest naming what is wrong."""
    value = lambda name, default=None: scalar(inputs(name), default)  # noqa: E731
    check_parameters(parameters)
    streaming = as_bool(value("streaming"), False)
    if streaming and not limits.decoupled:
        raise BadRequest("streaming needs decoupled mode: package the repository with streaming on")
    ids = inputs("input_ids")
    ids = np.zeros((1, 0), np.int32) if ids is None else np.asarray(ids)
    if ids.ndim == 2 and ids.shape[0] != 1:
        raise BadRequest(f"send one prompt per request (this one has a batch of {ids.shape[0]})")
    ids = ids.reshape(-1)
    n = int(value("input_lengths", len(ids)))
    if not 0 <= n <= len(ids):  # TensorRT-LLM would read past the prompt, or drop its last tokens unasked
        raise BadRequest(f"input_lengths must be between 1 and the {len(ids)} input_ids sent, got {n}")
    prompt = [int(x) for x in ids[:n]]
    if not prompt:
        raise BadRequest("the prompt is empty: send a non-empty text_input / input_ids")
    check_token_ids("input_ids", prompt, limits.vocab)  # TensorRT-LLM's checkTokenIdRange
    if len(prompt) > limits.max_input_len:
        raise BadRequest(f"the prompt has {len(prompt)} tokens, more than max_input_len {limits.max_input_len}: "
                         "shorten it, or build and package with a larger --max-input-len")
    max_tokens = int(value("request_output_len", 0))
    if max_tokens < 1:
        raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}")
    if max_tokens > limits.max_seq_len:
        raise BadRequest(f"max_tokens {max_tokens} exceeds the sequence limit max_seq_len {limits.max_seq_len} "
                         "(prompt + output): ask for fewer tokens, or build with a larger --max-seq-len")
    notes = []
    if len(prompt) + max_tokens > limits.max_seq_len:  # as TensorRT-LLM does: shorten the output, say so
        notes.append(f"prompt {len(prompt)} + max_tokens {max_tokens} > max_seq_len {limits.max_seq_len}: "
                     f"output limited to {limits.max_seq_len - len(prompt)} tokens")
        max_tokens = limits.max_seq_len - len(prompt)
    sent = {name: value(name) for name in SAMPLING_RULES}
    check_sampling(sent)
    for name, what in UNSUPPORTED.items():
        if as_bool(value(name), False):
            raise BadRequest(f"{what} ({name}) are not available from the torch runtime: "
                             "serve TensorRT engines (--runtime trtllm) for them")
    for name in ("beam_width", "num_return_sequences"):
        if (sent[name] or 1) > 1:
            raise BadRequest(f"{name} > 1 is not supported by the torch runtime (sampling, one sequence)")
    end_id, pad_id = value("end_id", limits.end_id), value("pad_id", limits.pad_id)
    check_token_id("end_id", end_id, limits.vocab, lowest=-1)  # as TensorRT-LLM's LlmRequest::validate
    check_token_id("pad_id", pad_id, limits.vocab)
    stop_words = parse_word_list(inputs("stop_words_list"), "stop_words_list")
    check_token_ids("stop_words_list", [t for w in stop_words for t in w], limits.vocab)
    bad_words = parse_word_list(inputs("bad_words_list"), "bad_words_list")
    check_token_ids("bad_words_list", [t for w in bad_words for t in w], limits.vocab)
    if bad_words:
        raise BadRequest("bad_words are not supported by the torch runtime: serve with --runtime trtllm")
    if "text_output" in requested and not limits.has_tokenizer:
        raise BadRequest("text_output needs the tokenizer: package the repository with its tokenizer_dir")
    given = lambda name, default: default if sent[name] is None else sent[name]  # noqa: E731
    params = dict(
        max_tokens=max_tokens,
        temperature=float(given("temperature", 1.0)),
        top_k=int(given("runtime_top_k", 0)),
        top_p=float(given("runtime_top_p", 0.0)),
        seed=int(value("seed", 0)),
        repetition_penalty=float(given("repetition_penalty", 1.0)),
        presence_penalty=float(given("presence_penalty", 0.0)),
        frequency_penalty=float(given("frequency_penalty", 0.0)),
        min_tokens=int(given("min_tokens", 0)),
        end_id=None if int(end_id) == -1 else int(end_id),  # -1: no end id (generate up to max_tokens)
        pad_id=int(pad_id),
        stop_words=stop_words,
    )
    fault_at = None
    if limits.faults and request_id.startswith(FAULT_PREFIX):
        fault_at = int(request_id[len(FAULT_PREFIX):].split("-")[0])
    return Translated(prompt, params, streaming,
                      exclude_input=as_bool(value("exclude_input_in_output"), limits.exclude_input),
                      want_in=as_bool(value("return_num_input_tokens"), False) and "num_input_tokens" in requested,
                      want_out=as_bool(value("return_num_output_tokens"), False) and "num_output_tokens" in requested,
                      perf=as_bool(value("return_perf_metrics"), False), fault_at=fault_at, notes=notes)
