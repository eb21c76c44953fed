"""The model families the engine runs, each a declaration of how it differs from the one decoder.

Every family here is a pre-norm decoder of RMSNorm, rotary self-attention with grouped
K/V heads, and a SwiGLU MLP, with Hugging Face's tensor names (`model.layers.N.self_attn.
q_proj.weight`, ...). What differs between them is data, not code: which projections carry a
bias, whether q and k are RMS-normalised per head before RoPE, which layers attend through a
sliding window, and the defaults their `transformers` config classes give to fields that a
`config.json` may leave out. `ModelConfig.from_dir` reads a checkpoint's config through its
family; `engine.model.CausalLM` builds whatever the resulting config says.

To add a family: write its `Family` below (and list it in FAMILIES), with its rule for
windows if it has its own; only a genuinely new operation (say, Gemma's scaled embeddings or
Phi-3's fused qkv tensor) needs code in `model.py`. Then add it to
`scripts/make_tiny_model.py --family` and to the tests that compare every family with
transformers (tests/test_families.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from splitinfer.engine.model_config import ConfigFields

# Each layer's sliding window (None: the layer attends to its whole context), from config.json.
WindowRule = Callable[["ConfigFields", int], tuple[int | None, ...]]


def no_windows(fields: ConfigFields, num_layers: int) -> tuple[int | None, ...]:
    """Every layer attends to its whole context (Llama)."""
    del fields
    return (None,) * num_layers


def window_on_every_layer(fields: ConfigFields, num_layers: int) -> tuple[int | None, ...]:
    """`sliding_window` (null: none) on every layer: Mistral."""
    return (fields.optional_positive_int("sliding_window"),) * num_layers


def windows_by_layer_type(fields: ConfigFields, num_layers: int) -> tuple[int | None, ...]:
    """Qwen2's and Qwen3's rule, as their transformers configs apply it: no window unless
    `use_sliding_window`; then `sliding_window` on the layers `layer_types` marks
    "sliding_attention", or, without `layer_types`, on the layers from `max_window_layers` on."""
    if not fields.boolean("use_sliding_window", default=False):
        return (None,) * num_layers
    window = fields.optional_positive_int("sliding_window")
    if window is None:
        return (None,) * num_layers
    layer_types = fields.layer_types(num_layers)
    if layer_types is None:
        first = fields.non_negative_int("max_window_layers", default=28)
        return tuple(window if i >= first else None for i in range(num_layers))
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


@dataclass(frozen=True, slots=True)
class Family:
    """How one architecture differs from the shared decoder.

    A bias flag is fixed (True/False) or names the config field that decides it (absent: no
    bias). `defaults` are the values the family's transformers config class gives to fields a
    `config.json` may omit, where they differ from the shared ones in `model_config.py`."""

    architecture: str  # as config.json's `architectures` lists it
    model_type: str  # config.json's `model_type`
    qkv_bias: bool | str = False
    o_bias: bool | str = False
    mlp_bias: bool | str = False
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (`q_norm`, `k_norm` weights [head_dim])
    windows: WindowRule = no_windows
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


LLAMA = Family(
    "LlamaForCausalLM",
    "llama",
    qkv_bias="attention_bias",
    o_bias="attention_bias",
    mlp_bias="mlp_bias",
)
# Qwen2 and Qwen2.5: biases on q, k and v only.
QWEN2 = Family(
    "Qwen2ForCausalLM",
    "qwen2",
    qkv_bias=True,
    windows=windows_by_layer_type,
    defaults=MappingProxyType({"max_position_embeddings": 32768}),
)
# Qwen3 (dense): q/k norms, an explicit head_dim (128 unless config.json says otherwise).
QWEN3 = Family(
    "Qwen3ForCausalLM",
    "qwen3",
    qkv_bias="attention_bias",
    o_bias="attention_bias",
    qk_norm=True,
    windows=windows_by_layer_type,
    defaults=MappingProxyType({"head_dim": 128, "max_position_embeddings": 32768}),
)
MISTRAL = Family(
    "MistralForCausalLM",
    "mistral",
    windows=window_on_every_layer,
    defaults=MappingProxyType({"max_position_embeddings": 4096 * 32}),
)

FAMILIES: Mapping[str, Family] = MappingProxyType({f.architecture: f for f in (LLAMA, QWEN2, QWEN3, MISTRAL)})
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


def family_of(architectures: object, model_type: object) -> Family | None:
    """The family of a config's `architectures` list (the first one supported), or, when the
    list is absent, of its `model_type`; None when neither names a supported family."""
    if isinstance(architectures, list):
        return next((FAMILIES[a] for a in architectures if isinstance(a, str) and a in FAMILIES), None)
    if architectures is None:
        return next((f for f in FAMILIES.values() if f.model_type == model_type), None)
    return None
