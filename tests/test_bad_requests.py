"""Malformed requests against a real tritonserver (CPU, the tiny model): each is refused naming the field and what
it may be, the way TensorRT-LLM's SamplingConfig refuses it, and the server keeps answering normal requests.

Over gRPC (streams, as tensorrtllm_backend's clients call) and HTTP (/generate), at every model a client calls:
ensemble, tensorrt_llm_bls, tensorrt_llm. The OpenAI endpoint's own cases are in test_openai_proxy.py.

Poison (issue 30): every value that indexes a tensor (input_ids, end_id, pad_id, stop/bad word ids) is checked
against the vocabulary before it joins the batch; unknown request parameters (the generate endpoint's extra JSON
keys) are refused, not ignored; and a request that breaks the engine's batched step (the test hook) fails alone
while the streams beside it finish. The engine's side of that, without a server, is in test_poison.py.
"""

import json
import math
import queue
import threading
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
VOCAB = 151936  # the tiny model's (Qwen2.5's padded vocabulary)
INT32_MIN = -(2**31)
FAULT = "trtqwen-test-fault-at-"  # with TRTQWEN_TEST_FAULTS=1: this request id breaks the engine step (model.py)


def error_of(url: str, model: str, inputs: dict, parameters: dict | None = None) -> str | None:
    """Send one streamed request; the error message it got (None: it was answered)."""
    results: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(url) as c:
        c.start_stream(callback=lambda result, error: results.put(error))
        c.async_stream_infer(model, [infer_input(k, v) for k, v in inputs.items()], enable_empty_final_response=True,
                             parameters=parameters)
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
             "beam_width": np.int32, "num_return_sequences": np.int32, "stream": bool, "end_id": np.int32,
             "pad_id": np.int32}
    base = {"text_input": "Hello there", "max_tokens": 4, **fields}
    return {k: np.array([[v.encode() if isinstance(v, str) else v]], dtype=kinds.get(k, np.float32))
            for k, v in base.items() if v is not None}


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
    # poison: ids that index the vocabulary (the issue's end_id INT32 min with min_tokens crashed the whole batch)
    ("end_id INT32 min", {"end_id": INT32_MIN, "min_tokens": 1}, ["end_id", f"[-1, {VOCAB})", str(INT32_MIN)]),
    ("end_id -200000", {"end_id": -200000, "min_tokens": 1}, ["end_id", "-200000"]),
    ("end_id -2", {"end_id": -2}, ["end_id", "-1: no end id"]),
    ("end_id = vocab", {"end_id": VOCAB, "min_tokens": 1}, ["end_id", str(VOCAB)]),
    ("pad_id negative", {"pad_id": -1}, ["pad_id", f"[0, {VOCAB})"]),
    ("pad_id INT32 min", {"pad_id": INT32_MIN}, ["pad_id", str(INT32_MIN)]),
    ("pad_id past vocab", {"pad_id": 10**9}, ["pad_id", str(10**9)]),
]


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
@pytest.mark.parametrize("case,fields,words", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_text_models_refuse_naming_the_field(served_tiny, model, case, fields, words):
    message = error_of(served_tiny[0], model, text_request(**fields))
    assert message is not None and BAD_REQUEST in message, (case, message)
    assert all(w in message for w in words), (case, message)
    assert still_serving(served_tiny[0])


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_max_tokens_is_required(served_tiny, model):
    """tensorrtllm_backend marks max_tokens required: a request without it is refused, naming it (not left
    unanswered)."""
    message = error_of(served_tiny[0], model, text_request(max_tokens=None))
    assert message and "max_tokens" in message and "required" in message


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls", "tensorrt_llm"])
def test_unknown_parameters_are_refused_naming_them(served_tiny, model):
    inputs = token_request() if model == "tensorrt_llm" else text_request()
    message = error_of(served_tiny[0], model, inputs, parameters={"ignore_eos": True, "n": 2})
    assert message and BAD_REQUEST in message and "ignore_eos, n" in message, message
    assert error_of(served_tiny[0], model, inputs) is None  # the same request without them is answered


def test_inputs_no_model_declares_are_refused(served_tiny):
    """embedding_bias (TensorRT-LLM's [vocab] logits bias) and the like are not declared: Triton itself refuses them."""
    message = error_of(served_tiny[0], "tensorrt_llm", token_request(embedding_bias=np.zeros((1, 5), np.float32)))
    assert message and "unexpected inference input 'embedding_bias'" in message


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
    # poison: every id that indexes a tensor, out of the vocabulary, refused before it joins the batch
    ("end_id INT32 min", {"end_id": INT32_MIN, "min_tokens": 1}, ["end_id", f"[-1, {VOCAB})"]),
    ("end_id -200000", {"end_id": -200000, "min_tokens": 1}, ["end_id", "-200000"]),
    ("end_id = vocab", {"end_id": VOCAB, "min_tokens": 1}, ["end_id", str(VOCAB)]),
    ("pad_id INT32 min", {"pad_id": INT32_MIN}, ["pad_id", f"[0, {VOCAB})"]),
    ("pad_id = vocab", {"pad_id": VOCAB}, ["pad_id", str(VOCAB)]),
    ("input_ids = vocab", {"input_ids": np.array([[9707, VOCAB, 374]], dtype=np.int32)}, ["input_ids", str(VOCAB)]),
    ("input_ids negative", {"input_ids": np.array([[9707, -5, 374]], dtype=np.int32)}, ["input_ids", "-5"]),
    ("input_ids INT32 min", {"input_ids": np.array([[INT32_MIN, 1052, 374]], dtype=np.int32)}, ["input_ids"]),
    ("stop word id past vocab", {"stop_words_list": np.array([[[200000, 0], [1, -1]]], dtype=np.int32)},
     ["stop_words_list", "200000"]),
    ("stop word id INT32 min", {"stop_words_list": np.array([[[INT32_MIN, 0], [1, -1]]], dtype=np.int32)},
     ["stop_words_list", str(INT32_MIN)]),
    ("bad word id negative", {"bad_words_list": np.array([[[-7, 0], [1, -1]]], dtype=np.int32)},
     ["bad_words_list", "-7"]),
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
    ("unknown keys", {"ignore_eos": True, "n": 2, "logprobs": 1}, "ignore_eos, logprobs, n"),
    ("end_id INT32 min", {"end_id": INT32_MIN, "min_tokens": 1}, "end_id"),
    ("pad_id past vocab", {"pad_id": VOCAB}, "pad_id"),
    ("no max_tokens", {"max_tokens": None}, "max_tokens"),
]


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
@pytest.mark.parametrize("case,fields,word", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_generate_answers_400(served_tiny, model, case, fields, word):
    body = json.dumps({k: v for k, v in {"text_input": "Hello there", "max_tokens": 4, **fields}.items()
                       if v is not None}).encode()
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


# --- poison never reaches the batch; a request that breaks the step anyway fails alone ------------------------------
def streamed(url: str, model: str, prompt: str, n: int, request_id: str = "") -> tuple[str, str | None]:
    """One greedy stream of exactly n tokens (min_tokens n): (its text, its error or None)."""
    results: queue.Queue = queue.Queue()
    inputs = text_request(text_input=prompt, max_tokens=n, min_tokens=n, top_k=1, stream=True)
    text, error = "", None
    with grpcclient.InferenceServerClient(url) as c:
        c.start_stream(callback=lambda result, error: results.put((result, error)))
        c.async_stream_infer(model, [infer_input(k, v) for k, v in inputs.items()], request_id=request_id,
                             enable_empty_final_response=True)
        while True:
            result, e = results.get(timeout=120)
            if e is not None:
                error = e.message()
                break
            out = result.as_numpy("text_output")
            text += out.reshape(-1)[0].decode() if out is not None and out.size else ""
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        c.stop_stream()
    return text, error


def together(jobs: dict) -> dict:
    """{name: callable} run side by side → {name: result}."""
    out: dict = {}
    threads = [threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f())) for k, f in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return out


def test_poison_is_refused_while_other_streams_go_on(served_tiny):
    """The issue's requests (straight to tensorrt_llm, end_id INT32 min / -200000 with min_tokens, ids past the
    vocabulary) sent while streams are in flight: each refused up front, every stream finishes in full."""
    url = served_tiny[0]
    prompts = {f"s{i}": f"Tell me a story about the number {i}." for i in range(4)}
    reference = together({k: lambda p=p: streamed(url, "ensemble", p, 40) for k, p in prompts.items()})
    poison = {"end_id INT32 min": token_request(end_id=INT32_MIN, min_tokens=1),
              "end_id -200000": token_request(end_id=-200000, min_tokens=3),
              "input_ids past vocab": token_request(input_ids=np.array([[9707, 10**6, 374]], dtype=np.int32)),
              "stop word past vocab": token_request(stop_words_list=np.array([[[VOCAB, 0], [1, -1]]], dtype=np.int32))}
    jobs = {k: lambda p=p: streamed(url, "ensemble", p, 40) for k, p in prompts.items()}
    jobs.update({k: lambda i=i: error_of(url, "tensorrt_llm", i) for k, i in poison.items()})
    results = together(jobs)
    for k in poison:
        assert results[k] and BAD_REQUEST in results[k], (k, results[k])
    assert {k: results[k] for k in prompts} == reference
    assert all(error is None and text for text, error in reference.values())
    assert still_serving(url)


