"""The OpenAI-compatible proxy answers as OpenAI and vLLM do, against a real tritonserver serving the tiny model.

The tiny build's limits: max_seq_len 4096 (prompt + output), max_input_len 2048. The proxy is made without a
tokenizer or limits, so it learns them from the deployment's model configs.
"""

import json
import re
import time

import httpx
import pytest
from conftest import serve_app

pytestmark = pytest.mark.slow

CHAT, COMP = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]
LONG = "hello " * 3000  # ~3000 tokens: past max_input_len 2048


@pytest.fixture(scope="module")
def proxy(served_tiny):
    from trtqwen.clients.openai import make_app

    with serve_app(make_app(served_tiny[0])) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def oai(proxy):
    import openai

    return openai.OpenAI(base_url=f"{proxy}/v1", api_key="x", max_retries=0, timeout=60)


def chat(**kw) -> dict:
    return {"model": "qwen2.5", "messages": HI, "max_tokens": 4, **kw}


def comp(**kw) -> dict:
    return {"model": "qwen2.5", "prompt": "Hello", "max_tokens": 4, **kw}


# (route, body: a dict, or raw bytes sent as they are, the field the error must name)
MALFORMED = [
    (CHAT, chat(messages=[]), "messages"),
    (CHAT, {"model": "qwen2.5", "max_tokens": 4}, "messages"),
    (CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    (CHAT, chat(messages=["Hi"]), "messages[0].role"),
    (CHAT, chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content"),
    (CHAT, chat(messages=[{"role": "user", "content": "a\ud800b"}]), "messages[0].content"),  # lone surrogate
    (CHAT, chat(messages=[{"role": "user", "content": LONG}]), "messages"),  # prompt past the context
    (CHAT, chat(max_tokens=0), "max_tokens"),
    (CHAT, chat(max_tokens="10"), "max_tokens"),
    (CHAT, chat(max_tokens=5000), "max_tokens"),  # more than max_seq_len
    (CHAT, chat(max_tokens=10**400), "max_tokens"),
    (CHAT, chat(max_tokens=None, max_completion_tokens=1.5), "max_completion_tokens"),
    (CHAT, chat(temperature=3), "temperature"),
    (CHAT, chat(temperature=float("nan")), "temperature"),  # json.dumps writes NaN, Python's json reads it
    (CHAT, chat(temperature=True), "temperature"),
    (CHAT, chat(top_p=float("inf")), "top_p"),
    (CHAT, chat(top_p=-0.1), "top_p"),
    (CHAT, chat(top_k=-2), "top_k"),
    (CHAT, chat(top_k=1.5), "top_k"),
    (CHAT, chat(presence_penalty=2.5), "presence_penalty"),
    (CHAT, chat(frequency_penalty=-3), "frequency_penalty"),
    (CHAT, chat(frequency_penalty=float("-inf")), "frequency_penalty"),
    (CHAT, chat(repetition_penalty=0), "repetition_penalty"),
    (CHAT, chat(min_tokens=-1), "min_tokens"),
    (CHAT, chat(min_tokens=5), "min_tokens"),  # more than max_tokens
    (CHAT, chat(seed=-1), "seed"),
    (CHAT, chat(seed="abc"), "seed"),
    (CHAT, chat(n=2), "n"),
    (CHAT, chat(stream="yes"), "stream"),
    (CHAT, chat(stream=True, stream_options="usage"), "stream_options"),
    (CHAT, chat(stream_options={"include_usage": True}), "stream_options"),  # without stream
    (CHAT, chat(stream=True, stream_options={"include_usage": "yes"}), "include_usage"),
    (CHAT, chat(stop=[1, 2]), "stop"),
    (CHAT, chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    (CHAT, chat(model=5), "model"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (CHAT, chat(tool_choice="auto"), "tool_choice"),
    (CHAT, chat(functions=[{"name": "f", "parameters": {}}]), "functions"),
    (CHAT, chat(function_call="auto"), "function_call"),
    (CHAT, chat(response_format={"type": "json_object"}), "response_format"),
    (CHAT, chat(logprobs=True), "logprobs"),
    (CHAT, chat(top_logprobs=3), "top_logprobs"),
    (CHAT, chat(logit_bias={"50256": -100}), "logit_bias"),
    (CHAT, chat(foo=1), "foo"),  # unknown fields are refused, never dropped (more in test_openai_security.py)
    (CHAT, chat(store=True), "store"),
    (CHAT, chat(min_p=0.1), "min_p"),
    (COMP, comp(messages=HI), "messages"),
    (COMP, comp(ignore_eos="yes"), "ignore_eos"),
    (CHAT, b"{not json", "JSON"),
    (CHAT, b"", "JSON"),
    (CHAT, b"[1, 2]", "object"),
    (CHAT, b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e999}', "temperature"),  # inf
    (COMP, comp(prompt=""), "prompt"),
    (COMP, {"model": "qwen2.5", "max_tokens": 4}, "prompt"),
    (COMP, comp(prompt=[1, 2, 3]), "prompt"),
    (COMP, comp(prompt=["a", "b"]), "prompt"),
    (COMP, comp(prompt="\ud800"), "prompt"),
    (COMP, comp(prompt=LONG), "prompt"),
    (COMP, comp(prompt="hello " * 1000, max_tokens=3500), "max_tokens"),  # prompt + output past max_seq_len
    (COMP, comp(max_tokens=5000), "max_tokens"),
    (COMP, comp(max_tokens=-3), "max_tokens"),
    (COMP, comp(seed=2**64), "seed"),
    (COMP, comp(n=0), "n"),
    (COMP, comp(stream=1), "stream"),
    (COMP, comp(best_of=2), "best_of"),
    (COMP, comp(suffix="!"), "suffix"),
    (COMP, comp(echo=True), "echo"),
    (COMP, comp(logprobs=1), "logprobs"),
    (COMP, comp(logprobs=0), "logprobs"),
    (COMP, comp(temperature=float("nan"), stream=True), "temperature"),
]


def post(proxy: str, route: str, body) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(proxy + route, content=raw, headers={"Content-Type": "application/json"}, timeout=60)


def test_malformed_requests_are_400_naming_the_field(proxy, oai):
    assert len(MALFORMED) >= 30
    for route, body, field in MALFORMED:
        r = post(proxy, route, body)
        case = f"{route} {body if isinstance(body, bytes) else json.dumps(body)[:120]}"
        assert r.status_code == 400, (case, r.status_code, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and set(err) == {"message", "type", "param", "code"}, case
        assert err["param"] == field or field in err["message"], (case, err)
    # after all that, the proxy still serves
    r = oai.chat.completions.create(model="qwen2.5", messages=HI, max_tokens=3)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 3


def test_context_limits_learned_or_given(served_tiny):
    from trtqwen.clients.openai import make_app

    with serve_app(make_app(served_tiny[0], max_seq_len=64, max_input_len=32)) as port:
        url = f"http://127.0.0.1:{port}"
        assert post(url, COMP, comp(max_tokens=100)).json()["error"]["param"] == "max_tokens"
        r = post(url, COMP, comp(prompt="hello " * 40))
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        # no max_tokens: the default shrinks to the room the prompt leaves
        r = post(url, COMP, {"prompt": "hello " * 30, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= 64


def test_chat_and_completions_with_usage(oai):
    r = oai.chat.completions.create(model="qwen2.5", messages=HI, max_tokens=5, temperature=0)
    u = r.usage
    assert r.choices[0].message.content is not None and r.choices[0].finish_reason in ("length", "stop")
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 5
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    r = oai.completions.create(model="qwen2.5", prompt="Hello there", max_tokens=6, temperature=0,
                               presence_penalty=0.5, frequency_penalty=0.5,
                               extra_body={"repetition_penalty": 1.1, "top_k": -1})  # vLLM's extensions
    assert r.choices[0].text and r.usage.prompt_tokens == 2 and r.usage.completion_tokens == 6
    assert r.usage.total_tokens == 8


def test_streams_with_usage(oai):
    stream = oai.chat.completions.create(model="qwen2.5", messages=HI, max_tokens=6, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    u = chunks[-1].usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 6
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    chunks = list(oai.completions.create(model="qwen2.5", prompt="Hello there", max_tokens=6, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    u = chunks[-1].usage
    assert u.prompt_tokens == 2 and u.total_tokens == 2 + u.completion_tokens


def test_ignore_eos_generates_exactly_max_tokens(oai):
    """ignore_eos reaches the runtime as min_tokens = max_tokens with no end-marker stop words."""
    for stream in (False, True):
        r = oai.completions.create(model="qwen2.5", prompt="Hi", max_tokens=40, temperature=1, stream=stream,
                                   stream_options={"include_usage": True} if stream else None,
                                   extra_body={"ignore_eos": True, "user": "tester"})
        if stream:
            chunks = list(r)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert reason == ["length"] and chunks[-1].usage.completion_tokens == 40
        else:
            assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 40


def test_retrieve_model(oai):
    import openai

    assert oai.models.retrieve("qwen2.5").id == "qwen2.5"
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found"


def test_early_stream_error_is_an_http_400(oai):
    import openai

    for kw in ({"max_tokens": 5000}, {"messages": [{"role": "user", "content": LONG}]}):
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(**{"model": "qwen2.5", "messages": HI, "max_tokens": 4, "stream": True, **kw})
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="qwen2.5", prompt="", max_tokens=4, stream=True)
    assert e.value.body["param"] == "prompt"


def test_unknown_model_is_404(oai):
    import openai

    for call in (lambda: oai.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2),
                 lambda: oai.completions.create(model="gpt-4o", prompt="x", max_tokens=2, stream=True)):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_wrong_method_and_route_answer_in_openai_shape(proxy):
    r = httpx.get(proxy + CHAT, timeout=10)
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert r.json()["error"]["code"] == "method_not_allowed" and "detail" not in r.json()
    r = httpx.post(proxy + "/v1/nope", json={}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert "/v1/nope" in r.json()["error"]["message"]


def test_unseeded_sampling_differs_seeded_repeats(oai):
    def texts(**kw) -> set[str]:
        return {oai.completions.create(model="qwen2.5", prompt="Once upon a time", max_tokens=12, temperature=1,
                                       top_p=1, **kw).choices[0].text for _ in range(3)}

    assert len(texts()) >= 2
    assert len(texts(seed=1234)) == 1


class FakeClient:
    """Stands in for TritonLLMClient: `script` is what stream() does (text deltas, then an exception or not)."""
    script: list = []
    model = "ensemble"

    def __init__(self, url, model):
        pass

    def input_name(self, name):
        return name

    def model_config(self, name):
        return {}

    def stream(self, prompt, params, cancel=None):
        from trtqwen.clients.client import Timing

        timing = Timing(start=0.0)
        for step in self.script:
            if isinstance(step, Exception):
                raise step
            timing.output_tokens += 1
            yield step, timing


def test_server_rejections_map_to_400_other_errors_to_500(monkeypatch):
    import openai

    from trtqwen.clients import openai as openai_proxy
    from trtqwen.clients.client import RequestRejected
    from trtqwen.errors import UserError

    monkeypatch.setattr(openai_proxy, "connect", lambda url, model=None, **kw: FakeClient(url, model))
    with serve_app(openai_proxy.make_app("fake:1")) as port:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        FakeClient.script = [RequestRejected("bad request: the prompt has 9 tokens, more than max_input_len 8")]
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(model="qwen2.5", messages=HI, max_tokens=4, stream=stream)
            assert e.value.body["param"] == "messages"
        FakeClient.script = [RequestRejected("bad request: top_k (runtime_top_k) must be ≥ 0 (0: off), got -5")]
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="qwen2.5", prompt="x", max_tokens=4)
        assert e.value.body["param"] == "top_k"
        FakeClient.script = [UserError("server error: the runtime broke")]
        with pytest.raises(openai.InternalServerError):
            c.completions.create(model="qwen2.5", prompt="x", max_tokens=4)
        # once tokens went out, an error is the stream's last event before [DONE]
        FakeClient.script = ["Hel", "lo", UserError("server error: the runtime broke")]
        r = httpx.post(f"http://127.0.0.1:{port}{COMP}", json=comp(stream=True), timeout=30)
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert r.status_code == 200 and events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["type"] == "server_error"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2]) == "Hello"


def test_a_client_that_disconnects_stops_generation_on_the_server(proxy, served_tiny):
    """The proxy talks to tensorrt_llm_bls by default, where a closed stream cancels the generation (an ensemble
    does not pass cancellation on in Triton 2.51): the runtime logs the cancel long before 1,500 tokens."""
    log = served_tiny[2] / "tritonserver.log"
    before = log.read_text(errors="replace").count("cancelled after")
    body = chat(max_tokens=1500, min_tokens=1500, stream=True)
    with httpx.stream("POST", f"{proxy}{CHAT}", json=body, timeout=60) as r:
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: ")
            if chunks >= 3:
                break  # and hang up
    # generous: once the CI machine stalled 15 s here; uncancelled, the 1,500 tokens end without this line
    deadline = time.monotonic() + 60
    while log.read_text(errors="replace").count("cancelled after") == before and time.monotonic() < deadline:
        time.sleep(0.2)
    cancels = re.findall(r"cancelled after (\d+) tokens", log.read_text(errors="replace"))
    assert len(cancels) > before and int(cancels[-1]) < 1500, "the server went on generating"
