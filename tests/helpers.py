"""Shared test helpers (importable as ``helpers`` from any test module)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from disagg.cli import default_cache_dir
from disagg.models.embedded import prepare_embedded
from disagg.models.llama import LlamaForCausalLM
from disagg.models.loader import ModelSource, load_model

REPO_ROOT = Path(__file__).resolve().parents[1]


def embedded_model_dir() -> Path:
    """The converted embedded model (``make test`` prepares it before pytest starts)."""
    return prepare_embedded(default_cache_dir())


def save_as_hf_dir(model: LlamaForCausalLM, hf_config: dict, path: Path) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory transformers can load."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config))
    return path


def random_model(name: str, seed: int = 0) -> tuple[LlamaForCausalLM, ModelSource]:
    source = ModelSource(name=f"random:{name}", random_config=name, seed=seed)
    return load_model(source), source


def rel_err_max(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (DESIGN.md §7: logits within 1e-4 of max |logit|)."""
    return float((ours - ref).abs().max() / ref.abs().max())


def greedy_prefix_length(scores: torch.Tensor, margin: float = 1e-3) -> int:
    """Steps before the reference's top-2 logit margin first falls below ``margin``.

    ``scores [steps, V]``. Up to that step, greedy ids of two correct implementations must be
    identical; after it, fp32 rounding may legitimately pick the other token.
    """
    top2 = scores.topk(2, dim=-1).values
    low = ((top2[:, 0] - top2[:, 1]) < margin).nonzero()
    return int(low[0]) if len(low) else scores.shape[0]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def own_serve_app(config, name: str):
    """A Ray instance of this module's own (2 CPUs) serving ``build_app(config)`` on a free
    port; yields the base URL and stops Serve and Ray after."""
    import ray
    from ray import serve

    from deployments.app import build_app

    assert not ray.is_initialized(), "this module starts (and stops) its own Ray instance"
    port = free_port()
    ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name=name, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


class LogitsCapture:
    """The model as the engine sees it, keeping the logits the engine computes."""

    def __init__(self, model):
        self.model, self.config, self.scale, self.logits = model, model.config, model.scale, None

    def __call__(self, *args):
        return self.model(*args)

    def parameters(self):
        return self.model.parameters()

    def compute_logits(self, hidden):
        self.logits = self.model.compute_logits(hidden)
        return self.logits


@contextlib.contextmanager
def small_ray():
    """A one-CPU local Ray for transport tests, or the session's Ray (the deployments tests')
    when one is up; shut down on exit only if started here."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, object_store_memory=100 << 20, include_dashboard=False,
                 log_to_driver=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