def test_a_request_that_breaks_the_engine_step_fails_alone(served_tiny):
    """The test hook (TRTQWEN_TEST_FAULTS=1, request id trtqwen-test-fault-at-3) makes the batched step raise at that
    request's 3rd token: it alone gets the error; 20 streams beside it finish with the tokens they get without it;
    the next request is served."""
    url = served_tiny[0]
    prompts = {f"s{i:02}": f"Stream {i}: once upon a time" for i in range(20)}
    reference = together({k: lambda p=p: streamed(url, "ensemble", p, 24) for k, p in prompts.items()})
    assert all(error is None and text for text, error in reference.values())
    jobs = {k: lambda p=p: streamed(url, "ensemble", p, 24) for k, p in prompts.items()}
    jobs["fault"] = lambda: streamed(url, "ensemble", "This one breaks the step", 24, request_id=f"{FAULT}3")
    results = together(jobs)
    text, error = results.pop("fault")
    assert error and "injected test fault" in error and "failed for this request" in error, error
    assert results == reference
    text, error = streamed(url, "ensemble", "Hello there", 4)
    assert text and error is None


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls", "tensorrt_llm"])
def test_return_perf_metrics_returns_tensorrtllm_backends_outputs(served_tiny, model):
    fields = ({"input_ids": [9707, 1052, 374], "input_lengths": 3, "request_output_len": 4} if model == "tensorrt_llm"
              else {"text_input": "Hello there", "max_tokens": 4})
    body = json.dumps({**fields, "return_perf_metrics": True}).encode()
    req = urllib.request.Request(f"http://{served_tiny[1]}/v2/models/{model}/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    out = json.loads(urllib.request.urlopen(req, timeout=60).read())
    assert 0 < out["arrival_time_ns"] <= out["first_scheduled_time_ns"] <= out["first_token_time_ns"] \
        <= out["last_token_time_ns"], out
    assert (out["kv_cache_alloc_new_blocks"], out["kv_cache_reused_blocks"], out["kv_cache_alloc_total_blocks"]) == (1, 0, 1)
    assert (out["acceptance_rate"], out["total_accepted_draft_tokens"], out["total_draft_tokens"]) == (0, 0, 0)
