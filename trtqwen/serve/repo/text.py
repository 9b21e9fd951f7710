"""Text ↔ token helpers shared by the python models of the repository (copied next to each model.py).

Only numpy and a tokenizer object: it runs inside Triton's python stub, where trtqwen may not be installed.

Streaming never splits a character: a byte-level BPE token can hold part of a UTF-8 sequence (most CJK
characters are 3 bytes, often split over two tokens), and decoding it alone gives U+FFFD (tensorrtllm_backend
#606). Text is emitted only once the ids decode to complete characters.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

REPLACEMENT = "\ufffd"
TRUE_STRINGS = ("true", "1", "t", "y", "yes", "on")
BAD_REQUEST = "bad request: "  # starts every error that is the client's mistake: clients answer it with a 400

# TensorRT-LLM's SamplingConfig checks (cpp/tensorrt_llm/executor/samplingConfig.cpp), by the tensorrt_llm input
# that carries each value; NaN fails every one of them there, and here. top_p 0 is upstream clients' "off".
SAMPLING_RULES = {
    "temperature": (lambda v: v >= 0, "≥ 0 (0: greedy)"),
    "runtime_top_k": (lambda v: v >= 0, "≥ 0 (0: off)"),
    "runtime_top_p": (lambda v: 0 <= v <= 1, "in (0, 1] (0: off)"),
    "repetition_penalty": (lambda v: v > 0, "> 0 (1: off)"),
    "len_penalty": (lambda v: v >= 0, "≥ 0"),
    "min_tokens": (lambda v: v >= 0, "≥ 0"),
    "beam_width": (lambda v: v >= 1, "≥ 1"),
    "num_return_sequences": (lambda v: v >= 1, "≥ 1"),
    "presence_penalty": (lambda v: True, "a finite number"),
    "frequency_penalty": (lambda v: True, "a finite number"),
}
USER_NAMES = {"runtime_top_k": "top_k", "runtime_top_p": "top_p", "len_penalty": "length_penalty",
              "request_output_len": "max_tokens", "input_ids": "text_input"}  # what ensemble/BLS callers send


# Request parameters a model reads. Triton's HTTP generate endpoint makes every JSON key that is not an input of the
# model a request parameter (`ignore_eos`, `n`, `logprobs`, …), gRPC clients may send any, and an ensemble forwards
# its request's to every step: tensorrtllm_backend's clients send every value as an input tensor, so none is read and
# each one sent is refused (check_parameters) rather than silently ignored.
ACCEPTED_PARAMETERS: frozenset = frozenset()


class BadRequest(ValueError):
    """The client's mistake; the message names the field and what it may be."""

    def __init__(self, message: str):
        super().__init__(BAD_REQUEST + message)


def field(name: str) -> str:
    user = USER_NAMES.get(name)
    return name if user is None else f"{user} ({name})"


def check_sampling(values: dict) -> None:
    """Refuse what TensorRT-LLM's SamplingConfig refuses, naming the field; None means not sent."""
    for name, v in values.items():
        rule = SAMPLING_RULES.get(name)
        if rule is not None and v is not None and not (math.isfinite(v) and rule[0](v)):
            raise BadRequest(f"{field(name)} must be {rule[1]}, got {v}")


def check_parameters(raw: str | None) -> None:
    """Refuse the request parameters (`request.parameters()`, JSON) that no model reads, naming them."""
    try:
        params = json.loads(raw) if raw else {}
    except ValueError:
        params = {}
    unknown = sorted(set(params) - ACCEPTED_PARAMETERS)
    if unknown:
        them = "them" if len(unknown) > 1 else "it"
        raise BadRequest(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: no input of this "
                         f"model is called that (see the inputs in its config), and nothing sent is silently ignored: "
                         f"leave {them} out")


def check_token_id(name: str, value, vocab: int, lowest: int = 0) -> None:
    """A token id that indexes the model's vocabulary (TensorRT-LLM: end_id in [-1, vocab), -1 meaning none)."""
    if value is not None and not lowest <= int(value) < vocab:
        none = " (-1: no end id)" if lowest == -1 else ""
        raise BadRequest(f"{field(name)} must be a token id in [{lowest}, {vocab}){none}, got {int(value)}")


def check_token_ids(name: str, ids, vocab: int) -> None:
    """Every id of a list (prompt, stop/bad words) inside the vocabulary, as TensorRT-LLM checks a prompt's."""
    a = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = a[(a < 0) | (a >= vocab)]
    if bad.size:
        raise BadRequest(f"{name} has token ids outside the vocabulary [0, {vocab}): {bad[:4].tolist()}"
                         + (f" and {bad.size - 4} more" if bad.size > 4 else ""))


def check_stub_numpy() -> None:
    """Fail at load, clearly, where the nvidia-pytriton wheel's stub runs under numpy 2.

    Its python-backend stubs are built against numpy 1.x: under numpy 2 they hand models garbage BYTES tensors
    (`unpack_from requires a buffer of at least …`, then the stub dies) — seen on a GPU box, reproduced here.
    `trtqwen serve` sets TRTQWEN_PYTRITON_STUB for that server only; NVIDIA's own containers are not checked.
    """
    if os.environ.get("TRTQWEN_PYTRITON_STUB") == "1" and int(np.__version__.split(".")[0]) >= 2:
        raise RuntimeError(
            f"numpy {np.__version__} ({np.__file__}) in the Python that runs Triton's python models: the "
            "nvidia-pytriton tritonserver's stubs need numpy<2 — install 'numpy<2' into that environment "
            "(`make install` does; elsewhere a venv made with --system-site-packages and numpy<2 in it: PYTHONPATH "
            "does not reach the stubs)")


