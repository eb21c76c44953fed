"""The kernels every model forward calls, one public function per op.

Each op has a pure-torch reference beside it (the CPU path and the oracle of the
tests); `dispatch` chooses the implementation per call. Import from here only.
"""

from splitinfer.kernels.dispatch import (
    apply_rope_,
    decode_split_batches,
    decode_workspace_numel,
    flash_attention_varlen,
    paged_attention,
    plan_paged_attention,
    rms_norm,
    silu_and_mul,
    store_kv,
    use_triton,
)
from splitinfer.kernels.attention import PagedAttentionPlan
from splitinfer.kernels.rope import RopeScaling, rope_cos_sin_cache

__all__ = [
    "PagedAttentionPlan",
    "RopeScaling",
    "apply_rope_",
    "decode_split_batches",
    "decode_workspace_numel",
    "flash_attention_varlen",
    "paged_attention",
    "plan_paged_attention",
    "rms_norm",
    "rope_cos_sin_cache",
    "silu_and_mul",
    "store_kv",
    "use_triton",
]
