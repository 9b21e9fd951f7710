"""The overlapped decode (LLMEngine overlap=True: each step launched before the host reads the last one's tokens)
accepts exactly what the synchronous engine accepts, step by step.

On a CPU every op is synchronous, so the pipeline's logic (the next step fed from the sampled tokens on the device,
finished rows dropped, a drain whenever the batch changes) runs here just as on a GPU; the `gpu` tests check it there.
"""

import pytest
import torch

from trtqwen.runtime import LLMEngine, SamplingParams
from trtqwen.runtime.random_model import SMALL, random_model

@pytest.fixture(scope="module")
def model():
    return random_model(SMALL, device="cpu", dtype=torch.float32, std=0.2, max_positions=512)


def engine(model, overlap: bool, graphs: bool = False) -> LLMEngine:
    eng = LLMEngine(model, max_slots=6, max_seq_len=256, prefill_chunk=64, cuda_graphs=graphs, overlap=overlap)
    eng.ahead_launches = 0
    decode_next = eng.runner.decode_next

    def counted(*args):
        eng.ahead_launches += 1
        return decode_next(*args)

    eng.runner.decode_next = counted
    return eng


def run(eng: LLMEngine, script, cancel_at=None):
    """script: (arrival step, prompt, params) per request; cancel_at: {request index: step}. → every callback in
    order as (request, token, reason), who each step returned, and each request's (output, finish reason)."""
    events, returned, reqs, step = [], [], {}, 0
    while len(reqs) < len(script) or eng.has_work():
        for i, (at, prompt, params) in enumerate(script):
            if at == step:
                reqs[i] = eng.add(prompt, params, lambda r, tok, why, i=i: events.append((i, tok, why)))
        for i, at in (cancel_at or {}).items():
            if at == step:
                eng.cancel(reqs[i])
        index = {id(r): i for i, r in reqs.items()}
        returned.append(sorted(index[id(r)] for r in eng.step()))
        step += 1
    assert not eng.scheduler.running and sorted(eng.scheduler.free_slots) == list(range(6))
    assert eng.ahead is None or all(r.finished for r in eng.ahead[0])  # only a step nobody's tokens come from
    return events, returned, [(reqs[i].output, reqs[i].finish_reason) for i in range(len(script))]


def free_run(model, prompt, n=30):
    return LLMEngine(model, max_slots=1, max_seq_len=256).generate([prompt], greedy(n))[0].output


def greedy(n, **kw):
    return SamplingParams(max_tokens=n, top_k=1, end_id=None, **kw)


def scenario(model, sampled: bool):
    """Requests of different lengths joining while others decode (one prompt chunked over steps), finishing by
    end_id (one held back by min_tokens), by a stop word, by max_tokens and by the sequence limit, one cancelled."""
    torch.manual_seed(1)
    prompts = [torch.randint(0, SMALL.vocab_size, (n,)).tolist() for n in (5, 40, 150, 9, 17, 3, 230, 12)]
    free3, free4 = free_run(model, prompts[3]), free_run(model, prompts[4])
    end = next(t for i, t in enumerate(free3) if i >= 4 and t not in free3[:i])  # the first time it comes, late
    stop = free4[5:7]
    mix = dict(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3, presence_penalty=0.4,
               frequency_penalty=0.3) if sampled else {}
    p = lambda n, i, **kw: SamplingParams(**{**dict(max_tokens=n, top_k=1, end_id=None), **mix, **kw},  # noqa: E731
                                          seed=100 + i)
    script = [(0, prompts[0], p(30, 0)),
              (0, prompts[1], p(25, 1, **({"top_k": 1} if sampled else {}))),  # a greedy row among sampled ones
              (3, prompts[2], p(20, 2)),  # 150 tokens: prefilled in chunks of 64 while the others decode
              (6, prompts[3], SamplingParams(max_tokens=30, top_k=1, end_id=end)),
              (6, prompts[4], SamplingParams(max_tokens=30, top_k=1, end_id=None, stop_words=[stop])),
              (8, prompts[5], p(60, 5)),  # cancelled at step 14
              (9, prompts[6], p(60, 6)),  # 230 + 26 tokens: the 256-token sequence limit
              (12, prompts[3], SamplingParams(max_tokens=30, top_k=1, end_id=end, min_tokens=free3.index(end) + 3)),
              (80, prompts[7], p(8, 7))]  # after every other one finished: the pipeline restarts from nothing
    return script, {5: 14}, free3.index(end)


