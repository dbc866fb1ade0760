"""Load a causal language model and its tokenizer from a local directory or a GGUF file."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path.home() / ".cache" / "icbs" / "gguf"


def choose_device(device: str | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _gguf_cache_dir(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return cache_dir / f"{gguf.stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def convert_gguf(gguf: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Dequantize a GGUF file once into a Hugging Face directory (safetensors) and return it.

    `save_pretrained` refuses a GGUF-loaded model, so the model is rebuilt from its config
    (without `quantization_config`) and given the dequantized float32 state dict.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    target = _gguf_cache_dir(gguf, Path(cache_dir) if cache_dir else DEFAULT_CACHE)
    if (target / "config.json").is_file():
        return target
    logger.info("converting %s to %s (once)", gguf, target)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def resolve_model_dir(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A Hugging Face model directory for `path` (a directory, or a GGUF file converted once)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_dir)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"{path}: expected a Hugging Face model directory (with config.json) or a .gguf file")


def load_model(path: str | Path, device: str | torch.device | None = None,
               cache_dir: str | Path | None = None):
    """(model, tokenizer) in eval mode on `device`: float32 on CPU, the model's dtype on GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = choose_device(str(device) if device else None)
    model_dir = resolve_model_dir(path, cache_dir)
    dtype = torch.float32 if device.type == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer
