"""TriangleMix attention config: which layers run Triangle attention during prefill.

TriangleMix keeps the shallow layers dense and runs Triangle attention (sinks + sliding window
+ dense last rows) in the deep ones. The split is per model, published for some models and
otherwise chosen by a gradient probe (the contribution of the skipped middle region to the
loss of the first generated token). Only prefill is sparse: decode attends densely over the
complete KV cache, which is tagged with ``AttentionConfig.tag`` because deep-layer K/V differ
from a dense prefill's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from disagg_kernels.dynamic_sparse import DynamicSparseParams
from disagg_kernels.triangle_mix import TriangleParams

from disagg.attention.metadata import AttentionKind

DENSE_TAG = "dense"

# Published splits (TriangleMix paper): the Triangle layers of each model.
PUBLISHED_TRIANGLE_LAYERS: dict[str, tuple[int, ...]] = {
    "llama-3.1-8b": tuple(range(16, 32)),
    "llama-3-8b-262k": tuple(range(16, 32)),
    "qwen2.5-7b": tuple(range(20, 28)),
    # No published split and no probe run yet: SmolLM2 is a Llama-architecture model, so we
    # take Llama-3.1-8B's proportion, the deeper half (15 of 30 layers). The probe replaces it.
    "smollm2-135m": tuple(range(15, 30)),
}


@dataclass(frozen=True)
class TriangleMixConfig:
    """Triangle attention in ``triangle_layers``, dense elsewhere, during prefill; with
    ``dynamic`` set, the other layers run dynamic block-sparse attention instead of dense
    (prompts of at least ``dynamic.min_tokens`` tokens)."""

    triangle_layers: tuple[int, ...]
    params: TriangleParams = field(default_factory=TriangleParams)
    dynamic: DynamicSparseParams | None = None  # None (default): the other layers stay dense

    def __post_init__(self):
        if not self.triangle_layers:
            raise ValueError("TriangleMix needs at least one Triangle layer")
        if any(i < 0 for i in self.triangle_layers):
            raise ValueError("layer indices must be >= 0")
        object.__setattr__(self, "triangle_layers", tuple(sorted(set(self.triangle_layers))))

    @property
    def min_sparse_tokens(self) -> int:
        """Prompts of at most this many tokens are effectively dense: use the dense path."""
        p = self.params
        return p.n_sink + p.n_window + p.n_last

    def kind(self, layer_idx: int, num_prompt_tokens: int) -> AttentionKind:
        if num_prompt_tokens > self.min_sparse_tokens and layer_idx in self.triangle_layers:
            return AttentionKind.TRIANGLE
        if self.dynamic is not None and num_prompt_tokens >= self.dynamic.min_tokens:
            return AttentionKind.DYNAMIC
        return AttentionKind.DENSE

    @property
    def tag(self) -> str:
        p, layers = self.params, self.triangle_layers
        span = (f"{layers[0]}-{layers[-1]}" if layers == tuple(range(layers[0], layers[-1] + 1))
                else ",".join(map(str, layers)))
        dynamic = f",{self.dynamic.tag}" if self.dynamic is not None else ""
        return (f"trianglemix(sink={p.n_sink},window={p.n_window},last={p.n_last},"
                f"layers={span}{dynamic})")

    def validate_for(self, num_layers: int) -> None:
        if self.triangle_layers[-1] >= num_layers:
            raise ValueError(f"Triangle layer {self.triangle_layers[-1]} does not exist in a "
                             f"{num_layers}-layer model")


def attention_tag(config: TriangleMixConfig | None) -> str:
    """The fingerprint's name for the prefill attention that produced a KV cache."""
    return DENSE_TAG if config is None else config.tag


def published_trianglemix(architecture: str, params: TriangleParams | None = None
                          ) -> TriangleMixConfig:
    """The TriangleMix config of a known architecture (``PUBLISHED_TRIANGLE_LAYERS`` keys)."""
    key = architecture.lower().removeprefix("random:").removesuffix("-instruct")
    if key not in PUBLISHED_TRIANGLE_LAYERS:
        known = ", ".join(PUBLISHED_TRIANGLE_LAYERS)
        raise ValueError(f"no TriangleMix split is known for {architecture!r} (known: {known}); "
                         "give the Triangle layers explicitly")
    return TriangleMixConfig(PUBLISHED_TRIANGLE_LAYERS[key], params or TriangleParams())
