"""What the web page talks to: one Triton connection (re-made after any failure), per-session cancel events,
the served-model description and the live stats line. No Gradio in here."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from trtqwen.clients.client import GenerationParams, Timing, TritonLLMClient, chatml, connect
from trtqwen.build.spec import BuildSpec
from trtqwen.checkpoint import read_model_dir
from trtqwen.errors import UserError

ERROR_MARK = "⚠"  # assistant turns starting with it are shown, never sent back to the model
STOPPED_MARK = "*[stopped]*"


def message_text(content) -> str:
    """A Chatbot message's text: Gradio sends a string, or a list of {"type": "text", "text": …} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("value") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(c) for c in content)
    return "" if content is None else str(content)


def conversation(history: list[dict]) -> list[dict]:
    """The turns the model should see: failed exchanges (error replies and their question) are left out."""
    turns: list[dict] = []
    for m in history:
        role, text = m.get("role"), message_text(m.get("content"))
        if role == "assistant" and text.startswith(ERROR_MARK):
            if turns and turns[-1]["role"] == "user":
                turns.pop()
            continue
        if role == "assistant":
            text = text.replace(STOPPED_MARK, "").rstrip()
        if role in ("user", "assistant"):
            turns.append({"role": role, "content": text})
    return turns


def precision_name(quant_algo: str | None, dtype: str | None) -> str:
    """A checkpoint's quant_algo/dtype as the precision names `trtqwen build` takes (W4A16_AWQ → int4_awq)."""
    from trtqwen.precision import PRECISION_OF_ALGO

    if quant_algo is None:
        return "fp16" if str(dtype) in ("float16", "fp16") else "bf16"
    return PRECISION_OF_ALGO[quant_algo].value if quant_algo in PRECISION_OF_ALGO else quant_algo.lower()


def stats_line(timing: Timing | None, state: str, model: str) -> str:
    if timing is None or timing.first_token is None:
        return f"**{state}** · waiting for the first token · `{model}`"
    now = timing.end or time.perf_counter()
    rate = (timing.output_tokens - 1) / max(now - timing.first_token, 1e-9) if timing.output_tokens > 1 else 0.0
    return (f"**{state}** · first token **{timing.ttft * 1e3:.0f} ms** · **{rate:.1f} tok/s** · "
            f"**{timing.output_tokens} tokens** · `{model}`")


class Backend:
    """The Triton side of the page. `model=None` picks tensorrt_llm_bls when served (stop cancels on the
    server there; Triton 2.51 does not pass cancellation through `ensemble`), else ensemble."""

    def __init__(self, url: str, model: str | None = None, repo: str | Path | None = None, timeout: float = 3.0):
        self.url, self.requested_model, self.repo, self.timeout = url, model, repo, timeout
        self._client: TritonLLMClient | None = None
        self._lock = threading.Lock()
        self._cancels: dict[str, threading.Event] = {}
        self.last_error: str | None = None

    @property
    def model(self) -> str:
        return self._client.model if self._client else (self.requested_model or "tensorrt_llm_bls")

    def client(self) -> TritonLLMClient:
        with self._lock:
            if self._client is None:
                self._client = connect(self.url, self.requested_model, timeout=self.timeout)
            return self._client

    def forget(self) -> None:
        """After a failure: the next request connects afresh (the server may have restarted)."""
        with self._lock:
            self._client = None

    # -- streaming --------------------------------------------------------------------------------------------
    def cancel_event(self, session: str) -> threading.Event:
        ev = threading.Event()
        self._cancels[session] = ev
        return ev

    def done(self, session: str, ev: threading.Event) -> None:
        if self._cancels.get(session) is ev:
            del self._cancels[session]

    def stop(self, session: str) -> bool:
        ev = self._cancels.get(session)
        if ev is None:
            return False
        ev.set()
        return True

    def stream(self, history: list[dict], system: str, params: GenerationParams, cancel: threading.Event):
        """Yield (answer so far, timing) for the last user turn of `history`; raises UserError with a message
        fit for the page when the server is unreachable or the request fails."""
        prompt = chatml(conversation(history), system.strip() or None)
        try:
            client = self.client()
            text = ""
            for delta, timing in client.stream(prompt, params, cancel):
                text += delta
                yield text, timing
            self.last_error = None
        except UserError as e:
            self.forget()
            self.last_error = e.message + (f" — {e.hint}" if e.hint else "")
            raise UserError(self.last_error) from None
        except Exception as e:  # noqa: BLE001 - a dropped connection mid-stream, a gRPC error: same to a user
            self.forget()
            self.last_error = f"request to {self.url} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise UserError(self.last_error) from None

    # -- what is served ---------------------------------------------------------------------------------------
    def info(self) -> dict:
        """Model, precision, TP, runtime, GPU: from the repository's trtqwen_repo.json when --repo is given,
        else from what the server's configs say."""
        info: dict = {"url": self.url}
        if self.repo:
            try:
                rec = json.loads((Path(self.repo) / "trtqwen_repo.json").read_text())
                spec = BuildSpec.from_dict(rec["spec"])
                info.update(source="repository record", model=Path(spec.model).name, precision=spec.precision.value,
                            tp=spec.tp, runtime=rec.get("runtime"), gpu=spec.gpu,
                            max_seq_len=(rec.get("settings") or {}).get("max_seq_len"),
                            tensorrt_llm=(rec.get("versions") or {}).get("tensorrt_llm"))
            except (OSError, ValueError, KeyError, TypeError, UserError) as e:
                info["record_error"] = f"cannot read {self.repo}/trtqwen_repo.json ({type(e).__name__})"
        try:
            c = self.client()
            info.update(served=c.model, status="online")
            if "precision" not in info:
                info.update(self._info_from_server(c))
        except UserError as e:
            self.forget()
            info.update(status="offline", error=e.message)
        return info

    def _info_from_server(self, c: TritonLLMClient) -> dict:
        out: dict = {"source": "server config"}
        try:
            cfg = c.client.get_model_config("tensorrt_llm", as_json=True, client_timeout=self.timeout)["config"]
        except Exception:  # noqa: BLE001 - a deployment without that model name: say what we know
            return out
        params = {k: v.get("string_value") for k, v in cfg.get("parameters", {}).items()}
        path = Path(params.get("gpt_model_path") or params.get("engine_dir") or "")
        out["runtime"] = "trtllm" if cfg.get("backend") == "tensorrtllm" else f"{cfg.get('backend')} backend"
        out["model"] = (path.parent.name if path.name in ("checkpoint", "hf_checkpoint", "engine") else path.name) or "?"
        out["max_seq_len"] = params.get("max_seq_len")
        try:  # the checkpoint (through the one reader) or engine config, when the server's files are visible from here
            pc = json.loads((path / "config.json").read_text()).get("pretrained_config")  # trtllm-build's engine config
            if pc is None:
                ck = read_model_dir(path)  # an HF checkpoint is split at load: the TP it is served at
                out.update(precision=precision_name(ck.quant_algo, ck.dtype),
                           tp=ck.tp if ck.kind == "trtllm" else int(params.get("tensor_parallel_size") or 1))
            else:
                out["precision"] = precision_name((pc.get("quantization") or {}).get("quant_algo"), pc.get("dtype"))
                out["tp"] = (pc.get("mapping") or {}).get("tp_size")
        except (OSError, ValueError, AttributeError, UserError):
            pass
        return out
