"""The kernel backends, and the one place that picks one.

A `Backend` runs every hot op of the model: `TritonBackend` the Triton kernels,
`TorchBackend` the pure-torch references (the CPU path). `select_backend(device)` picks one
when a model is built, from the device and the environment variable SPLITINFER_KERNELS:
`triton` forces Triton (with TRITON_INTERPRET=1 set before triton is imported, the kernels
then run on CPU tensors under the interpreter: that is how the tests prove them), `torch`
forces the references, `auto` (the default) decides by device. Whoever calls the kernels
keeps the backend it got (the model does, `LlamaForCausalLM.backend`): the environment is
read once, not on every call, and one model never mixes the two implementations.

The attention ops take the step's `AttentionMetadata`, built once per forward and shared by
every layer, instead of the same lengths, tables and slots at every call.
"""

from __future__ import annotations

import abc
import functools
import importlib.util
import os
from types import ModuleType
from typing import ClassVar

import torch

from splitinfer.kernels import activation, attention, kv_store, norm, rope
from splitinfer.kernels.metadata import AttentionMetadata

# Triton ships wheels for Linux x86_64 only; elsewhere the references run. It is
# imported on first use, so that TRITON_INTERPRET may still be set before then
# (the kernel bench does) and CPU-only runs never pay for the import.
HAS_TRITON = importlib.util.find_spec("triton") is not None


@functools.cache
def _triton(name: str) -> ModuleType:
    """The Triton launcher module `splitinfer.kernels.<name>`, imported on first use."""
    return importlib.import_module(f"splitinfer.kernels.{name}")


BACKEND_ENV = "SPLITINFER_KERNELS"
# Split-K decode cuts a context into at most this many slices (see paged_decode_triton).
MAX_DECODE_SPLITS = 16
BACKENDS = ("auto", "triton", "torch")


class Backend(abc.ABC):
    """The model's hot ops on one implementation. Shapes are `[tokens, heads, head_dim]`; caches
    are one layer's `[blocks, block_size, Hkv, D]`; GQA maps query head h to KV head
    `h // (Hq // Hkv)` without repeating K/V. Backends hold no state: one instance serves
    every model."""

    name: ClassVar[str]
    # Only Triton ops may be captured in a CUDA graph: the torch path plans paged attention
    # on the host (`.tolist()`, `nonzero`), which syncs, and a sync is illegal during capture.
    uses_triton: ClassVar[bool]

    @abc.abstractmethod
    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm of x [T, H] times weight [H], fp32 math; with `residual`, fused
        `residual_out = x + residual` and returns `(rms_norm(residual_out), residual_out)`."""

    @abc.abstractmethod
    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU: [T, 2*I] (gate first) -> silu(gate) * up [T, I]."""

    @abc.abstractmethod
    def apply_rope_(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
    ) -> None:
        """Rotate q [T, Hq, D] and k [T, Hkv, D] in place (rotate-half layout) by positions [T]."""

    @abc.abstractmethod
    def store_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> None:
        """Write k, v [T, Hkv, D] into one layer's paged caches at `metadata.slot_mapping`;
        slot -1 writes nothing."""

    @abc.abstractmethod
    def flash_attention_varlen(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float | None = None,
        causal: bool = True,
        window: int | None = None,
    ) -> torch.Tensor:
        """Attention within each packed sequence over its fresh K/V alone (a prefill with no
        cached prefix): q [T, Hq, D], k, v [T, Hkv, D], split by `metadata.cu_seqlens_q`. With
        a sliding `window` W (causal only), the query at position p sees keys p - W < j <= p."""

    @abc.abstractmethod
    def paged_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float | None = None,
        window: int | None = None,
    ) -> torch.Tensor:
        """Packed queries q [T, Hq, D] over each sequence's paged context (one layer's caches,
        which already hold the new tokens); sequence b's queries are its last
        `cu_seqlens_q[b+1] - cu_seqlens_q[b]` positions of `seq_lens[b]`, causal, its keys
        read through `block_tables[b]`; with a sliding `window` W, the query at position p
        sees keys p - W < j <= p only, and blocks wholly before them are not read."""

    def __repr__(self) -> str:
        return f"<{self.name} kernels>"


class TorchBackend(Backend):
    """The pure-torch references: the CPU path, and the oracle of the Triton kernels."""

    name = "torch"
    uses_triton = False

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return norm.rms_norm_reference(x, weight, eps, residual)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return activation.silu_and_mul_reference(gate_up)

    def apply_rope_(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
    ) -> None:
        rope.apply_rope_reference_(q, k, positions, cos_sin_cache)

    def store_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> None:
        kv_store.store_kv_reference(k, v, k_cache, v_cache, metadata.slot_mapping)

    def flash_attention_varlen(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float | None = None,
        causal: bool = True,
        window: int | None = None,
    ) -> torch.Tensor:
        return attention.flash_attention_varlen_reference(
            q, k, v, metadata.cu_seqlens_q, metadata.max_seqlen_q, scale, causal, window
        )

    def paged_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float | None = None,
        window: int | None = None,
    ) -> torch.Tensor:
        """The decode rows of a step in a few SDPA calls (`paged_attention_cpu`), grouped by a
        plan made once per step and window (`metadata.cpu_plan`) and reused by every layer with
        that window."""
        m = metadata
        plan = m.cpu_plan(k_cache.shape[1], window)
        return attention.paged_attention_cpu(
            q, k_cache, v_cache, m.block_tables, m.seq_lens, m.cu_seqlens_q, scale, window=window, plan=plan
        )


