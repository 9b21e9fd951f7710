"""`tensorrt_llm_bls`: the ensemble's text interface in one python model calling the others (BLS).

preprocessing (tokenize, stop words) → tensorrt_llm (streamed) → incremental detokenization here: with
`accumulate_tokens` the ids of a request are accumulated and only new, complete text is sent, so a character
split over tokens never reaches the client as U+FFFD whatever runtime serves tensorrt_llm. (NVIDIA's BLS sends
the whole accumulated text each time; this one sends the clean delta, which is what clients of the streaming
ensemble expect.) With the llmapi runtime, tensorrt_llm takes text and streams its cumulative text; the new
complete text is sent likewise.

`execute` hands each request to a thread and returns, so concurrent streams are served together (FACTS §5).
"""

import threading
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils
from trtqwen_interface import ENSEMBLE_TRTLLM_INPUTS, PASSTHROUGH_OUTPUTS, TEXT_INPUTS
from trtqwen_text import (BAD_REQUEST, SAMPLING_RULES, BadRequest, IncrementalDecoder, TextDeltas, as_bool,
                          check_parameters, check_sampling, config_param, load_tokenizer, model_config, utf8, words_of)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
PREPROCESSING_INPUTS = {"QUERY": "text_input", "REQUEST_OUTPUT_LEN": "max_tokens", "BAD_WORDS_DICT": "bad_words",
                        "STOP_WORDS_DICT": "stop_words", "END_ID": "end_id", "PAD_ID": "pad_id"}
FROM_PREPROCESSING = {"input_ids": "INPUT_ID", "input_lengths": "REQUEST_INPUT_LEN",
                      "request_output_len": "REQUEST_OUTPUT_LEN", "end_id": "OUT_END_ID", "pad_id": "OUT_PAD_ID",
                      "stop_words_list": "STOP_WORDS_IDS", "bad_words_list": "BAD_WORDS_IDS"}
LLMAPI_INPUTS = {"sampling_param_max_tokens": "max_tokens", "sampling_param_temperature": "temperature",
                 "sampling_param_top_k": "top_k", "sampling_param_top_p": "top_p", "sampling_param_seed": "seed",
                 "sampling_param_frequency_penalty": "frequency_penalty",
                 "sampling_param_presence_penalty": "presence_penalty"}
PASSTHROUGH = [t.name for t in PASSTHROUGH_OUTPUTS if t.name not in ("num_output_tokens",)]


def _error(message: str, code=None) -> "pb_utils.InferenceResponse":
    """An error response; a client's mistake (found here or by the model it calls) keeps INVALID_ARG for HTTP."""
    if code is None and BAD_REQUEST in message:
        code = pb_utils.TritonError.INVALID_ARG
    err = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=err)


