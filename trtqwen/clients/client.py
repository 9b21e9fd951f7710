"""Streaming client for a tensorrtllm_backend-layout Triton deployment (ours, or NVIDIA's on a 4090D).

gRPC streaming, Qwen's ChatML template, Qwen's end/pad ids and stop words,
and input names discovered from the served model's config, so deployments made by other tools work.
Every request reports time to first token, inter-token gaps and token counts.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from trtqwen.errors import UserError
from trtqwen.qwen_tokenizer import DEFAULT_SYSTEM, ENDOFTEXT, EOS_ID, IM_END, IM_START, PAD_ID
from trtqwen.serve.repo.text import BAD_REQUEST

# Canonical name → names it has had across tensorrtllm_backend versions (0.x first, 1.x renames after).
INPUT_ALIASES = {
    "seed": ["seed", "random_seed"],
    "min_tokens": ["min_tokens", "min_length"],
}
INPUT_DTYPES = {
    "text_input": "BYTES", "max_tokens": "INT32", "stop_words": "BYTES", "bad_words": "BYTES", "end_id": "INT32",
    "pad_id": "INT32", "top_k": "INT32", "top_p": "FP32", "temperature": "FP32", "repetition_penalty": "FP32",
    "presence_penalty": "FP32", "frequency_penalty": "FP32", "seed": "UINT64", "random_seed": "UINT64",
    "min_tokens": "INT32", "min_length": "INT32", "stream": "BOOL", "beam_width": "INT32",
    "exclude_input_in_output": "BOOL", "return_num_output_tokens": "BOOL", "return_num_input_tokens": "BOOL",
}


def chatml(messages: list[dict], system: str | None = DEFAULT_SYSTEM, add_generation_prompt: bool = True) -> str:
    """Qwen2.5's chat format: <|im_start|>role\\ncontent<|im_end|>\\n …, ending with the assistant's turn."""
    msgs = list(messages)
    if system is not None and (not msgs or msgs[0].get("role") != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in msgs)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


# Own subchannels and a short reconnect backoff: gRPC otherwise shares one backoff (up to 120 s) between every
# channel to a server that went away, and a restarted server stays unreachable to us for a minute or more.
# Not grpc.min_reconnect_backoff_ms: gRPC takes it as the connect timeout, and at 250 ms a busy server (200 streams
# opening at once behind nginx) failed handshakes with "timed out before receiving SETTINGS frame".
CHANNEL_ARGS = [("grpc.use_local_subchannel_pool", 1), ("grpc.initial_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", 1000)]
IDLE_TIMEOUT_S = 60.0  # longest silence inside a stream: far above a prefill on the GPU, below a user's patience


# what gRPC reports when the server (or the replica behind nginx) died with the stream open
CUT_STREAM = ("RST_STREAM", "Stream removed", "Socket closed", "Connection reset")


class RequestRejected(UserError):
    """The server refused the request as invalid (a field out of range, a prompt too long): the caller's mistake."""


def server_error(message: str) -> UserError:
    """A Triton error as ours: the models start client mistakes with BAD_REQUEST (gRPC streams carry no status)."""
    if BAD_REQUEST in message:
        return RequestRejected(message[message.index(BAD_REQUEST) + len(BAD_REQUEST):])
    if any(cut in message for cut in CUT_STREAM):
        return UserError(f"the server went away in the middle of this answer ({message})",
                         "ask again: behind trtqwen's load balancer the request goes to a replica that is up; "
                         "alone, restart the server (`trtqwen serve <repo>`)")
    return UserError(f"server error: {message}")


DEFAULT_MAX_TOKENS = 512  # one answer's length for every client: chat, web demo, OpenAI proxy


@dataclass
class GenerationParams:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None
    stop_words: list[str] = field(default_factory=lambda: [IM_END, ENDOFTEXT])
    end_id: int = EOS_ID
    pad_id: int = PAD_ID


