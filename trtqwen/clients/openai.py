"""OpenAI-compatible HTTP front for the Triton deployment: /v1/models, /v1/chat/completions, /v1/completions.

Streaming answers are server-sent events (`data: {chunk}` … `data: [DONE]`), like OpenAI's. Chat requests are
rendered with Qwen's ChatML template. Requests go to Triton through `TritonLLMClient` (gRPC streams), so any
OpenAI SDK or tool (LangChain, Open WebUI, curl) can talk to the served model.

Errors answer as OpenAI's and vLLM's do: `{"error": {"message", "type", "param", "code"}}`, 400 for the client's
mistakes (naming the field), 404 for an unknown model or route, 503 while Triton is away. Fields this server
cannot honour (tools, logprobs, logit_bias, …) are refused, never ignored. Extensions taken as vLLM takes them:
`top_k` (-1 or 0: off), `repetition_penalty` (> 0, 1: off), `min_tokens`.
"""


import json
import math
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

MAX_STOP = 4
PENALTY = (-2.0, 2.0)  # OpenAI's range for presence_penalty and frequency_penalty
INT32_MAX = 2**31 - 1  # Triton's max_tokens, top_k and min_tokens are INT32 tensors

# Fields we cannot honour → whether a value is the "off" default that asks for nothing (accepted as such).
UNSUPPORTED = {
    "tools": lambda v: v is None or v == [],
    "tool_choice": lambda v: v is None or v == "none",
    "functions": lambda v: v is None or v == [],
    "function_call": lambda v: v is None or v == "none",
    "response_format": lambda v: v is None or v == {"type": "text"},
    "logprobs": lambda v: v is None or v is False,  # completions' logprobs=0 still asks for the chosen token's
    "top_logprobs": lambda v: v is None or (v == 0 and not isinstance(v, bool)),
    "logit_bias": lambda v: v is None or v == {},
    "best_of": lambda v: v is None or (v == 1 and not isinstance(v, bool)),
    "suffix": lambda v: v is None or v == "",
    "echo": lambda v: v is None or v is False,
}
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


def refuse_unsupported(body: dict) -> None:
    for name, harmless in UNSUPPORTED.items():
        if not harmless(body.get(name)):
            raise _bad(f"'{name}' is not supported by this server", name)


def stream_options(body: dict, stream: bool) -> bool:
    """Validates stream/stream_options; returns include_usage."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    if not stream:
        raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    return _bool(opts, "include_usage") if "include_usage" in opts else False


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
    p = GenerationParams(max_tokens=max_tokens, seed=seed, min_tokens=min_tokens, repetition_penalty=repetition,
                         presence_penalty=_number(body, "presence_penalty", float, *PENALTY),
                         frequency_penalty=_number(body, "frequency_penalty", float, *PENALTY),
                         stop_words=[IM_END, ENDOFTEXT] + stops)
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
    """Cuts streamed text at the first stop string (Qwen's end markers or the user's), holding back a possible prefix."""

    def __init__(self, stops: list[str]):
        self.stops = [IM_END, ENDOFTEXT] + list(stops)
        self.buf = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.buf += delta
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf, self.stopped = self.buf[: min(hits)], "", True
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

    @property
    def prompt_param(self) -> str:
        return "messages" if self.chat else "prompt"


def make_app(triton_url: str, model: str | None = None, served_model_name: str = "qwen2.5", tokenizer_dir=None,
             max_seq_len: int | None = None, max_input_len: int | None = None):
    """The FastAPI app.

    `tokenizer_dir` (the build's tokenizer/) lets usage count prompt tokens and lets the proxy refuse prompts past
    the context before sending them; `max_seq_len` / `max_input_len` are the served limits (prompt + output, prompt).
    Any of them left out is learned from the deployment's model configs on first contact (`served_settings`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from trtqwen.clients.bench import load_tokenizer

    app = FastAPI(title="trtqwen OpenAI-compatible API")
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
        trim = StopTrimmer(job.stops)
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

    def usage(job: Job, timing) -> dict:
        pt = prompt_tokens(job.prompt)
        if pt is None:
            pt = getattr(timing, "input_tokens", None) or 0  # the server's count, where the client reports it
        ct = timing.output_tokens if timing is not None else 0
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

        def chunk(delta: str | None, reason: str | None, role: bool = False) -> str:
            if job.chat:
                d = {"role": "assistant", "content": ""} if role else {} if delta is None else {"content": delta}
                choice = {"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
            c = {"id": rid, "object": obj, "created": int(time.time()), "model": served_model_name}
            return event({**c, "choices": [choice], **({"usage": None} if job.include_usage else {})})

        def events():
            timing = None
            try:
                if job.chat:
                    yield chunk(None, None, role=True)
                for delta, timing in chain([first], tokens):
                    if delta:
                        yield chunk(delta, None)
                yield chunk(None if job.chat else "", finish_reason(timing, job.params))
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

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": created,
                                            "owned_by": "trtqwen"}]}

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
        refuse_unsupported(body)
        stream = _bool(body, "stream")
        include_usage = stream_options(body, stream)
        prompt = chat_prompt(body) if chat else completion_prompt(body)
        params, stops = params_from(body)
        job = Job(prompt, params, stops, chat, include_usage)
        check_inputs(client(), body)
        fit_context(job, body)
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
                 max_seq_len: int | None = None, max_input_len: int | None = None) -> None:
    """Run the proxy with uvicorn until Ctrl-C."""
    import uvicorn

    app = make_app(triton_url, model, served_model_name, tokenizer_dir, max_seq_len, max_input_len)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
