"""The OpenAI proxy's guards and field policy, against a stand-in for Triton (every refusal here happens before any
Triton call; tests/test_openai_proxy.py runs the real server).

Browser attacks on a desktop: a foreign page's fetch (Origin) or a DNS-rebound name (Host) is refused before
anything is generated; an API key guards /v1/*; nothing a request asks for is silently dropped.
"""

import json

import httpx
import pytest
from conftest import serve_app

CHAT, COMP = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]
KEY = "sk-test-7d1e"


class Recorder:
    """Stands in for TritonLLMClient; records each generation (prompt, params); `takes` the inputs it has."""
    calls: list = []
    script: list = ["Hel", "lo"]
    takes = {"seed", "min_tokens", "repetition_penalty", "presence_penalty", "frequency_penalty"}
    model = "ensemble"

    def __init__(self, url, model=None, **kw):
        pass

    def input_name(self, name):
        return name if name in self.takes else None

    def model_config(self, name):
        return {}

    def ready(self):
        return True

    def stream(self, prompt, params, cancel=None):
        from trtqwen.clients.client import Timing

        Recorder.calls.append((prompt, params))
        timing = Timing(start=0.0, input_tokens=3)
        for step in self.script:
            timing.output_tokens += 1
            yield step, timing


@pytest.fixture(scope="module")
def patched():
    from trtqwen.clients import openai as openai_proxy

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(openai_proxy, "connect", Recorder)
        yield openai_proxy


@pytest.fixture(autouse=True)
def fresh():
    Recorder.calls, Recorder.script = [], ["Hel", "lo"]
    Recorder.takes = set(Recorder.takes) | {"min_tokens"}


@pytest.fixture(scope="module")
def plain(patched):
    """Defaults: no key, no allowed origin, loopback hosts only."""
    with serve_app(patched.make_app("fake:1")) as port:
        yield port


@pytest.fixture(scope="module")
def keyed(patched):
    """An API key and one allowed origin."""
    with serve_app(patched.make_app("fake:1", api_key=KEY, allowed_origins=["http://localhost:3000"],
                                    allowed_hosts=["llm.lan"])) as port:
        yield port


def url(port: int, path: str) -> str:
    return f"http://127.0.0.1:{port}{path}"


