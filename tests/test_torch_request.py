"""The torch runtime's request translation (serve/repo/torch_request.py), as pure functions: no server."""

import numpy as np
import pytest

from trtqwen.serve.repo.text import BadRequest
from trtqwen.serve.repo.torch_request import FAULT_PREFIX, Limits, translate

LIMITS = Limits(vocab=1000, max_input_len=16, max_seq_len=32, end_id=7, pad_id=8)
OUT = frozenset({"output_ids", "text_output", "num_input_tokens"})


def req(**tensors):
    base = {"input_ids": np.array([[1, 2, 3]], np.int32), "request_output_len": np.array([[5]], np.int32)}
    base.update({k: None if v is None else np.asarray(v) for k, v in tensors.items()})
    return lambda name: base.get(name)


def test_a_request_becomes_the_engine_s_prompt_and_sampling_params():
    t = translate(req(runtime_top_k=[[40]], temperature=[[0.5]], stop_words_list=[[[9, 10], [2, -1]]],
                      return_num_input_tokens=[[True]], streaming=[[True]]), None, OUT, LIMITS)
    assert t.prompt == [1, 2, 3] and t.streaming and t.want_in and not t.want_out
    assert t.params["max_tokens"] == 5 and t.params["top_k"] == 40 and t.params["temperature"] == 0.5
    assert t.params["end_id"] == 7 and t.params["pad_id"] == 8 and t.params["stop_words"] == [[9, 10]]
    assert translate(req(end_id=[[-1]]), None, OUT, LIMITS).params["end_id"] is None  # -1: no end id


@pytest.mark.parametrize("tensors, field", [
    ({"input_ids": [[1, 1000]]}, "input_ids"), ({"input_ids": [[-3]]}, "input_ids"),
    ({"end_id": [[-2147483648]]}, "end_id"), ({"pad_id": [[1000]]}, "pad_id"),
    ({"stop_words_list": [[[1000], [1]]]}, "stop_words_list"), ({"request_output_len": [[0]]}, "max_tokens"),
    ({"request_output_len": [[33]]}, "max_seq_len"), ({"input_ids": [list(range(17))]}, "max_input_len"),
    ({"runtime_top_p": [[1.5]]}, "top_p"), ({"temperature": [[float("nan")]]}, "temperature"),
    ({"return_log_probs": [[True]]}, "return_log_probs"), ({"beam_width": [[2]]}, "beam_width"),
    ({"input_lengths": [[4]]}, "input_lengths"), ({"input_ids": [[]]}, "empty"),
])
def test_every_bad_value_is_refused_naming_its_field(tensors, field):
    with pytest.raises(BadRequest, match=field):
        translate(req(**tensors), None, OUT, LIMITS)


def test_unknown_parameters_and_streaming_without_decoupled_are_refused():
    with pytest.raises(BadRequest, match="ignore_eos"):
        translate(req(), '{"ignore_eos": {"bool_param": true}}', OUT, LIMITS)
    with pytest.raises(BadRequest, match="decoupled"):
        translate(req(streaming=[[True]]), None, OUT, Limits(**{**LIMITS.__dict__, "decoupled": False}))


def test_an_output_past_max_seq_len_is_shortened_and_said_so():
    t = translate(req(request_output_len=[[31]]), None, OUT, LIMITS)
    assert t.params["max_tokens"] == 29 and "output limited to 29 tokens" in t.notes[0]


def test_the_fault_hook_needs_the_test_switch():
    rid = FAULT_PREFIX + "3"
    assert translate(req(), None, OUT, LIMITS, rid).fault_at is None
    assert translate(req(), None, OUT, Limits(**{**LIMITS.__dict__, "faults": True}), rid).fault_at == 3
