"""OpenAI-compatible HTTP front for the Triton deployment: /v1/models, /v1/chat/completions, /v1/completions.

Streaming answers are server-sent events (`data: {chunk}` … `data: [DONE]`), like OpenAI's. Chat requests are
rendered with Qwen's ChatML template. Requests go to Triton through `TritonLLMClient` (gRPC streams), so any
OpenAI SDK or tool (LangChain, Open WebUI, curl) can talk to the served model.

Errors answer as OpenAI's and vLLM's do: `{"error": {"message", "type", "param", "code"}}`, 400 for the client's
mistakes (naming the field), 401 without the API key, 403 for a foreign Host or Origin, 404 for an unknown model or
route, 503 while Triton is away.

Security defaults (a browser on the same desktop is the threat): a request whose `Host` is not 127.0.0.1, localhost,
[::1], the bind address or an `allowed_hosts` entry is refused (DNS rebinding); one carrying an `Origin` that is not
the server's own nor in `allowed_origins` is refused, preflights included (none by default; CORS is answered for
those allowed). With `api_key` every /v1/ route needs `Authorization: Bearer <key>` (/health stays open), and
`serve_openai` refuses to bind anything but loopback without one.

Fields: each endpoint knows a fixed set of body fields; any other is refused (400 naming it), never dropped.
Implemented extensions, as vLLM takes them: `top_k` (-1 or 0: off), `repetition_penalty` (> 0, 1: off),
`min_tokens`, `ignore_eos` (true: min_tokens = max_tokens and no end-of-text stop; needs a model that takes
min_tokens), `include_stop_str_in_output`, `stream_options.continuous_usage_stats` (usage in every chunk, with
include_usage). Documented no-ops (accepted, change nothing): `user` (a string tag); the "off" values
`skip_special_tokens: true` (always so), `min_p: 0`, `use_beam_search: false`, `length_penalty: 1`, `store: false`,
`metadata: {}` (kept only with store), `service_tier: "auto"` or `"default"`, `modalities: ["text"]`,
`stream_options.include_obfuscation: false`, and null for any field this server knows. Refused unless off/null:
tools, tool_choice, functions, function_call, response_format (but {"type": "text"}), logprobs, top_logprobs,
logit_bias, best_of (but 1), suffix (but ""), echo, audio, prediction, web_search_options, reasoning_effort,
guided_json, and the no-ops' other values.
"""


import hmac
import json
import math
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from trtqwen.clients.client import DEFAULT_MAX_TOKENS, GenerationParams, RequestRejected, TritonLLMClient, chatml, connect
from trtqwen.qwen_tokenizer import ENDOFTEXT, IM_END
from trtqwen.errors import UserError
from trtqwen.serve.process import is_loopback

MAX_STOP = 4
PENALTY = (-2.0, 2.0)  # OpenAI's range for presence_penalty and frequency_penalty
INT32_MAX = 2**31 - 1  # Triton's max_tokens, top_k and min_tokens are INT32 tensors


def _is(value):
    return lambda v: v is None or (v == value and type(v) is type(value))


def _num(value):
    return lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == value)


