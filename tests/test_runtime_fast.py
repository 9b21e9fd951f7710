"""The runtime's fast paths: bucketed (graph-shaped) decode, compiled blocks, int4 kernels — each equal to the plain path.

CUDA graph capture itself needs a GPU: the `gpu` tests run on the lent H100 (see docs/PERFORMANCE.md);
on a CPU the same bucketing and padding run eagerly, so their logic is tested here.
"""

import pytest
import torch

from trtqwen.runtime import LLMEngine, SamplingParams, load_model
from trtqwen.runtime.engine.model_runner import batch_buckets, kv_buckets
from trtqwen.runtime.layers.linear import Int4Linear
from trtqwen.runtime.random_model import SMALL, random_model

GREEDY = SamplingParams(max_tokens=40, top_k=1, end_id=None)


@pytest.fixture(scope="module")
def tiny_model(tiny_tp_dir):
    return load_model(tiny_tp_dir, max_positions=1024)


def staggered(engine: LLMEngine, prompts, lengths):
    """Requests arriving every other step, so batches grow, shrink and leave holes in the slot range."""
    reqs, pending, step = [], list(zip(prompts, lengths)), 0
    while pending or engine.has_work():
        if pending and step % 2 == 0:
            p, n = pending.pop(0)
            reqs.append(engine.add(p, SamplingParams(max_tokens=n, top_k=1, end_id=None)))
        engine.step()
        step += 1
    return [r.output for r in reqs]


def test_buckets_cover_every_size():
    assert kv_buckets(2048) == [256, 512, 1024, 2048]
    assert kv_buckets(3000) == [256, 512, 1024, 2048, 3000]
    assert kv_buckets(100) == [100]
    assert batch_buckets(32)[-1] == 32 and batch_buckets(5) == [1, 2, 4, 5]


def test_bucketed_decode_equals_plain_decode(tiny_model):
    """Padding the batch to a bucket and reading a longer KV range must not change any sequence's tokens."""
    torch.manual_seed(3)
    prompts = [torch.randint(0, 150000, (int(n),)).tolist() for n in torch.randint(3, 300, (9,))]
    lengths = [5 + (11 * i) % 40 for i in range(9)]
    plain = staggered(LLMEngine(tiny_model, max_slots=6, max_seq_len=512, prefill_chunk=128, cuda_graphs=False),
                      prompts, lengths)
    bucketed_engine = LLMEngine(tiny_model, max_slots=6, max_seq_len=512, prefill_chunk=128, cuda_graphs=True)
    assert bucketed_engine.graphs is not None and bucketed_engine.graphs.batches == [1, 2, 4, 6]
    assert staggered(bucketed_engine, prompts, lengths) == plain
    assert [len(o) for o in plain] == lengths


def test_compiled_blocks_equal_eager(tiny_tp_dir):
    eager = load_model(tiny_tp_dir, max_positions=512)
    compiled = load_model(tiny_tp_dir, max_positions=512).compile()
    prompts = [[1, 2, 3, 4], list(range(100, 180)), [7] * 30]
    a = LLMEngine(eager, max_slots=4, max_seq_len=256).generate(prompts, GREEDY)
    b = LLMEngine(compiled, max_slots=4, max_seq_len=256).generate(prompts, GREEDY)
    assert [r.output for r in a] == [r.output for r in b]


def test_int4_kernels_match_dequantized_awq(exported):
    """Packed int4 GEMMs compute what the dequantized weights compute (bf16 rounding apart)."""
    ckpt = exported("int4_awq", 2)  # TP shards merged: q and group scales are concatenated like the weights
    ref = load_model(ckpt, "cpu", torch.bfloat16, int4_kernels=False)
    fast = load_model(ckpt, "cpu", torch.bfloat16, int4_kernels=True)
    assert all(isinstance(getattr(fast.layers[0], n), Int4Linear) for n in ("qkv", "o", "gate", "up", "down"))
    x = torch.arange(50, 120)
    a, b = ref.logits(x), fast.logits(x)
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.999
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9  # random weights: near-ties flip in bf16