class TritonPythonModel:
    def initialize(self, args):
        cfg = model_config(args)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(cfg)
        self.accumulate = as_bool(config_param(cfg, "accumulate_tokens"), True)
        self.trtllm = config_param(cfg, "tensorrt_llm_model_name", "tensorrt_llm")
        self.interface = config_param(cfg, "tensorrt_llm_interface", "tokens")
        self.skip_special_tokens = as_bool(config_param(cfg, "skip_special_tokens"), True)
        self.tokenizer = load_tokenizer(config_param(cfg, "tokenizer_dir"))
        self.input_names = [t.name for t in TEXT_INPUTS]
        self.logger = pb_utils.Logger

    def execute(self, requests):
        for request in requests:
            inputs = {}
            for name in self.input_names:
                t = pb_utils.get_input_tensor_by_name(request, name)
                if t is not None:
                    inputs[name] = np.array(t.as_numpy(), copy=True)
            sender = request.get_response_sender()
            threading.Thread(target=self._serve, args=(inputs, sender, request.parameters()), daemon=True).start()
        return None

    # --- one request, in its own thread ------------------------------------------------------------------------
    def _serve(self, inputs: dict, sender, parameters: str = ""):
        try:
            check_parameters(parameters)
            self._validate(inputs)
            stream = as_bool(inputs["stream"].reshape(-1)[0]) if inputs.get("stream") is not None else False
            if stream and not self.decoupled:
                raise BadRequest("streaming needs decoupled mode: package the repository with streaming on")
            if self.interface == "llmapi":
                self._generate_llmapi(inputs, sender, stream)
            else:
                self._generate(inputs, sender, stream)
        except BadRequest as e:
            self._send(sender, _error(str(e)), FINAL)
        except Exception as e:  # noqa: BLE001 - report, keep serving
            self.logger.log_error(f"[trtqwen] tensorrt_llm_bls: {e!r}")
            self._send(sender, _error(f"tensorrt_llm_bls: {e}"), FINAL)

    @staticmethod
    def _validate(inputs: dict):
        text = inputs.get("text_input")
        if text is None or text.size == 0:
            raise BadRequest("text_input is required")
        if text.size != 1:
            raise BadRequest("send one prompt per request")
        if not utf8(text.reshape(-1)[0]):
            raise BadRequest("text_input is empty: send a prompt")
        tokens = inputs.get("max_tokens")
        if tokens is None or tokens.size == 0 or int(tokens.reshape(-1)[0]) < 1:
            got = "nothing" if tokens is None or tokens.size == 0 else int(tokens.reshape(-1)[0])
            raise BadRequest(f"max_tokens must be at least 1, got {got}")
        check_sampling({trt: inputs[text].reshape(-1)[0].item() for trt, text in ENSEMBLE_TRTLLM_INPUTS.items()
                        if trt in SAMPLING_RULES and inputs.get(text) is not None and inputs[text].size})

    @staticmethod
    def _send(sender, response, flags=0) -> bool:
        try:
            if response is None:
                sender.send(flags=flags)
            else:
                sender.send(response, flags=flags)
            return True
        except Exception:  # noqa: BLE001 - the client has gone
            return False

    @staticmethod
    def _tensor(name, value):
        return pb_utils.Tensor(name, value)

    def _text_response(self, text: str, extra: list) -> "pb_utils.InferenceResponse":
        out = np.array([text.encode("utf-8")], dtype=np.object_)  # [beam]: upstream clients read text_output[0]
        return pb_utils.InferenceResponse(output_tensors=[self._tensor("text_output", out)] + extra)

    def _generate(self, inputs: dict, sender, stream: bool):
        pre_inputs = [self._tensor(k, inputs[v]) for k, v in PREPROCESSING_INPUTS.items() if v in inputs]
        pre = pb_utils.InferenceRequest(model_name="preprocessing", inputs=pre_inputs,
                                        requested_output_names=list(FROM_PREPROCESSING.values())).exec()
        if pre.has_error():  # preprocessing's message says whose mistake it is
            self._send(sender, _error(pre.error().message()), FINAL)
            return
        trt_inputs = [self._tensor(k, pb_utils.get_output_tensor_by_name(pre, v).as_numpy())
                      for k, v in FROM_PREPROCESSING.items()]
        for trt_name, text_name in ENSEMBLE_TRTLLM_INPUTS.items():
            if text_name in inputs and trt_name not in FROM_PREPROCESSING:
                trt_inputs.append(self._tensor(trt_name, inputs[text_name]))
        if "streaming" not in {t.name() for t in trt_inputs}:
            trt_inputs.append(self._tensor("streaming", np.array([[stream]], dtype=bool)))
        request_id = uuid.uuid4().hex
        trt_request = pb_utils.InferenceRequest(model_name=self.trtllm, inputs=trt_inputs, request_id=request_id,
                                                requested_output_names=["output_ids", "sequence_length"] + PASSTHROUGH
                                                + ["num_output_tokens"])
        want_out = "return_num_output_tokens" in inputs and as_bool(inputs["return_num_output_tokens"].reshape(-1)[0])
        decoder = IncrementalDecoder(self.tokenizer, self.skip_special_tokens)
        responses = trt_request.exec(decoupled=True) if self.decoupled else [trt_request.exec()]
        all_ids, unsent, passthrough = [], 0, []
        for resp in responses:
            if resp.has_error():
                self._send(sender, _error(resp.error().message()), FINAL)
                return
            ids_t = pb_utils.get_output_tensor_by_name(resp, "output_ids")
            if ids_t is None:
                continue  # an empty final response
            passthrough = self._passthrough(resp)  # the latest (perf metrics, token counts) go with the final too
            n = int(pb_utils.get_output_tensor_by_name(resp, "sequence_length").as_numpy().reshape(-1)[0])
            ids = ids_t.as_numpy().reshape(-1)[:n].tolist()
            all_ids += ids
            unsent += len(ids)
            if not stream:
                continue
            if self.accumulate:
                text = decoder.push(ids)
            else:  # NVIDIA's accumulate_tokens false: each response decoded alone (may split a character)
                text = self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
            if not text:
                continue  # part of a character: it goes out with the next token
            extra = passthrough + self._count(want_out, unsent)
            unsent = 0
            if not self._send(sender, self._text_response(text, extra)):
                self._stop(request_id)
                return
            if sender.is_cancelled():
                self._stop(request_id)
                self._send(sender, _error("request cancelled by the client", pb_utils.TritonError.CANCELLED), FINAL)
                return
        if stream:
            rest = decoder.flush() if self.accumulate else ""
            if rest or unsent:
                self._send(sender, self._text_response(rest, passthrough + self._count(want_out, unsent)), FINAL)
            else:
                self._send(sender, None, FINAL)
        else:
            text = self.tokenizer.decode(all_ids, skip_special_tokens=self.skip_special_tokens)
            self._send(sender, self._text_response(text, passthrough + self._count(want_out, len(all_ids))), FINAL)

    @staticmethod
    def _passthrough(resp) -> list:
        out = []
        for name in PASSTHROUGH:
            t = pb_utils.get_output_tensor_by_name(resp, name)
            if t is not None:
                out.append(pb_utils.Tensor(name, t.as_numpy()))
        return out

    @staticmethod
    def _count(wanted: bool, n: int) -> list:
        return [pb_utils.Tensor("num_output_tokens", np.array([[n]], dtype=np.int32))] if wanted else []

    def _stop(self, request_id: str):
        """Ask tensorrt_llm to stop generating for a client that has gone (its `stop` input, by request id)."""
        try:
            stop = pb_utils.InferenceRequest(
                model_name=self.trtllm, request_id=request_id, requested_output_names=["output_ids"],
                inputs=[pb_utils.Tensor("input_ids", np.array([[0]], dtype=np.int32)),
                        pb_utils.Tensor("input_lengths", np.array([[1]], dtype=np.int32)),
                        pb_utils.Tensor("request_output_len", np.array([[1]], dtype=np.int32)),
                        pb_utils.Tensor("stop", np.array([[True]], dtype=bool))])
            for _ in (stop.exec(decoupled=True) if self.decoupled else [stop.exec()]):
                pass
        except Exception as e:  # noqa: BLE001
            self.logger.log_verbose(f"[trtqwen] stop request failed: {e}")

    # --- llmapi: tensorrt_llm speaks text ------------------------------------------------------------------------
    def _generate_llmapi(self, inputs: dict, sender, stream: bool):
        text = inputs["text_input"].reshape(-1)[:1]
        req_inputs = [pb_utils.Tensor("text_input", text.astype(np.object_)),
                      pb_utils.Tensor("streaming", np.array([stream], dtype=bool))]
        for name, src in LLMAPI_INPUTS.items():
            if src in inputs:
                req_inputs.append(pb_utils.Tensor(name, inputs[src].reshape(-1)[:1]))
        stops = words_of(inputs.get("stop_words"))
        if stops:
            words = np.array([w.encode() for w in stops], dtype=np.object_)
            req_inputs.append(pb_utils.Tensor("sampling_param_stop", words))
        exclude = inputs.get("exclude_input_in_output")
        req_inputs.append(pb_utils.Tensor("sampling_param_exclude_input_from_output",
                                          np.array([True if exclude is None else bool(exclude.reshape(-1)[0])])))
        request = pb_utils.InferenceRequest(model_name=self.trtllm, inputs=req_inputs,
                                            requested_output_names=["text_output"])
        deltas = TextDeltas()
        last = ""
        for resp in (request.exec(decoupled=True) if self.decoupled else [request.exec()]):
            if resp.has_error():
                self._send(sender, _error(resp.error().message()), FINAL)
                return
            t = pb_utils.get_output_tensor_by_name(resp, "text_output")
            if t is None:
                continue
            raw = t.as_numpy().reshape(-1)[0]
            last = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            if stream:
                delta = deltas.push(last)
                if delta and not self._send(sender, self._text_response(delta, [])):
                    return
        if stream:
            rest = deltas.push(last, final=True)
            self._send(sender, self._text_response(rest, []) if rest else None, FINAL)
        else:
            self._send(sender, self._text_response(last, []), FINAL)
