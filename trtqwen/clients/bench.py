"""Load benchmark for a served Qwen2.5: a concurrency sweep of fixed-shape requests over the streaming client
(Triton's gRPC, `run_bench`) or an OpenAI-compatible endpoint (`run_bench_openai`: streamed /v1/completions).

For each concurrency level N, N worker threads send requests back to back until the level's time is up (or its
request cap is reached). Prompts have an exact token count (made with the served tokenizer and checked by
re-encoding) and every request generates exactly `output_len` tokens (min_tokens = max_tokens, no stop words), so
the levels are comparable. Reported per level: TTFT, TPOT (time per output token after the first), ITL (inter-token
gaps) at p50/p90/p95/p99, output tok/s per user and in total, requests/s, errors, and the server's memory if its
Prometheus metrics report it. Over OpenAI each simulated user is an asyncio task with its own HTTP connection; TTFT
runs from sending the request to the first chunk with text, ITL is the gaps between text chunks (a chunk, like a
Triton response, may carry several tokens) and the tokens are counted by the stream's usage chunk
(`stream_options.include_usage`); `ignore_eos` fixes the output length.
"""

from __future__ import annotations

import csv
import json
import random
import re
import threading
import time
import urllib.request
from pathlib import Path

from trtqwen.errors import UserError

STATS = ("p50", "p90", "p95", "p99", "mean", "min")
MEMORY_METRICS = ("nv_gpu_memory_used_bytes", "nv_cpu_memory_used_bytes")
FALLBACK_WORD = " hello"  # one Qwen token; repeated without a tokenizer (input length then approximate)


# --- prompts --------------------------------------------------------------------------------------------------------
def _word_pool(tok) -> list[str]:
    """Plain ' word' tokens: each encodes to exactly one token and they never merge with their neighbours."""
    words = []
    for piece, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        if piece.startswith("Ġ") and 3 <= len(piece) <= 9 and piece[1:].isascii() and piece[1:].isalpha():
            words.append(" " + piece[1:])
        if len(words) >= 4000:
            break
    return words or [FALLBACK_WORD]


def make_prompt(tok, n_tokens: int, rng: random.Random, pool: list[str] | None = None) -> str:
    """A prompt of exactly `n_tokens` tokens under `tok` (random plain words, checked by re-encoding)."""
    if n_tokens < 1:
        raise UserError(f"input length must be at least 1 token (got {n_tokens})")
    pool = pool or _word_pool(tok)
    words = [rng.choice(pool) for _ in range(n_tokens)]
    for _ in range(50):
        text = "".join(words)
        n = len(tok.encode(text, add_special_tokens=False))
        if n == n_tokens:
            return text
        if n > n_tokens:
            words = words[: max(1, len(words) - (n - n_tokens))]
        else:
            words += [rng.choice(pool) for _ in range(n_tokens - n)]
    text = FALLBACK_WORD * n_tokens  # " hello" × n is n tokens under Qwen's tokenizer
    if len(tok.encode(text, add_special_tokens=False)) != n_tokens:
        raise UserError(f"could not make a prompt of exactly {n_tokens} tokens with this tokenizer")
    return text


