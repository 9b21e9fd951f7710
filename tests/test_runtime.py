"""Reference runtime: matches transformers, batches continuously without changing results, samples reproducibly."""

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from trtqwen.errors import UserError
from trtqwen.runtime import LLMEngine, SamplingParams, load_model
from trtqwen.runtime.layers.sampler import sample, uniform_noise

VOCAB = 512


@pytest.fixture(scope="module")
def hf_pair(module_tmp):
    """A small Qwen2 with large random weights (so tokens vary) saved as safetensors, and its transformers twin."""
    d = module_tmp("rt_hf")
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=384, architectures=["Qwen2ForCausalLM"], rope_theta=1e6,
                      max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
            elif p.dim() == 2:
                p.normal_(0, 0.2)
    m.save_pretrained(d, safe_serialization=True)
    return d, m


@pytest.fixture(scope="module")
def model(hf_pair):
    return load_model(hf_pair[0])


GREEDY = SamplingParams(max_tokens=24, top_k=1, end_id=None)


def test_greedy_matches_transformers_generate(hf_pair, model):
    _, ref = hf_pair
    prompts = [[1, 2, 3, 4, 5], [7] * 20, list(range(30, 90))]
    outs = LLMEngine(model, max_slots=4, max_seq_len=256).generate(prompts, GREEDY)
    for p, r in zip(prompts, outs):
        expect = ref.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert r.output == expect[0, len(p):].tolist()
        assert r.finish_reason == "length"


def test_logits_match_transformers(hf_pair, model):
    x = torch.arange(40, 100)
    with torch.no_grad():
        expect = hf_pair[1](x.unsqueeze(0)).logits[0]
    got = model.logits(x)
    assert torch.nn.functional.cosine_similarity(expect, got, dim=-1).min() > 0.99999


def test_chunked_prefill_equals_whole_prefill(model):
    prompt = list(range(10, 300))
    whole = LLMEngine(model, max_slots=1, max_seq_len=400, prefill_chunk=1024).generate([prompt], GREEDY)[0].output
    chunked = LLMEngine(model, max_slots=1, max_seq_len=400, prefill_chunk=37).generate([prompt], GREEDY)[0].output
    assert whole == chunked


def test_continuous_batching_staggered_equals_alone(model):
    torch.manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (int(n),)).tolist() for n in torch.randint(3, 60, (16,))]
    lengths = [4 + (7 * i) % 23 for i in range(16)]
    alone = [LLMEngine(model, max_slots=1, max_seq_len=128).generate([p], SamplingParams(max_tokens=n, top_k=1, end_id=None))[0].output
             for p, n in zip(prompts, lengths)]

    eng = LLMEngine(model, max_slots=6, max_seq_len=128, prefill_chunk=64)
    reqs, pending, step = [], list(zip(prompts, lengths)), 0
    max_running = 0
    while pending or eng.has_work():
        if pending and step % 2 == 0:  # a new request every other step, while others decode
            p, n = pending.pop(0)
            reqs.append(eng.add(p, SamplingParams(max_tokens=n, top_k=1, end_id=None)))
        finished = eng.step()
        for r in finished:  # finished sequences leave at once: slot freed in the same step
            assert r.slot not in eng.scheduler.running or eng.scheduler.running[r.slot] is not r
        assert all(not r.finished for r in eng.scheduler.running.values())
        max_running = max(max_running, len(eng.scheduler.running))
        step += 1
    assert max_running == 6  # the batch really was full at times
    assert [r.output for r in reqs] == alone
    assert [len(r.output) for r in reqs] == lengths


def test_seeded_sampling_same_alone_and_in_batch(model):
    sp = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=1234, end_id=None)
    alone = LLMEngine(model, max_slots=1, max_seq_len=128).generate([[5, 6, 7]], sp)[0].output
    others = [SamplingParams(max_tokens=20, temperature=1.2, top_p=0.9, seed=s, end_id=None) for s in (1, 2, 3)]
    batch = LLMEngine(model, max_slots=4, max_seq_len=128).generate([[9, 9], [5, 6, 7], [1], [2, 3]],
                                                                   [others[0], sp, others[1], others[2]])
    assert batch[1].output == alone
    other_seed = LLMEngine(model, max_slots=1, max_seq_len=128).generate(
        [[5, 6, 7]], SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=99, end_id=None))[0].output
    assert other_seed != alone


def test_noise_depends_only_on_seed_step_token():
    a = uniform_noise(torch.tensor([5, 6]), torch.tensor([3, 3]), 1000)
    b = uniform_noise(torch.tensor([6, 5]), torch.tensor([3, 3]), 1000)
    assert torch.equal(a[0], b[1]) and not torch.equal(a[0], a[1])
    assert 0.45 < a.mean() < 0.55


def test_top_k_and_top_p_restrict_choices():
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0]]).repeat(200, 1)
    steps = torch.arange(200)
    topk2 = sample(logits, [SamplingParams(temperature=5.0, top_k=2, seed=1)] * 200, steps)
    assert set(topk2.tolist()) == {0, 1}
    topp = sample(logits, [SamplingParams(temperature=1.0, top_p=0.5, seed=1)] * 200, steps)
    assert set(topp.tolist()) == {0}  # token 0 alone holds > 50 % of the mass
    free = sample(logits, [SamplingParams(temperature=3.0, top_p=1.0, seed=1)] * 200, steps)
    assert len(set(free.tolist())) >= 3
    # TensorRT-LLM semantics: temperature with top_k 0 and top_p 0 is greedy
    assert set(sample(logits, [SamplingParams(temperature=3.0)] * 200, steps).tolist()) == {0}


def test_penalties_change_choices(model):
    base = SamplingParams(max_tokens=30, top_k=1, end_id=None)
    plain = LLMEngine(model, max_slots=1, max_seq_len=128).generate([[7] * 10], base)[0].output
    rep = LLMEngine(model, max_slots=1, max_seq_len=128).generate(
        [[7] * 10], SamplingParams(max_tokens=30, top_k=1, end_id=None, repetition_penalty=5.0))[0].output
    freq = LLMEngine(model, max_slots=1, max_seq_len=128).generate(
        [[7] * 10], SamplingParams(max_tokens=30, top_k=1, end_id=None, frequency_penalty=100.0))[0].output
    assert rep != plain and 7 not in rep[:1]
    assert len(set(freq)) == len(freq)  # a huge frequency penalty forbids any repeat


def test_end_id_min_tokens_stop_words_and_max_tokens(model):
    eng = LLMEngine(model, max_slots=2, max_seq_len=128)
    free = eng.generate([[3, 4, 5]], SamplingParams(max_tokens=12, top_k=1, end_id=None))[0].output
    end = free[3]
    stopped = eng.generate([[3, 4, 5]], SamplingParams(max_tokens=12, top_k=1, end_id=end))[0]
    assert stopped.finish_reason == "stop" and stopped.output == free[: free.index(end)]
    held = eng.generate([[3, 4, 5]], SamplingParams(max_tokens=12, top_k=1, end_id=end, min_tokens=8))[0]
    assert len(held.output) >= 8
    sw = eng.generate([[3, 4, 5]], SamplingParams(max_tokens=12, top_k=1, end_id=None, stop_words=[free[4:6]]))[0]
    assert sw.finish_reason == "stop_word" and sw.output == free[:6]
    assert len(eng.generate([[3]], SamplingParams(max_tokens=5, top_k=1, end_id=None))[0].output) == 5


def test_streaming_callbacks_and_cancellation(model):
    eng = LLMEngine(model, max_slots=2, max_seq_len=128)
    events = []
    r = eng.add([1, 2, 3], SamplingParams(max_tokens=50, top_k=1, end_id=None), lambda req, tok, why: events.append((tok, why)))
    other = eng.add([4, 5], SamplingParams(max_tokens=10, top_k=1, end_id=None))
    for _ in range(5):
        eng.step()
    eng.cancel(r)
    while eng.has_work():
        eng.step()
    assert r.finish_reason == "cancelled" and 3 <= len(r.output) < 50
    assert [t for t, _ in events[:-1]] == r.output and events[-1] == (None, "cancelled")
    assert other.finish_reason == "length" and len(other.output) == 10
    assert not eng.scheduler.running and sorted(eng.scheduler.free_slots) == [0, 1]


def test_sequence_limit_and_bad_requests(model):
    eng = LLMEngine(model, max_slots=1, max_seq_len=32)
    r = eng.generate([[1] * 28], SamplingParams(max_tokens=100, top_k=1, end_id=None))[0]
    assert r.finish_reason == "length" and r.length == 32
    with pytest.raises(UserError, match="does not fit"):
        eng.add([1] * 40)
    with pytest.raises(UserError, match="empty prompt"):
        eng.add([])
    with pytest.raises(UserError, match="outside the vocabulary"):
        eng.add([VOCAB + 5])
    with pytest.raises(UserError, match="max_tokens"):
        eng.add([1], SamplingParams(max_tokens=0))


def test_wrong_architecture_refused(tmp_path, hf_pair):
    cfg = json.loads((hf_pair[0] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UserError, match="not Qwen2ForCausalLM"):
        load_model(tmp_path)
