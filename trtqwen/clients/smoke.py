"""`trtqwen smoke`: is this deployment usable? Readiness, answers, streaming, CJK, JSON, stop words, max_tokens,
5 concurrent users against the targets (first token < 1 s, ≥ 20 tok/s each), and bad requests answered with errors.

Works against any tensorrtllm_backend-layout server. With `--no-content` (the tiny random model) it checks the
mechanics only: answers arrive and obey the limits; the wording checks (languages, JSON, arithmetic) are not run. With `--no-targets` (the
reference runtime on a CPU) the concurrent users' speed is reported, not judged: the targets are a GPU's.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from trtqwen.clients.client import GenerationParams, TritonLLMClient, chatml
from trtqwen.errors import UserError

TTFT_TARGET_S = 1.0
TOKS_TARGET = 20.0
USERS = 5


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def _greedy(max_tokens: int, **kw) -> GenerationParams:
    return GenerationParams(max_tokens=max_tokens, top_k=1, **kw)


def _check(name: str, fn) -> Check:
    try:
        ok, detail = fn()
    except UserError as e:
        ok, detail = False, e.message
    except Exception as e:  # noqa: BLE001 - a smoke test reports every failure as a row, never a traceback
        ok, detail = False, f"{type(e).__name__}: {e}"
    return Check(name, bool(ok), detail)


def run_smoke(url: str, model: str = "ensemble", content: bool = True, targets: bool = True) -> list[Check]:
    client = TritonLLMClient(url, model)
    checks = [Check("server and model ready", client.ready(), f"{url}, model {model}")]

    def one_answer():
        r = client.generate(chatml([{"role": "user", "content": "Say hello in one short sentence."}]), _greedy(32))
        return bool(r.text.strip()), f"{r.timing.output_tokens} tokens, first after {r.timing.ttft * 1e3:.0f} ms: {r.text[:60]!r}"

    def streaming():
        chunks = [d for d, _ in client.stream(chatml([{"role": "user", "content": "Count from one to ten."}]), _greedy(24))]
        return len(chunks) >= 2, f"{len(chunks)} streamed chunks"

    def language(prompt: str, script: tuple[int, int], least: int, word: str | None = None):
        def run():
            text = client.generate(chatml([{"role": "user", "content": prompt}]), _greedy(48)).text
            broken = text.count("\ufffd")
            in_script = sum(script[0] <= ord(c) <= script[1] for c in text)
            ok = broken == 0 and in_script >= least and (word is None or word in text)
            return ok, f"{in_script} chars in script, {broken} U+FFFD: {text[:50]!r}"
        return run

    def arithmetic():
        text = client.generate(chatml([{"role": "user", "content": "What is 17 + 25? Answer with the number only."}]),
                               _greedy(16)).text
        return text.strip().rstrip(".") == "42", f"{text.strip()[:40]!r} (want 42)"

    def json_output():
        text = client.generate(chatml([{"role": "user", "content":
                                        'Reply with only a JSON object with keys "city" and "country" for Paris.'}]),
                               _greedy(64)).text
        body = text.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
        try:
            return isinstance(json.loads(body), dict), body[:60]
        except json.JSONDecodeError as e:
            return False, f"not JSON ({e.msg}): {body[:60]!r}"

    def stop_words():
        prompt = chatml([{"role": "user", "content": "List the days of the week."}])
        chunks = [d for d, _ in client.stream(prompt, _greedy(24, stop_words=[]))]  # one chunk per token (ensemble)
        picks = [i for i, c in enumerate(chunks) if i >= 3 and c.strip() and "\ufffd" not in c]
        if not picks:
            return False, f"answer too short to pick a stop word from: {''.join(chunks)!r}"
        i = picks[0]
        word, full = chunks[i], "".join(chunks)
        stopped = client.generate(prompt, _greedy(24, stop_words=[word])).text
        return len(stopped) < len(full) and stopped.startswith("".join(chunks[:i])), \
            f"stop word {word!r}: {len(full)} → {len(stopped)} chars"

    def max_tokens():
        r = client.generate(chatml([{"role": "user", "content": "Write a long story."}]), _greedy(5, stop_words=[]))
        return 1 <= r.timing.output_tokens <= 5, f"asked 5, got {r.timing.output_tokens} tokens"

    def concurrent_users():
        results: list = [None] * USERS

        def user(i):
            results[i] = client.generate(chatml([{"role": "user", "content": f"User {i}: tell me about the sea."}]),
                                         GenerationParams(max_tokens=64, min_tokens=64, top_k=1, stop_words=[]))
        threads = [threading.Thread(target=user, args=(i,)) for i in range(USERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        ttfts = [r.timing.ttft for r in results if r and r.timing.ttft is not None]
        rates = [r.timing.tokens_per_s for r in results if r and r.timing.tokens_per_s]
        answered = len(ttfts) == USERS and len(rates) == USERS
        if not answered:
            return False, f"{USERS - len(rates)} of {USERS} users got no answer"
        met = max(ttfts) < TTFT_TARGET_S and min(rates) >= TOKS_TARGET
        detail = (f"first token max {max(ttfts) * 1e3:.0f} ms (target < {TTFT_TARGET_S * 1e3:.0f}), "
                  f"slowest user {min(rates):.1f} tok/s (target ≥ {TOKS_TARGET:.0f})")
        return met or not targets, detail + ("" if targets else f"; targets {'met' if met else 'not met'}, not judged")

    def bad_requests():
        refused = []
        for label, prompt, params in [("empty text", "", _greedy(8)), ("max_tokens -1", "hi", _greedy(-1))]:
            try:
                client.generate(prompt, params)
                refused.append(f"{label}: accepted")
            except UserError as e:
                refused.append(f"{label}: error ✓ ({e.message[:40]})")
        still = client.ready() and bool(client.generate("hello", _greedy(4)).text)
        return all("✓" in r for r in refused) and still, "; ".join(refused) + ("; server still serving" if still else "; server broke")

    wording = [("English", language("What is the capital of France?", (0x41, 0x7A), 5, "Paris")),
               ("Chinese", language("用一句话介绍北京。", (0x4E00, 0x9FFF), 5)),
               ("Japanese", language("日本の首都はどこですか？", (0x3040, 0x9FFF), 3)),
               ("JSON output", json_output), ("arithmetic", arithmetic)]
    mechanics = [("stop words", stop_words), ("max_tokens honoured", max_tokens),
                 (f"{USERS} concurrent users", concurrent_users), ("bad requests", bad_requests)]
    # a random model's wording says nothing: its answers are only checked to arrive (one answer, streaming)
    for name, fn in [("one answer", one_answer), ("streaming", streaming), *(wording if content else []), *mechanics]:
        checks.append(_check(name, fn))
    return checks


def smoke_table(checks: list[Check], url: str, model: str, content: bool):
    from rich.table import Table

    t = Table(title=f"smoke: {model} at {url}" + ("" if content else " — mechanics only (tiny/random model: wording not judged)"))
    for c in ("check", "result", "numbers / details"):
        t.add_column(c)
    for c in checks:
        t.add_row(c.name, "[green]PASS[/]" if c.passed else "[red]FAIL[/]", c.detail)
    return t
