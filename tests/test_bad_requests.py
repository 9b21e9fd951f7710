"""Malformed requests against a real tritonserver (CPU, the tiny model): each is refused naming the field and what
it may be, the way TensorRT-LLM's SamplingConfig refuses it, and the server keeps answering normal requests.

Over gRPC (streams, as tensorrtllm_backend's clients call) and HTTP (/generate), at every model a client calls:
ensemble, tensorrt_llm_bls, tensorrt_llm. The OpenAI endpoint's own cases are in test_openai_proxy.py.
"""

import json
import math
import queue
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import infer_input

from trtqwen.clients.client import GenerationParams, RequestRejected, TritonLLMClient, server_error
from trtqwen.serve.repo.text import BAD_REQUEST

pytestmark = pytest.mark.slow

NAN, INF = float("nan"), float("inf")


def error_of(url: str, model: str, inputs: dict) -> str | None:
    """Send one streamed request; the error message it got (None: it was answered)."""
    results: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(url) as c:
        c.start_stream(callback=lambda result, error: results.put(error))
        c.async_stream_infer(model, [infer_input(k, v) for k, v in inputs.items()], enable_empty_final_response=True)
        c.stop_stream()
    errors = []
    while not results.empty():
        e = results.get()
        if e is not None:
            errors.append(e.message() if hasattr(e, "message") else str(e))
    return errors[0] if errors else None


def still_serving(url: str) -> bool:
    client = TritonLLMClient(url)
    return client.ready() and bool(client.generate("Hello there", GenerationParams(max_tokens=2, top_k=1)).text)


def text_request(**fields) -> dict:
    kinds = {"text_input": object, "max_tokens": np.int32, "top_k": np.int32, "min_tokens": np.int32,
             "beam_width": np.int32, "num_return_sequences": np.int32, "stream": bool}
    base = {"text_input": "Hello there", "max_tokens": 4, **fields}
    return {k: np.array([[v.encode() if isinstance(v, str) else v]], dtype=kinds.get(k, np.float32))
            for k, v in base.items()}