class FastTokenizer:
    """tokenizer.json through the `tokenizers` library alone: the two calls prompt-making needs, no transformers."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def get_vocab(self) -> dict[str, int]:
        return self.tok.get_vocab()


def load_tokenizer(tokenizer_dir):
    if tokenizer_dir is None:
        return None
    try:
        return FastTokenizer(Path(tokenizer_dir) / "tokenizer.json")
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot load a tokenizer from {tokenizer_dir} ({type(e).__name__})",
                        "pass the build directory's tokenizer/ folder (the one the server uses)") from None


# --- server metrics -------------------------------------------------------------------------------------------------
def _metrics_url(url: str, http_metrics_url: str | None) -> str | None:
    if http_metrics_url:
        u = http_metrics_url if "://" in http_metrics_url else f"http://{http_metrics_url}"
        return u if u.rstrip("/").endswith("/metrics") else u.rstrip("/") + "/metrics"
    m = re.fullmatch(r"(.+):(\d+)", url)  # Triton's default layout: metrics port = gRPC port + 1
    return f"http://{m.group(1)}:{int(m.group(2)) + 1}/metrics" if m else None


def read_memory(metrics_url: str | None, timeout: float = 2.0) -> dict:
    """{metric: bytes summed over devices} for the memory gauges the server reports; {} if none / unreachable."""
    if not metrics_url:
        return {}
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - memory is a bonus; never fail the benchmark over it
        return {}
    return parse_memory(text)


def parse_memory(text: str) -> dict:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        for name in MEMORY_METRICS:
            if line.startswith(name) and (len(line) == len(name) or line[len(name)] in "{ "):
                try:
                    out[name] = out.get(name, 0.0) + float(line.rsplit(None, 1)[-1])
                except ValueError:
                    pass
    return out


# --- statistics -----------------------------------------------------------------------------------------------------
def summarize(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {k: None for k in STATS}
    a = np.asarray(values, dtype=float)
    stats = {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 95, 99)}
    return stats | {"mean": float(a.mean()), "min": float(a.min())}


# --- the sweep ------------------------------------------------------------------------------------------------------
def _check_args(levels: list[int], input_len: int, output_len: int, duration_s: float, max_requests: int) -> None:
    if not levels:
        raise UserError("no concurrency levels given", "e.g. --concurrency 1,2,4,8")
    if any(c <= 0 for c in levels):
        raise UserError(f"concurrency must be positive (got {levels})", "e.g. --concurrency 1,2,4,8")
    if input_len < 1 or output_len < 1:
        raise UserError(f"input and output lengths must be ≥ 1 (got {input_len}, {output_len})")
    if duration_s <= 0:
        raise UserError(f"duration must be positive (got {duration_s})")
    if max_requests < 1:
        raise UserError(f"max requests per level must be ≥ 1 (got {max_requests})")


def _prompts(tokenizer_dir, input_len: int, n: int, seed: int) -> tuple[list[str], bool]:
    """n prompts of exactly input_len tokens (one approximate prompt without a tokenizer); whether they are exact."""
    tok = load_tokenizer(tokenizer_dir)
    if tok is None:
        return [FALLBACK_WORD * input_len], False
    rng, pool = random.Random(seed), _word_pool(tok)
    return [make_prompt(tok, input_len, rng, pool) for _ in range(n)], True


def _record(start: float, times: list[float], end: float, n: int, n_in: int | None) -> dict:
    """One request's numbers from its send time, the arrival time of each piece of text, its end and token counts."""
    if not times:
        raise UserError("the server returned no tokens")
    tpot = (times[-1] - times[0]) / (n - 1) if n > 1 and len(times) > 1 else None
    tok_s = (n - 1) / max(end - times[0], 1e-9) if n > 1 else None
    return {"ttft": times[0] - start, "tpot": tpot, "gaps": [b - a for a, b in zip(times, times[1:])],
            "output_tokens": n, "input_tokens": n_in, "tok_s": tok_s, "latency": end - start}


def _one_request(client, prompt: str, params) -> dict:
    timing = None
    for _delta, timing in client.stream(prompt, params):
        pass
    if timing is None or timing.first_token is None:
        raise UserError("the server returned no tokens")
    return _record(timing.start, timing.token_times, timing.end, timing.output_tokens, timing.input_tokens)