@dataclass
class Timing:
    start: float
    first_token: float | None = None
    end: float | None = None
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    input_tokens: int | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def gaps(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tokens_per_s(self) -> float | None:
        """Decode rate after the first token (the per-user speed users feel)."""
        if self.end is None or self.first_token is None or self.output_tokens < 2:
            return None
        return (self.output_tokens - 1) / max(self.end - self.first_token, 1e-9)


@dataclass
class Result:
    text: str
    timing: Timing
    error: str | None = None


class TritonLLMClient:
    """Talks to `ensemble` or `tensorrt_llm_bls` (same text interface) over gRPC streams."""

    def __init__(self, url: str = "127.0.0.1:8001", model: str = "ensemble", timeout: float = 5.0,
                 idle_timeout: float = IDLE_TIMEOUT_S):
        import tritonclient.grpc as grpcclient

        self.url, self.model, self.idle_timeout = url, model, idle_timeout
        self.grpc = grpcclient
        try:
            self.client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
            live = self.client.is_server_live(client_timeout=timeout)
        except Exception as e:  # noqa: BLE001 - any transport failure means the same thing to a user
            raise UserError(f"cannot reach a Triton server at {url} ({type(e).__name__})",
                            "start one with `trtqwen serve` or pass --url host:grpc_port") from None
        if not live:
            raise UserError(f"Triton server at {url} is not live")
        try:
            cfg = self.client.get_model_config(model, as_json=True, client_timeout=timeout)["config"]
        except Exception:  # noqa: BLE001
            raise UserError(f"model {model!r} is not served at {url}", "pass --model with one it serves (ensemble, "
                            "tensorrt_llm_bls, tensorrt_llm for a trtqwen repository)") from None
        self.inputs = {i["name"]: i for i in cfg.get("input", [])}
        self.decoupled = bool(cfg.get("model_transaction_policy", {}).get("decoupled"))
        self.parameters = {k: v.get("string_value") for k, v in cfg.get("parameters", {}).items()}

    def input_name(self, canonical: str) -> str | None:
        """The name this deployment uses for a canonical input (1.x renamed random_seed → seed, …)."""
        for name in INPUT_ALIASES.get(canonical, [canonical]):
            if name in self.inputs:
                return name
        return None

    def model_config(self, name: str) -> dict:
        """A served model's config as JSON; {} when it is not served (or the server says nothing)."""
        try:
            return self.client.get_model_config(name, as_json=True)["config"]
        except Exception:  # noqa: BLE001 - not served, or another layout: nothing learned
            return {}

    def ready(self) -> bool:
        try:
            return self.client.is_server_ready() and self.client.is_model_ready(self.model)
        except Exception:  # noqa: BLE001
            return False

    def _inputs(self, prompt: str, p: GenerationParams, stream: bool):
        values = {
            "text_input": [prompt.encode("utf-8") if isinstance(prompt, str) else prompt],
            "max_tokens": [p.max_tokens], "end_id": [p.end_id], "pad_id": [p.pad_id], "temperature": [p.temperature],
            "top_k": [p.top_k], "top_p": [p.top_p], "stream": [stream],
            "return_num_output_tokens": [True],  # one response may carry several tokens (whole characters)
            "return_num_input_tokens": [True],  # the prompt's length in tokens, for usage without a tokenizer
        }
        if p.stop_words:
            values["stop_words"] = [w.encode() for w in p.stop_words]
        seed = p.seed if p.seed is not None else random.getrandbits(63)  # no seed: each request samples anew
        optional = {"seed": seed, "min_tokens": p.min_tokens, "repetition_penalty": p.repetition_penalty,
                    "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty}
        values.update({k: [v] for k, v in optional.items() if v is not None})
        tensors = []
        for canonical, val in values.items():
            name = self.input_name(canonical)
            if name is None:
                continue  # this deployment does not take it
            dtype = INPUT_DTYPES[name]
            arr = np.array([val], dtype=object if dtype == "BYTES" else {
                "INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": bool}[dtype])
            t = self.grpc.InferInput(name, list(arr.shape), dtype)
            t.set_data_from_numpy(arr)
            tensors.append(t)
        return tensors

    def stream(self, prompt: str, params: GenerationParams | None = None, cancel: threading.Event | None = None
               ) -> Iterator[tuple[str, Timing]]:
        """Yield (text delta, timing so far) as tokens arrive; raises UserError on a server error."""
        from tritonclient.utils import InferenceServerException

        params = params or GenerationParams()
        timing = Timing(start=time.perf_counter())
        events: queue.Queue = queue.Queue()
        # a stream per request: concurrent users don't share one
        client = self.grpc.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        client.start_stream(callback=lambda result, error: events.put((result, error)))
        try:
            try:
                client.async_stream_infer(self.model, self._inputs(prompt, params, True), enable_empty_final_response=True)
            except InferenceServerException as e:  # the stream failed before the request went out (a model
                # being loaded again, a server going away): the reason came through the callback
                try:
                    e = events.get(timeout=1.0)[1] or e
                except queue.Empty:
                    pass
                raise server_error(e.message() if hasattr(e, "message") else str(e)) from None
            last = time.perf_counter()
            while True:
                if cancel is not None and cancel.is_set():
                    break  # closing the stream cancels the request on the server
                try:
                    result, error = events.get(timeout=0.05 if cancel is not None else 1.0)
                except queue.Empty:
                    if time.perf_counter() - last > self.idle_timeout:  # a killed model stub answers nothing, ever
                        raise UserError(f"no response from {self.model} at {self.url} for {self.idle_timeout:.0f} s: "
                                        "its model process may have died",
                                        "see the server log; restart it with `trtqwen serve <repo> --stop` and serve")
                    continue
                last = time.perf_counter()
                if error is not None:
                    raise server_error(error.message() if hasattr(error, "message") else str(error))
                resp = result.get_response()
                final = resp.parameters.get("triton_final_response")
                if timing.input_tokens is None:  # the prompt's length comes with the first response
                    n_in = result.as_numpy("num_input_tokens")
                    timing.input_tokens = int(n_in.ravel()[0]) if n_in is not None and n_in.size else None
                out = result.as_numpy("text_output")
                if out is not None and out.size:
                    now = time.perf_counter()
                    delta = b"".join(x if isinstance(x, bytes) else str(x).encode() for x in out.ravel()).decode("utf-8", "replace")
                    if delta:
                        timing.first_token = timing.first_token or now
                        timing.token_times.append(now)
                        timing.output_tokens += self._tokens_in(result, 1)
                        yield delta, timing
                if final is not None and final.bool_param:
                    break
        finally:
            timing.end = time.perf_counter()
            client.stop_stream(cancel_requests=True)
            client.close()

    @staticmethod
    def _tokens_in(result, default: int) -> int:
        n = result.as_numpy("num_output_tokens") if hasattr(result, "as_numpy") else None
        try:
            return int(n.ravel()[0]) if n is not None and n.size else default
        except Exception:  # noqa: BLE001
            return default

    def generate(self, prompt: str, params: GenerationParams | None = None) -> Result:
        pieces, timing = [], None
        for delta, timing in self.stream(prompt, params):
            pieces.append(delta)
        if timing is None:  # no tokens at all (e.g. immediate end_id)
            timing = Timing(start=time.perf_counter(), end=time.perf_counter())
        return Result("".join(pieces), timing)


def connect(url: str, model: str | None = None, **kw) -> TritonLLMClient:
    """A client for `model`; None: tensorrt_llm_bls when served (a closed stream cancels generation there; Triton 2.51
    does not pass cancellation through an ensemble), else ensemble."""
    if model:
        return TritonLLMClient(url, model, **kw)
    try:
        return TritonLLMClient(url, "tensorrt_llm_bls", **kw)
    except UserError as e:
        if "is not served" not in e.message:
            raise
        return TritonLLMClient(url, "ensemble", **kw)
