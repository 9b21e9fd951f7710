"""A request that breaks the engine fails alone (issue 30): LLMEngine, on the CPU, without a server.

Per-request work (penalty counts, a prompt chunk, the stop checks, the token callback) fails only its request; a
batched op that raises (a group's prefill, the decode, the sampling) is split until the request at fault is alone,
and everyone else gets exactly the tokens they get without it. Only a broken engine (every request failing alone)
raises from step(). The served model's side (the same through tritonserver) is in test_bad_requests.py.
"""

import pytest
import torch

from trtqwen.errors import UserError
from trtqwen.runtime import LLMEngine, SamplingParams
from trtqwen.runtime.engine.llm_engine import EngineError
from trtqwen.runtime.random_model import SMALL, random_model

PROMPTS = [[5 + i, 17, 99 + 3 * i, 7] * (1 + i % 3) for i in range(7)]


@pytest.fixture(scope="module")
def model():
    return random_model(SMALL, device="cpu", dtype=torch.float32, std=0.2, max_positions=512)


def greedy(n=12, **kw):
    return SamplingParams(max_tokens=n, top_k=1, end_id=None, **kw)


def run(model, faults: dict, overlap=False, params=None, callbacks=None):
    """PROMPTS together; faults: {index: fault_at}; → (outputs, finish reasons, errors, what step() returned)."""
    eng = LLMEngine(model, max_slots=8, max_seq_len=256, prefill_chunk=64, overlap=overlap)
    reqs = [eng.add(p, params or greedy(), (callbacks or {}).get(i), fault_at=faults.get(i))
            for i, p in enumerate(PROMPTS)]
    returned = []
    while eng.has_work():
        returned += eng.step()
    assert not eng.scheduler.running and sorted(eng.scheduler.free_slots) == list(range(8))
    return [r.output for r in reqs], [r.finish_reason for r in reqs], [r.error for r in reqs], returned, reqs


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("fault_at", [1, 4], ids=["first token (prefill batch)", "4th token (decode batch)"])
def test_a_request_that_breaks_the_batched_step_fails_alone(model, overlap, fault_at):
    clean, reasons, _, _, _ = run(model, {}, overlap)
    assert reasons == ["length"] * len(PROMPTS)
    out, reasons, errors, returned, reqs = run(model, {3: fault_at}, overlap)
    assert reasons[3] == "error" and "injected test fault" in errors[3] and len(out[3]) == fault_at - 1
    assert reqs[3] in returned  # step() reports it with the finished ones
    for i in set(range(len(PROMPTS))) - {3}:
        assert (out[i], reasons[i], errors[i]) == (clean[i], "length", None), i


def test_two_requests_at_fault_in_one_batch_each_fail_alone(model):
    clean, *_ = run(model, {})
    out, reasons, errors, *_ = run(model, {1: 3, 5: 3})
    assert reasons[1] == reasons[5] == "error"
    assert all(out[i] == clean[i] for i in (0, 2, 3, 4, 6))


def test_a_raising_callback_fails_only_its_request(model):
    clean, *_ = run(model, {})

    def explode(req, token, reason):
        if token is not None and len(req.output) == 2:
            raise ValueError("client callback broke")

    out, reasons, errors, *_ = run(model, {}, callbacks={2: explode})
    assert reasons[2] == "error" and "client callback broke" in errors[2]
    assert all(out[i] == clean[i] for i in set(range(len(PROMPTS))) - {2})


def test_a_broken_engine_still_fails_everything(model):
    """Every request failing alone is the engine's failure: step() raises (the served model then fails all streams
    and makes a new engine)."""
    eng = LLMEngine(model, max_slots=8, max_seq_len=256, prefill_chunk=64)
    for p in PROMPTS[:3]:
        eng.add(p, greedy())
    eng.step()

    def broken(*args, **kwargs):
        raise RuntimeError("the model is gone")

    eng.runner.decode = broken
    with pytest.raises(EngineError, match="each of its 3 requests alone"):
        eng.step()


@pytest.mark.parametrize("prompt,params,word", [
    ([1, 2, 4096], greedy(), "vocabulary"),
    ([1, -1], greedy(), "vocabulary"),
    ([1, 2], SamplingParams(max_tokens=4, end_id=-2147483648, min_tokens=1), "end_id"),
    ([1, 2], SamplingParams(max_tokens=4, end_id=4096), "end_id"),
    ([1, 2], greedy(stop_words=[[3, 4096]]), "stop words"),
    ([1, 2], greedy(stop_words=[[-200000]]), "stop words"),
])
def test_the_engine_refuses_ids_outside_the_vocabulary_up_front(model, prompt, params, word):
    eng = LLMEngine(model, max_slots=2, max_seq_len=256)
    with pytest.raises(UserError, match=word):
        eng.add(prompt, params)
    assert not eng.has_work()


@pytest.mark.gpu
@pytest.mark.parametrize("fault_at", [1, 4])
def test_a_request_fails_alone_under_cuda_graphs_and_overlap_on_gpu(fault_at):
    """The same on a GPU: graphed decode, overlap on (its default there), bf16."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device: run them on a GPU machine (-m gpu)")
    gpu = random_model(SMALL, device="cuda", dtype=torch.bfloat16, std=0.2, max_positions=512)

    def go(faults):
        eng = LLMEngine(gpu, max_slots=8, max_seq_len=256, prefill_chunk=64)
        assert eng.graphs is not None and eng.overlap
        reqs = [eng.add(p, greedy(), fault_at=faults.get(i)) for i, p in enumerate(PROMPTS)]
        while eng.has_work():
            eng.step()
        return [(r.output, r.finish_reason) for r in reqs]

    clean, faulted = go({}), go({3: fault_at})
    assert faulted[3][1] == "error" and len(faulted[3][0]) == fault_at - 1
    assert [x for i, x in enumerate(faulted) if i != 3] == [x for i, x in enumerate(clean) if i != 3]