def _level_result(concurrency: int, records: list[dict], errors: list[str], elapsed: float, cpu_s: float,
                  mem_before: dict, mem_after: dict) -> dict:
    elapsed = max(elapsed, 1e-9)
    out_tokens = [r["output_tokens"] for r in records]
    in_tokens = [r["input_tokens"] for r in records if r.get("input_tokens") is not None]
    total_tokens = sum(out_tokens)
    memory = {k.replace("nv_", "", 1): max(mem_before.get(k, 0), mem_after.get(k, 0))
              for k in MEMORY_METRICS if k in mem_before or k in mem_after}
    return {
        "concurrency": concurrency,
        "requests": len(records),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "elapsed_s": elapsed,
        "requests_per_s": len(records) / elapsed,
        "output_tokens": total_tokens,
        "output_tokens_per_request": {"min": min(out_tokens, default=None), "max": max(out_tokens, default=None),
                                      "mean": (total_tokens / len(out_tokens)) if out_tokens else None},
        "input_tokens_per_request": {"min": min(in_tokens, default=None), "max": max(in_tokens, default=None)},
        "total_tok_s": total_tokens / elapsed,
        "user_tok_s": summarize([r["tok_s"] for r in records if r["tok_s"] is not None]),
        "ttft_s": summarize([r["ttft"] for r in records]),
        "tpot_s": summarize([r["tpot"] for r in records if r["tpot"] is not None]),
        "itl_s": summarize([g for r in records for g in r["gaps"]]),
        "latency_s": summarize([r["latency"] for r in records]),
        # the benchmark's own CPU (all its threads) per second of the level: near the core count, the client may be
        # what limits the numbers
        "client_cpu": cpu_s / elapsed,
        "memory_bytes": memory,
    }


def _run_level(client, prompts: list[str], params, concurrency: int, duration_s: float, max_requests: int,
               metrics_url: str | None) -> dict:
    lock = threading.Lock()
    records: list[dict] = []
    errors: list[str] = []
    issued = [0]
    mem_before = read_memory(metrics_url)
    cpu0, start = time.process_time(), time.perf_counter()
    deadline = start + duration_s

    def worker(wid: int):
        i = wid
        while time.perf_counter() < deadline:
            with lock:
                if issued[0] >= max_requests:
                    return
                issued[0] += 1
            try:
                rec = _one_request(client, prompts[i % len(prompts)], params)
                with lock:
                    records.append(rec)
            except Exception as e:  # noqa: BLE001 - count it, keep loading the server
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
            i += concurrency

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return _level_result(concurrency, records, errors, elapsed, cpu, mem_before, read_memory(metrics_url))


