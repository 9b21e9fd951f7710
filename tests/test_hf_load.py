"""An HF checkpoint read for one TP rank a part at a time (bench/hf_load_memory.py measures what it holds)."""

import pytest
import torch

from trtqwen.checkpoint import read_hf_checkpoint
from trtqwen.runtime.hf_layout import rank_shard, trtllm_parts
from trtqwen.runtime.loader import hf_rank_tensors, read_safetensors


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_rank_reads_its_shard_lazily_and_keeps_no_whole_tensor_alive(tiny_tp_dir, tp):
    ck, t = hf_rank_tensors(tiny_tp_dir, tp, rank=tp - 1)
    whole = read_safetensors(sorted(tiny_tp_dir.glob("*.safetensors")))
    expected = rank_shard({k: v for part in trtllm_parts(whole, ck.shape) for k, v in part.items()},
                          read_hf_checkpoint(tiny_tp_dir).shape, tp, tp - 1)
    assert t.keys() == expected.keys() and all(torch.equal(t[k], expected[k]) for k in t)
    # a slice along dim 0 is a view: kept as one, it would hold the whole tensor it came from
    assert sum(x.untyped_storage().nbytes() for x in t.values()) == sum(x.numel() * x.element_size() for x in t.values())
