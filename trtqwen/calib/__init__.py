"""Offline calibration texts (English, Chinese, Japanese, code, JSON, ChatML chats; short and long), or a user's file."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from trtqwen.errors import UserError


def _read(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path} is not JSON lines with a 'text' field", 'write one {"text": "..."} per line') from None
    return [block.strip() for block in text.split("\n\n") if block.strip()]  # .txt: blank-line separated samples


def load_calibration_texts(path: Path | str | None, n: int) -> list[str]:
    """n samples (cycling if the set is smaller); a user file replaces the bundled set."""
    if path is None:
        texts = _read(Path(str(resources.files("trtqwen.calib") / "calib.jsonl")))
    else:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"calibration file {path} does not exist", "pass a .jsonl (with 'text') or a .txt file")
        texts = _read(path)
    if not texts:
        raise UserError(f"calibration file {path} has no samples")
    return [texts[i % len(texts)] for i in range(n)]
