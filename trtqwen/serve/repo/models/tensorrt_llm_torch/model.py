"""`tensorrt_llm` served by trtqwen's reference PyTorch runtime, with the C++ backend's tensors and parameters.

The engine core (scheduler, model runner, sampler) runs in a process of its own (trtqwen/runtime/engine/core.py),
started at load and ready once its model is loaded and its graphs captured; this model is its frontend: `execute`
validates each request and hands it to the engine process, a receiving thread takes one message per engine step
with every stream's new tokens, and the sending thread answers through each request's response sender. The step
and the responses no longer share an interpreter (vLLM V1's EngineCoreProc, SGLang's scheduler process).
Streaming sends what a stream has gained since its last response: every `stream_interval` tokens (TensorRT-LLM's
and vLLM's parameter, default 1), several at once when sending falls behind. Every response decodes to whole
characters (a CJK character split over two tokens goes out in one response), and carries its text (`text_output`,
decoded here once, so the ensemble needs no postprocessing hop) besides the ids.
A request whose client has gone is cancelled at the next step; a bad request gets an error response and
the model keeps serving. Every value that indexes a tensor (input_ids, end_id, pad_id, stop/bad word ids) is checked
against the vocabulary before it joins the batch; a request that still fails in the engine fails alone (LLMEngine
isolates it). A broken engine, a dead engine process (ended within 0.1 s) or a hung one (nothing for
`engine_hang_timeout_s` while requests are open) fails every open stream, and a new engine process takes over.
"""

import faulthandler
import os
import sys
import threading
import time
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils
from trtqwen_request import Limits, scalar, translate
from trtqwen_text import REPLACEMENT, BadRequest, Profile, as_bool, config_param, load_tokenizer, model_config

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_CHECK_S = 0.1
PERF_OUTPUTS = ("kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks", "arrival_time_ns",
                "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns", "acceptance_rate",
                "total_accepted_draft_tokens", "total_draft_tokens")