def model_config(args: dict) -> dict:
    """What every model's initialize starts with: the numpy check, then its parsed config."""
    check_stub_numpy()  # before any tensor crosses the stub
    return json.loads(args["model_config"])


def load_tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer  # here: only the models that detokenize pay for the import

    return AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)


def as_bool(value, default: bool = False) -> bool:
    if value is None:
        return default
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    return str(value).strip().lower() in TRUE_STRINGS


def config_param(model_config: dict, key: str, default: str | None = None) -> str | None:
    """A `parameters { key: ... string_value: ... }` entry of a model's config; unset ${...} placeholders are None."""
    v = (model_config.get("parameters") or {}).get(key, {}).get("string_value")
    return default if v is None or v == "" or v.startswith("${") else v


def utf8(raw, what: str = "text_input") -> str:
    """A BYTES element as text; invalid UTF-8 is the client's mistake and says so."""
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"{what} is not valid UTF-8 (byte {e.start}: {bytes(raw)[e.start:e.start + 4]!r}); "
                         "send UTF-8 encoded text") from None


def words_of(tensor) -> list[str]:
    """A BYTES tensor of words ([1, n] or [n]) → non-empty strings."""
    if tensor is None:
        return []
    return [w for w in (utf8(x, "stop/bad word") for x in np.asarray(tensor).reshape(-1)) if w]


def to_word_list_format(word_lists: list[list[str]], encode) -> np.ndarray:
    """TensorRT-LLM's stop/bad words layout: int32 [batch, 2, L], row 0 the flat ids, row 1 the end offsets.

    Ids are padded with 0 and offsets with -1 (as tensorrtllm_backend's preprocessing does); a request without
    words gets ids [0] and offsets [-1], which means none.
    """
    flat, offsets = [], []
    for words in word_lists:
        ids, ends = [], []
        for w in words:
            t = list(encode(w))
            if not t:
                continue
            ids += t
            ends.append(len(ids))
        flat.append(ids)
        offsets.append(ends)
    width = max([1] + [len(x) for x in flat] + [len(x) for x in offsets])
    out = np.zeros((len(word_lists), 2, width), dtype=np.int32)
    out[:, 1, :] = -1
    for i, (ids, ends) in enumerate(zip(flat, offsets)):
        out[i, 0, : len(ids)] = ids
        out[i, 1, : len(ends)] = ends
    return out


def parse_word_list(arr, name: str = "word list") -> list[list[int]]:
    """[2, L] (or [1, 2, L]) flat ids + end offsets → list of token sequences."""
    if arr is None:
        return []
    a = np.asarray(arr)
    if a.size % 2:
        raise BadRequest(f"{name} must be [2, n] (ids, then end offsets), got shape {list(a.shape)}")
    a = a.reshape(2, -1) if a.size else np.zeros((2, 0), dtype=np.int32)
    ids, ends = a[0].tolist(), a[1].tolist()
    words, start = [], 0
    for end in ends:
        if end < 0:
            break
        if end > len(ids) or end < start:  # TensorRT-LLM would read past the list or backwards
            raise BadRequest(f"word list offsets must rise and stay within its {len(ids)} ids, got {ends}")
        if end > start:
            words.append(ids[start:end])
        start = end
    return words


class IncrementalDecoder:
    """Ids in, text deltas out; a delta is emitted only once its characters are complete.

    Decodes a short window (from the last emitted boundary), so each token costs O(1), not O(length).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # ids before this are already emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, ids) -> str:
        self.ids.extend(int(i) for i in ids)
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) > len(before) and not text.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        """At the end: whatever is left, even an incomplete character (then as U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]


class TextDeltas:
    """Cumulative text in (TensorRT-LLM's LLM API streams the whole text so far), new complete text out.

    A piece that does not extend what was sent is taken as a delta itself (a backend that streams deltas).
    """

    def __init__(self):
        self.sent = ""
        self.held = ""  # a trailing partial character, held back until it completes

    def push(self, text: str, final: bool = False) -> str:
        seen = self.sent + self.held
        if text.startswith(self.sent) and len(text) >= len(seen):
            delta = text[len(self.sent) :]
        else:
            delta = self.held.rstrip(REPLACEMENT) + text
        self.held = ""
        if not final:
            complete = delta.rstrip(REPLACEMENT)
            self.held, delta = delta[len(complete) :], complete
        self.sent += delta
        return delta


class Profile:
    """Where a served token's time goes: named counters (seconds, counts) of one python model.

    Off unless TRTQWEN_PROFILE_DIR is set in the server's environment; then `<dir>/<model>.json` holds the
    running totals, rewritten (atomically) at most every `every_s` seconds, so a benchmark can diff two reads.
    """

    def __init__(self, model: str, every_s: float = 0.25):
        d = os.environ.get("TRTQWEN_PROFILE_DIR")
        self.path = os.path.join(d, f"{model}.json") if d else None
        if d:
            os.makedirs(d, exist_ok=True)
        self.totals: dict[str, float] = {}
        self.every_s, self.written = every_s, 0.0

    def add(self, **values: float) -> None:
        if self.path is None:
            return
        for k, v in values.items():
            self.totals[k] = self.totals.get(k, 0.0) + v

    def write(self, now: float, force: bool = False) -> None:
        if self.path is None or (not force and now - self.written < self.every_s):
            return
        self.written = now
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(dict(self.totals), f)  # a copy: another thread may add a counter meanwhile
            os.replace(tmp, self.path)
        except OSError:
            pass  # counters are for benchmarks; serving never stops over them
