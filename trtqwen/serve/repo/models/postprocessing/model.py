"""`postprocessing`: token ids → text, one response at a time (stateless, as tensorrtllm_backend's is).

The ensemble over TensorRT engines (runtime trtllm) ends here. The C++ backend streams single tokens, so a CJK
character split over two of them decodes as U+FFFD here: stream through `tensorrt_llm_bls` (accumulate_tokens),
which detokenizes incrementally. The torch runtime's tensorrt_llm answers in text itself (whole characters per
response), and its ensemble skips this hop.
"""


import time

import numpy as np
import triton_python_backend_utils as pb_utils
from trtqwen_text import BadRequest, Profile, as_bool, check_parameters, config_param, load_tokenizer, model_config


class TritonPythonModel:
    def initialize(self, args):
        cfg = model_config(args)
        self.tokenizer = load_tokenizer(config_param(cfg, "tokenizer_dir"))
        self.skip_special_tokens = as_bool(config_param(cfg, "skip_special_tokens"), True)
        self.profile = Profile(args.get("model_instance_name", "postprocessing"))

    def execute(self, requests):
        t0 = time.perf_counter()
        responses = []
        for request in requests:
            try:
                check_parameters(request.parameters())
                tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
                lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
                if tokens.ndim != 3:  # [batch, beam, tokens] as tensorrt_llm sends them; tolerate [batch, tokens]
                    tokens = tokens.reshape(1, 1, -1) if tokens.ndim < 2 else tokens[:, None, :]
                lengths = lengths.reshape(tokens.shape[0], tokens.shape[1])
                seqs = [tokens[b, k, : int(lengths[b, k])].tolist()
                        for b in range(tokens.shape[0]) for k in range(tokens.shape[1])]
                texts = self.tokenizer.batch_decode(seqs, skip_special_tokens=self.skip_special_tokens)
                out = np.array([t.encode("utf-8") for t in texts], dtype=np.object_)  # [batch × beam], as upstream's
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", out)]))
            except BadRequest as e:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)))
            except Exception as e:  # noqa: BLE001
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"postprocessing: {e}")))
        now = time.perf_counter()
        self.profile.add(executes=1, requests=len(requests), execute_s=now - t0)
        self.profile.write(now)
        return responses
