"""The benchmark and the OpenAI-compatible proxy against a real tritonserver (CPU) serving the tiny model."""

import json
import struct
import time

import pytest
from conftest import free_ports, serve_app

from trtqwen.errors import UserError

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Served:
    def __init__(self, build, repo, ports):
        self.build, self.repo = build, repo
        self.http, self.grpc, self.metrics = ports
        self.url = f"127.0.0.1:{self.grpc}"
        self.metrics_url = f"127.0.0.1:{self.metrics}"
        self.tokenizer = build / "tokenizer"


@pytest.fixture(scope="module")
def served(served_tiny):
    """The session's tiny server (its build beside its repository)."""
    from trtqwen.serve import server

    repo = served_tiny[2]
    state = server.running_server(repo)
    return Served(repo.parent / "build", repo, (state["http_port"], state["grpc_port"], state["metrics_port"]))


# --- bench ----------------------------------------------------------------------------------------------------------
def test_bench_sweep_reports_and_compare(served, tmp_path):
    from trtqwen.clients import bench
    from trtqwen.clients.client import GenerationParams, TritonLLMClient

    t0 = time.time()
    result = bench.run_bench(served.url, concurrency=[1, 2, 4], input_len=32, output_len=12, duration_s=2.5, warmup=2,
                             tokenizer_dir=served.tokenizer, http_metrics_url=served.metrics_url,
                             max_requests_per_level=200)
    assert time.time() - t0 < 60
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 2, 4]
    assert result["meta"]["input_len_exact"]
    for lv in result["levels"]:
        assert lv["errors"] == 0, lv["error_samples"]
        assert lv["requests"] >= lv["concurrency"]
        tokens = lv["output_tokens_per_request"]
        assert tokens["min"] == tokens["max"] == 12  # exactly output_len: min_tokens held end_id back
        for metric in ("ttft_s", "tpot_s", "itl_s"):
            s = lv[metric]
            assert 0 < s["p50"] <= s["p90"] <= s["p99"]
        assert lv["total_tok_s"] > 0 and lv["requests_per_s"] > 0 and lv["user_tok_s"]["p50"] > 0
        assert lv["total_tok_s"] == pytest.approx(lv["output_tokens"] / lv["elapsed_s"])
    # More users → more total throughput than one user alone (a batching server), never a collapse.
    assert result["levels"][-1]["total_tok_s"] > 0.8 * result["levels"][0]["total_tok_s"]
    # Triton on CPU reports its RAM; the bench picks it up from the metrics port.
    assert result["levels"][0]["memory_bytes"].get("cpu_memory_used_bytes", 0) > 0

    # The bench's numbers agree with the client's own timing of a lone request measured right after.
    client = TritonLLMClient(served.url)
    tok = bench.load_tokenizer(served.tokenizer)
    prompt = bench.make_prompt(tok, 32, __import__("random").Random(1))
    assert len(tok.encode(prompt)) == 32
    params = GenerationParams(max_tokens=12, min_tokens=12, stop_words=[], top_k=1)
    ttfts = sorted(client.generate(prompt, params).timing.ttft for _ in range(5))
    direct = ttfts[2]
    lone = result["levels"][0]["ttft_s"]["p50"]
    assert direct / 3 < lone < direct * 3, (lone, direct)

    # Reports: JSON (round-trips), CSV (one row per level), PNG (a real image of a sensible size).
    paths = bench.write_reports(result, tmp_path)
    assert json.loads(paths["json"].read_text())["levels"][0]["concurrency"] == 1
    lines = paths["csv"].read_text().strip().splitlines()
    assert lines[0].startswith("concurrency,") and len(lines) == 4
    png = paths["png"].read_bytes()
    assert png[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 400 and height >= 300 and len(png) > 10_000

    table = bench.format_table(result)
    assert "TTFT p50" in table and "total tok/s" in table and len(table.splitlines()) >= 6

    # --compare old.json: one row per (level, metric) in both, deltas where both are known.
    old = bench.load_result(paths["json"])
    old["levels"] = old["levels"][:2]
    old["levels"][0]["total_tok_s"] /= 2
    rows = bench.compare(result, old)
    assert {r["concurrency"] for r in rows} == {1, 2}
    tot = next(r for r in rows if r["concurrency"] == 1 and r["metric"] == "total_tok_s")
    assert tot["delta_pct"] == pytest.approx(100.0) and tot["better"] is True
    same = next(r for r in rows if r["concurrency"] == 2 and r["metric"] == "ttft_ms_p50")
    assert same["delta"] == 0 and same["better"] is None
    assert "total_tok_s" in bench.format_compare(rows)


def test_bench_rejects_bad_input(served):
    from trtqwen.clients import bench
    with pytest.raises(UserError, match="concurrency"):
        bench.run_bench(served.url, concurrency=[0], duration_s=1)
    with pytest.raises(UserError, match="concurrency"):
        bench.run_bench(served.url, concurrency=[2, -1], duration_s=1)
    with pytest.raises(UserError, match="not served"):
        bench.run_bench(served.url, model="nope", concurrency=[1], duration_s=1)
    with pytest.raises(UserError, match="cannot reach"):
        bench.run_bench("127.0.0.1:19999", concurrency=[1], duration_s=1)


def test_memory_metric_parsing():
    from trtqwen.clients.bench import parse_memory

    text = ('# HELP nv_gpu_memory_used_bytes x\nnv_gpu_memory_used_bytes{gpu_uuid="a"} 1e9\n'
            'nv_gpu_memory_used_bytes{gpu_uuid="b"} 2e9\nnv_gpu_memory_total_bytes{gpu_uuid="a"} 9e9\n'
            'nv_cpu_memory_used_bytes 5\n')
    assert parse_memory(text) == {"nv_gpu_memory_used_bytes": 3e9, "nv_cpu_memory_used_bytes": 5.0}


# --- OpenAI-compatible proxy ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def proxy(served):
    from trtqwen.clients.openai import make_app

    with serve_app(make_app(served.url, tokenizer_dir=served.tokenizer)) as port:
        yield port


@pytest.fixture
def oai(proxy):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{proxy}/v1", api_key="x", max_retries=0, timeout=60)


def test_openai_models_and_streamed_chat(oai):
    assert [m.id for m in oai.models.list()] == ["qwen2.5"]
    stream = oai.chat.completions.create(model="qwen2.5", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2 and "".join(deltas)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["length"], ["stop"])
    assert chunks[-1].usage.completion_tokens <= 8 and chunks[-1].usage.prompt_tokens > 0


def test_openai_completion_with_usage_and_stop(oai):
    r = oai.completions.create(model="qwen2.5", prompt="Hello there", max_tokens=10, temperature=0, seed=1)
    assert r.choices[0].text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens == 2 and r.usage.total_tokens == 12
    # stop (a list or a string) cuts the text before the stop string
    word = r.choices[0].text.strip().split()[-1] if r.choices[0].text.strip() else None
    if word:
        cut = oai.completions.create(model="qwen2.5", prompt="Hello there", max_tokens=10, temperature=0, stop=word)
        assert word not in cut.choices[0].text and r.choices[0].text.startswith(cut.choices[0].text)
    chat = oai.chat.completions.create(model="qwen2.5", messages=[{"role": "system", "content": "Be brief."},
                                                                  {"role": "user", "content": "Hi"}],
                                       max_tokens=4, temperature=0, stop=["zzz"])
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 4


def test_openai_bad_requests(oai, proxy):
    import openai
    import urllib.error
    import urllib.request

    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="qwen2.5", messages=[], max_tokens=4)
    assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oai.completions.create(model="qwen2.5", prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="stop"):
        oai.completions.create(model="qwen2.5", prompt="x", max_tokens=2, stop=[1, 2])
    req = urllib.request.Request(f"http://127.0.0.1:{proxy}/v1/completions", data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as he:
        urllib.request.urlopen(req, timeout=10)
    assert he.value.code == 400 and "error" in json.loads(he.value.read())


def test_openai_triton_down_is_503():
    import openai

    from trtqwen.clients.openai import make_app

    with serve_app(make_app(f"127.0.0.1:{free_ports(1)[0]}")) as port:  # no Triton there
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="qwen2.5", prompt="x", max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "service_unavailable"


# --- bench --openai: the same sweep through the proxy -----------------------------------------------------------------
def test_bench_openai_sweep(served, proxy, tmp_path):
    from typer.testing import CliRunner

    from trtqwen.cli import app
    from trtqwen.clients import bench

    t0 = time.time()
    result = bench.run_bench_openai(f"http://127.0.0.1:{proxy}", concurrency=[1, 3], input_len=24, output_len=10,
                                    duration_s=2, warmup=1, tokenizer_dir=served.tokenizer,
                                    http_metrics_url=served.metrics_url, max_requests_per_level=100)
    assert time.time() - t0 < 60
    meta = result["meta"]
    assert meta["api"] == "openai-completions" and meta["model"] == "qwen2.5" and meta["fixed_output_len"]
    assert meta["url"] == f"http://127.0.0.1:{proxy}/v1" and meta["input_len_exact"]
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 3]
    for lv in result["levels"]:
        assert lv["errors"] == 0, lv["error_samples"]
        assert lv["requests"] >= lv["concurrency"] and lv["requests_without_usage"] == 0
        assert lv["output_tokens_per_request"]["min"] == lv["output_tokens_per_request"]["max"] == 10  # ignore_eos
        assert lv["input_tokens_per_request"]["min"] == lv["input_tokens_per_request"]["max"] == 24  # usage's count
        assert lv["output_tokens"] == 10 * lv["requests"]
        ttft, latency = lv["ttft_s"], lv["latency_s"]
        # each request's TTFT ≤ its whole time, so every percentile is too; no request outlasts its level
        assert 0 < ttft["p50"] <= latency["p50"] and ttft["p99"] <= latency["p99"] <= lv["elapsed_s"]
        assert 0 < lv["itl_s"]["p50"] <= lv["itl_s"]["p99"] and lv["tpot_s"]["p50"] > 0
        assert lv["total_tok_s"] == pytest.approx(lv["output_tokens"] / lv["elapsed_s"]) and lv["user_tok_s"]["p50"] > 0
        assert lv["memory_bytes"].get("cpu_memory_used_bytes", 0) > 0  # Triton's metrics, given explicitly
    table = bench.format_table(result)
    assert "OpenAI" in table and "TTFT p95" in table and len(table.splitlines()) >= 5
    paths = bench.write_reports(result, tmp_path)
    assert json.loads(paths["json"].read_text())["meta"]["api"] == "openai-completions"
    assert len(paths["csv"].read_text().strip().splitlines()) == 3

    # the command: --openai URL, the model learned from /v1/models, --compare against the run above
    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["bench", "--openai", f"127.0.0.1:{proxy}", "--concurrency", "3", "--duration", "1",
                                 "--input-len", "8", "--output-len", "4", "--warmup", "1", "--out", str(out),
                                 "--compare", str(paths["json"])])
    assert r.exit_code == 0, r.output
    assert "qwen2.5 @ http://127.0.0.1" in r.output and "total_tok_s" in r.output
    level = json.loads((out / "bench.json").read_text())["levels"][0]
    assert level["errors"] == 0 and level["output_tokens_per_request"]["max"] == 4


