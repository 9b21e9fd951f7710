"""OpenAI-compatible HTTP front for the Triton deployment: /v1/models, /v1/chat/completions, /v1/completions.

Streaming answers are server-sent events (`data: {chunk}` … `data: [DONE]`), like OpenAI's. Chat requests are
rendered with Qwen's ChatML template. Requests go to Triton through `TritonLLMClient` (gRPC streams), so any
OpenAI SDK or tool (LangChain, Open WebUI, curl) can talk to the served model.
"""


import json
import threading
import time
import uuid

from trtqwen.client import ENDOFTEXT, IM_END, GenerationParams, TritonLLMClient, chatml
from trtqwen.errors import UserError

DEFAULT_MAX_TOKENS = 256
MAX_STOP = 4


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


def _number(body: dict, name: str, kind, lo=None, hi=None, default=None):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise _bad(f"'{name}' must be {'an integer' if kind is int else 'a number'}", name)
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"≥ {lo}" if hi is None else f"between {lo} and {hi}"
        raise _bad(f"'{name}' must be {rng} (got {v})", name)
    return v


def params_from(body: dict) -> tuple[GenerationParams, list[str]]:
    """OpenAI sampling fields → GenerationParams (+ the user's stop strings, which the proxy also trims)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    else:
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = _number({name: max_tokens}, name, int, lo=1)
    temperature = _number(body, "temperature", float, 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", float, 0.0, 1.0, None)
    seed = _number(body, "seed", int, 0, 2**64 - 1, None)
    n = _number(body, "n", int, 1, None, 1)
    if n != 1:
        raise _bad("only n=1 is supported", "n")
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
    p = GenerationParams(max_tokens=max_tokens, seed=seed, stop_words=[IM_END, ENDOFTEXT] + stops)
    if temperature == 0.0:  # greedy
        p.temperature, p.top_k, p.top_p = 1.0, 1, 0.0
    else:
        p.temperature = temperature
        p.top_p = 0.0 if top_p is None or top_p >= 1.0 else top_p
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
        raise _bad("'prompt' must be a string (batches of prompts are not supported)", "prompt")
    if body.get("echo"):
        raise _bad("'echo' is not supported", "echo")
    return prompt


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


def make_app(triton_url: str, model: str = "ensemble", served_model_name: str = "qwen2.5", tokenizer_dir=None):
    """The FastAPI app. `tokenizer_dir` (the build's tokenizer/) lets usage report prompt_tokens exactly."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse


    app = FastAPI(title="trtqwen OpenAI-compatible API")
    state = {"client": None, "tokenizer": None}
    lock = threading.Lock()
    created = int(time.time())

    if tokenizer_dir is not None:
        from trtqwen.bench import load_tokenizer

        state["tokenizer"] = load_tokenizer(tokenizer_dir)

    def client():
        with lock:
            if state["client"] is None:
                try:
                    state["client"] = TritonLLMClient(triton_url, model)
                except UserError as e:
                    raise APIError(503, f"the model server is unavailable: {e.message}", "server_error",
                                   code="service_unavailable") from None
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
        return JSONResponse(exc.body(), status_code=exc.status)

    async def read_json(request: Request) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise _bad("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        return body

    def run(prompt: str, params: GenerationParams, stops: list[str], cancel: threading.Event):
        """Yields (text delta, timing) from Triton, trimmed at stop strings; raises APIError on failure."""
        c = client()
        trim = StopTrimmer(stops)
        timing = None
        try:
            for delta, timing in c.stream(prompt, params, cancel=cancel):
                out = trim.feed(delta)
                if out:
                    yield out, timing
                if trim.stopped:
                    break
            tail = trim.flush()
            if tail:
                yield tail, timing
        except UserError as e:
            raise APIError(500, e.message, "server_error") from None
        except Exception as e:  # noqa: BLE001 - transport failure mid-request: the server went away
            with lock:
                state["client"] = None  # reconnect (and re-check) next time
            raise APIError(503, f"the model server is unavailable ({type(e).__name__})", "server_error",
                           code="service_unavailable") from None
        yield "", timing  # the final timing (possibly None: no tokens at all)

    def usage(prompt: str, timing) -> dict:
        pt = prompt_tokens(prompt)
        ct = timing.output_tokens if timing is not None else 0
        u = {"completion_tokens": ct}
        if pt is not None:
            u["prompt_tokens"] = pt
            u["total_tokens"] = pt + ct
        return u

    def finish_reason(timing, params: GenerationParams) -> str:
        return "length" if timing is not None and timing.output_tokens >= params.max_tokens else "stop"

    def generate(prompt, params, stops, chat: bool, body: dict):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        cancel = threading.Event()
        pieces, timing = [], None
        for delta, timing in run(prompt, params, stops, cancel):
            pieces.append(delta)
        text = "".join(pieces)
        reason = finish_reason(timing, params)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": served_model_name, "choices": [choice], "usage": usage(prompt, timing)}

    def sse(prompt, params, stops, chat: bool, body: dict):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion.chunk" if chat else "text_completion"
        name = served_model_name
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        cancel = threading.Event()
        client()  # fail with a 503 before the stream starts if Triton is down

        def chunk(delta: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                d = {} if delta is None else {"content": delta}
                if role:
                    d = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
            c = {"id": rid, "object": obj, "created": int(time.time()), "model": name, "choices": [choice]}
            if include_usage:
                c["usage"] = None
            return f"data: {json.dumps(c)}\n\n"

        def events():
            timing = None
            try:
                if chat:
                    yield chunk(None, None, role=True)
                for delta, timing in run(prompt, params, stops, cancel):
                    if delta:
                        yield chunk(delta, None)
                yield chunk(None if chat else "", finish_reason(timing, params))
                if include_usage:
                    yield "data: " + json.dumps({"id": rid, "object": obj, "created": int(time.time()), "model": name,
                                                 "choices": [], "usage": usage(prompt, timing)}) + "\n\n"
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
                yield "data: [DONE]\n\n"
            else:
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()  # the client went away or we are done: stop generating on the server

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

    async def handle(request: Request, chat: bool):
        from starlette.concurrency import run_in_threadpool

        body = await read_json(request)
        check_model(body)
        prompt = chat_prompt(body) if chat else completion_prompt(body)
        params, stops = params_from(body)
        if body.get("stream"):
            return await run_in_threadpool(sse, prompt, params, stops, chat, body)
        return await run_in_threadpool(generate, prompt, params, stops, chat, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    return app


def serve_openai(triton_url: str, host: str = "127.0.0.1", port: int = 9000, model: str = "ensemble",
                 served_model_name: str = "qwen2.5", tokenizer_dir=None, log_level: str = "info") -> None:
    """Run the proxy with uvicorn until Ctrl-C."""
    import uvicorn

    uvicorn.run(make_app(triton_url, model, served_model_name, tokenizer_dir), host=host, port=port, log_level=log_level)
