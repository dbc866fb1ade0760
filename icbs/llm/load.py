"""Load a causal language model and its tokenizer from a local directory or a GGUF file."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path.home() / ".cache" / "icbs" / "gguf"


def choose_device(device: str | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU; ValueError for a device
    this machine does not have."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch has no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices")
    if chosen.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    return chosen


MANIFEST = "icbs-manifest.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, source_sha256: str) -> None:
    """Record the SHA-256 of every file of a converted model directory."""
    files = {f.name: file_sha256(f) for f in sorted(directory.iterdir()) if f.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps(
        {"source_sha256": source_sha256, "files": files}, indent=1))


def verify_manifest(directory: Path, source_sha256: str) -> None:
    """Raise unless the directory holds exactly the files of its manifest, unchanged, made
    from the source with this hash (a planted, partial or edited cache is refused)."""
    problem = None
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        present = {f.name for f in directory.iterdir() if f.name != MANIFEST}
        if manifest.get("source_sha256") != source_sha256:
            problem = "it was not converted from this file"
        elif present != set(manifest["files"]):
            problem = f"its files {sorted(present)} are not those of its manifest"
        else:
            changed = [name for name, digest in manifest["files"].items()
                       if file_sha256(directory / name) != digest]
            problem = f"{changed} changed since the conversion" if changed else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = f"its manifest cannot be read ({exc})"
    if problem:
        raise ValueError(f"GGUF cache {directory} is not a conversion icbs made: {problem}; "
                         f"delete the directory to convert again")


def convert_gguf(gguf: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Dequantize a GGUF file once into a Hugging Face directory (safetensors) and return it.

    The directory is named by the file's SHA-256 and holds a manifest of its files' hashes,
    checked on every later use.

    `save_pretrained` refuses a GGUF-loaded model, so the model is rebuilt from its config
    (without `quantization_config`) and given the dequantized float32 state dict.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    source_sha256 = file_sha256(gguf)
    target = (Path(cache_dir) if cache_dir else DEFAULT_CACHE) / \
        f"{gguf.stem}-{source_sha256[:16]}"
    if target.exists():
        verify_manifest(target, source_sha256)
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
    # One partial directory per process: runs started together each convert, and the first
    # to finish publishes its directory.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # what a killed conversion left
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    write_manifest(partial, source_sha256)
    publish_conversion(partial, target, source_sha256)
    return target


def publish_conversion(partial: Path, target: Path, source_sha256: str) -> None:
    """Rename a finished conversion to `target`; where another process published first,
    drop this one and check theirs."""
    try:
        partial.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(partial, ignore_errors=True)
        verify_manifest(target, source_sha256)


def resolve_model_dir(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A Hugging Face model directory for `path` (a directory, or a GGUF file converted once)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_dir)
    if path.is_dir() and (path / "config.json").is_file():
        if not any(path.glob("*.safetensors")):
            pickles = sorted(f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth"))
            raise ValueError(
                f"{path} has no safetensors weights{f' (only {pickles})' if pickles else ''}; "
                f"icbs loads safetensors only, because unpickling a .bin file can run code. "
                f"Convert it once, where you trust the file: python -c \"from transformers "
                f"import AutoModelForCausalLM as M; M.from_pretrained('{path}')"
                f".save_pretrained('{path}-safetensors')\"")
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
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 use_safetensors=True).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer
