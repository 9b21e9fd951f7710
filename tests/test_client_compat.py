"""Compatibility both ways. Our client works unchanged against deployments it did not create: the 0.x input names
(random_seed, min_length) and the 1.x ones (seed, min_tokens), discovered from the served config. And clients
written for tensorrtllm_backend work unchanged against ours: they read `text_output` as one string per beam
(`as_numpy("text_output")[0].decode()`), `output_ids` as [1, beam, tokens] and `sequence_length` as [1, beam]."""

import json
import queue
import shutil
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import infer_input, serving

from trtqwen.clients.client import GenerationParams, TritonLLMClient
from trtqwen.serve.repo.configs import from_pbtxt, to_pbtxt

pytestmark = pytest.mark.slow
RENAMES = {"seed": "random_seed", "min_tokens": "min_length"}


@pytest.fixture(scope="module")
def old_names_server(served_tiny, module_tmp):
    """A copy of the served repository whose ensemble takes tensorrtllm_backend 0.x input names."""
    repo = module_tmp("old") / "repo"
    shutil.copytree(served_tiny[2], repo, ignore=shutil.ignore_patterns("*.log", ".trtqwen-server.json"))
    cfg = from_pbtxt((repo / "ensemble" / "config.pbtxt").read_text())
    for tensor in cfg.input:
        tensor.name = RENAMES.get(tensor.name, tensor.name)
    for step in cfg.ensemble_scheduling.step:
        for inner, outer in list(step.input_map.items()):
            if outer in RENAMES:
                step.input_map[inner] = RENAMES[outer]
    (repo / "ensemble" / "config.pbtxt").write_text(to_pbtxt(cfg))
    with serving(repo, ["ensemble"]) as (grpc, _, _ports):
        yield grpc


SAMPLED = GenerationParams(max_tokens=12, min_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=7, stop_words=[])


def test_both_input_name_variants(served_tiny, old_names_server):
    new, old = TritonLLMClient(served_tiny[0]), TritonLLMClient(old_names_server)
    assert (new.input_name("seed"), new.input_name("min_tokens")) == ("seed", "min_tokens")
    assert (old.input_name("seed"), old.input_name("min_tokens")) == ("random_seed", "min_length")
    a, b = new.generate("Hello there", SAMPLED), old.generate("Hello there", SAMPLED)
    assert a.text and a.text == b.text  # the seed reached the sampler under either name
    assert a.timing.output_tokens == b.timing.output_tokens == 12  # and so did min_tokens / min_length
    other = new.generate("Hello there", GenerationParams(**{**SAMPLED.__dict__, "seed": 8}))
    assert other.text != a.text


# --- clients written the way tensorrtllm_backend's own are (inflight_batcher_llm/client, tools/) -------------------
def upstream_stream(url: str, model: str, inputs: list, outputs: list[str]) -> list:
    """start_stream + async_stream_infer with a callback queue, as upstream's end_to_end_grpc_client does."""
    results: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(url) as c:
        c.start_stream(callback=lambda result, error: results.put(error or result))
        c.async_stream_infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
        c.stop_stream()  # waits for the final response
    got = []
    while not results.empty():
        r = results.get()
        assert not isinstance(r, Exception), r
        got.append(r)
    return got


def text_inputs(prompt: str, stream: bool) -> list:
    return [infer_input("text_input", np.array([[prompt.encode()]], dtype=object)),
            infer_input("max_tokens", np.array([[8]], dtype=np.int32)),
            infer_input("stream", np.array([[stream]], dtype=bool))]


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_clients_read_text_output(served_tiny, model, stream):
    results = upstream_stream(served_tiny[0], model, text_inputs("Hello there", stream), ["text_output"])
    texts = [r.as_numpy("text_output") for r in results]
    texts = [t for t in texts if t is not None]
    assert texts and all(t.shape == (1,) for t in texts)  # one string per beam, no batch axis left over
    pieces = [t[0].decode("utf-8") for t in texts]  # end_to_end_grpc_client.py / end_to_end_test.py read it so
    assert "".join(pieces) and (len(pieces) > 1) == stream


def test_upstream_clients_read_token_outputs(served_tiny):
    ids = np.array([[9707, 1052, 374]], dtype=np.int32)
    inputs = [infer_input("input_ids", ids), infer_input("input_lengths", np.array([[3]], dtype=np.int32)),
              infer_input("request_output_len", np.array([[6]], dtype=np.int32)),
              infer_input("end_id", np.array([[-1]], dtype=np.int32)),
              infer_input("return_num_input_tokens", np.array([[True]], dtype=bool)),
              infer_input("return_num_output_tokens", np.array([[True]], dtype=bool))]
    (r,) = [r for r in upstream_stream(served_tiny[0], "tensorrt_llm", inputs,
                                       ["output_ids", "sequence_length", "num_input_tokens", "num_output_tokens"])
            if r.as_numpy("output_ids") is not None]
    out, lengths = r.as_numpy("output_ids"), r.as_numpy("sequence_length")
    assert out.dtype == np.int32 and out.ndim == 3 and lengths.shape == (1, 1)  # [1, beam, tokens], [1, beam]
    tokens = np.squeeze(out, axis=(0, 1))  # e2e_grpc_speculative_decoding_client.py
    assert len(tokens) == lengths[0][0] == len(list(out[0][0]))  # inflight_batcher_llm_client.py
    assert r.as_numpy("num_input_tokens")[0][0] == 3 and r.as_numpy("num_output_tokens")[0][0] == lengths[0][0]


def test_http_generate_gives_text_output_as_a_string(served_tiny):
    """Triton's /generate turns a one-element tensor into a JSON scalar: upstream's README shows a plain string."""
    body = json.dumps({"text_input": "Hello there", "max_tokens": 4}).encode()
    req = urllib.request.Request(f"http://{served_tiny[1]}/v2/models/ensemble/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert isinstance(json.loads(resp.read())["text_output"], str)