# Fields we do not implement → (whether a value is the "off" default that asks for nothing, accepted as a no-op;
# why another value is refused).
UNSUPPORTED = {
    "tools": (lambda v: v is None or v == [], "tool calling is not implemented"),
    "tool_choice": (lambda v: v is None or v == "none", "tool calling is not implemented"),
    "functions": (lambda v: v is None or v == [], "function calling is not implemented"),
    "function_call": (lambda v: v is None or v == "none", "function calling is not implemented"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, "only {\"type\": \"text\"} is supported"),
    "logprobs": (lambda v: v is None or v is False, None),  # completions' logprobs=0 still asks for the chosen token's
    "top_logprobs": (_num(0), None),
    "logit_bias": (lambda v: v is None or v == {}, None),
    "best_of": (_num(1), "only best_of=1"),
    "suffix": (_is(""), None),
    "echo": (_is(False), None),
    # vLLM's sampling extensions with an off value
    "min_p": (_num(0), "only 0 (off)"),
    "use_beam_search": (_is(False), "only false: beam search is not implemented"),
    "length_penalty": (_num(1), "it applies to beam search, which is not implemented; only 1 (off)"),
    "skip_special_tokens": (_is(True), "only true: special tokens are always skipped"),
    "guided_json": (lambda v: v is None, "guided decoding is not implemented"),
    # OpenAI's chat fields with an off value
    "modalities": (lambda v: v is None or v == ["text"], "only [\"text\"]"),
    "audio": (lambda v: v is None, "audio output is not implemented"),
    "prediction": (lambda v: v is None, "predicted outputs are not implemented"),
    "web_search_options": (lambda v: v is None, "web search is not implemented"),
    "reasoning_effort": (lambda v: v is None, "only null: the served model does not reason"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "only \"auto\" or \"default\""),
    "store": (_is(False), "only false: completions are not stored"),
    "metadata": (lambda v: v is None or v == {}, "metadata is kept only with 'store': true, and nothing is stored"),
}
# The fields each endpoint knows (UNSUPPORTED's are known and refused unless off); anything else is a 400.
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream", "stream_options",
                 "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user",
                 # vLLM's extensions
                 "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "use_beam_search",
                 "length_penalty", "skip_special_tokens", "include_stop_str_in_output", "guided_json"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
                               "function_call", "response_format", "modalities", "audio", "prediction",
                               "web_search_options", "reasoning_effort", "service_tier", "store", "metadata"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "best_of", "suffix", "echo"}
STREAM_OPTIONS = {"include_usage", "continuous_usage_stats", "include_obfuscation"}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
# Field names a server rejection may mention, to name the field in the 400 (the prompt's names map to the prompt).
REJECTED_FIELDS = ("max_tokens", "min_tokens", "temperature", "top_k", "top_p", "seed", "repetition_penalty",
                   "presence_penalty", "frequency_penalty")
PROMPT_WORDS = re.compile(r"\b(prompt|text_input|input_ids|max_input_len)\b")
# Optional inputs a deployment may not take: the client would drop them silently, so the proxy refuses them.
OPTIONAL_INPUTS = ("seed", "min_tokens", "repetition_penalty", "presence_penalty", "frequency_penalty")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def _number(body: dict, name: str, kind, lo=None, hi=None, default=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and isinstance(v, float)
                                                                   and math.isfinite(v) and not v.is_integer()):
        raise _bad(f"'{name}' must be {'an integer' if kind is int else 'a number'}", name)
    if isinstance(v, float) and not math.isfinite(v):  # Python's json reads NaN, Infinity and 1e999
        raise _bad(f"'{name}' must be a finite number (got {v})", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):  # before converting: 10**400 overflows a float
        rng = f"≥ {lo}" if hi is None else f"between {lo} and {hi}"
        raise _bad(f"'{name}' must be {rng} (got {str(v)[:40]})", name)
    try:
        return kind(v)
    except OverflowError:
        raise _bad(f"'{name}' must be a finite number", name) from None


