"""The kernels every model forward calls, behind one `Backend` per implementation.

Each op has a pure-torch reference beside it (the CPU path and the oracle of the tests)
and a Triton launcher; `select_backend(device)` picks which implementation a model runs,
once, when it is built (`dispatch`). Attention ops take the step's `AttentionMetadata`.
Import from here only.
"""

from splitinfer.kernels.attention import PagedAttentionPlan
from splitinfer.kernels.dispatch import (
    BACKEND_ENV,
    Backend,
    TorchBackend,
    TritonBackend,
    decode_split_batches,
    decode_workspace_numel,
    select_backend,
)
from splitinfer.kernels.metadata import AttentionMetadata
from splitinfer.kernels.rope import RopeScaling, rope_cos_sin_cache

__all__ = [
    "BACKEND_ENV",
    "AttentionMetadata",
    "Backend",
    "PagedAttentionPlan",
    "RopeScaling",
    "TorchBackend",
    "TritonBackend",
    "decode_split_batches",
    "decode_workspace_numel",
    "rope_cos_sin_cache",
    "select_backend",
]