class Stream:
    """One client request in flight."""

    def __init__(self, sender, request_id, prompt, streaming, exclude_input, want_in, want_out, requested,
                 perf=False):
        self.sender, self.request_id, self.prompt = sender, request_id, prompt
        self.streaming, self.exclude_input = streaming, exclude_input
        self.requested = requested  # the output names the request asked for: every response carries only these
        self.want_text = "text_output" in requested
        self.want_in, self.want_out = want_in, want_out
        self.output: list[int] = []  # every token so far (under the model's lock)
        self.pending: list[int] = []  # tokens not sent yet (under the lock)
        self.finish: str | None = None  # the engine's finish reason, set with the last tokens (under the lock)
        self.error: str | None = None  # the stream ends with this error instead of its tokens
        self.error_code = pb_utils.TritonError.INTERNAL
        self.scheduled_ns: int | None = None  # when it took its KV slot in the engine (perf metrics)
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
        from trtqwen.qwen_tokenizer import EOS_ID, PAD_ID
        from trtqwen.runtime.engine.client import EngineClient, EngineUnavailable
        from trtqwen.runtime.engine.core import EngineSpec
        from trtqwen.runtime.layers.sampler import SamplingParams

        self.SamplingParams, self.EngineUnavailable = SamplingParams, EngineUnavailable
        self.max_input_len = int(param("max_input_len"))
        self.max_seq_len = int(param("max_seq_len"))
        self.end_id = int(param("end_id", str(EOS_ID)))
        self.pad_id = int(param("pad_id", str(PAD_ID)))
        self.exclude_input_default = as_bool(param("exclude_input_in_output"), False)
        self.stream_interval = max(1, int(param("stream_interval", "1")))
        device, gpus = self._devices(args, param("gpu_device_ids", "0"))
        overlap = os.environ.get("TRTQWEN_OVERLAP")  # unset: the engine's default (on for a GPU)
        spec = EngineSpec(path=param("gpt_model_path"), device=device, gpus=gpus,
                          tp=int(param("tensor_parallel_size", "1")), max_seq_len=self.max_seq_len,
                          max_batch_size=max(1, int(cfg.get("max_batch_size") or 1)),
                          max_num_tokens=int(param("max_num_tokens", "8192")),
                          kv_fraction=float(param("kv_cache_free_gpu_mem_fraction", "0.9")),
                          compile=as_bool(param("torch_compile"), True),
                          overlap=None if overlap is None else as_bool(overlap))
        self.tokenizer = None
        if param("tokenizer_dir"):
            self.tokenizer = load_tokenizer(param("tokenizer_dir"))
            self.special = set(self.tokenizer.all_special_ids)
        self.skip_special = as_bool(param("skip_special_tokens"), True)
        self.lock = threading.Lock()
        self.streams: dict[str, Stream] = {}  # request id → stream, for `stop` requests and cancellation
        self.outbox: dict[Stream, None] = {}  # streams with something to send, in order (under the lock)
        self.ready = threading.Event()  # work for the sender
        self.profile = Profile(args.get("model_instance_name", "tensorrt_llm"))
        self.engine = EngineClient(spec, self._on_step, self._on_failure, lambda m: self.logger.log_warn(f"[trtqwen] {m}"),
                                   float(param("engine_hang_timeout_s", "60")))
        self.limits = Limits(vocab=int(self.engine.info["vocab"]),  # what every token id must index (the logits')
                             max_input_len=self.max_input_len, max_seq_len=self.max_seq_len, end_id=self.end_id,
                             pad_id=self.pad_id, decoupled=self.decoupled, exclude_input=self.exclude_input_default,
                             has_tokenizer=self.tokenizer is not None,
                             faults=os.environ.get("TRTQWEN_TEST_FAULTS") == "1")  # trtqwen_request.FAULT_PREFIX
        self.sending = True
        self.sender_thread = threading.Thread(target=self._send_loop, name="trtqwen-send", daemon=True)
        self.sender_thread.start()
        info = self.engine.info
        where = info["device"] if info["tp"] == 1 else f"{info['device']}, TP {info['tp']}: one process per rank"
        self.logger.log_info(f"[trtqwen] tensorrt_llm (torch runtime) on {where}, engine process {info['pid']}: "
                             f"{info['slots']} slots, max_input_len {self.max_input_len}, max_seq_len {self.max_seq_len}")

    def _devices(self, args, gpu_device_ids: str) -> tuple[str, list[int] | None]:
        """This instance's device (its group's first GPU) and its group of GPUs, one per TP rank (asked without
        touching CUDA: the stub never uses the GPU, its engine process does)."""
        import torch

        if not torch.cuda.is_available():
            return "cpu", None
        groups = [g for g in gpu_device_ids.split(";") if g.strip()] or ["0"]
        name = args.get("model_instance_name", "")
        index = int(name.rsplit("_", 1)[-1]) if name.rsplit("_", 1)[-1].isdigit() else 0
        gpus = [int(i) for i in groups[index % len(groups)].split(",") if i.strip()]
        return f"cuda:{gpus[0]}", gpus

    # --- execute: validate, enqueue, return --------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                if as_bool(scalar(self._array(request, "stop")), False):
                    self._stop(request.request_id(), sender)
                else:
                    self._add(request, sender)
            except Exception as e:  # noqa: BLE001 - every failure becomes this request's error response
                code = (pb_utils.TritonError.INVALID_ARG if isinstance(e, BadRequest) else
                        pb_utils.TritonError.UNAVAILABLE if isinstance(e, self.EngineUnavailable) else
                        pb_utils.TritonError.INTERNAL)
                self._send(None, sender, pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), code)), FINAL)
        return None

    def _stop(self, request_id, sender):
        with self.lock:
            stream = self.streams.get(request_id) if request_id else None
        if stream is not None:
            self.engine.cancel(stream.request_id)
        sender.send(flags=FINAL)

    def _add(self, request, sender):
        request_id = request.request_id() or uuid.uuid4().hex
        requested = frozenset(request.requested_output_names())
        t = translate(lambda name: self._array(request, name), request.parameters(), requested, self.limits, request_id)
        for note in t.notes:
            self.logger.log_warn(f"[trtqwen] {note}")
        params = self.SamplingParams(**t.params)
        stream = Stream(sender, request_id, t.prompt, t.streaming, t.exclude_input, t.want_in, t.want_out, requested,
                        t.perf)
        with self.lock:
            self.streams[request_id] = stream
        try:
            self.engine.add(request_id, t.prompt, params, t.fault_at)
        except Exception:
            with self.lock:
                self.streams.pop(request_id, None)
            raise

    @staticmethod
    def _array(request, name):
        t = pb_utils.get_input_tensor_by_name(request, name)
        return None if t is None else t.as_numpy()

    # --- the engine's messages (its client's receiving thread): one per step, every stream's news ------------------
    def _on_step(self, updates, step_s: float) -> None:
        t0, now = time.perf_counter(), time.monotonic_ns()
        tokens = 0
        with self.lock:
            for u in updates:
                s = self.streams.get(u.rid)
                if s is None:
                    continue
                if u.tokens:
                    tokens += len(u.tokens)
                    s.output += u.tokens
                    s.pending += u.tokens
                    s.last_token_ns = now
                    s.first_token_ns = s.first_token_ns or now
                s.scheduled_ns = u.scheduled_ns or s.scheduled_ns
                if u.reason == "error":  # this request failed in the engine; the batch went on without it
                    s.error = f"generation failed for this request (the others in its batch went on): {u.error}"
                    self.logger.log_error(f"[trtqwen] request {s.request_id} failed alone: {u.error}")
                elif u.reason == "rejected":  # the engine's own checks (a backstop of _add's): the client's mistake
                    s.error, s.error_code = f"bad request: {u.error}", pb_utils.TritonError.INVALID_ARG
                if u.reason is not None:
                    s.finish = u.reason
                self.outbox[s] = None
        self.ready.set()
        self.profile.add(step_s=step_s, steps=1, step_tokens=tokens, publish_s=time.perf_counter() - t0)

    def _on_failure(self, message: str) -> None:
        """The engine failed every open request (a broken engine, its process dead or hung)."""
        self.logger.log_error(f"[trtqwen] {message}")
        self._fail_all(message)

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
                    self.engine.cancel(s.request_id)
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
            self._close(s, pb_utils.InferenceResponse(error=pb_utils.TritonError(s.error, s.error_code)))
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
            if len(ids) < self.stream_interval:  # stream_interval: a response every so many tokens (and the last)
                with self.lock:
                    s.pending[:0] = ids
                return
            t0 = time.perf_counter()
            text = self._text(ids)
            self.profile.add(detok_s=time.perf_counter() - t0)
            if text is None:  # half a character: wait for the token that completes it
                with self.lock:
                    s.pending[:0] = ids
                return
            if not self._send(s, s.sender, self._response(s, ids, text), 0):
                self.engine.cancel(s.request_id)

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
        scheduled = s.scheduled_ns or 0
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
            if gone:
                self.engine.cancel(s.request_id)

    def _fail_all(self, message: str):
        """End every open stream with this error (sent by the sender, so no stream gets two final responses)."""
        with self.lock:
            for s in self.streams.values():
                s.error = s.error or message
                self.outbox[s] = None
        self.ready.set()

    def finalize(self):
        self.engine.close()  # the engine process, and its TP ranks
        self._fail_all("the model is being unloaded")
        self.sending = False
        self.ready.set()
        self.sender_thread.join(timeout=10)
        self.profile.write(time.perf_counter(), force=True)
