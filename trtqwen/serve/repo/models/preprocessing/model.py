"""`preprocessing`: text → token ids, stop/bad words → TensorRT-LLM's [2, -1] word lists, end/pad ids.

Tokenizer from the build's tokenizer dir (no remote code). No chat template is applied: clients send the
ChatML prompt (tensorrtllm_backend's preprocessing applies none either). end_id/pad_id default to Qwen's
<|im_end|>/<|endoftext|> as found in the tokenizer; sent ones must be token ids (checked here against the vocabulary, again by tensorrt_llm against the model's), and request
parameters are refused (an ensemble forwards its request's to this, its first step).
"""


import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from trtqwen_text import (BadRequest, as_bool, check_parameters, check_token_id, config_param, load_tokenizer,
                          model_config, to_word_list_format, utf8, words_of)


def _array(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        cfg = model_config(args)
        self.tokenizer = load_tokenizer(config_param(cfg, "tokenizer_dir"))
        self.add_special_tokens = as_bool(config_param(cfg, "add_special_tokens"), False)
        # a prompt longer than this many bytes cannot fit max_input_len tokens: refused before tokenizing it
        longest = max(len(t.encode()) for t in self.tokenizer.get_vocab())  # ≥ the bytes of any token's text
        max_input_len = config_param(cfg, "max_input_len")
        self.max_prompt_bytes = None if max_input_len is None else int(max_input_len) * longest
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        self.end_id = int(config_param(cfg, "end_id", str(eos)))
        self.pad_id = int(config_param(cfg, "pad_id", str(pad)))
        self.vocab = self._vocab_size(config_param(cfg, "tokenizer_dir"))

    def _vocab_size(self, tokenizer_dir: str) -> int:
        """The model's vocabulary where the tokenizer dir has its config.json (it does from `trtqwen build`, and as
        an HF model dir), else the tokenizer's: tensorrt_llm checks the exact bound again."""
        try:
            with open(os.path.join(tokenizer_dir, "config.json")) as f:
                model_vocab = int(json.load(f).get("vocab_size") or 0)
        except (OSError, ValueError, TypeError):
            model_vocab = 0
        return max(len(self.tokenizer), model_vocab)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except Exception as e:  # noqa: BLE001 - every failure becomes this request's error response
                code = pb_utils.TritonError.INVALID_ARG if isinstance(e, BadRequest) else pb_utils.TritonError.INTERNAL
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), code)))
        return responses

    def _one(self, request):
        check_parameters(request.parameters())
        queries = _array(request, "QUERY")
        raw = list(queries.reshape(queries.shape[0], -1)[:, 0]) if queries is not None else []
        too_long = [len(q) for q in raw if self.max_prompt_bytes and len(q) > self.max_prompt_bytes]
        if too_long:  # seconds of tokenizing and a bigger stub for a prompt that cannot be served anyway
            raise BadRequest(f"text_input has {too_long[0]:,} bytes: no prompt over {self.max_prompt_bytes:,} bytes fits "
                             "max_input_len tokens; shorten it")
        texts = [utf8(q) for q in raw]
        if not texts or any(not t for t in texts):
            raise BadRequest("text_input is empty: send a prompt")
        ids = [self.tokenizer.encode(t, add_special_tokens=self.add_special_tokens) for t in texts]
        if any(not x for x in ids):
            raise BadRequest("text_input tokenizes to nothing: send a prompt")
        batch = len(ids)
        width = max(len(x) for x in ids)
        input_ids = np.full((batch, width), self.pad_id, dtype=np.int32)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = x
        lengths = np.array([[len(x)] for x in ids], dtype=np.int32)

        def per_request(name, default):
            a = _array(request, name)
            return (np.full((batch, 1), default, dtype=np.int32) if a is None or a.size == 0
                    else a.astype(np.int32).reshape(batch, -1)[:, :1])

        def words(name):
            a = _array(request, name)
            return [words_of(a[i]) if a is not None else [] for i in range(batch)]

        end_ids, pad_ids = per_request("END_ID", self.end_id), per_request("PAD_ID", self.pad_id)
        for e, p in zip(end_ids.reshape(-1), pad_ids.reshape(-1)):
            check_token_id("end_id", e, self.vocab, lowest=-1)
            check_token_id("pad_id", p, self.vocab)
        outputs = [
            pb_utils.Tensor("INPUT_ID", input_ids),
            pb_utils.Tensor("REQUEST_INPUT_LEN", lengths),
            pb_utils.Tensor("BAD_WORDS_IDS", to_word_list_format(words("BAD_WORDS_DICT"), self._encode)),
            pb_utils.Tensor("STOP_WORDS_IDS", to_word_list_format(words("STOP_WORDS_DICT"), self._encode)),
            pb_utils.Tensor("REQUEST_OUTPUT_LEN", per_request("REQUEST_OUTPUT_LEN", 0)),
            pb_utils.Tensor("OUT_END_ID", end_ids),
            pb_utils.Tensor("OUT_PAD_ID", pad_ids),
        ]
        return pb_utils.InferenceResponse(output_tensors=outputs)