def test_bench_openai_rejects_bad_input(served, proxy):
    from trtqwen.clients import bench
    from trtqwen.clients.openai import make_app

    url = f"http://127.0.0.1:{proxy}"
    with pytest.raises(UserError, match="cannot reach an OpenAI-compatible server"):
        bench.run_bench_openai(f"127.0.0.1:{free_ports(1)[0]}", concurrency=[1], duration_s=1)
    with pytest.raises(UserError, match="'nope' is not served .*qwen2.5"):
        bench.run_bench_openai(url, model="nope", concurrency=[1], duration_s=1)
    with pytest.raises(UserError, match="concurrency"):
        bench.run_bench_openai(url, concurrency=[2, 0], duration_s=1)
    with pytest.raises(UserError, match="OpenAI-compatible"):  # Triton's own HTTP port is no OpenAI server
        bench.run_bench_openai(f"127.0.0.1:{served.http}", concurrency=[1], duration_s=1)
    with serve_app(make_app(served.url, api_key="k")) as port:
        with pytest.raises(UserError, match="API key"):
            bench.run_bench_openai(f"127.0.0.1:{port}", concurrency=[1], duration_s=1)
    with serve_app(make_app(f"127.0.0.1:{free_ports(1)[0]}")) as port:  # a proxy whose Triton is away
        with pytest.raises(UserError, match="warm-up request failed: HTTP 503"):
            bench.run_bench_openai(f"127.0.0.1:{port}", concurrency=[1], duration_s=1)