@pytest.mark.parametrize("graphs", [False, True], ids=["plain", "bucketed"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded-penalties"])
def test_overlapped_steps_equal_synchronous_steps(model, sampled, graphs):
    script, cancel_at, before_end = scenario(model, sampled)
    sync_eng, ahead_eng = engine(model, False, graphs), engine(model, True, graphs)
    sync = run(sync_eng, script, cancel_at)
    assert run(ahead_eng, script, cancel_at) == sync  # callbacks in the same order, the same finishes at each step
    reasons = [why for _, why in sync[2]]
    assert reasons[:7] == ["length", "length", "length", "stop", "stop_word", "cancelled", "length"]
    outputs = [out for out, _ in sync[2]]
    assert len(outputs[3]) == before_end and len(outputs[7]) >= before_end + 3  # end_id held back by min_tokens
    assert 0 < len(outputs[5]) < 60 and len(outputs[6]) == 256 - 230
    assert sync_eng.ahead_launches == 0 and ahead_eng.ahead_launches >= 35  # it did run ahead (40 of ~55 decodes)


def test_batch_of_one_runs_ahead_every_step(model):
    prompt = [7, 8, 9, 10]
    eng = engine(model, True)
    out = eng.generate([prompt], greedy(20))[0].output
    assert out == free_run(model, prompt, 20)
    assert eng.ahead_launches == 19  # every decode step after the first; the last one's token is dropped
    assert eng.ahead is not None and eng.ahead[0][0].finished


def test_overlap_is_off_by_default_on_cpu(model):
    assert LLMEngine(model, max_slots=2, max_seq_len=64).overlap is False
    assert LLMEngine(model, max_slots=2, max_seq_len=64, overlap=True).overlap is True


# ── GPU: run with -m gpu on a CUDA machine ─────────────────────────────────────────────────────────────────────────

def gpu_or_fail():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device: run them on a GPU machine (-m gpu)")


@pytest.mark.gpu
def test_overlapped_graphs_equal_synchronous_graphs_on_gpu():
    """CUDA graphs, overlap on (the default) and off: the same greedy and seeded tokens, callbacks and finishes."""
    gpu_or_fail()
    model = random_model(SMALL, std=0.2)
    assert LLMEngine(model, max_slots=4, max_seq_len=256).overlap is True
    for sampled in (False, True):
        script, cancel_at, _ = scenario(model, sampled)
        ahead_eng = engine(model, None, True)
        sync = run(engine(model, False, True), script, cancel_at)
        assert run(ahead_eng, script, cancel_at) == sync
        assert ahead_eng.ahead_launches >= 20


@pytest.mark.gpu
def test_steady_overlapped_steps_never_wait_for_the_stream_on_gpu():
    """With a stable batch a step neither syncs the stream nor copies blocking (event waits are how it reads)."""
    gpu_or_fail()
    eng = LLMEngine(random_model(SMALL, std=0.2), max_slots=4, max_seq_len=512)
    for i, prompt in enumerate(([1, 2, 3], list(range(100, 140)), [9] * 20)):
        eng.add(prompt, SamplingParams(max_tokens=60, end_id=3, min_tokens=30, seed=i, temperature=0.9, top_p=0.9,
                                       repetition_penalty=1.2, frequency_penalty=0.2) if i else greedy(60))
    for _ in range(3):  # prefill, then the first decode from the host: the pipeline fills
        eng.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            assert eng.step() == []
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert eng.ahead is not None and len(eng.ahead[0]) == 3