def _meta(url, model, levels, input_len, output_len, exact, duration_s, warmup, max_requests, tokenizer_dir,
          metrics_url, api: str) -> dict:
    return {"url": url, "model": model, "api": api, "concurrency": levels, "input_len": input_len,
            "output_len": output_len, "input_len_exact": exact, "duration_s": duration_s, "warmup": warmup,
            "max_requests_per_level": max_requests, "tokenizer": str(tokenizer_dir) if tokenizer_dir else None,
            "metrics_url": metrics_url, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sampling": "greedy"}


def run_bench(url: str, model: str = "ensemble", concurrency=(1, 2, 4, 8), input_len: int = 128, output_len: int = 64,
              duration_s: float = 20, warmup: int = 2, tokenizer_dir=None, http_metrics_url: str | None = None,
              max_requests_per_level: int = 1000, seed: int = 0, progress=None) -> dict:
    """Sweep `concurrency` levels against a served model over Triton's gRPC; returns the result dict (see
    `write_reports`). `progress`, if given, is called with each level's result as it finishes (for a live table).
    """
    from trtqwen.clients.client import TritonLLMClient, GenerationParams

    levels = [int(c) for c in concurrency]
    _check_args(levels, input_len, output_len, duration_s, max_requests_per_level)
    client = TritonLLMClient(url, model)  # raises the UserError a user should see: unreachable / no such model
    prompts, exact = _prompts(tokenizer_dir, input_len, max(levels) * 4, seed)
    # Exactly output_len tokens: min_tokens holds end_id back, no stop words; greedy (top_k 1) keeps it reproducible.
    params = GenerationParams(max_tokens=output_len, min_tokens=output_len, temperature=1.0, top_k=1, top_p=0.0,
                              stop_words=[])
    if client.input_name("min_tokens") is None:
        params.end_id = -1  # no min_tokens on this deployment: an end id it can never produce keeps the length
    metrics_url = _metrics_url(url, http_metrics_url)

    for i in range(max(0, warmup)):
        try:
            _one_request(client, prompts[i % len(prompts)], params)
        except UserError as e:
            raise UserError(f"warm-up request failed: {e.message}", e.hint) from None

    results = []
    for c in levels:
        level = _run_level(client, prompts, params, c, duration_s, max_requests_per_level, metrics_url)
        results.append(level)
        if progress:
            progress(level)
    return {"meta": _meta(url, model, levels, input_len, output_len, exact, duration_s, warmup, max_requests_per_level,
                          tokenizer_dir, metrics_url, "triton-grpc"),
            "levels": results}


# --- the same sweep over an OpenAI-compatible endpoint ----------------------------------------------------------------
OPENAI_READ_TIMEOUT_S = 300.0  # the longest silence inside a stream (a deep queue's TTFT included)


def openai_base(url: str) -> str:
    """'127.0.0.1:9000', 'http://host:9000' or 'http://host:9000/v1' → 'http://host:9000/v1'."""
    u = url.strip().rstrip("/")
    if not u:
        raise UserError("--openai needs a URL", "e.g. --openai http://127.0.0.1:9000")
    if "://" not in u:
        u = "http://" + u
    return u if u.endswith("/v1") else u + "/v1"


def _http_error(status: int, raw: bytes) -> UserError:
    try:
        err = json.loads(raw)
        msg = err["error"]["message"] if isinstance(err.get("error"), dict) else str(err.get("error") or err)
    except Exception:  # noqa: BLE001 - not OpenAI's error shape: show what came
        msg = raw[:300].decode("utf-8", "replace") or "(empty body)"
    return UserError(f"HTTP {status}: {msg}")


def openai_model(base: str, model: str | None, api_key: str | None, timeout: float = 10.0) -> str:
    """The model to ask for: `model` if /v1/models lists it, else the one it lists when `model` is None."""
    import httpx

    try:
        r = httpx.get(base + "/models", headers=_auth(api_key), timeout=timeout)
    except httpx.HTTPError as e:
        raise UserError(f"cannot reach an OpenAI-compatible server at {base} ({type(e).__name__})",
                        "start one with `trtqwen openai --url <triton>` or pass --openai http://host:port") from None
    if r.status_code == 401:
        raise UserError(f"{base} wants an API key", "pass --api-key KEY (or set TRTQWEN_API_KEY)")
    if r.status_code != 200:
        raise UserError(f"{base}/models answered HTTP {r.status_code}: is this an OpenAI-compatible server?",
                        "pass the proxy's address, e.g. --openai http://127.0.0.1:9000")
    try:
        ids = [m["id"] for m in r.json()["data"]]
    except Exception:  # noqa: BLE001
        raise UserError(f"{base}/models did not answer a model list: is this an OpenAI-compatible server?") from None
    if model is None:
        if len(ids) != 1:
            raise UserError(f"{base} serves {len(ids)} models ({', '.join(ids) or 'none'})", "pass --model NAME")
        return ids[0]
    if model not in ids:
        raise UserError(f"model {model!r} is not served at {base} (it serves {', '.join(ids) or 'none'})",
                        "pass --model with one it serves, or leave it out")
    return model


def _auth(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _openai_request(http, body: dict) -> dict:
    """One streamed completion: TTFT from sending to the first chunk with text, the gaps between text chunks (a
    chunk may carry several tokens, as a Triton response does), tokens counted by the final usage chunk."""
    start = time.perf_counter()
    times: list[float] = []
    usage = None
    end = None
    async with http.stream("POST", "/completions", json=body) as r:
        if r.status_code != 200:
            raise _http_error(r.status_code, await r.aread())
        buf = b""
        async for data in r.aiter_bytes():
            now = time.perf_counter()
            buf += data.replace(b"\r", b"")  # JSON holds no raw CR: \r\n endings become \n
            while (i := buf.find(b"\n\n")) >= 0:
                event, buf = buf[:i], buf[i + 2:]
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        end = now
                        continue
                    obj = json.loads(payload)
                    if "error" in obj:
                        err = obj["error"]
                        raise UserError("error in the stream: " + (err.get("message") if isinstance(err, dict)
                                                                    else str(err)))
                    choices = obj.get("choices")
                    if choices and choices[0].get("text"):
                        times.append(now)
                    if obj.get("usage"):
                        usage = obj["usage"]
    end = end or time.perf_counter()
    n = usage.get("completion_tokens") if usage else None
    rec = _record(start, times, end, n if n is not None else len(times), usage.get("prompt_tokens") if usage else None)
    rec["usage"] = usage is not None
    return rec


def _openai_client(base: str, api_key: str | None):
    import httpx

    # one connection per simulated user, kept alive across its requests: streams never wait for a pooled connection
    return httpx.AsyncClient(base_url=base, headers=_auth(api_key), limits=httpx.Limits(max_connections=1),
                             timeout=httpx.Timeout(OPENAI_READ_TIMEOUT_S, connect=10.0))


async def _openai_level(base: str, api_key: str | None, bodies: list[dict], concurrency: int, duration_s: float,
                        max_requests: int) -> tuple[list[dict], list[str], float, float]:
    import asyncio

    records: list[dict] = []
    errors: list[str] = []
    issued = [0]
    clients = [_openai_client(base, api_key) for _ in range(concurrency)]
    cpu0, start = time.process_time(), time.perf_counter()
    deadline = start + duration_s

    async def worker(wid: int):
        i = wid
        while time.perf_counter() < deadline and issued[0] < max_requests:
            issued[0] += 1  # one event loop: no lock needed
            try:
                records.append(await _openai_request(clients[wid], bodies[i % len(bodies)]))
            except Exception as e:  # noqa: BLE001 - count it, keep loading the server
                errors.append(f"{type(e).__name__}: {e}")
            i += concurrency

    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    finally:
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)
    return records, errors, elapsed, cpu


async def _openai_warmup(base: str, api_key: str | None, bodies: list[dict], n: int) -> None:
    async with _openai_client(base, api_key) as http:
        for i in range(n):
            await _openai_request(http, bodies[i % len(bodies)])


def run_bench_openai(url: str, model: str | None = None, concurrency=(1, 2, 4, 8), input_len: int = 128,
                     output_len: int = 64, duration_s: float = 20, warmup: int = 2, tokenizer_dir=None,
                     http_metrics_url: str | None = None, max_requests_per_level: int = 1000, seed: int = 0,
                     progress=None, api_key: str | None = None) -> dict:
    """`run_bench` against an OpenAI-compatible server (`trtqwen openai`, vLLM, …): streamed /v1/completions, one
    HTTP connection per user, `ignore_eos` + `max_tokens` fixing the output length, usage counting the tokens.

    `model` None: the one /v1/models lists. At least one warm-up request is sent: it checks that the server takes
    `ignore_eos` (a server that refuses it is asked without, and the result's meta says `fixed_output_len: false`).
    Server memory comes only from `http_metrics_url` (Triton's metrics address), when given."""
    import asyncio

    levels = [int(c) for c in concurrency]
    _check_args(levels, input_len, output_len, duration_s, max_requests_per_level)
    base = openai_base(url)
    model = openai_model(base, model, api_key)
    prompts, exact = _prompts(tokenizer_dir, input_len, max(levels) * 4, seed)
    metrics_url = _metrics_url("", http_metrics_url) if http_metrics_url else None

    def bodies(fixed: bool) -> list[dict]:
        extra = {"ignore_eos": True} if fixed else {}  # min_tokens = max_tokens, no end-of-text stop
        return [{"model": model, "prompt": p, "max_tokens": output_len, "temperature": 0, "stream": True,
                 "stream_options": {"include_usage": True}, **extra} for p in prompts]

    def warm(reqs: list[dict]) -> None:
        try:
            asyncio.run(_openai_warmup(base, api_key, reqs, max(1, warmup)))
        except UserError as e:
            raise UserError(f"warm-up request failed: {e.message}", e.hint) from None
        except Exception as e:  # noqa: BLE001 - the transport: the server went away since /v1/models
            raise UserError(f"warm-up request to {base} failed ({type(e).__name__}: {e})") from None

    fixed, reqs = True, bodies(True)
    try:
        warm(reqs)
    except UserError as e:
        if "ignore_eos" not in e.message:
            raise
        fixed, reqs = False, bodies(False)  # a server without it: lengths then end where the model stops
        warm(reqs)

    results = []
    for c in levels:
        mem_before = read_memory(metrics_url)
        records, errors, elapsed, cpu = asyncio.run(_openai_level(base, api_key, reqs, c, duration_s,
                                                                  max_requests_per_level))
        level = _level_result(c, records, errors, elapsed, cpu, mem_before, read_memory(metrics_url))
        level["requests_without_usage"] = sum(1 for r in records if not r["usage"])
        results.append(level)
        if progress:
            progress(level)
    meta = _meta(base, model, levels, input_len, output_len, exact, duration_s, max(1, warmup),
                 max_requests_per_level, tokenizer_dir, metrics_url, "openai-completions")
    return {"meta": meta | {"fixed_output_len": fixed}, "levels": results}


# --- reports --------------------------------------------------------------------------------------------------------
def _ms(x):
    return None if x is None else x * 1000.0


CSV_COLUMNS = ["concurrency", "requests", "errors", "requests_per_s", "total_tok_s", "user_tok_s_p50", "user_tok_s_mean",
               "ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p90", "tpot_ms_p99",
               "itl_ms_p50", "itl_ms_p90", "itl_ms_p99", "output_tokens_per_request", "gpu_memory_used_bytes",
               "cpu_memory_used_bytes", "ttft_ms_p95", "tpot_ms_p95", "itl_ms_p95"]


def flat_row(level: dict) -> dict:
    row = {k: level[k] for k in ("concurrency", "requests", "errors", "requests_per_s", "total_tok_s")}
    row["user_tok_s_p50"] = level["user_tok_s"]["p50"]
    row["user_tok_s_mean"] = level["user_tok_s"]["mean"]
    for metric in ("ttft", "tpot", "itl"):
        for s in ("p50", "p90", "p95", "p99"):
            row[f"{metric}_ms_{s}"] = _ms(level[f"{metric}_s"][s])
    row["output_tokens_per_request"] = level["output_tokens_per_request"]["mean"]
    mem = level.get("memory_bytes", {})
    row["gpu_memory_used_bytes"] = mem.get("gpu_memory_used_bytes")
    row["cpu_memory_used_bytes"] = mem.get("cpu_memory_used_bytes")
    return row


def _fmt(x, digits=1):
    return "–" if x is None else f"{x:.{digits}f}"


def format_table(result: dict) -> str:
    """The table users know: one row per concurrency level."""
    head = ["users", "TTFT p50 ms", "TTFT p95 ms", "TPOT p50 ms", "ITL p95 ms", "tok/s/user", "total tok/s", "req/s",
            "errors"]
    rows = []
    for lv in result["levels"]:
        r = flat_row(lv)
        rows.append([str(r["concurrency"]), _fmt(r["ttft_ms_p50"]), _fmt(r["ttft_ms_p95"]), _fmt(r["tpot_ms_p50"], 2),
                     _fmt(r["itl_ms_p95"], 2), _fmt(r["user_tok_s_p50"]), _fmt(r["total_tok_s"]),
                     _fmt(r["requests_per_s"], 2), str(r["errors"])])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    m = result.get("meta", {})
    api = " (OpenAI /v1/completions, streamed)" if m.get("api") == "openai-completions" else ""
    out_len = "" if m.get("fixed_output_len", True) else " at most (the server refused ignore_eos)"
    title = (f"{m.get('model', '?')} @ {m.get('url', '?')}{api}: {m.get('input_len')} tokens in"
             f"{'' if m.get('input_len_exact', True) else ' (approx.)'}, {m.get('output_len')} out{out_len}")
    out = [title, line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    mems = [(lv["concurrency"], lv.get("memory_bytes", {})) for lv in result["levels"] if lv.get("memory_bytes")]
    if mems:
        c, mem = mems[-1]
        out.append("server memory: " + ", ".join(f"{k.split('_')[0].upper()} {v / 2**30:.2f} GiB" for k, v in mem.items()))
    return "\n".join(out)


def plot(result: dict, path: Path) -> Path:
    """Throughput vs latency (TTFT p50/p90) and per-user speed vs total throughput, one labelled point per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [flat_row(lv) for lv in result["levels"] if lv["requests"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    if rows:
        tot = [r["total_tok_s"] for r in rows]
        p50 = [r["ttft_ms_p50"] for r in rows]
        p90 = [r["ttft_ms_p90"] for r in rows]
        user = [r["user_tok_s_p50"] or 0 for r in rows]
        ax1.plot(tot, p50, "o-", label="TTFT p50")
        ax1.plot(tot, p90, "s--", alpha=0.7, label="TTFT p90")
        ax2.plot(tot, user, "o-", color="tab:green", label="per-user tok/s (p50)")
        for r, x, y, u in zip(rows, tot, p50, user):
            ax1.annotate(f"{r['concurrency']} user{'' if r['concurrency'] == 1 else 's'}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
            ax2.annotate(f"{r['concurrency']} user{'' if r['concurrency'] == 1 else 's'}", (x, u), textcoords="offset points", xytext=(5, 5), fontsize=8)
    else:
        ax1.text(0.5, 0.5, "no successful requests", ha="center", transform=ax1.transAxes)
    ax1.set_xlabel("total output tokens/s")
    ax1.set_ylabel("time to first token (ms)")
    ax1.set_title("latency vs throughput")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xlabel("total output tokens/s")
    ax2.set_ylabel("tokens/s per user")
    ax2.set_title("per-user speed vs throughput")
    ax2.grid(alpha=0.3)
    m = result.get("meta", {})
    fig.suptitle(f"{m.get('model', '')}: {m.get('input_len')} in / {m.get('output_len')} out tokens", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def write_reports(result: dict, out_dir, stem: str = "bench") -> dict:
    """Write <stem>.json, <stem>.csv and <stem>.png into out_dir; returns {"json": path, "csv": path, "png": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=2))
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for lv in result["levels"]:
            w.writerow(flat_row(lv))
    plot(result, paths["png"])
    return paths


def load_result(path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read benchmark result {path} ({type(e).__name__})", "pass a bench.json written by `trtqwen bench`") from None
    if "levels" not in data:
        raise UserError(f"{path} is not a benchmark result (no 'levels')")
    return data


# metric → True when higher is better
COMPARE_METRICS = {"ttft_ms_p50": False, "ttft_ms_p90": False, "tpot_ms_p50": False, "itl_ms_p90": False,
                   "user_tok_s_p50": True, "total_tok_s": True, "requests_per_s": True, "errors": False}


def compare(new: dict, old: dict) -> list[dict]:
    """Per concurrency level present in both: {concurrency, metric, old, new, delta, delta_pct, better}."""
    old_by = {lv["concurrency"]: flat_row(lv) for lv in old["levels"]}
    rows = []
    for lv in new["levels"]:
        n = flat_row(lv)
        o = old_by.get(n["concurrency"])
        if o is None:
            continue
        for metric, higher in COMPARE_METRICS.items():
            a, b = o.get(metric), n.get(metric)
            delta = None if a is None or b is None else b - a
            pct = None if delta is None or not a else 100.0 * delta / abs(a)
            better = None if not delta else (delta > 0) == higher
            rows.append({"concurrency": n["concurrency"], "metric": metric, "old": a, "new": b, "delta": delta,
                         "delta_pct": pct, "better": better})
    return rows


def format_compare(rows: list[dict]) -> str:
    if not rows:
        return "no concurrency level in common with the old result"
    out = [f"{'users':>5}  {'metric':<15} {'old':>10} {'new':>10} {'change':>9}"]
    for r in rows:
        change = "–" if r["delta_pct"] is None else f"{r['delta_pct']:+.1f}%"
        mark = "" if r["better"] is None else (" better" if r["better"] else " worse")
        out.append(f"{r['concurrency']:>5}  {r['metric']:<15} {_fmt(r['old'], 2):>10} {_fmt(r['new'], 2):>10} {change:>9}{mark}")
    return "\n".join(out)