def _bool(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise _bad(f"'{name}' must be a boolean (got {json.dumps(v)})", name)
    return bool(v)


def max_tokens_field(body: dict) -> str | None:
    """Which of OpenAI's two names the request set its output limit with (None: neither)."""
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            return name
    return None


def refuse_unknown(body: dict, known: set[str], route: str) -> None:
    """Refuse the first field the endpoint does not know: dropping it would answer something else than was asked."""
    for name in body:
        if name not in known:
            raise _bad(f"Unrecognized request argument supplied: '{name}' ({route} does not implement it)", name)


def refuse_unsupported(body: dict) -> None:
    for name, (harmless, why) in UNSUPPORTED.items():
        if name in body and not harmless(body[name]):
            raise _bad(f"'{name}' is not supported by this server" + (f" ({why})" if why else ""), name)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("'user' must be a string", "user")


def stream_options(body: dict, stream: bool) -> tuple[bool, bool]:
    """Validates stream/stream_options; returns (include_usage, continuous_usage_stats)."""
    opts = body.get("stream_options")
    if opts is None:
        return False, False
    if not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    if not stream:
        raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    for name in opts:
        if name not in STREAM_OPTIONS:
            raise _bad(f"Unrecognized stream option: '{name}'", f"stream_options.{name}")
    if _bool(opts, "include_obfuscation"):
        raise _bad("'include_obfuscation' is not supported by this server (only false)",
                   "stream_options.include_obfuscation")
    include, continuous = _bool(opts, "include_usage"), _bool(opts, "continuous_usage_stats")
    if continuous and not include:
        raise _bad("'continuous_usage_stats' needs 'include_usage': true", "stream_options.continuous_usage_stats")
    return include, continuous


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise _bad("'stop' must be a string or a list of strings", "stop")
    stops = [s for s in stops if s]
    if len(stops) > MAX_STOP:
        raise _bad(f"at most {MAX_STOP} stop sequences", "stop")
    return stops


def params_from(body: dict) -> tuple[GenerationParams, list[str]]:
    """OpenAI sampling fields → GenerationParams (+ the user's stop strings, which the proxy also trims)."""
    name = max_tokens_field(body)
    max_tokens = DEFAULT_MAX_TOKENS if name is None else _number(body, name, int, 1, INT32_MAX)
    temperature = _number(body, "temperature", float, 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", float, 0.0, 1.0, None)
    top_k = _number(body, "top_k", int, -1, INT32_MAX, 0)
    seed = _number(body, "seed", int, 0, 2**64 - 1, None)
    if _number(body, "n", int, 1, None, 1) != 1:
        raise _bad("only n=1 is supported", "n")
    min_tokens = _number(body, "min_tokens", int, 0, max_tokens, None)
    repetition = _number(body, "repetition_penalty", float, 0.0, None, None)
    if repetition == 0.0:
        raise _bad("'repetition_penalty' must be > 0 (1: off)", "repetition_penalty")
    stops = _stops(body)
    ends = [] if _bool(body, "ignore_eos") else [IM_END, ENDOFTEXT]  # min_tokens then holds end_id back (prepare)
    p = GenerationParams(max_tokens=max_tokens, seed=seed, min_tokens=min_tokens, repetition_penalty=repetition,
                         presence_penalty=_number(body, "presence_penalty", float, *PENALTY),
                         frequency_penalty=_number(body, "frequency_penalty", float, *PENALTY),
                         stop_words=ends + stops)
    if temperature == 0.0 or top_p == 0.0 or top_k == 1:  # greedy (top_p → 0 keeps only the likeliest token)
        p.temperature, p.top_k, p.top_p = 1.0, 1, 0.0
    else:
        p.temperature, p.top_k = temperature, max(top_k, 0)  # vLLM's -1 is TensorRT-LLM's 0: off
        p.top_p = 1.0 if top_p is None else top_p  # not 0: with top_k 0 that is TensorRT-LLM's greedy
    return p, stops


def _content_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad("only text content parts are supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise _bad("message content must be a string or a list of text parts", f"messages[{i}].content")


def chat_prompt(body: dict) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise _bad("each message needs a role: system, user, assistant or tool", f"messages[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        msgs.append({"role": role, "content": _content_text(m.get("content"), i)})
    return chatml(msgs)


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("'prompt' must be a string (batches of prompts and token ids are not supported)", "prompt")
    if not prompt:
        raise _bad("'prompt' is empty: send some text", "prompt")
    return prompt


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def surrogate_path(v, path: str = "") -> str | None:
    """Where a lone surrogate ("\\ud800": valid JSON, not Unicode, so it cannot go to Triton) is; None if nowhere."""
    if isinstance(v, str):
        return None if _encodable(v) else path or "body"
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
        at = f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}" if path else k
        if isinstance(k, str) and not _encodable(k):
            return path or "body"
        found = surrogate_path(x, at)
        if found:
            return found
    return None


def rejected_param(message: str, prompt_param: str) -> str | None:
    """The OpenAI field a server rejection's message names, if any."""
    for name in REJECTED_FIELDS:
        if re.search(rf"\b{name}\b", message):
            return name
    return prompt_param if PROMPT_WORDS.search(message) else None


def _int_param(params: dict, name: str) -> int | None:
    try:
        return int(params.get(name) or "")
    except ValueError:  # absent, or an unfilled ${template} of NVIDIA's repository
        return None


def served_settings(c: TritonLLMClient) -> dict:
    """max_seq_len, max_input_len and tokenizer_dir as the deployment's model configs tell them (None: unknown).

    The torch runtime lists the limits on `tensorrt_llm`; a TensorRT engine keeps them in its config.json, read when
    it lies on this machine; `preprocessing` names its tokenizer."""
    def params(name: str) -> dict:
        return {k: v.get("string_value") for k, v in c.model_config(name).get("parameters", {}).items()}

    trt = params("tensorrt_llm")
    limits = {k: _int_param(trt, k) for k in ("max_seq_len", "max_input_len")}
    engine = Path(trt.get("gpt_model_path") or "/nonexistent") / "config.json"
    if None in limits.values() and engine.is_file():
        build = json.loads(engine.read_text()).get("build_config", {})
        limits = {k: v if v is not None else build.get(k) for k, v in limits.items()}
    tok = params("preprocessing").get("tokenizer_dir")
    return {**limits, "tokenizer_dir": tok if tok and (Path(tok) / "tokenizer.json").is_file() else None}


class StopTrimmer:
    """Cuts streamed text at the first stop string (Qwen's end markers or the user's), holding back a possible prefix.

    `ends`: also stop at Qwen's end markers (not under ignore_eos); `include`: keep the user's stop string that
    matched (vLLM's include_stop_str_in_output)."""

    def __init__(self, stops: list[str], ends: bool = True, include: bool = False):
        self.user = list(stops)
        self.stops = ([IM_END, ENDOFTEXT] if ends else []) + self.user
        self.include = include
        self.buf = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.buf += delta
        hits = sorted((i, -len(s), s) for s in self.stops if (i := self.buf.find(s)) >= 0)
        if hits:
            i, _, s = hits[0]
            cut = i + len(s) if self.include and s in self.user else i
            out, self.buf, self.stopped = self.buf[:cut], "", True
            return out
        hold = 0
        for s in self.stops:  # longest suffix of buf that is a prefix of a stop string
            for k in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out, self.buf = self.buf[: len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        return out

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out


@dataclass
class Job:
    """One validated request, ready for Triton."""
    prompt: str
    params: GenerationParams
    stops: list[str]
    chat: bool
    include_usage: bool = False
    continuous_usage: bool = False  # usage in every chunk (vLLM's stream_options.continuous_usage_stats)
    ignore_eos: bool = False
    include_stop: bool = False  # vLLM's include_stop_str_in_output

    @property
    def prompt_param(self) -> str:
        return "messages" if self.chat else "prompt"


def host_name(host: str) -> str:
    """A Host header (or an allowed host) without its port, lowercased: 'LocalHost:9000' → 'localhost',
    '[::1]:9000' and '::1' → '[::1]'."""
    h = host.strip().lower()
    if h.startswith("["):
        end = h.find("]")
        return h[: end + 1] if end > 0 else h
    if h.count(":") > 1:  # a bare IPv6 address
        return f"[{h}]"
    return h.rsplit(":", 1)[0] if ":" in h else h


def _origin(origin: str) -> str:
    return origin.strip().lower().rstrip("/")


class _Gate:
    """Pure ASGI middleware (streams and disconnects pass untouched) answering `check(scope)`'s APIError, if any."""

    def __init__(self, app, check):
        self.app, self.check = app, check

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            err = self.check(scope)
            if err is not None:
                from starlette.responses import JSONResponse

                await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


def browser_guard(allowed_origins=(), allowed_hosts=()):
    """check(scope) → the 403 for a request a foreign page's browser could have sent, else None.

    Host must be a loopback name or one of `allowed_hosts` ("*": any), so a DNS-rebound name cannot reach us;
    an Origin, when sent, must be this server's own (its scheme and validated Host) or one of `allowed_origins`
    ("*": any). Tools (curl, SDKs) send no Origin."""
    hosts = {host_name(h) for h in chain(LOOPBACK_NAMES, allowed_hosts) if h and h.strip()}
    origins = {_origin(o) for o in allowed_origins if o and o.strip()}

    def check(scope) -> APIError | None:
        host = _header(scope, b"host")
        if "*" not in hosts and (host is None or host_name(host) not in hosts):
            return APIError(403, f"Host {host!r} is not allowed (DNS rebinding protection): use http://127.0.0.1, or "
                            "start the proxy with --allowed-host NAME for the name clients use", "permission_error",
                            code="host_not_allowed")
        origin = _header(scope, b"origin")
        if origin is None or "*" in origins or _origin(origin) in origins:
            return None
        if host and _origin(origin) in (f"http://{host.lower()}", f"https://{host.lower()}"):  # a page we served
            return None
        return APIError(403, f"Origin {origin!r} is not allowed: cross-origin requests from web pages are refused "
                        "unless the proxy is started with --allowed-origin ORIGIN", "permission_error",
                        code="origin_not_allowed")

    return check


def key_guard(api_key: str):
    """check(scope) → the 401 for a /v1/ request without `Authorization: Bearer <api_key>`, else None."""
    want = api_key.encode()

    def check(scope) -> APIError | None:
        path = scope.get("path", "")
        if path != "/v1" and not path.startswith("/v1/"):
            return None  # /health stays open
        scheme, _, given = (_header(scope, b"authorization") or "").strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), want):
            return None
        return APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                        "invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check


def make_app(triton_url: str, model: str | None = None, served_model_name: str = "qwen2.5", tokenizer_dir=None,
             max_seq_len: int | None = None, max_input_len: int | None = None, api_key: str | None = None,
             allowed_origins=(), allowed_hosts=()):
    """The FastAPI app.

    `tokenizer_dir` (the build's tokenizer/) lets usage count prompt tokens and lets the proxy refuse prompts past
    the context before sending them; `max_seq_len` / `max_input_len` are the served limits (prompt + output, prompt).
    Any of them left out is learned from the deployment's model configs on first contact (`served_settings`).
    `api_key`: every /v1/ route needs `Authorization: Bearer <api_key>`. `allowed_hosts`: Host names accepted besides
    127.0.0.1, localhost and [::1] ("*": any). `allowed_origins`: web origins whose pages may call the API, answered
    with CORS headers ("*": any); any other Origin is refused (403)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from trtqwen.clients.bench import load_tokenizer

    app = FastAPI(title="trtqwen OpenAI-compatible API")
    # The last added runs first: Host and Origin (403), then CORS for allowed origins, then the API key (401).
    if api_key:
        app.add_middleware(_Gate, check=key_guard(api_key))
    origins = [_origin(o) for o in allowed_origins if o and o.strip()]
    if origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=["*"] if "*" in origins else origins,
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["*"], max_age=600)
    app.add_middleware(_Gate, check=browser_guard(origins, allowed_hosts))
    state = {"client": None, "tokenizer": load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None,
             "max_seq_len": max_seq_len, "max_input_len": max_input_len}
    lock = threading.Lock()
    created = int(time.time())

    def learn(c: TritonLLMClient) -> None:
        """Fills in what make_app was not told from the deployment's configs."""
        found = served_settings(c)
        for k in ("max_seq_len", "max_input_len"):
            state[k] = state[k] if state[k] is not None else found[k]
        if state["tokenizer"] is None and found["tokenizer_dir"]:
            try:
                state["tokenizer"] = load_tokenizer(found["tokenizer_dir"])
            except UserError:
                pass  # counts then come from the server, where it reports them

    def client():
        with lock:
            if state["client"] is None:
                try:
                    c = connect(triton_url, model)
                except UserError as e:
                    raise APIError(503, f"the model server is unavailable: {e.message}", "server_error",
                                   code="service_unavailable") from None
                learn(c)
                state["client"] = c
            return state["client"]

    def prompt_tokens(prompt: str) -> int | None:
        tok = state["tokenizer"]
        return len(tok.encode(prompt, add_special_tokens=False)) if tok is not None else None

    def check_model(body: dict):
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            raise _bad("'model' must be a string", "model")
        if name not in (None, served_model_name):  # as OpenAI and vLLM answer: never echo a model we do not serve
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{served_model_name}'",
                           "invalid_request_error", "model", "model_not_found")

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # unknown routes, wrong methods: OpenAI's shape
        what = {404: ("Invalid URL", "not_found"), 405: ("Method not allowed", "method_not_allowed")}
        text, code = what.get(exc.status_code, (str(exc.detail), None))
        err = APIError(exc.status_code, f"{text} ({request.method} {request.url.path})", code=code,
                       headers=getattr(exc, "headers", None))
        return await api_error(request, err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return await api_error(request, _bad(first.get("msg", "invalid request"), param))

    async def read_json(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise _bad("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        where = surrogate_path(body)
        if where:
            raise _bad(f"'{where}' holds a lone UTF-16 surrogate: send valid Unicode text", where)
        return body

    def fit_context(job: Job, body: dict) -> None:
        """Refuse (as vLLM does) what cannot fit the served context; a default max_tokens shrinks to fit instead."""
        seq, inp, name = state["max_seq_len"], state["max_input_len"], max_tokens_field(body)
        p = job.params
        if seq is not None and name is not None and p.max_tokens > seq:
            raise _bad(f"'{name}' is {p.max_tokens}, more than this model's context of {seq} tokens", name,
                       "context_length_exceeded")
        n = prompt_tokens(job.prompt)
        if n is None:
            return  # the server checks the prompt itself
        if (inp is not None and n > inp) or (seq is not None and n >= seq):
            raise _bad(f"the prompt has {n} tokens, more than this model's {min(x for x in (inp, seq) if x)} "
                       "prompt-token limit: shorten it", job.prompt_param, "context_length_exceeded")
        if seq is not None and n + p.max_tokens > seq:
            if name is not None:
                raise _bad(f"this model's context is {seq} tokens, you asked for {n + p.max_tokens} ({n} in the "
                           f"prompt, {p.max_tokens} in the completion): ask for fewer tokens or shorten the prompt",
                           name, "context_length_exceeded")
            p.max_tokens = seq - n

    def check_inputs(c: TritonLLMClient, body: dict) -> None:
        for name in OPTIONAL_INPUTS:
            if body.get(name) is not None and c.input_name(name) is None:
                raise _bad(f"'{name}' is not supported by the served model ({c.model})", name)

    def run(job: Job, cancel: threading.Event):
        """Yields (text delta, timing) from Triton, trimmed at stop strings; raises APIError on failure."""
        c = client()
        trim = StopTrimmer(job.stops, ends=not job.ignore_eos, include=job.include_stop)
        timing = None
        try:
            for delta, timing in c.stream(job.prompt, job.params, cancel=cancel):
                out = trim.feed(delta)
                if out:
                    yield out, timing
                if trim.stopped:
                    break
            tail = trim.flush()
            if tail:
                yield tail, timing
        except RequestRejected as e:  # the server found the request invalid: the client's mistake
            raise _bad(e.message, rejected_param(e.message, job.prompt_param)) from None
        except UserError as e:
            raise APIError(500, e.message, "server_error") from None
        except Exception as e:  # noqa: BLE001 - transport failure mid-request: the server went away
            with lock:
                state["client"] = None  # reconnect (and re-check) next time
            raise APIError(503, f"the model server is unavailable ({type(e).__name__})", "server_error",
                           code="service_unavailable") from None
        yield "", timing  # the final timing (possibly None: no tokens at all)

    def usage(job: Job, timing, completion: int | None = None) -> dict:
        pt = prompt_tokens(job.prompt)
        if pt is None:
            pt = getattr(timing, "input_tokens", None) or 0  # the server's count, where the client reports it
        ct = completion if completion is not None else timing.output_tokens if timing is not None else 0
        return {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}

    def finish_reason(timing, params: GenerationParams) -> str:
        return "length" if timing is not None and timing.output_tokens >= params.max_tokens else "stop"

    def generate(job: Job):
        rid = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex[:24]
        pieces, timing = [], None
        for delta, timing in run(job, threading.Event()):
            pieces.append(delta)
        text = "".join(pieces)
        reason = finish_reason(timing, job.params)
        if job.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return {"id": rid, "object": "chat.completion" if job.chat else "text_completion",
                "created": int(time.time()), "model": served_model_name, "choices": [choice],
                "usage": usage(job, timing)}

    def sse(job: Job):
        rid = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion.chunk" if job.chat else "text_completion"
        cancel = threading.Event()
        tokens = run(job, cancel)
        try:
            first = next(tokens)  # a refusal known before the first token is an HTTP error, not a 200 stream
        except APIError:
            cancel.set()
            raise

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        def chunk(delta: str | None, reason: str | None, role: bool = False, timing=None) -> str:
            if job.chat:
                d = {"role": "assistant", "content": ""} if role else {} if delta is None else {"content": delta}
                choice = {"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
            c = {"id": rid, "object": obj, "created": int(time.time()), "model": served_model_name}
            use = None
            if job.continuous_usage:  # the tokens so far (vLLM's continuous_usage_stats)
                use = usage(job, first[1] if role else timing, 0 if role else None)
            return event({**c, "choices": [choice], **({"usage": use} if job.include_usage else {})})

        def events():
            timing = None
            try:
                if job.chat:
                    yield chunk(None, None, role=True)
                for delta, timing in chain([first], tokens):
                    if delta:
                        yield chunk(delta, None, timing=timing)
                yield chunk(None if job.chat else "", finish_reason(timing, job.params), timing=timing)
                if job.include_usage:
                    yield event({"id": rid, "object": obj, "created": int(time.time()), "model": served_model_name,
                                 "choices": [], "usage": usage(job, timing)})
            except APIError as e:  # after tokens went out the status is sent: the error is the stream's last event
                yield event(e.body())
            finally:
                cancel.set()  # the client went away or we are done: stop generating on the server
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def model_card() -> dict:
        return {"id": served_model_name, "object": "model", "created": created, "owned_by": "trtqwen"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    def retrieve_model(model_id: str):
        if model_id != served_model_name:
            raise APIError(404, f"The model '{model_id}' does not exist; this server serves '{served_model_name}'",
                           "invalid_request_error", "model", "model_not_found")
        return model_card()

    @app.get("/health")
    def health():
        try:
            ok = client().ready()
        except APIError:
            ok = False
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    def prepare(body: dict, chat: bool) -> Job:
        """Everything checkable is checked here, before Triton is asked (400s first, then 503 if it is away)."""
        check_model(body)
        refuse_unknown(body, CHAT_FIELDS if chat else COMPLETION_FIELDS,
                       "/v1/chat/completions" if chat else "/v1/completions")
        refuse_unsupported(body)
        stream = _bool(body, "stream")
        include_usage, continuous = stream_options(body, stream)
        prompt = chat_prompt(body) if chat else completion_prompt(body)
        params, stops = params_from(body)
        job = Job(prompt, params, stops, chat, include_usage, continuous, _bool(body, "ignore_eos"),
                  _bool(body, "include_stop_str_in_output"))
        c = client()
        check_inputs(c, body)
        if job.ignore_eos and c.input_name("min_tokens") is None:
            raise _bad(f"'ignore_eos' needs min_tokens, which the served model ({c.model}) does not take",
                       "ignore_eos")
        fit_context(job, body)
        p = job.params
        if job.ignore_eos:
            p.min_tokens = p.max_tokens  # end_id held back to the last token; Qwen's end markers are no stop words
        elif p.min_tokens is not None:
            p.min_tokens = min(p.min_tokens, p.max_tokens)  # a default max_tokens may have shrunk to fit
        return job

    async def handle(request: Request, chat: bool):
        from starlette.concurrency import run_in_threadpool

        body = await read_json(request)
        job = await run_in_threadpool(prepare, body, chat)
        return await run_in_threadpool(sse if body.get("stream") else generate, job)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    return app


def serve_openai(triton_url: str, host: str = "127.0.0.1", port: int = 9000, model: str = "ensemble",
                 served_model_name: str = "qwen2.5", tokenizer_dir=None, log_level: str = "info",
                 max_seq_len: int | None = None, max_input_len: int | None = None, api_key: str | None = None,
                 allowed_origins=(), allowed_hosts=()) -> None:
    """Run the proxy with uvicorn until Ctrl-C.

    `api_key` None takes $TRTQWEN_API_KEY; binding anything but loopback without a key is refused. The bind host
    itself is an allowed Host (unless it is a wildcard such as 0.0.0.0: then name the others with allowed_hosts)."""
    import uvicorn

    api_key = (api_key if api_key is not None else os.environ.get("TRTQWEN_API_KEY")) or None
    if not is_loopback(host) and api_key is None:
        raise UserError(f"refusing to serve the OpenAI API on {host or 'every address'} without an API key: anyone "
                        "who can reach it could use the model",
                        "pass --api-key KEY (or set TRTQWEN_API_KEY) and send 'Authorization: Bearer KEY', "
                        "or bind 127.0.0.1")
    wildcard = host.strip().strip("[]") in ("", "0.0.0.0", "::")
    hosts = tuple(allowed_hosts) + (() if wildcard else (host,))
    app = make_app(triton_url, model, served_model_name, tokenizer_dir, max_seq_len, max_input_len, api_key,
                   tuple(allowed_origins), hosts)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
