"""Model sources and loading.

A model name resolves to one of three sources:
- the embedded default ``smollm2-135m-instruct`` (converted once into the cache directory);
- ``random:<name>``: random weights of a named architecture (``random_configs``), token ids only;
- a local Hugging Face directory (``config.json`` + safetensors + tokenizer files).
Random weights are never a fallback: they are used only when the name says ``random:``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from disagg.errors import UnknownModelError
from disagg.models.config import ModelConfig
from disagg.models.embedded import EMBEDDED_MODEL, prepare_embedded
from disagg.models.llama import LlamaForCausalLM
from disagg.models.random_configs import RANDOM_CONFIGS

RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from: a directory, or a random config and seed."""

    name: str
    path: Path | None = None
    random_config: str | None = None
    seed: int = 0

    @property
    def has_tokenizer(self) -> bool:
        return self.path is not None

    def hf_config(self) -> dict[str, Any]:
        if self.random_config is not None:
            return dict(RANDOM_CONFIGS[self.random_config])
        with open(self.path / "config.json") as f:
            return json.load(f)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_hf_dict(self.hf_config())


def resolve_model(name: str, *, cache_dir: Path, seed: int = 0) -> ModelSource:
    """Turn a user-given model name into a ``ModelSource`` (preparing the embedded model)."""
    if name.lower() == EMBEDDED_MODEL:
        return ModelSource(name=EMBEDDED_MODEL, path=prepare_embedded(cache_dir))
    if name.startswith(RANDOM_PREFIX):
        config_name = name[len(RANDOM_PREFIX):]
        if config_name not in RANDOM_CONFIGS:
            known = ", ".join(RANDOM_PREFIX + k for k in RANDOM_CONFIGS)
            raise UnknownModelError(f"unknown random config {name!r}; known: {known}")
        return ModelSource(name=name, random_config=config_name, seed=seed)
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return ModelSource(name=name, path=path.resolve())
    raise UnknownModelError(
        f"model {name!r} is not {EMBEDDED_MODEL!r}, a random:<config> name, "
        "or a local directory with a config.json"
    )


def load_model(
    source: ModelSource, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    """Build the model of ``source`` on ``device`` in ``dtype``, weights loaded, in eval mode,
    its projections packed (``LlamaForCausalLM.fuse_projections``)."""
    config = source.model_config()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if source.random_config is not None:
        model.to_empty(device=device)
        model.to(dtype)
        init_random_weights(model, source.seed)
    else:
        state = _read_safetensors(source.path)
        if config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        model.to(device=device, dtype=dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval().requires_grad_(False)
    model.fuse_projections()
    return model


def load_tokenizer(source: ModelSource):
    """The transformers tokenizer of ``source`` (with its chat template), or None."""
    if not source.has_tokenizer:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path)


@torch.no_grad()
def init_random_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Deterministic random weights: N(0, 0.02) matrices and biases, unit norm weights."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnknownModelError(f"model directory {path} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state