def awq_case(m: int, k: int, n: int, group: int, device="cpu", seed=0):
    """x, random AWQ values q [n, k] with group scales [n, k/group], and the fp32 dequantized weight."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), device=device, dtype=torch.int8, generator=g)
    scales = torch.rand(n, k // group, device=device, generator=g) * 0.004 + 0.001
    x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
    return x, q, scales, q.float() * scales.repeat_interleave(group, dim=1)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("group", [64, 128])
def test_int4_packing_and_torch_path_equal_dequantized_awq(group):
    """The packed layout unpacks to the checkpoint's values, a quarter of bf16's bytes; the torch path's GEMM is the
    dequantized one (its bf16 weights exactly, the product to bf16 rounding)."""
    from trtqwen.runtime.layers import int4_triton

    x, q, scales, w = awq_case(33, 512, 4608 // 8 + 8, group)  # N: not a power of two
    bias, pre = torch.randn(q.shape[0]), torch.rand(q.shape[1]) + 0.5
    lin = Int4Linear(q, scales, group, bias, pre)
    assert torch.equal(int4_triton.unpack(lin.packed) - 8, q.t().int())
    assert lin.packed.nbytes * 4 == q.numel() * 2
    w_bf16 = (q.float() * lin.scales.t().float().repeat_interleave(group, dim=1)).to(torch.bfloat16)
    assert torch.equal(int4_triton.dequantize(lin.packed, lin.scales, group), w_bf16.t())
    xs = x * pre.to(torch.bfloat16)
    linear = torch.nn.functional.linear(xs, w_bf16, bias.to(torch.bfloat16))
    torch.testing.assert_close(lin(x), linear, atol=8e-3, rtol=1.6e-2)  # an ulp: bias added after rounding
    assert rel_err(lin(x), xs.float() @ w.t() + bias) < 5e-3  # and the fp32 weights to bf16 rounding
    assert lin(x.view(3, 11, -1)).shape == (3, 11, q.shape[0])
    torch.library.opcheck(int4_triton.w4a16_mm, (x, lin.packed, lin.scales, group))


@pytest.mark.gpu
def test_int4_triton_kernel_and_graph_replay_on_gpu():
    """The Triton W4A16 kernel (GEMV, M=32 and prefill configs) computes the dequantized GEMM; a graph replays it."""
    gpu_or_fail()
    from trtqwen.runtime.layers import int4_triton

    for m in (1, 32, 1024):
        for k, n in ((3584, 4608), (18944, 3584)):
            x, q, scales, w = awq_case(m, k, n, 128, "cuda", seed=m)
            lin = Int4Linear(q, scales, 128)
            assert int4_triton.uses_triton(x)
            ref = x.float() @ w.t()
            assert rel_err(lin(x), ref) < 5e-3, (m, k, n)
            torch.testing.assert_close(lin(x), int4_triton.torch_mm(x, lin.packed, lin.scales, 128), rtol=2e-2,
                                       atol=2e-2 * ref.abs().max().item())
    x, q, scales, _ = awq_case(32, 3584, 18944, 128, "cuda")
    lin, static = Int4Linear(q, scales, 128), x.clone()
    eager = lin(static)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lin(static)
    static.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, lin(static)) and not torch.equal(out, eager)


def test_batched_fresh_prefill_equals_alone(tiny_model):
    """Prompts arriving together are prefilled in padded batches (grouped by length): same tokens as alone."""
    torch.manual_seed(5)
    prompts = [torch.randint(0, 150000, (int(n),)).tolist() for n in (3, 4, 9, 30, 31, 200, 7, 64)]
    together = LLMEngine(tiny_model, max_slots=8, max_seq_len=512, prefill_chunk=1024).generate(prompts, GREEDY)
    alone = [LLMEngine(tiny_model, max_slots=1, max_seq_len=512).generate([p], GREEDY)[0].output for p in prompts]
    assert [r.output for r in together] == alone


def test_length_groups_bound_padding():
    from trtqwen.runtime.engine.scheduler import Request, length_groups

    reqs = [Request(list(range(n)), SamplingParams()) for n in (5, 6, 7, 8, 400, 410, 3000)]
    groups = [[len(r.prompt) for r in g] for g in length_groups(reqs)]
    assert groups == [[5, 6, 7, 8], [400, 410], [3000]]


def gpu_or_fail():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device: run them on a GPU machine (-m gpu)")


PROMPTS = [[1, 2, 3], list(range(100, 400)), [9] * 40, list(range(5, 25)), list(range(700, 1300))]
LENGTHS = [30, 45, 12, 60, 300]  # the last crosses KV buckets 1024 → 2048 mid-stream


@pytest.mark.gpu
@pytest.mark.parametrize("int4", [False, True], ids=["bf16", "int4"])
def test_cuda_graphs_greedy_equal_without_graphs_on_gpu(int4):
    """Replayed graphs compute exactly what the same bucketed step computes launched op by op."""
    gpu_or_fail()
    model = random_model(SMALL, int4=int4, std=0.2)
    graphed = LLMEngine(model, max_slots=5, max_seq_len=2048, cuda_graphs=True)
    assert len(graphed.graphs.graphs) == len(graphed.graphs.batches) * len(graphed.graphs.kv_lens)
    with_graphs = staggered(graphed, PROMPTS, LENGTHS)
    launched = LLMEngine(model, max_slots=5, max_seq_len=2048, cuda_graphs=True)
    launched.graphs.graphs.clear()  # no captured graphs: every bucketed step runs op by op
    assert staggered(launched, PROMPTS, LENGTHS) == with_graphs
    # and the plain (unbucketed, eager) decode agrees on the short streams, where rounding cannot drift far
    plain = staggered(LLMEngine(model, max_slots=5, max_seq_len=2048, cuda_graphs=False), PROMPTS, LENGTHS)
    assert [o[:12] for o in plain] == [o[:12] for o in with_graphs]


@pytest.mark.gpu
@pytest.mark.parametrize("int4", [False, True], ids=["fp32", "int4-bf16"])
def test_compiled_graphs_match_eager_on_gpu(int4):
    """Compiled kernels round differently (fused norms): in fp32 greedy streams agree; int4 (bf16) agrees closely."""
    gpu_or_fail()
    dtype = torch.bfloat16 if int4 else torch.float32
    eager_model = random_model(SMALL, int4=int4, std=0.2, dtype=dtype)
    compiled = LLMEngine(random_model(SMALL, int4=int4, std=0.2, dtype=dtype).compile(), max_slots=5, max_seq_len=2048)
    eager = staggered(LLMEngine(eager_model, max_slots=5, max_seq_len=2048, cuda_graphs=False), PROMPTS, LENGTHS)
    fast = staggered(compiled, PROMPTS, LENGTHS)
    same = 3 if int4 else 12  # bf16 near-ties flip after a few tokens on random weights
    assert [o[:same] for o in fast] == [o[:same] for o in eager]
    toks, pos = torch.tensor([5, 6, 7, 8], device="cuda"), torch.tensor([0, 3, 9, 100], device="cuda")
    a = eager_model.decode(toks, pos, eager_model.new_cache(4, 256), 256)
    b = compiled.model.decode(toks, pos, compiled.model.new_cache(4, 256), 256)
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.999
