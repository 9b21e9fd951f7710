"""Hugging Face checkpoints: fetch from the hub (only the files a build needs) and validate before spending time."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from trtqwen.errors import UserError

# What a build needs from a repository: weights, configs, tokenizer. Never *.bin / *.pt (safetensors only).
FETCH_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                  "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                  "added_tokens.json"]
KNOWN_DTYPES = {"bfloat16", "float16", "float32"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                           "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class HfCheckpoint:
    path: Path
    config: dict
    weight_files: list[str]
    dtype: str
    revision: str | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)


def is_hub_id(model: str) -> bool:
    return not Path(model).exists() and bool(HUB_ID.match(model))


def fetch(model: str, revision: str | None = None, patterns: list[str] | None = None) -> tuple[Path, str | None]:
    """A local directory is used as it is; a hub id is downloaded (resumable, cached under HF_HOME)."""
    if Path(model).exists():
        if not Path(model).is_dir():
            raise UserError(f"{model} is a file", "pass a model directory (with config.json and *.safetensors) or a hub id")
        return Path(model), None
    if not HUB_ID.match(model):
        raise UserError(f"{model!r} is neither a local directory nor a hub id like Qwen/Qwen2.5-7B-Instruct")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = snapshot_download(model, revision=revision, allow_patterns=patterns or FETCH_PATTERNS)
    except RepositoryNotFoundError:
        raise UserError(f"no repository {model!r} on the hub (or it is gated)", "check the id, or `huggingface-cli login` for gated models") from None
    except LocalEntryNotFoundError:
        raise UserError(
            f"cannot reach the Hugging Face hub and there is no local copy of {model}",
            "connect to the network (HF_HUB_OFFLINE unset), point HF_HOME at a cache that has it, or pass --model <local dir>",
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"download of {model} failed: {e}", "check the network and disk, then re-run: the download resumes") from None
    sha = Path(path).name  # snapshots/<commit sha>
    return Path(path), sha


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (truncated, bad header), or None. Reads only the header."""
    size = path.stat().st_size
    if size < 8:
        return "shorter than a safetensors header"
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8 or header_len > 100_000_000:
            return "header length exceeds the file (truncated or not safetensors)"
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "header is not valid JSON (truncated or not safetensors)"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size < 8 + header_len + end:
        return f"truncated: {size} bytes, header promises {8 + header_len + end}"
    return None


def fingerprint(path: Path) -> str:
    """Cheap identity of a file: size plus a hash of its first MiB (full hashes of 15 GB take minutes)."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def validate(path: Path, revision: str | None = None) -> HfCheckpoint:
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{path} has no config.json", "pass the directory of a Hugging Face model (config.json, *.safetensors, tokenizer)")
    config = json.loads(cfg_path.read_text())
    arch = (config.get("architectures") or ["<none>"])[0]
    if arch != "Qwen2ForCausalLM":
        raise UserError(f"{path} is a {arch} model, not Qwen2ForCausalLM",
                        "trtqwen builds Qwen2-architecture models (Qwen2, Qwen2.5); pick one of those")

    custom = [name for name in ("config.json", "tokenizer_config.json")
              if (path / name).is_file() and "auto_map" in json.loads((path / name).read_text())]
    if custom:  # trust_remote_code stays off: what that code would change, the standard build would silently miss
        raise UserError(f"{path} asks for custom code (auto_map in {', '.join(custom)}); trtqwen never runs checkpoint "
                        "code and builds the standard Qwen2 architecture",
                        "if the custom code is the stock Qwen2 (as in many fine-tunes), delete the auto_map entries")

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise UserError(f"{len(missing)} weight shard(s) listed in {index.name} are missing: {', '.join(missing[:3])}",
                            "re-run the build to resume the download, or copy the missing files")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        other = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        raise UserError(f"{path} has no *.safetensors weights" + (f" (found {', '.join(other[:3])})" if other else ""),
                        "trtqwen loads safetensors only; convert with `transformers` save_pretrained(safe_serialization=True)")
    for f in files:
        problem = safetensors_problem(path / f)
        if problem:
            raise UserError(f"weight file {f} is unusable: {problem}", "delete it and re-run to download it again")

    if not ((path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())):
        raise UserError(f"{path} has no tokenizer (tokenizer.json or vocab.json + merges.txt)",
                        "copy the tokenizer files of the base model into the directory")
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").replace("torch.", "")
    if dtype not in KNOWN_DTYPES:
        raise UserError(f"unknown checkpoint dtype {dtype!r}", f"expected one of {', '.join(sorted(KNOWN_DTYPES))}")
    prints = {f: fingerprint(path / f) for f in files}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (path / name).is_file():
            prints[name] = hashlib.sha256((path / name).read_bytes()).hexdigest()[:16]
    return HfCheckpoint(path=path, config=config, weight_files=files, dtype=dtype, revision=revision, fingerprints=prints)


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "config.json"]