class TritonBackend(Backend):
    """The Triton kernels (`*_triton.py`). Each launcher module is looked up at call time
    (`_triton`), so triton is imported on first use only."""

    name = "triton"
    uses_triton = True

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return _triton("norm_triton").rms_norm_triton(x, weight, eps, residual)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return _triton("activation_triton").silu_and_mul_triton(gate_up)

    def apply_rope_(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
    ) -> None:
        _triton("rope_triton").apply_rope_triton_(q, k, positions, cos_sin_cache)

    def store_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> None:
        _triton("kv_store_triton").store_kv_triton(k, v, k_cache, v_cache, metadata.slot_mapping)

    def flash_attention_varlen(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float | None = None,
        causal: bool = True,
        window: int | None = None,
    ) -> torch.Tensor:
        return _triton("attention_triton").flash_attention_varlen_triton(
            q, k, v, metadata.cu_seqlens_q, metadata.max_seqlen_q, scale, causal, window=window
        )

    def paged_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float | None = None,
        window: int | None = None,
    ) -> torch.Tensor:
        """`max_seqlen_q` 1 selects the split-K decode kernel (in `decode_workspace` when given).
        Otherwise the first `num_decode_seqs` sequences (one query each, packed first in a mixed
        step) go through the decode kernel and the rest through the prefill kernel, into one
        output; 0 sends every sequence through the prefill kernel. Both take the `window`. No
        host sync: every value read on the host is a host int of the metadata."""
        m = metadata
        prefill = _triton("attention_triton")
        prefill.check_paged_inputs(q, k_cache, v_cache, m.block_tables, m.seq_lens, m.cu_seqlens_q)
        decode = _triton("paged_decode_triton").paged_decode_attention_triton
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if m.max_seqlen_q == 1:
            return decode(
                q,
                k_cache,
                v_cache,
                m.block_tables,
                m.seq_lens,
                m.cu_seqlens_q,
                scale,
                workspace=m.decode_workspace,
                window=window,
            )
        batch, n = m.seq_lens.shape[0], m.num_decode_seqs
        if not 0 < n < batch:
            return prefill.paged_prefill_attention_triton(
                q, k_cache, v_cache, m.block_tables, m.seq_lens, m.cu_seqlens_q, m.max_seqlen_q, scale, window=window
            )
        # Both kernels read and write their rows at cu_seqlens_q[seq] (absolute token offsets), so
        # each gets its slice of the metadata and they fill disjoint rows of one output.
        out = q.new_empty(q.shape)
        decode(
            q,
            k_cache,
            v_cache,
            m.block_tables[:n],
            m.seq_lens[:n],
            m.cu_seqlens_q[: n + 1],
            scale,
            out=out,
            workspace=m.decode_workspace,
            window=window,
        )
        prefill.paged_prefill_attention_triton(
            q,
            k_cache,
            v_cache,
            m.block_tables[n:],
            m.seq_lens[n:],
            m.cu_seqlens_q[n:],
            m.max_seqlen_q,
            scale,
            out=out,
            window=window,
        )
        return out


_TORCH = TorchBackend()
_TRITON = TritonBackend()


def select_backend(device: torch.device | str) -> Backend:
    """The backend for a model on `device`: Triton on CUDA when triton is installed, the torch
    references otherwise, unless SPLITINFER_KERNELS says `triton` or `torch`. Reads the
    environment: call it once, when the model is built, and keep what it returns."""
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "torch":
        return _TORCH
    if choice == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{BACKEND_ENV}=triton but triton is not installed")
        return _TRITON
    return _TRITON if torch.device(device).type == "cuda" and HAS_TRITON else _TORCH


def decode_workspace_numel(batch: int, num_heads: int, head_dim: int) -> int:
    """fp32 elements of split-K decode scratch for `batch` sequences: each (sequence, query
    head, slice) keeps a partial output of `head_dim` values and its log-sum-exp."""
    return batch * num_heads * MAX_DECODE_SPLITS * (head_dim + 1)


def decode_split_batches(max_batch: int, kv_heads: int, device: torch.device) -> dict[int, int]:
    """Each split count the Triton decode kernel picks for some batch of 1 to `max_batch`
    sequences, with the smallest such batch. The count is a compile-time constant of the
    kernel, so each is one binary to compile before serving (`ModelRunner.warm_up`)."""
    pick = _triton("paged_decode_triton").decode_num_splits
    batches: dict[int, int] = {}
    for batch in range(1, max_batch + 1):
        batches.setdefault(pick(batch, kv_heads, device), batch)
    return batches
