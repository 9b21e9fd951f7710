"""`tensorrt_llm` served by trtqwen's reference PyTorch runtime, with the C++ backend's tensors and parameters.

In-flight batching: `execute` validates each request, adds it to one shared LLMEngine and returns at once.
Two threads do the rest: the stepping thread only steps the engine (the GPU never waits for a response to go
out), and the sending thread answers through each request's response sender. Streaming sends what a stream has
gained since its last response: one token per response while sending keeps up, several once it does not
(32 streams at GPU speed), so the number of responses — each an IPC round trip through Triton — stays what the
server can carry. Every response decodes to whole characters (a CJK character
split over two tokens goes out in one response), and carries its text (`text_output`, what the ensemble returns:
decoded here once, so the ensemble needs no postprocessing hop) besides the ids.
A request whose client has gone is cancelled at the next step; a bad request gets an error response and
the model keeps serving. Every value that indexes a tensor (input_ids, end_id, pad_id, stop/bad word ids) is checked
against the vocabulary before it joins the batch; a request that still fails in the engine fails alone (LLMEngine
isolates it), and only a broken engine fails every stream (`_fail_all`, then a new engine).
"""

import faulthandler
import os
import sys
import threading
import time
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils
from trtqwen_text import (REPLACEMENT, SAMPLING_RULES, BadRequest, Profile, as_bool, check_parameters,
                          check_sampling, check_token_id, check_token_ids, config_param, load_tokenizer, model_config,
                          parse_word_list)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_CHECK_S = 0.1
UNSUPPORTED = {  # inputs this runtime cannot honour: refuse rather than silently ignore (FACTS §7.10)
    "return_log_probs": "log probabilities", "return_context_logits": "context logits",
    "return_generation_logits": "generation logits",
}
# TRTQWEN_TEST_FAULTS=1 in the server's environment (tests only): a request id `trtqwen-test-fault-at-<n>` makes the
# engine's batched step raise at that request's n-th output token (LLMEngine.add fault_at), to show it fails alone.
FAULT_PREFIX = "trtqwen-test-fault-at-"
PERF_OUTPUTS = ("kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks", "arrival_time_ns",
                "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns", "acceptance_rate",
                "total_accepted_draft_tokens", "total_draft_tokens")


def _value(request, name, default=None):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return default
    a = t.as_numpy()
    return default if a.size == 0 else a.reshape(-1)[0].item()


class Stream:
    """One client request in flight."""

    def __init__(self, sender, request_id, prompt, streaming, exclude_input, want_in, want_out, requested,
                 perf=False):
        self.sender, self.request_id, self.prompt = sender, request_id, prompt
        self.streaming, self.exclude_input = streaming, exclude_input
        self.requested = requested  # the output names the request asked for: every response carries only these
        self.want_text = "text_output" in requested
        self.want_in = want_in and "num_input_tokens" in requested
        self.want_out = want_out and "num_output_tokens" in requested
        self.new: list[int] = []  # tokens of the current step (stepping thread only)
        self.output: list[int] = []  # every token so far (stepping thread only)
        self.pending: list[int] = []  # tokens not sent yet, moved from `new` under the model's lock
        self.finish: str | None = None  # set with the last tokens, under the lock
        self.error: str | None = None  # the stream ends with this error instead of its tokens
        self.reason: str | None = None  # the engine's finish reason (stepping thread), published as `finish`
        self.req = None  # the engine's Request
        self.closed = False
        # return_perf_metrics: time.monotonic_ns() (TensorRT-LLM's steady clock) at arrival, first and last token
        self.perf = perf and not requested.isdisjoint(PERF_OUTPUTS)
        self.arrival_ns, self.first_token_ns, self.last_token_ns = time.monotonic_ns(), 0, 0


