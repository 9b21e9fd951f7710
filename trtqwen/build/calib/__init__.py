"""Offline calibration texts, shipped with the package, or the user's own file.

calib.jsonl holds ~100 original samples, one JSON object per line ({"kind": ..., "text": ...}): English and
Chinese prose (short, medium, long), a few other languages, Python / JavaScript / TypeScript / SQL / C / Rust / Go /
shell / Docker / YAML / HTML code, JSON, Markdown, math, and ChatML conversations in Qwen2.5's chat format. The
lines are interleaved by kind, so the first n samples are varied for any n.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from trtqwen.errors import UserError

FORMATS = "a .jsonl file with a \"text\" field per line, or a .txt file with one sample per blank-line-separated block"
TEXT_SUFFIXES = (".txt", ".text", ".md")


def bundled_path() -> Path:
    return Path(str(resources.files("trtqwen.build.calib") / "calib.jsonl"))


def _read_jsonl(path: Path, text: str) -> list[str]:
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}, line {number}: not a JSON object with a \"text\" field",
                            'write one {"text": "..."} object per line') from None
        if not isinstance(sample, str):
            raise UserError(f"{path}, line {number}: \"text\" is {type(sample).__name__}, not a string")
        if sample.strip():
            samples.append(sample)
    return samples


def read_calibration_file(path: Path) -> list[str]:
    """All samples in a calibration file (.jsonl or text blocks); UserError when unreadable."""
    if not path.is_file():
        raise UserError(f"calibration file {path} does not exist" if not path.exists() else f"{path} is not a file",
                        f"pass {FORMATS}")
    suffix = path.suffix.lower()
    if suffix != ".jsonl" and suffix not in TEXT_SUFFIXES:
        raise UserError(f"calibration file {path} has an unknown format ({suffix or 'no suffix'})", f"pass {FORMATS}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"calibration file {path} is not UTF-8 text", f"pass {FORMATS}") from None
    if suffix == ".jsonl":
        return _read_jsonl(path, text)
    return [block.strip() for block in re.split(r"\n[ \t]*\n", text) if block.strip()]


def load_calibration_texts(path: Path | str | None, n: int) -> list[str]:
    """The first n samples of the user's file (which replaces the bundled set) or of the bundled set.

    Fewer than n come back when the source has fewer: repeating a sample adds no information to calibration.
    """
    if n < 1:
        raise UserError(f"the number of calibration samples must be at least 1, got {n}")
    source = bundled_path() if path is None else Path(path)
    texts = read_calibration_file(source)
    if not texts:
        raise UserError(f"calibration file {source} has no samples", f"pass {FORMATS}")
    return texts[:n]