def shape(r: httpx.Response, status: int, code=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    if code:
        assert err["code"] == code, err
    return err


def body(route: str, **kw) -> dict:
    base = {"model": "qwen2.5", "messages": HI} if route == CHAT else {"model": "qwen2.5", "prompt": "Hello"}
    return {**base, "max_tokens": 4, **kw}


# --- browsers ---------------------------------------------------------------------------------------------------

def test_a_foreign_pages_simple_post_is_refused_before_generating(plain):
    """A <form>/fetch with text/plain needs no preflight: the browser sends it anyway, with its Origin."""
    raw = json.dumps(body(COMP)).encode()
    r = httpx.post(url(plain, COMP), content=raw, timeout=10,
                   headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    shape(r, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in r.headers and Recorder.calls == []
    for origin in ("null", "http://localhost:3000", "http://127.0.0.1:1"):  # sandboxed frames, other local ports
        r = httpx.post(url(plain, CHAT), json=body(CHAT), headers={"Origin": origin}, timeout=10)
        shape(r, 403, "origin_not_allowed")
    r = httpx.options(url(plain, COMP), timeout=10, headers={"Origin": "http://evil.example",
                                                             "Access-Control-Request-Method": "POST"})
    shape(r, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in r.headers and Recorder.calls == []
    # tools send no Origin: the same body generates
    r = httpx.post(url(plain, COMP), content=raw, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello" and len(Recorder.calls) == 1
    # a page this server itself served (same origin: scheme and Host) may call it
    r = httpx.get(url(plain, "/v1/models"), headers={"Origin": f"http://127.0.0.1:{plain}"}, timeout=10)
    assert r.status_code == 200


def test_dns_rebinding_host_is_refused(plain, keyed):
    for host in ("evil.example:9000", "evil.example", f"127.0.0.1.nip.io:{plain}", "localhost.evil.example"):
        for path in ("/v1/models", "/health"):
            shape(httpx.get(url(plain, path), headers={"Host": host}, timeout=10), 403, "host_not_allowed")
        r = httpx.post(url(plain, COMP), json=body(COMP), headers={"Host": host}, timeout=10)
        shape(r, 403, "host_not_allowed")
    assert Recorder.calls == []
    for host in (f"127.0.0.1:{plain}", f"localhost:{plain}", "LOCALHOST", f"[::1]:{plain}", "127.0.0.1"):
        assert httpx.get(url(plain, "/v1/models"), headers={"Host": host}, timeout=10).status_code == 200, host
    # allowed_hosts adds names (with or without port)
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(url(keyed, "/v1/models"), headers={"Host": "llm.lan:9000", **auth}, timeout=10).status_code == 200
    assert httpx.get(url(plain, "/v1/models"), headers={"Host": "llm.lan:9000"}, timeout=10).status_code == 403


def test_an_allowed_origin_gets_cors(keyed):
    origin = "http://localhost:3000"
    r = httpx.options(url(keyed, CHAT), timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.post(url(keyed, CHAT), json=body(CHAT), timeout=10,
                   headers={"Origin": origin, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    assert r.json()["choices"][0]["message"]["content"] == "Hello"
    # its page can read a 401 (CORS headers on it); other origins stay refused
    r = httpx.post(url(keyed, CHAT), json=body(CHAT), headers={"Origin": origin}, timeout=10)
    shape(r, 401, "invalid_api_key")
    assert r.headers["access-control-allow-origin"] == origin
    r = httpx.post(url(keyed, CHAT), json=body(CHAT), timeout=10,
                   headers={"Origin": "http://localhost:3001", "Authorization": f"Bearer {KEY}"})
    shape(r, 403, "origin_not_allowed")
    assert len(Recorder.calls) == 1


# --- API key ----------------------------------------------------------------------------------------------------

def test_api_key_guards_v1_but_not_health(keyed):
    import openai

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}, {"Authorization": "Bearer"}):
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/models/qwen2.5"), ("POST", CHAT), ("POST", COMP),
                             ("POST", "/v1/nope")):
            r = httpx.request(method, url(keyed, path), json=body(CHAT if path == CHAT else COMP), headers=headers,
                              timeout=10)
            shape(r, 401, "invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
    assert Recorder.calls == []
    r = httpx.get(url(keyed, "/health"), timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    c = openai.OpenAI(base_url=url(keyed, "/v1"), api_key=KEY, max_retries=0, timeout=10)
    assert [m.id for m in c.models.list()] == ["qwen2.5"]
    assert c.chat.completions.create(model="qwen2.5", messages=HI, max_tokens=4).choices[0].message.content == "Hello"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url(keyed, "/v1"), api_key="nope", max_retries=0).models.list()


def test_serve_openai_refuses_a_public_bind_without_a_key(patched, monkeypatch):
    import uvicorn

    from trtqwen.errors import UserError

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: started.append((app, host)))
    monkeypatch.delenv("TRTQWEN_API_KEY", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.20", "my-box.lan", ""):
        with pytest.raises(UserError) as e:
            patched.serve_openai("fake:1", host, 9000)
        assert "--api-key" in e.value.hint and "127.0.0.1" in e.value.hint
    assert started == []
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        patched.serve_openai("fake:1", host, 9000)
    patched.serve_openai("fake:1", "0.0.0.0", 9000, api_key=KEY)
    monkeypatch.setenv("TRTQWEN_API_KEY", KEY)
    patched.serve_openai("fake:1", "192.168.1.20", 9000)
    assert [h for _, h in started] == ["127.0.0.1", "localhost", "::1", "127.0.0.2", "0.0.0.0", "192.168.1.20"]
    # the bind address is an allowed Host; the key from the environment is enforced
    from starlette.testclient import TestClient

    c = TestClient(started[-1][0], base_url="http://192.168.1.20:9000")
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_cli_openai_options(patched, monkeypatch):
    from typer.testing import CliRunner

    from trtqwen.cli import app

    got = []
    monkeypatch.setattr(patched, "serve_openai", lambda *a, **kw: got.append((a, kw)))
    monkeypatch.delenv("TRTQWEN_API_KEY", raising=False)
    r = CliRunner().invoke(app, ["openai", "--host", "0.0.0.0", "--api-key", KEY, "--allowed-origin", "http://a:1",
                                 "--allowed-origin", "http://b:2", "--allowed-host", "llm.lan"])
    assert r.exit_code == 0, r.output
    assert got[-1][1] == {"api_key": KEY, "allowed_origins": ("http://a:1", "http://b:2"),
                          "allowed_hosts": ("llm.lan",)}
    r = CliRunner().invoke(app, ["openai"], env={"TRTQWEN_API_KEY": "from-env"})
    assert r.exit_code == 0 and got[-1][1]["api_key"] == "from-env"
    monkeypatch.undo()  # the real serve_openai: a public bind without a key is an error, exit 2
    monkeypatch.delenv("TRTQWEN_API_KEY", raising=False)
    r = CliRunner().invoke(app, ["openai", "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "API key" in r.output


# --- /v1/models/{id} --------------------------------------------------------------------------------------------

def test_retrieve_model(plain):
    import openai

    c = openai.OpenAI(base_url=url(plain, "/v1"), api_key="x", max_retries=0, timeout=10)
    m = c.models.retrieve("qwen2.5")
    assert m.id == "qwen2.5" and m.object == "model" and m.owned_by == "trtqwen"
    for name in ("gpt-4o", "Qwen/Qwen2.5-7B-Instruct"):
        err = shape(httpx.get(url(plain, f"/v1/models/{name}"), timeout=10), 404, "model_not_found")
        assert name in err["message"] and err["param"] == "model"


# --- field policy -----------------------------------------------------------------------------------------------

# (route, extra fields, the field a 400 must name, or None: accepted)
FIELDS = [
    # refused outright
    (CHAT, {"foo": 1}, "foo"),
    (CHAT, {"foo": None}, "foo"),
    (COMP, {"foo": 1}, "foo"),
    (CHAT, {"use_beam_search": True}, "use_beam_search"),
    (CHAT, {"min_p": 0.1}, "min_p"),
    (COMP, {"min_p": 0.05}, "min_p"),
    (CHAT, {"guided_json": {"type": "object"}}, "guided_json"),
    (CHAT, {"length_penalty": 0.8}, "length_penalty"),
    (CHAT, {"skip_special_tokens": False}, "skip_special_tokens"),
    (CHAT, {"modalities": ["text", "audio"]}, "modalities"),
    (CHAT, {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    (CHAT, {"prediction": {"type": "content", "content": "Hello"}}, "prediction"),
    (CHAT, {"web_search_options": {}}, "web_search_options"),
    (CHAT, {"reasoning_effort": "low"}, "reasoning_effort"),
    (CHAT, {"service_tier": "flex"}, "service_tier"),
    (CHAT, {"store": True}, "store"),
    (CHAT, {"metadata": {"run": "1"}}, "metadata"),
    (CHAT, {"user": 5}, "user"),
    (CHAT, {"ignore_eos": "yes"}, "ignore_eos"),
    (CHAT, {"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
    (CHAT, {"stream": True, "stream_options": {"continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    (CHAT, {"stream": True, "stream_options": {"include_usage": True, "foo": 1}}, "stream_options.foo"),
    (CHAT, {"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
    # chat's fields are not the legacy endpoint's, and the other way round
    (COMP, {"messages": HI}, "messages"),
    (COMP, {"store": False}, "store"),
    (COMP, {"max_completion_tokens": 4}, "max_completion_tokens"),
    (CHAT, {"prompt": "x"}, "prompt"),
    (CHAT, {"suffix": ""}, "suffix"),
    # documented no-ops: the off values
    (CHAT, {"user": "alice"}, None),
    (COMP, {"user": "alice"}, None),
    (CHAT, {"skip_special_tokens": True}, None),
    (CHAT, {"min_p": 0}, None),
    (CHAT, {"use_beam_search": False}, None),
    (CHAT, {"length_penalty": 1.0}, None),
    (CHAT, {"store": False, "metadata": {}}, None),
    (CHAT, {"service_tier": "auto"}, None),
    (CHAT, {"service_tier": "default"}, None),
    (CHAT, {"modalities": ["text"]}, None),
    (CHAT, {"audio": None, "prediction": None, "web_search_options": None, "reasoning_effort": None}, None),
    (CHAT, {"stream": True, "stream_options": {"include_usage": False, "include_obfuscation": False}}, None),
    (COMP, {"ignore_eos": False, "include_stop_str_in_output": False}, None),
]


def test_every_field_is_implemented_a_documented_no_op_or_refused(plain):
    assert len(FIELDS) >= 40
    for route, extra, field in FIELDS:
        Recorder.calls = []
        r = httpx.post(url(plain, route), json=body(route, **extra), timeout=10)
        case = (route, extra)
        if field is None:
            assert r.status_code == 200, (case, r.text)
            p = Recorder.calls[0][1]  # a no-op changes nothing that is sent
            assert (p.max_tokens, p.min_tokens, p.stop_words[:2]) == (4, None, ["<|im_end|>", "<|endoftext|>"]), case
        else:
            err = shape(r, 400)
            assert err["type"] == "invalid_request_error" and err["param"] == field, (case, err)
            assert field.split(".")[-1] in err["message"], (case, err)
            assert Recorder.calls == [], case


def test_ignore_eos_holds_the_end_back_to_max_tokens(plain):
    for route in (CHAT, COMP):
        Recorder.calls = []
        r = httpx.post(url(plain, route), json=body(route, max_tokens=9, stop="##", ignore_eos=True), timeout=10)
        assert r.status_code == 200, r.text
        p = Recorder.calls[0][1]
        assert p.min_tokens == p.max_tokens == 9 and p.stop_words == ["##"]  # no <|im_end|>/<|endoftext|> stop
    # the end markers no longer cut the text; the user's stop still does
    Recorder.script = ["a<|endoftext|>b", "##c"]
    r = httpx.post(url(plain, COMP), json=body(COMP, stop="##", ignore_eos=True), timeout=10)
    assert r.json()["choices"][0]["text"] == "a<|endoftext|>b"
    r = httpx.post(url(plain, COMP), json=body(COMP, stop="##"), timeout=10)
    assert r.json()["choices"][0]["text"] == "a"
    # a deployment without min_tokens cannot hold end_id back: refused, not ignored
    Recorder.takes = Recorder.takes - {"min_tokens"}
    Recorder.calls = []
    from trtqwen.clients import openai as openai_proxy

    with serve_app(openai_proxy.make_app("fake:2")) as port:
        err = shape(httpx.post(url(port, CHAT), json=body(CHAT, ignore_eos=True), timeout=10), 400)
        assert err["param"] == "ignore_eos" and "min_tokens" in err["message"] and Recorder.calls == []


def test_include_stop_str_in_output(plain):
    Recorder.script = ["Hello EN", "D world"]
    for stream in (False, True):
        texts = {}
        for include in (False, True):
            r = httpx.post(url(plain, COMP), json=body(COMP, stop=["END"], include_stop_str_in_output=include,
                                                       stream=stream), timeout=10)
            if stream:
                events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")][:-1]
                texts[include] = "".join(json.loads(e)["choices"][0]["text"] for e in events)
            else:
                texts[include] = r.json()["choices"][0]["text"]
        assert texts == {False: "Hello ", True: "Hello END"}, stream


def test_continuous_usage_stats(plain):
    Recorder.script = ["a", "b", "c"]
    r = httpx.post(url(plain, CHAT), timeout=10, json=body(CHAT, stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True}))
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == [0, 1, 2, 3, 3, 3]  # role chunk, three deltas, the finish, the usage chunk
    assert all(c["usage"]["prompt_tokens"] == 3 for c in chunks)
    # without it, usage is null until the last chunk (OpenAI's include_usage)
    r = httpx.post(url(plain, CHAT), json=body(CHAT, stream=True, stream_options={"include_usage": True}), timeout=10)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert [c["usage"] is None for c in chunks] == [True] * (len(chunks) - 1) + [False]