class TritonPythonModel:
    def initialize(self, args):
        if not faulthandler.is_enabled():  # a crash of the stub (a signal) leaves its threads' stacks in the server log
            faulthandler.enable()
        cfg = model_config(args)
        self.logger = pb_utils.Logger
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(cfg)
        param = lambda key, default=None: config_param(cfg, key, default)  # noqa: E731
        try:
            import trtqwen  # noqa: F401
        except ImportError:  # not installed in the stub's Python: use the source the repository was made from
            sys.path.insert(0, param("trtqwen_src", ""))
        import torch
        from trtqwen.runtime import LLMEngine, SamplingParams, load_model
        from trtqwen.errors import UserError

        self.torch, self.SamplingParams, self.LLMEngine, self.UserError = torch, SamplingParams, LLMEngine, UserError
        self.max_input_len = int(param("max_input_len"))
        self.max_seq_len = int(param("max_seq_len"))
        self.max_num_tokens = int(param("max_num_tokens", "8192"))
        self.end_id = int(param("end_id", "151645"))
        self.pad_id = int(param("pad_id", "151643"))
        self.faults = os.environ.get("TRTQWEN_TEST_FAULTS") == "1"  # the test hook (FAULT_PREFIX)
        self.exclude_input_default = as_bool(param("exclude_input_in_output"), False)
        self.max_batch_size = max(1, int(cfg.get("max_batch_size") or 1))
        self.device, gpus = self._devices(args, param("gpu_device_ids", "0"))
        self.broken: str | None = None  # why the model cannot serve any more (a tensor-parallel rank died)
        # A TP > 1 checkpoint runs as one process per rank, started (and stopped in finalize) by this model.
        self.model = load_model(param("gpt_model_path"), self.device, max_positions=self.max_seq_len, tp_ranks=True,
                                gpu_ids=gpus, tp=int(param("tensor_parallel_size", "1")))
        if self.device.startswith("cuda") and as_bool(param("torch_compile"), True):
            self.model.compile()  # fused decode blocks; the engine then captures CUDA graphs of them
        self.vocab = int(self.model.cfg.vocab_size)  # what every token id must index (the logits' width)
        self.slots = self._slots(float(param("kv_cache_free_gpu_mem_fraction", "0.9")))
        self.engine = self._new_engine()
        self.tokenizer = None
        if param("tokenizer_dir"):
            self.tokenizer = load_tokenizer(param("tokenizer_dir"))
            self.special = set(self.tokenizer.all_special_ids)
        self.skip_special = as_bool(param("skip_special_tokens"), True)
        self.lock = threading.Lock()
        self.streams: dict[str, Stream] = {}  # request id → stream, for `stop` requests and cancellation
        self.dirty: list[Stream] = []  # touched during a step (filled by on_token, in the stepping thread)
        self.outbox: dict[Stream, None] = {}  # streams with something to send, in order (under the lock)
        self.wake, self.ready = threading.Event(), threading.Event()  # work for the stepper / for the sender
        self.profile = Profile(args.get("model_instance_name", "tensorrt_llm"))
        self.running = self.sending = True
        self.thread = threading.Thread(target=self._loop, name="trtqwen-engine", daemon=True)
        self.sender_thread = threading.Thread(target=self._send_loop, name="trtqwen-send", daemon=True)
        self.thread.start()
        self.sender_thread.start()
        tp = getattr(self.model, "tp_size", 1)
        where = self.device if tp == 1 else f"{self.device}, TP {tp}: one process per rank" + (f" on GPUs {gpus}" if gpus else "")
        self.logger.log_info(f"[trtqwen] tensorrt_llm (torch runtime) on {where}: {self.slots} slots, "
                             f"max_input_len {self.max_input_len}, max_seq_len {self.max_seq_len}")

    def _devices(self, args, gpu_device_ids: str) -> tuple[str, list[int] | None]:
        """This instance's device (its group's first GPU) and its group of GPUs, one per TP rank."""
        if not self.torch.cuda.is_available():
            return "cpu", None
        groups = [g for g in gpu_device_ids.split(";") if g.strip()] or ["0"]
        name = args.get("model_instance_name", "")
        index = int(name.rsplit("_", 1)[-1]) if name.rsplit("_", 1)[-1].isdigit() else 0
        gpus = [int(i) for i in groups[index % len(groups)].split(",") if i.strip()]
        return f"cuda:{gpus[0]}", gpus

    def _slots(self, fraction: float) -> int:
        """KV slots: max_batch_size, fewer where the GPU memory left after the weights cannot hold them."""
        if not self.device.startswith("cuda"):
            return self.max_batch_size
        c = getattr(self.model, "local", self.model).cfg  # a TP model's cache: this rank's KV heads
        per_slot = 2 * c.num_layers * c.num_kv_heads * c.head_dim * self.max_seq_len * self.model.dtype.itemsize
        free, _ = self.torch.cuda.mem_get_info(self.torch.device(self.device))
        return max(1, min(self.max_batch_size, int(free * fraction // per_slot)))

    def _new_engine(self):
        overlap = os.environ.get("TRTQWEN_OVERLAP")  # unset: the engine's default (on for a GPU)
        return self.LLMEngine(self.model, max_slots=self.slots, max_seq_len=self.max_seq_len,
                              prefill_chunk=self.max_num_tokens, overlap=None if overlap is None else as_bool(overlap))

    # --- execute: validate, enqueue, return --------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                if as_bool(_value(request, "stop"), False):
                    self._stop(request.request_id(), sender)
                else:
                    self._add(request, sender)
            except Exception as e:  # noqa: BLE001 - every failure becomes this request's error response
                code = pb_utils.TritonError.INVALID_ARG if isinstance(e, BadRequest) else pb_utils.TritonError.INTERNAL
                self._send(None, sender, pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), code)), FINAL)
        self.wake.set()
        return None

    def _stop(self, request_id, sender):
        with self.lock:
            stream = self.streams.get(request_id) if request_id else None
        if stream is not None and stream.req is not None:
            self.engine.cancel(stream.req)
        sender.send(flags=FINAL)

    def _add(self, request, sender):
        if self.broken:
            raise RuntimeError(self.broken)
        check_parameters(request.parameters())
        streaming = as_bool(_value(request, "streaming"), False)
        if streaming and not self.decoupled:
            raise BadRequest("streaming needs decoupled mode: package the repository with streaming on")
        ids_t = pb_utils.get_input_tensor_by_name(request, "input_ids")
        ids = np.zeros((1, 0), np.int32) if ids_t is None else ids_t.as_numpy()
        if ids.ndim == 2 and ids.shape[0] != 1:
            raise BadRequest(f"send one prompt per request (this one has a batch of {ids.shape[0]})")
        ids = ids.reshape(-1)
        n = int(_value(request, "input_lengths", len(ids)))
        if not 0 <= n <= len(ids):  # TensorRT-LLM would read past the prompt, or drop its last tokens unasked
            raise BadRequest(f"input_lengths must be between 1 and the {len(ids)} input_ids sent, got {n}")
        prompt = [int(x) for x in ids[:n]]
        if not prompt:
            raise BadRequest("the prompt is empty: send a non-empty text_input / input_ids")
        check_token_ids("input_ids", prompt, self.vocab)  # TensorRT-LLM's checkTokenIdRange
        if len(prompt) > self.max_input_len:
            raise BadRequest(f"the prompt has {len(prompt)} tokens, more than max_input_len {self.max_input_len}: "
                             "shorten it, or build and package with a larger --max-input-len")
        max_tokens = int(_value(request, "request_output_len", 0))
        if max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1, got {max_tokens}")
        if max_tokens > self.max_seq_len:
            raise BadRequest(f"max_tokens {max_tokens} exceeds the sequence limit max_seq_len {self.max_seq_len} "
                             "(prompt + output): ask for fewer tokens, or build with a larger --max-seq-len")
        if len(prompt) + max_tokens > self.max_seq_len:  # as TensorRT-LLM does: shorten the output, say so
            self.logger.log_warn(f"[trtqwen] prompt {len(prompt)} + max_tokens {max_tokens} > max_seq_len "
                                 f"{self.max_seq_len}: output limited to {self.max_seq_len - len(prompt)} tokens")
            max_tokens = self.max_seq_len - len(prompt)
        sent = {name: _value(request, name) for name in SAMPLING_RULES}
        check_sampling(sent)
        for name, what in UNSUPPORTED.items():
            if as_bool(_value(request, name), False):
                raise BadRequest(f"{what} ({name}) are not available from the torch runtime: "
                                 "serve TensorRT engines (--runtime trtllm) for them")
        for name in ("beam_width", "num_return_sequences"):
            if (sent[name] or 1) > 1:
                raise BadRequest(f"{name} > 1 is not supported by the torch runtime (sampling, one sequence)")
        end_id, pad_id = _value(request, "end_id", self.end_id), _value(request, "pad_id", self.pad_id)
        check_token_id("end_id", end_id, self.vocab, lowest=-1)  # as TensorRT-LLM's LlmRequest::validate
        check_token_id("pad_id", pad_id, self.vocab)
        stop_words = parse_word_list(self._array(request, "stop_words_list"), "stop_words_list")
        check_token_ids("stop_words_list", [t for w in stop_words for t in w], self.vocab)
        bad_words = parse_word_list(self._array(request, "bad_words_list"), "bad_words_list")
        check_token_ids("bad_words_list", [t for w in bad_words for t in w], self.vocab)
        if bad_words:
            raise BadRequest("bad_words are not supported by the torch runtime: serve with --runtime trtllm")
        given = lambda name, default: default if sent[name] is None else sent[name]  # noqa: E731
        params = self.SamplingParams(
            max_tokens=max_tokens,
            temperature=float(given("temperature", 1.0)),
            top_k=int(given("runtime_top_k", 0)),
            top_p=float(given("runtime_top_p", 0.0)),
            seed=int(_value(request, "seed", 0)),
            repetition_penalty=float(given("repetition_penalty", 1.0)),
            presence_penalty=float(given("presence_penalty", 0.0)),
            frequency_penalty=float(given("frequency_penalty", 0.0)),
            min_tokens=int(given("min_tokens", 0)),
            end_id=None if int(end_id) == -1 else int(end_id),  # -1: no end id (generate up to max_tokens)
            pad_id=int(pad_id),
            stop_words=stop_words,
        )
        requested = frozenset(request.requested_output_names())
        if "text_output" in requested and self.tokenizer is None:
            raise BadRequest("text_output needs the tokenizer: package the repository with its tokenizer_dir")
        request_id = request.request_id() or uuid.uuid4().hex
        stream = Stream(sender, request_id, prompt, streaming,
                        as_bool(_value(request, "exclude_input_in_output"), self.exclude_input_default),
                        as_bool(_value(request, "return_num_input_tokens"), False),
                        as_bool(_value(request, "return_num_output_tokens"), False), requested,
                        as_bool(_value(request, "return_perf_metrics"), False))
        fault_at = None
        if self.faults and request_id.startswith(FAULT_PREFIX):
            fault_at = int(request_id[len(FAULT_PREFIX):].split("-")[0])

        def on_token(req, token, reason, stream=stream):  # called in the stepping thread
            if token is not None:
                stream.new.append(token)
                stream.output.append(token)
                stream.last_token_ns = time.monotonic_ns()
                stream.first_token_ns = stream.first_token_ns or stream.last_token_ns
            if reason == "error":  # this request failed in the engine; the batch went on without it
                stream.error = f"generation failed for this request (the others in its batch went on): {req.error}"
                self.logger.log_error(f"[trtqwen] request {stream.request_id} failed alone: {req.error}")
            if reason is not None:
                stream.reason = reason
            self.dirty.append(stream)

        with self.lock:
            self.streams[request_id] = stream
        try:
            stream.req = self.engine.add(prompt, params, on_token, fault_at=fault_at)
        except Exception as e:
            with self.lock:
                self.streams.pop(request_id, None)
            if isinstance(e, self.UserError):  # the engine's own checks: the client's mistake
                raise BadRequest(str(e)) from None
            raise

    @staticmethod
    def _array(request, name):
        t = pb_utils.get_input_tensor_by_name(request, name)
        return None if t is None else t.as_numpy()

    # --- the stepping thread: steps, and hands each step's tokens to the sender ------------------------------------
    def _loop(self):
        while self.running:
            if not self.engine.has_work():
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                self.logger.log_error(f"[trtqwen] engine step failed: {e!r}")
                self._fail_all(f"generation failed: {e}")
                continue
            t1 = time.perf_counter()
            dirty, self.dirty = list(dict.fromkeys(self.dirty)), []
            tokens = sum(len(s.new) for s in dirty)
            self._publish(dirty)
            self.profile.add(step_s=t1 - t0, steps=1, step_tokens=tokens, publish_s=time.perf_counter() - t1)

    def _publish(self, dirty: list[Stream]) -> None:
        """This step's tokens and finishes, to the sender (one lock per step, not per token)."""
        if not dirty:
            return
        with self.lock:
            for s in dirty:
                s.pending += s.new
                s.new = []
                if s.reason is not None:
                    s.finish = s.reason
                self.outbox[s] = None
        self.ready.set()

    # --- the sending thread: one response per stream per pass, carrying all it has gained ------------------------
    def _send_loop(self):
        last_check = 0.0
        while self.sending or self.outbox:
            self.ready.wait(0.05)
            self.ready.clear()
            with self.lock:
                batch = [(s, s.pending, s.finish) for s in self.outbox]
                for s, _, _ in batch:
                    s.pending = []
                self.outbox = {}
            for s, ids, finish in batch:
                try:
                    self._flush(s, ids, finish)
                except Exception as e:  # noqa: BLE001 - one stream's response (its text, say) fails that stream only
                    self.logger.log_error(f"[trtqwen] request {s.request_id}: responding failed: {e!r}")
                    if s.req is not None:
                        self.engine.cancel(s.req)
                    if not s.closed:
                        self._close(s, pb_utils.InferenceResponse(
                            error=pb_utils.TritonError(f"responding to this request failed: {e}")))
            now = time.perf_counter()
            if now - last_check > CANCEL_CHECK_S:  # here, not in the stepper: a sender is asked only while open
                last_check = now
                self._check_cancelled()
            self.profile.write(now)

    def _flush(self, s: Stream, ids: list[int], finish: str | None) -> None:
        if s.closed:
            return
        if s.error is not None:
            self._close(s, pb_utils.InferenceResponse(error=pb_utils.TritonError(s.error)))
        elif finish is not None:
            if finish == "cancelled":
                self.logger.log_info(f"[trtqwen] request {s.request_id} cancelled after {len(s.output)} tokens")
                if s.sender.is_cancelled():
                    self._close(s, pb_utils.InferenceResponse(
                        error=pb_utils.TritonError("request cancelled by the client", pb_utils.TritonError.CANCELLED)))
                    return
            if not s.streaming:
                ids = s.output if s.exclude_input else s.prompt + s.output
            self._close(s, self._response(s, ids))
        elif s.streaming and ids:
            t0 = time.perf_counter()
            text = self._text(ids)
            self.profile.add(detok_s=time.perf_counter() - t0)
            if text is None:  # half a character: wait for the token that completes it
                with self.lock:
                    s.pending[:0] = ids
                return
            if not self._send(s, s.sender, self._response(s, ids, text), 0) and s.req is not None:
                self.engine.cancel(s.req)

    def _text(self, ids: list[int], final: bool = False) -> str | None:
        """ids as text (as postprocessing decodes them); None where they end inside a character, unless final."""
        if self.tokenizer is None:
            return ""  # no text asked for (want_text needs the tokenizer)
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        if text.endswith(REPLACEMENT) and not final:
            return None
        if self.skip_special and not self.special.isdisjoint(ids):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text

    def _response(self, s: Stream, ids, text: str | None = None):
        """Only the outputs the request asked for. Triton 2.51's ResponseSender.send drops the others itself with
        the GIL released, so a numpy array freed there races the stepping thread's Python: on the GPU (the stepper
        holds the GIL most of the time) the stub segfaulted at its first streamed response (python_backend fixed
        that in r25.01, #390: it frees them under the GIL)."""
        out = []
        if "output_ids" in s.requested:
            out.append(pb_utils.Tensor("output_ids", np.asarray(ids, dtype=np.int32).reshape(1, 1, -1)))
        if "sequence_length" in s.requested:
            out.append(pb_utils.Tensor("sequence_length", np.array([[len(ids)]], dtype=np.int32)))
        if s.want_text:
            text = self._text(ids, final=True) if text is None else text
            out.append(pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)))
        if s.want_in:
            out.append(pb_utils.Tensor("num_input_tokens", np.array([[len(s.prompt)]], dtype=np.int32)))
        if s.want_out:
            n = len(ids) if s.streaming or s.exclude_input else len(s.output)
            out.append(pb_utils.Tensor("num_output_tokens", np.array([[n]], dtype=np.int32)))
        if s.perf:
            out += self._perf_metrics(s)
        return pb_utils.InferenceResponse(output_tensors=out)

    @staticmethod
    def _perf_metrics(s: Stream) -> list:
        """return_perf_metrics: tensorrtllm_backend's outputs, [1, 1] each. The runtime's KV cache is one slot per
        request, counted as one block, never reused; it drafts no tokens (acceptance rate 0)."""
        scheduled = getattr(s.req, "scheduled_ns", None) or 0
        values = {"kv_cache_alloc_new_blocks": (1, np.int32), "kv_cache_reused_blocks": (0, np.int32),
                  "kv_cache_alloc_total_blocks": (1, np.int32), "arrival_time_ns": (s.arrival_ns, np.int64),
                  "first_scheduled_time_ns": (scheduled, np.int64), "first_token_time_ns": (s.first_token_ns, np.int64),
                  "last_token_time_ns": (s.last_token_ns, np.int64), "acceptance_rate": (0.0, np.float32),
                  "total_accepted_draft_tokens": (0, np.int32), "total_draft_tokens": (0, np.int32)}
        return [pb_utils.Tensor(name, np.array([[v]], dtype=t)) for name, (v, t) in values.items()
                if name in s.requested]

    def _send(self, s, sender, response, flags) -> bool:
        t0 = time.perf_counter()
        try:
            sender.send(response, flags=flags)
            return True
        except Exception as e:  # noqa: BLE001 - the client has gone; stop generating for it
            if s is not None:
                self.logger.log_verbose(f"[trtqwen] request {s.request_id}: send failed ({e}); cancelling")
            return False
        finally:
            self.profile.add(send_s=time.perf_counter() - t0, sends=1)

    def _close(self, s: Stream, response):
        s.closed = True
        with self.lock:
            self.streams.pop(s.request_id, None)
        self._send(s, s.sender, response, FINAL)

    def _check_cancelled(self):
        with self.lock:
            active = list(self.streams.values())
        for s in active:
            if s.closed:
                continue  # its final response went out: Triton has released its response factory
            try:
                gone = s.sender.is_cancelled()
            except Exception:  # noqa: BLE001
                gone = True
            if gone and s.req is not None:
                self.engine.cancel(s.req)

    def _fail_all(self, message: str, restart: bool = True):
        """End every open stream with this error (sent by the sender, so no stream gets two final responses)."""
        with self.lock:
            for s in self.streams.values():
                s.error = s.error or message
                self.outbox[s] = None
        self.ready.set()
        self.dirty = []
        if not restart or self.broken:
            return
        try:
            self.engine = self._new_engine()
        except Exception as e:  # noqa: BLE001 - a dead TP rank: refuse every request from now on, loudly
            self.broken = f"the model cannot serve: {e} (see the server log; restart the server)"
            self.logger.log_error(f"[trtqwen] {self.broken}")
            self.running = False
            self._fail_all(self.broken, restart=False)  # requests added while the engine was being remade

    def finalize(self):
        self.running = False
        self.wake.set()
        self.thread.join(timeout=10)
        self._fail_all("the model is being unloaded", restart=False)
        self.sending = False
        self.ready.set()
        self.sender_thread.join(timeout=10)
        self.profile.write(time.perf_counter(), force=True)
        if hasattr(self.model, "close"):
            self.model.close()  # stop the TP rank processes (shutdown, then kill what lingers)
