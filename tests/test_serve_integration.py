"""A real tritonserver (the nvidia-pytriton binary, on CPU) serving a generated repository with the torch runtime.

The model is the tiny Qwen2 with its transformer layers switched off and a few next-token transitions wired into
its embeddings and lm_head, so greedy decoding follows scripts that end in known places:
  "你好，世界" → the bytes of "中文好。", one byte-level token per UTF-8 byte (every character split over three
               tokens), then <|im_end|>;
  "Say hello"  → "Hello", " world", "!", "Hello", " world", "!", ... (never ends by itself).
Everything else generates whatever the random weights give.
"""

import json
import queue
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import free_ports, infer_input, started_together

from trtqwen.serve import server
from trtqwen.serve.repo import generate_repo
from trtqwen.serve.repo.interface import MODELS
from trtqwen.qwen_tokenizer import EOS_ID

pytestmark = pytest.mark.slow

PROMPT_CJK, ANSWER_CJK = "你好，世界", "中文好。"
PROMPT_EN, LOOP_EN = "Say hello", ["Hello", " world", "!"]
SPEC = dict(model="tiny", precision="bf16", tp=1, gpu="rtx4090d", kv_cache_dtype="auto", max_batch_size=64,
            max_input_len=64, max_seq_len=512, max_num_tokens=256)


