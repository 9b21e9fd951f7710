"""The tensorrtllm_backend interface: model names, tensor names, types and shapes (TensorRT-LLM 1.x names).

Source: TensorRT-LLM `triton_backend/all_models/inflight_batcher_llm/*/config.pbtxt` (the same files as
tensorrtllm_backend v0.19.0 `all_models/inflight_batcher_llm`, with 1.x's `seed` and `min_tokens`). Only the
tensors a decoder-only text model uses are declared (no LoRA, prompt tables, multimodal, draft models or
guided decoding); the names that are declared are exactly NVIDIA's, so clients written for it work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

ENSEMBLE, PREPROCESSING, TENSORRT_LLM, POSTPROCESSING, BLS = (
    "ensemble", "preprocessing", "tensorrt_llm", "postprocessing", "tensorrt_llm_bls")
MODELS = (ENSEMBLE, PREPROCESSING, TENSORRT_LLM, POSTPROCESSING, BLS)


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton's DataType enum name, e.g. "TYPE_INT32"
    dims: tuple[int, ...] = (1,)
    optional: bool = False
    scalar: bool = False  # `reshape: { shape: [ ] }`: the model sees one value per request
    ragged: bool = False  # `allow_ragged_batch: true`


def _t(name, dtype, dims=(1,), optional=True, scalar=False, ragged=False) -> Tensor:
    return Tensor(name, f"TYPE_{dtype}", tuple(dims), optional, scalar, ragged)


# --- ensemble and tensorrt_llm_bls: text in, text out -------------------------------------------------------
TEXT_INPUTS = (
    _t("text_input", "STRING", optional=False),
    _t("max_tokens", "INT32", optional=False),
    _t("bad_words", "STRING", (-1,)),
    _t("stop_words", "STRING", (-1,)),
    _t("exclude_input_in_output", "BOOL"),
    _t("end_id", "INT32"),
    _t("pad_id", "INT32"),
    _t("top_k", "INT32"),
    _t("top_p", "FP32"),
    _t("temperature", "FP32"),
    _t("length_penalty", "FP32"),
    _t("repetition_penalty", "FP32"),
    _t("min_tokens", "INT32"),
    _t("presence_penalty", "FP32"),
    _t("frequency_penalty", "FP32"),
    _t("seed", "UINT64"),
    _t("return_log_probs", "BOOL"),
    _t("return_context_logits", "BOOL"),
    _t("return_generation_logits", "BOOL"),
    _t("return_perf_metrics", "BOOL"),
    _t("return_num_input_tokens", "BOOL"),
    _t("return_num_output_tokens", "BOOL"),
    _t("beam_width", "INT32"),
    _t("num_return_sequences", "INT32"),
    _t("stream", "BOOL"),
)

# Outputs the tensorrt_llm step produces besides the tokens, passed through unchanged to the text models.
PASSTHROUGH_OUTPUTS = (
    _t("cum_log_probs", "FP32", (-1,)),
    _t("output_log_probs", "FP32", (-1, -1)),
    _t("context_logits", "FP32", (-1, -1)),
    _t("generation_logits", "FP32", (-1, -1, -1)),
    _t("batch_index", "INT32"),
    _t("sequence_index", "INT32"),
    _t("kv_cache_alloc_new_blocks", "INT32"),
    _t("kv_cache_reused_blocks", "INT32"),
    _t("kv_cache_alloc_total_blocks", "INT32"),
    _t("arrival_time_ns", "INT64"),
    _t("first_scheduled_time_ns", "INT64"),
    _t("first_token_time_ns", "INT64"),
    _t("last_token_time_ns", "INT64"),
    _t("acceptance_rate", "FP32"),
    _t("total_accepted_draft_tokens", "INT32"),
    _t("total_draft_tokens", "INT32"),
    _t("num_input_tokens", "INT32"),
    _t("num_output_tokens", "INT32"),
)
TEXT_OUTPUTS = (_t("text_output", "STRING", (-1,)),) + PASSTHROUGH_OUTPUTS

# --- preprocessing: text → token ids ---------------------------------------------------------------------------
PREPROCESSING_INPUTS = (
    _t("QUERY", "STRING", optional=False),
    _t("REQUEST_OUTPUT_LEN", "INT32", optional=False),
    _t("BAD_WORDS_DICT", "STRING", (-1,)),
    _t("STOP_WORDS_DICT", "STRING", (-1,)),
    _t("END_ID", "INT32"),
    _t("PAD_ID", "INT32"),
)
PREPROCESSING_OUTPUTS = (
    _t("INPUT_ID", "INT32", (-1,)),
    _t("REQUEST_INPUT_LEN", "INT32"),
    _t("BAD_WORDS_IDS", "INT32", (2, -1)),
    _t("STOP_WORDS_IDS", "INT32", (2, -1)),
    _t("REQUEST_OUTPUT_LEN", "INT32", (-1,)),
    _t("OUT_END_ID", "INT32"),
    _t("OUT_PAD_ID", "INT32"),
)

# --- tensorrt_llm: token ids in, token ids out (in-flight batching) -----------------------------------------
TRTLLM_INPUTS = (
    _t("input_ids", "INT32", (-1,), ragged=True),
    _t("input_lengths", "INT32", optional=False, scalar=True),
    _t("request_output_len", "INT32", optional=False, scalar=True),
    _t("num_return_sequences", "INT32", scalar=True),
    _t("end_id", "INT32", scalar=True),
    _t("pad_id", "INT32", scalar=True),
    _t("stop_words_list", "INT32", (2, -1), ragged=True),
    _t("bad_words_list", "INT32", (2, -1), ragged=True),
    _t("beam_width", "INT32", scalar=True),
    _t("temperature", "FP32", scalar=True),
    _t("runtime_top_k", "INT32", scalar=True),
    _t("runtime_top_p", "FP32", scalar=True),
    _t("len_penalty", "FP32", scalar=True),
    _t("repetition_penalty", "FP32", scalar=True),
    _t("min_tokens", "INT32", scalar=True),
    _t("presence_penalty", "FP32", scalar=True),
    _t("frequency_penalty", "FP32", scalar=True),
    _t("seed", "UINT64", scalar=True),
    _t("return_log_probs", "BOOL", scalar=True),
    _t("return_context_logits", "BOOL", scalar=True),
    _t("return_generation_logits", "BOOL", scalar=True),
    _t("return_perf_metrics", "BOOL", scalar=True),
    _t("return_num_input_tokens", "BOOL", scalar=True),
    _t("return_num_output_tokens", "BOOL", scalar=True),
    _t("exclude_input_in_output", "BOOL", scalar=True),
    _t("stop", "BOOL", scalar=True),
    _t("streaming", "BOOL", scalar=True),
)
TRTLLM_OUTPUTS = (
    _t("output_ids", "INT32", (-1, -1)),
    _t("sequence_length", "INT32", (-1,)),
) + PASSTHROUGH_OUTPUTS

# The torch runtime's tensorrt_llm also answers in text (decoded once per response, in the model), so its ensemble
# goes preprocessing → tensorrt_llm without a postprocessing hop per response (the C++ backend has no text output).
TORCH_TRTLLM_OUTPUTS = TRTLLM_OUTPUTS + (_t("text_output", "STRING", (-1,)),)

# --- postprocessing: token ids → text --------------------------------------------------------------------------
POSTPROCESSING_INPUTS = (
    _t("TOKENS_BATCH", "INT32", (-1, -1), optional=False),
    _t("SEQUENCE_LENGTH", "INT32", (-1,), optional=False),
)
POSTPROCESSING_OUTPUTS = (_t("OUTPUT", "STRING", (-1,)),)

# --- the ensemble's wiring (step input/output maps, as NVIDIA's ensemble/config.pbtxt has them) -------------------
ENSEMBLE_PREPROCESSING_INPUTS = {
    "QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens", "BAD_WORDS_DICT": "bad_words",
    "STOP_WORDS_DICT": "stop_words", "END_ID": "end_id", "PAD_ID": "pad_id",
}
ENSEMBLE_PREPROCESSING_OUTPUTS = {
    "REQUEST_INPUT_LEN": "_REQUEST_INPUT_LEN", "INPUT_ID": "_INPUT_ID", "REQUEST_OUTPUT_LEN": "_REQUEST_OUTPUT_LEN",
    "STOP_WORDS_IDS": "_STOP_WORDS_IDS", "BAD_WORDS_IDS": "_BAD_WORDS_IDS", "OUT_END_ID": "_PREPROCESSOR_END_ID",
    "OUT_PAD_ID": "_PREPROCESSOR_PAD_ID",
}
ENSEMBLE_TRTLLM_INPUTS = {
    "input_ids": "_INPUT_ID", "input_lengths": "_REQUEST_INPUT_LEN", "exclude_input_in_output": "exclude_input_in_output",
    "request_output_len": "_REQUEST_OUTPUT_LEN", "end_id": "_PREPROCESSOR_END_ID", "pad_id": "_PREPROCESSOR_PAD_ID",
    "runtime_top_k": "top_k", "runtime_top_p": "top_p", "temperature": "temperature", "len_penalty": "length_penalty",
    "repetition_penalty": "repetition_penalty", "min_tokens": "min_tokens", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "seed": "seed", "return_log_probs": "return_log_probs",
    "return_context_logits": "return_context_logits", "return_generation_logits": "return_generation_logits",
    "return_perf_metrics": "return_perf_metrics", "return_num_input_tokens": "return_num_input_tokens",
    "return_num_output_tokens": "return_num_output_tokens", "num_return_sequences": "num_return_sequences",
    "beam_width": "beam_width", "streaming": "stream", "stop_words_list": "_STOP_WORDS_IDS",
    "bad_words_list": "_BAD_WORDS_IDS",
}
_PASSTHROUGH = {t.name: t.name for t in PASSTHROUGH_OUTPUTS}
ENSEMBLE_TRTLLM_OUTPUTS = {"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH", **_PASSTHROUGH}
ENSEMBLE_TORCH_TRTLLM_OUTPUTS = {"text_output": "text_output", **_PASSTHROUGH}
ENSEMBLE_POSTPROCESSING_INPUTS = {"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"}
ENSEMBLE_POSTPROCESSING_OUTPUTS = {"OUTPUT": "text_output"}
