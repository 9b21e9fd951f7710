"""A TensorRT-LLM checkpoint directory as `trtqwen build` writes it (config.json from the product's own writer,
empty rank files), for tests that check what is read from it and never load its weights."""

import json
import shutil
from pathlib import Path

from trtqwen.build.spec import BuildSpec
from trtqwen.build.trtllm_config import qwen_checkpoint_config

# Qwen2.5-7B's shape: every precision and TP 1, 2, 4 split it.
QWEN25_7B_HF = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
                "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                "intermediate_size": 18944, "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6}


def write_checkpoint(path: Path, spec: BuildSpec, hf: dict | None = None, tp: int | None = None) -> Path:
    """config.json for spec (sharded for tp, default spec.tp) and its rank files."""
    tp = spec.tp if tp is None else tp
    path.mkdir(parents=True, exist_ok=True)
    config = qwen_checkpoint_config(hf or QWEN25_7B_HF, spec.replace(tp=tp))
    (path / "config.json").write_text(json.dumps(config))
    for rank in range(tp):
        (path / f"rank{rank}.safetensors").touch()
    return path


def pytorch_view(build: Path, out: Path, tp: int | None = None) -> Path:
    """A `--target both` build as its `--target pytorch` twin at `out` (its HF checkpoint and tokenizer linked, the
    TensorRT-LLM checkpoint left out), planned for TP `tp` (default the build's): an HF checkpoint splits at load."""
    out.mkdir()
    for name in ("hf_checkpoint", "tokenizer"):
        (out / name).symlink_to(build / name)
    m = json.loads((build / "build.json").read_text())
    m["target"] = "pytorch"
    m["spec"]["tp"] = m["spec"]["tp"] if tp is None else tp
    del m["stages"]["checkpoint"]["dir"]
    (out / "build.json").write_text(json.dumps(m))
    return out


def used(dirs: dict, key, keep: int) -> Path:
    """dirs[key], marked used last; the directories used longest ago beyond `keep` are removed from disk and dirs."""
    dirs[key] = dirs.pop(key)
    while len(dirs) > keep:
        shutil.rmtree(dirs.pop(next(iter(dirs))))
    return dirs[key]


def checkpoint_factory(model_dir: Path, root: Path, keep: int = 3, **calib):
    """get(precision, tp, kv="auto") → a TensorRT-LLM checkpoint of model_dir: each (precision, kv) is calibrated
    once (on the CPU) and kept in memory; only the `keep` checkpoints used last stay on disk (each tiny-tp one is
    ~330 MB: the real vocabulary), the others are written again if asked for."""
    from trtqwen.build import quantize

    quantized, written, tokenizer = {}, {}, quantize.load_tokenizer(model_dir)

    def get(precision: str, tp: int, kv: str = "auto") -> Path:
        key, spec = (precision, tp, kv), BuildSpec(model=str(model_dir), precision=precision, tp=tp, kv_cache_dtype=kv, **calib)
        if (precision, kv) not in quantized:
            model = quantize.load_hf_model(model_dir, spec, "cpu")
            quantize.quantize_model(model, tokenizer, spec)
            quantized[precision, kv] = model
        if key not in written:
            out = root / f"{precision}-tp{tp}-kv{kv}"
            quantize.write_checkpoint(quantized[precision, kv], json.loads((model_dir / "config.json").read_text()),
                                      spec, out)
            written[key] = out
        return used(written, key, keep)

    return get