# (case, fields, words the error must contain): the text models' callers send these names
TEXT_CASES = [
    ("temperature negative", {"temperature": -1.0}, ["temperature", "≥ 0"]),
    ("temperature NaN", {"temperature": NAN}, ["temperature", "nan"]),
    ("temperature inf", {"temperature": INF}, ["temperature", "inf"]),
    ("top_p above 1", {"top_p": 1.5}, ["top_p", "(0, 1]"]),
    ("top_p negative", {"top_p": -0.1}, ["top_p"]),
    ("top_p NaN", {"top_p": NAN}, ["top_p"]),
    ("top_k negative", {"top_k": -1}, ["top_k", "≥ 0"]),
    ("repetition_penalty 0", {"repetition_penalty": 0.0}, ["repetition_penalty", "> 0"]),
    ("repetition_penalty negative", {"repetition_penalty": -1.0}, ["repetition_penalty"]),
    ("repetition_penalty NaN", {"repetition_penalty": NAN}, ["repetition_penalty"]),
    ("min_tokens negative", {"min_tokens": -1}, ["min_tokens", "≥ 0"]),
    ("beam_width 0", {"beam_width": 0}, ["beam_width", "≥ 1"]),
    ("num_return_sequences 0", {"num_return_sequences": 0}, ["num_return_sequences", "≥ 1"]),
    ("presence_penalty NaN", {"presence_penalty": NAN}, ["presence_penalty", "finite"]),
    ("frequency_penalty inf", {"frequency_penalty": INF}, ["frequency_penalty", "finite"]),
    ("length_penalty negative", {"length_penalty": -1.0}, ["length_penalty", "≥ 0"]),
    ("max_tokens 0", {"max_tokens": 0}, ["max_tokens", "at least 1"]),
    ("max_tokens negative", {"max_tokens": -5}, ["max_tokens"]),
    ("max_tokens past max_seq_len", {"max_tokens": 10**6}, ["max_tokens", "max_seq_len"]),
    ("empty text_input", {"text_input": ""}, ["text_input", "empty"]),
    ("prompt past max_input_len", {"text_input": "hello " * 5000}, ["max_input_len"]),
    ("10 MB prompt", {"text_input": "x" * 10_000_000}, ["bytes", "max_input_len"]),
]


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
@pytest.mark.parametrize("case,fields,words", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_text_models_refuse_naming_the_field(served_tiny, model, case, fields, words):
    message = error_of(served_tiny[0], model, text_request(**fields))
    assert message is not None and BAD_REQUEST in message, (case, message)
    assert all(w in message for w in words), (case, message)
    assert still_serving(served_tiny[0])


def test_invalid_utf8_is_refused(served_tiny):
    inputs = text_request()
    inputs["text_input"] = np.array([[b"caf\xe9 \xff"]], dtype=object)
    for model in ("ensemble", "tensorrt_llm_bls"):
        message = error_of(served_tiny[0], model, inputs)
        assert message and "UTF-8" in message and BAD_REQUEST in message


def token_request(**fields) -> dict:
    ids = np.array([[9707, 1052, 374]], dtype=np.int32)
    base = {"input_ids": ids, "input_lengths": 3, "request_output_len": 4, **fields}
    return {k: v if isinstance(v, np.ndarray) else
            np.array([[v]], dtype=bool if isinstance(v, bool) else np.float32 if isinstance(v, float) else np.int32)
            for k, v in base.items()}


TOKEN_CASES = [
    ("input_lengths negative", {"input_lengths": -1}, ["input_lengths"]),
    ("input_lengths past input_ids", {"input_lengths": 4}, ["input_lengths", "3 input_ids"]),
    ("stop word offsets past the end", {"stop_words_list": np.array([[[9707, 0], [5, -1]]], dtype=np.int32)},
     ["word list", "offsets"]),
    ("runtime_top_p 2", {"runtime_top_p": 2.0}, ["top_p (runtime_top_p)"]),
    ("runtime_top_k negative", {"runtime_top_k": -3}, ["top_k (runtime_top_k)"]),
    ("request_output_len 0", {"request_output_len": 0}, ["max_tokens"]),
    ("beam_width 2", {"beam_width": 2}, ["beam_width", "not supported"]),
    ("return_log_probs", {"return_log_probs": True}, ["return_log_probs"]),
]


@pytest.mark.parametrize("case,fields,words", TOKEN_CASES, ids=[c[0] for c in TOKEN_CASES])
def test_tensorrt_llm_refuses_naming_the_field(served_tiny, case, fields, words):
    message = error_of(served_tiny[0], "tensorrt_llm", token_request(**fields))
    assert message is not None and BAD_REQUEST in message, (case, message)
    assert all(w in message for w in words), (case, message)
    assert still_serving(served_tiny[0])


HTTP_CASES = [
    ("temperature negative", {"temperature": -1}, "temperature"),
    ("top_p above 1", {"top_p": 2}, "top_p"),
    ("top_k negative", {"top_k": -1}, "top_k"),
    ("max_tokens 0", {"max_tokens": 0}, "max_tokens"),
    ("empty text_input", {"text_input": ""}, "text_input"),
]


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
@pytest.mark.parametrize("case,fields,word", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_generate_answers_400(served_tiny, model, case, fields, word):
    body = json.dumps({"text_input": "Hello there", "max_tokens": 4, **fields}).encode()
    req = urllib.request.Request(f"http://{served_tiny[1]}/v2/models/{model}/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400 and word in json.loads(e.value.read())["error"], case
    assert still_serving(served_tiny[0])


def test_the_client_raises_request_rejected_and_the_server_keeps_serving(served_tiny):
    client = TritonLLMClient(served_tiny[0])
    with pytest.raises(RequestRejected, match="top_p"):
        client.generate("Hello there", GenerationParams(max_tokens=4, top_p=math.nan))
    assert client.ready() and client.generate("Hello there", GenerationParams(max_tokens=4, top_k=1)).text
    assert not isinstance(server_error("stub process is not healthy"), RequestRejected)  # the server's trouble
