"""The single place that picks an implementation for each kernel call.

Today every op runs its pure-torch reference, on any device; the Triton kernels join
here (Triton for CUDA tensors, or when SPLITINFER_KERNELS=triton) without any change
to the callers.
"""

from __future__ import annotations

from splitinfer.kernels.activation import silu_and_mul_reference as silu_and_mul
from splitinfer.kernels.attention import flash_attention_varlen_reference as flash_attention_varlen
from splitinfer.kernels.attention import paged_attention_reference as paged_attention
from splitinfer.kernels.kv_store import store_kv_reference as store_kv
from splitinfer.kernels.rms_norm import rms_norm_reference as rms_norm
from splitinfer.kernels.rope import apply_rope_reference_ as apply_rope_

__all__ = ["apply_rope_", "flash_attention_varlen", "paged_attention", "rms_norm", "silu_and_mul", "store_kv"]