# --- the scripted model and its build directory -------------------------------------------------------------------
def scripted_checkpoint(tiny: Path, dst: Path, chains: list[list[int]]) -> None:
    """Copy of `tiny` whose greedy next token after chain[i] is chain[i+1] (layers off: logits see the last token)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    w = load_file(str(tiny / "model.safetensors"))
    for name, t in w.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            t.zero_()
    embed, head = w["model.embed_tokens.weight"], w["lm_head.weight"]
    transitions = [(a, b) for chain in chains for a, b in zip(chain, chain[1:])]
    embed[:, : len(transitions)] = 0  # reserved hidden dims: one per transition, silent for every other token
    cleared = set()
    for dim, (a, b) in enumerate(transitions):
        embed[a] = 0
        embed[a, dim] = 1
        if b not in cleared:
            head[b] = 0
            cleared.add(b)
        head[b, dim] = 10
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})


def make_scripted_build(root: Path) -> Path:
    """A build directory (build.json, checkpoint, tokenizer) around the scripted tiny model."""
    from transformers import AutoTokenizer
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    from trtqwen.build.tiny import make_tiny

    tiny = make_tiny(root / "tiny", preset="tiny")
    tok = AutoTokenizer.from_pretrained(tiny)
    b2u = bytes_to_unicode()
    cjk = [tok.encode(PROMPT_CJK)[-1]] + [tok.convert_tokens_to_ids(b2u[b]) for b in ANSWER_CJK.encode()] + [EOS_ID]
    assert all(len(tok.encode(w)) == 1 for w in LOOP_EN)
    loop = [tok.encode(PROMPT_EN)[-1]] + [tok.encode(w)[0] for w in LOOP_EN]
    loop.append(loop[1])  # "!" → "Hello": round and round
    build = root / "build"
    scripted_checkpoint(tiny, build / "checkpoint", [cjk, loop])
    (build / "tokenizer").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny / name).is_file():
            shutil.copy2(tiny / name, build / "tokenizer" / name)
    (build / "build.json").write_text(json.dumps({
        "spec": SPEC, "plan": {"kv_cache_free_gpu_mem_fraction": 0.9}, "versions": {"tensorrt_llm": None},
        "stages": {"checkpoint": {"dir": "checkpoint"}, "engine": {"status": "pending"}}, "tokenizer_dir": "tokenizer"}))
    return build


@pytest.fixture(scope="module")
def build_dir(module_tmp):
    return make_scripted_build(module_tmp("serve"))


class Served:
    def __init__(self, repo: Path, ports: list[int]):
        self.repo, (self.http, self.grpc, self.metrics) = repo, ports
        self.http_url, self.grpc_url = f"127.0.0.1:{self.http}", f"127.0.0.1:{self.grpc}"


def serve(build: Path, out: Path, streaming: bool, ports: list[int]):
    repo = generate_repo(build, out, runtime="torch", streaming=streaming)
    server.start(repo, list(MODELS), http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], timeout=120,
                 env={"TRTQWEN_PROFILE_DIR": str(out.parent / f"profile_{out.name}")})
    return Served(repo, ports)


@pytest.fixture(scope="module")
def servers(build_dir):
    """Two servers, started and stopped side by side: the streaming package, and one made with streaming off."""
    ports = free_ports(6)  # chosen together, before either server binds: no two servers race for one port
    starts = {name: (lambda name=name, i=i: serve(build_dir, build_dir.parent / f"repo_{name}", name == "stream",
                                                  ports[3 * i : 3 * i + 3]))
              for i, name in enumerate(("stream", "unary"))}
    with started_together(starts, lambda s: server.stop(s.repo)) as started:
        yield started


@pytest.fixture(scope="module")
def srv(servers):
    return servers["stream"]


@pytest.fixture(scope="module")
def srv_unary(servers):
    return servers["unary"]


# --- clients ----------------------------------------------------------------------------------------------------
def request_inputs(prompt, max_tokens, **extra):
    values = {"text_input": np.array([[prompt if isinstance(prompt, bytes) else prompt.encode()]], dtype=object),
              "max_tokens": np.array([[max_tokens]], dtype=np.int32), "stream": np.array([[True]])}
    for k, v in extra.items():
        if k in ("stop_words", "bad_words"):
            values[k] = np.array([[w.encode() for w in v]], dtype=object)
        elif isinstance(v, bool):
            values[k] = np.array([[v]])
        else:
            values[k] = np.array([[v]], dtype=np.int32)
    return values


def grpc_stream(s: Served, model: str, prompt, max_tokens: int, cancel_after: int | None = None, **extra):
    """(text deltas, output token counts, error message or None) of one streamed request."""
    import tritonclient.grpc as grpcclient

    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(s.grpc_url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    tensors = [infer_input(name, arr)
               for name, arr in request_inputs(prompt, max_tokens, return_num_output_tokens=True, **extra).items()]
    deltas, counts, error = [], [], None
    try:
        client.async_stream_infer(model, tensors, enable_empty_final_response=True)
        while True:
            result, err = events.get(timeout=60)
            if err is not None:
                error = err.message() if hasattr(err, "message") else str(err)
                break
            text = result.as_numpy("text_output")
            if text is not None:
                deltas.append(b"".join(text.ravel()).decode("utf-8"))  # strict: a split character would raise
            n = result.as_numpy("num_output_tokens")
            if n is not None:
                counts.append(int(n.ravel()[0]))
            if cancel_after is not None and len(deltas) >= cancel_after:
                break
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    return deltas, counts, error


def http_post(s: Served, path: str, body: dict, timeout: float = 60) -> tuple[int, str]:
    req = urllib.request.Request(f"http://{s.http_url}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8")


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


def ready(s: Served) -> bool:
    try:
        with urllib.request.urlopen(f"http://{s.http_url}/v2/health/ready", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


TEXT_MODELS = ["ensemble", "tensorrt_llm_bls"]


# --- tests ------------------------------------------------------------------------------------------------------
def test_all_five_models_load(srv):
    for m in MODELS:
        with urllib.request.urlopen(f"http://{srv.http_url}/v2/models/{m}/ready", timeout=5) as r:
            assert r.status == 200, m


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_grpc_stream_chinese_is_clean_and_stops_at_im_end(srv, model):
    deltas, counts, error = grpc_stream(srv, model, PROMPT_CJK, 64)
    assert error is None
    assert not any("\ufffd" in d for d in deltas)
    assert [d for d in deltas if d] == list(ANSWER_CJK)  # one whole character per response, none split
    assert "".join(deltas) == ANSWER_CJK  # stopped at <|im_end|> (end_id) long before 64; prompt not echoed
    assert sum(counts) == len(ANSWER_CJK.encode())  # every token delivered: 3 byte-tokens per character


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_generate_stream_sse(srv, model):
    status, body = http_post(srv, f"/v2/models/{model}/generate_stream",
                             {"text_input": PROMPT_CJK, "max_tokens": 64, "stream": True})
    assert status == 200, body
    events = sse_events(body)
    assert events and not any("error" in e for e in events)
    texts = [e.get("text_output", "") for e in events]
    assert "".join(texts) == ANSWER_CJK and not any("\ufffd" in t for t in texts)


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_max_tokens_is_honoured(srv, model):
    deltas, counts, error = grpc_stream(srv, model, PROMPT_EN, 5)
    assert error is None
    assert "".join(deltas) == "Hello world!Hello world" and sum(counts) == 5
    assert not "".join(deltas).startswith(PROMPT_EN)


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_stop_words_and_end_id_stop_generation(srv, model):
    deltas, _, error = grpc_stream(srv, model, PROMPT_EN, 50, stop_words=[" world"])
    assert error is None and "".join(deltas) == "Hello world"  # the stop word ends the output, included
    bang = 0  # the token id of "!" in the Qwen vocabulary
    deltas, _, error = grpc_stream(srv, model, PROMPT_EN, 50, end_id=bang)
    assert error is None and "".join(deltas) == "Hello world"  # end_id is not part of the output


BAD_REQUESTS = [
    ("", 8, "text_input is empty"),
    (PROMPT_EN, -1, "max_tokens must be at least 1"),
    (PROMPT_EN, 100000, "exceeds the sequence limit"),
    ("hello " * 100, 8, "more than max_input_len 64"),
    (b"\xff\xfe bad bytes", 8, "not valid UTF-8"),
]


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_bad_requests_get_clear_errors_and_serving_goes_on(srv, model):
    for prompt, max_tokens, message in BAD_REQUESTS:
        deltas, _, error = grpc_stream(srv, model, prompt, max_tokens)
        assert error is not None and message in error, (prompt[:20], max_tokens, error)
        good, _, err = grpc_stream(srv, model, PROMPT_EN, 3)
        assert err is None and "".join(good) == "Hello world!"
    status, body = http_post(srv, f"/v2/models/{model}/generate_stream", {"text_input": "", "max_tokens": 4, "stream": True})
    assert "text_input is empty" in body
    assert ready(srv)


def test_fifty_concurrent_streams_all_complete(srv):
    n, max_tokens = 50, 12
    expected = "".join(LOOP_EN) * (max_tokens // 3)
    results: list = [None] * n

    def one(i):
        results[i] = grpc_stream(srv, TEXT_MODELS[i % 2], PROMPT_EN, max_tokens)

    t0 = time.time()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    elapsed = time.time() - t0
    for i, (deltas, counts, error) in enumerate(results):
        assert error is None, (i, error)
        assert "".join(deltas) == expected and sum(counts) == max_tokens, i
    assert ready(srv)
    print(f"50 concurrent streams × {max_tokens} tokens: {elapsed:.1f} s")


def profile(s: Served) -> dict:
    time.sleep(0.5)  # the sender rewrites its counters every 0.25 s
    return json.loads((s.repo.parent / f"profile_{s.repo.name}" / "tensorrt_llm_0_0.json").read_text())


def test_responses_carry_what_each_stream_gained(srv):
    """The counters of the stepping and sending threads add up: every token stepped is sent exactly once, and no
    stream gets more responses than tokens (under load several tokens share one); the ensemble has no
    postprocessing hop (its text comes from tensorrt_llm) and still answers whole characters."""
    n, max_tokens = 16, 30
    before = profile(srv)
    results: list = [None] * n
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, grpc_stream(srv, "ensemble", PROMPT_EN, max_tokens)))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    after = profile(srv)
    for deltas, counts, error in results:
        assert error is None and sum(counts) == max_tokens
        assert "".join(deltas) == "".join(LOOP_EN) * (max_tokens // 3) and len(deltas) == len(counts)
    assert after["step_tokens"] - before["step_tokens"] == n * max_tokens
    assert n <= after["sends"] - before["sends"] <= n * (max_tokens + 1)
    ensemble = json.loads(urllib.request.urlopen(f"http://{srv.http_url}/v2/models/ensemble/config").read())
    assert [st["model_name"] for st in ensemble["ensemble_scheduling"]["step"]] == ["preprocessing", "tensorrt_llm"]
    deltas, _, error = grpc_stream(srv, "ensemble", PROMPT_CJK, 50)
    assert error is None and "".join(deltas) == ANSWER_CJK


def test_a_client_that_goes_away_is_cancelled(srv):
    """The BLS sees its client go (is_cancelled) and sends tensorrt_llm a `stop` request for the generation.

    Not tested through the ensemble: Triton 2.51 propagates an ensemble's cancellation only to steps scheduled
    after it (core PR #263), never to the running tensorrt_llm step, and the cancelled ensemble stays in flight.
    """
    model = "tensorrt_llm_bls"
    log = srv.repo / "tritonserver.log"
    before = log.read_text(errors="replace").count("cancelled after")
    deltas, _, error = grpc_stream(srv, model, PROMPT_EN, 400, cancel_after=3)
    assert error is None and len(deltas) >= 3
    deadline = time.time() + 15
    while time.time() < deadline and log.read_text(errors="replace").count("cancelled after") == before:
        time.sleep(0.2)
    assert log.read_text(errors="replace").count("cancelled after") > before, "generation went on for a gone client"
    good, _, err = grpc_stream(srv, model, PROMPT_EN, 3)
    assert err is None and "".join(good) == "Hello world!"


def test_metrics_on_the_metrics_port(srv):
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'nv_inference_request_success{model="ensemble"' in text
    assert 'model="tensorrt_llm"' in text


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_generate_on_a_package_with_streaming_off(srv_unary, model):
    status, body = http_post(srv_unary, f"/v2/models/{model}/generate", {"text_input": PROMPT_CJK, "max_tokens": 64})
    assert status == 200, body
    out = json.loads(body)
    assert "error" not in out and out["text_output"] == ANSWER_CJK
    status, body = http_post(srv_unary, f"/v2/models/{model}/generate",
                             {"text_input": PROMPT_EN, "max_tokens": 3, "exclude_input_in_output": False})
    assert status == 200 and json.loads(body)["text_output"] == PROMPT_EN + "Hello world!"
    status, body = http_post(srv_unary, f"/v2/models/{model}/generate", {"text_input": PROMPT_EN, "max_tokens": -2})
    assert status == 400 and "max_tokens must be at least 1" in json.loads(body)["error"]
