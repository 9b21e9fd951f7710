"""The client works unchanged against deployments it did not create: the 0.x input names (random_seed,
min_length) and the 1.x ones (seed, min_tokens), discovered from the served config."""

import shutil

import pytest

from trtqwen import server
from trtqwen.client import GenerationParams, TritonLLMClient
from trtqwen.repo.configs import from_pbtxt, to_pbtxt

pytestmark = pytest.mark.slow
RENAMES = {"seed": "random_seed", "min_tokens": "min_length"}


@pytest.fixture(scope="module")
def old_names_server(served_tiny, tmp_path_factory):
    """A copy of the served repository whose ensemble takes tensorrtllm_backend 0.x input names."""
    repo = tmp_path_factory.mktemp("old") / "repo"
    shutil.copytree(served_tiny[2], repo, ignore=shutil.ignore_patterns("*.log", ".trtqwen-server.json"))
    cfg = from_pbtxt((repo / "ensemble" / "config.pbtxt").read_text())
    for tensor in cfg.input:
        tensor.name = RENAMES.get(tensor.name, tensor.name)
    for step in cfg.ensemble_scheduling.step:
        for inner, outer in list(step.input_map.items()):
            if outer in RENAMES:
                step.input_map[inner] = RENAMES[outer]
    (repo / "ensemble" / "config.pbtxt").write_text(to_pbtxt(cfg))
    base = 18760
    server.start(repo, ["ensemble"], "127.0.0.1", base, base + 1, base + 2, timeout=180)
    try:
        yield f"127.0.0.1:{base + 1}"
    finally:
        server.stop(repo)


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
