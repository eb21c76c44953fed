"""The one decoder every supported family runs, over packed batches, shaped like the Hugging
Face checkpoint.

What a family changes (projection biases, per-head q/k norms, sliding windows, tied
embeddings, rope variants) is data on `ModelConfig` (see `families.py`), read here when the
modules are built; there is no model class per family. Module and parameter names follow
Hugging Face's (`model.layers.N.self_attn.q_proj`, ...) so every checkpoint tensor maps to
one place; q/k/v and gate/up are fused into single matmuls and `weight_sources()` says which
checkpoint tensor fills which rows. All hot ops go through one `splitinfer.kernels.Backend`
(Triton or torch), picked once when the model is built.

What does not change from step to step is bound to the modules instead of passed down
each forward: every module keeps the backend, every attention layer the rope table, and,
once the KV cache is allocated (`bind_kv_cache`), its own layer's K/V cache views. A
layer's forward takes only the step's hidden states, positions and attention metadata.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from splitinfer import kernels
from splitinfer.engine import cpu_linear
from splitinfer.engine.forward_batch import ForwardBatch
from splitinfer.engine.kv_cache import KVCache
from splitinfer.engine.model_config import ModelConfig
from splitinfer.engine.parallel import SINGLE, ShardPlan, TensorParallel

if TYPE_CHECKING:
    from splitinfer.engine.tp_ranks import Driver
from splitinfer.kernels import AttentionMetadata, Backend


def _empty_param(*shape: int) -> nn.Parameter:
    # Uninitialised on purpose: the model is built on the meta device and materialised
    # on the target device by `CausalLM.build`; the loader fills every element.
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Linear(nn.Module):
    """`y = x W^T (+ b)` with an uninitialised weight [out, in] to be filled by the loader.

    On CPU the weight may also be kept prepacked for oneDNN (`packed`), and a half-precision
    weight multiplied in fp32 for inputs of many rows (`upcast`); see `cpu_linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = _empty_param(out_features, in_features)
        self.bias = _empty_param(out_features) if bias else None
        self.packed: cpu_linear.PackedWeight | None = None
        self.upcast: cpu_linear.Upcast | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_linear.linear(x, self.weight, self.bias, self.packed, self.upcast)


class RowParallelLinear(Linear):
    """A Linear whose input features are split across the ranks (o_proj, down_proj): each rank
    multiplies its columns, the partial sums are all-reduced, then the bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel) -> None:
        super().__init__(in_features, out_features, bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        y = self.tp.all_reduce(cpu_linear.linear(x, self.weight, None, self.packed, self.upcast))
        return y if self.bias is None else y + self.bias


class VocabEmbedding(nn.Module):
    """The token embedding; with tensor parallelism each rank holds rows [start, start + count)
    of the vocabulary, looks up its own tokens, and the ranks' rows are summed."""

    def __init__(self, hidden_size: int, shard: ShardPlan, tp: TensorParallel) -> None:
        super().__init__()
        self.weight = _empty_param(shard.vocab_count, hidden_size)
        self.start = shard.vocab_start
        self.tp = tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        hidden = F.embedding(torch.where(mine, local, 0), self.weight)
        hidden.masked_fill_(~mine.unsqueeze(-1), 0)
        return self.tp.all_reduce(hidden)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, backend: Backend) -> None:
        super().__init__()
        self.weight = _empty_param(hidden_size)
        self.eps = eps
        self.backend = backend

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.backend.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    """Self-attention of one layer over the paged KV cache, through the layer's sliding window
    if it has one, with q and k RMS-normalised per head before RoPE if the family does so.

    Built with the backend and the rope table (fp32 [max_positions, D], shared by every layer);
    its own layer's K/V cache views are bound once the cache exists (`bind_kv_cache`). Until
    then it writes no K/V and can only attend within the batch (the profiling forwards that
    size the cache)."""

    def __init__(
        self,
        config: ModelConfig,
        layer_index: int,
        backend: Backend,
        rope_cache: torch.Tensor,
        shard: ShardPlan,
        tp: TensorParallel,
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.backend = backend
        # Plain attributes, not buffers: `Module.to(dtype)` must leave the fp32 table alone, and
        # the caches are views into the engine's one KV allocation, not state of this module.
        self.rope_cache = rope_cache
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, Hkv, D]
        self.v_cache: torch.Tensor | None = None
        # This rank's heads (all of them without tensor parallelism).
        self.num_heads = shard.num_heads
        self.num_kv_heads = shard.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = shard.num_heads * config.head_dim
        self.kv_size = shard.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        self.window = config.layer_windows[layer_index]
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = RowParallelLinear(self.q_size, config.hidden_size, config.o_bias, tp)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, backend) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, backend) if config.qk_norm else None

    def bind_kv_cache(self, kv_cache: KVCache) -> None:
        """Keep this layer's views of `kv_cache`. CUDA graphs captured afterwards read and write
        through them, so a model whose graphs are captured must keep this cache."""
        self.k_cache, self.v_cache = kv_cache.layer(self.layer_index)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # Strided views into the qkv output, not copies (three copy kernels per layer): every
        # kernel takes token and head strides, and RoPE rotates the views in place. `view`, not
        # `reshape`, so that a layout it cannot view raises instead of silently copying.
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # new dense tensors, which RoPE then rotates in place
            q = self._norm_heads(self.q_norm, q)
            k = self._norm_heads(self.k_norm, k)
        self.backend.apply_rope_(q, k, positions, self.rope_cache)
        if self.k_cache is None:
            if batch.has_cached_prefix:
                raise ValueError("a batch with a cached prefix needs the KV cache (bind_kv_cache)")
        elif batch.slot_mapping is not None:  # a batch without slots (for_prefill) writes nothing
            self.backend.store_kv(k, v, self.k_cache, self.v_cache, batch)
        if batch.has_cached_prefix:
            out = self.backend.paged_attention(q, self.k_cache, self.v_cache, batch, self.scale, window=self.window)
        else:
            out = self.backend.flash_attention_varlen(q, k, v, batch, self.scale, window=self.window)
        return self.o_proj(out.reshape(tokens, self.q_size))

    @staticmethod
    def _norm_heads(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm over each head's `head_dim` values of x [T, H, D] (a strided view of the qkv
        output: the norm kernels take rows, so the heads become rows of a dense copy)."""
        tokens, heads, dim = x.shape
        return norm(x.reshape(tokens * heads, dim)).view(tokens, heads, dim)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, backend: Backend, shard: ShardPlan, tp: TensorParallel) -> None:
        super().__init__()
        inter = shard.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * inter, bias=config.mlp_bias)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, config.mlp_bias, tp)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.backend.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_index: int,
        backend: Backend,
        rope_cache: torch.Tensor,
        shard: ShardPlan,
        tp: TensorParallel,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.self_attn = Attention(config, layer_index, backend, rope_cache, shard, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.mlp = MLP(config, backend, shard, tp)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        batch: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add is fused into the next RMSNorm: (norm(h + r), h + r).
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, positions, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(
        self, config: ModelConfig, backend: Backend, rope_cache: torch.Tensor, shard: ShardPlan, tp: TensorParallel
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.hidden_size, shard, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, backend, rope_cache, shard, tp) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)


class CausalLM(nn.Module):
    """The whole model. Create it with `build`, fill it with `engine.loader.load_weights`, and
    bind the KV cache once it is allocated (`bind_kv_cache`; `ModelRunner` does)."""

    def __init__(
        self, config: ModelConfig, backend: Backend, rope_cache: torch.Tensor, tp: TensorParallel = SINGLE
    ) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.shard = ShardPlan.of(config, tp)  # this rank's heads, intermediate and vocabulary slices
        # Rank 0 of several: sends each call on the model to the other ranks first (`tp_ranks.py`).
        self.driver: Driver | None = None
        self.backend = backend  # which kernels every op runs: `uses_triton` says whether graphs may capture it
        # fp32 [max_positions, head_dim] cos|sin, the one table every layer rotates by (a plain
        # attribute, not a buffer, so it stays fp32 whatever the model dtype: the angles of
        # late positions need the precision).
        self.rope_cache = rope_cache
        self.kv_cache: KVCache | None = None
        self.model = DecoderModel(config, backend, rope_cache, self.shard, tp)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, self.shard.vocab_count)
        self.packed_lm_head: cpu_linear.PackedWeight | None = None  # the (tied or not) lm_head weight, prepacked
        self.upcast: cpu_linear.Upcast | None = None  # the lm_head's, as every Linear's

    @classmethod
    def build(
        cls, config: ModelConfig, device: torch.device, dtype: torch.dtype, tp: TensorParallel = SINGLE
    ) -> CausalLM:
        """Allocate the (uninitialised) model directly on `device` in `dtype`: no host copy, no init;
        with tensor parallelism, only this rank's shard (`parallel.py`). The kernel backend is
        chosen here, once, from the device and SPLITINFER_KERNELS."""
        backend = kernels.select_backend(device)
        # Computed outside the meta-device block below, which would make it a meta tensor.
        rope_cache = kernels.rope_cos_sin_cache(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        ).to(device)
        with torch.device("meta"):
            model = cls(config, backend, rope_cache, tp)
        model = model.to(dtype=dtype).to_empty(device=device)
        return model.eval()

    def bind_kv_cache(self, kv_cache: KVCache) -> None:
        """Give every layer its views of `kv_cache`, once it is allocated; from then on a forward
        whose batch has slots writes its K/V there, and attention may read cached prefixes."""
        if self.driver is not None:
            self.driver.bind_kv(kv_cache.num_blocks, kv_cache.block_size)
        self.kv_cache = kv_cache
        for layer in self.model.layers:
            layer.self_attn.bind_kv_cache(kv_cache)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states [T, hidden] of the packed tokens `input_ids` [T] at `positions` [T].

        With a KV cache bound, the new tokens' K/V are written at `batch.slot_mapping` (none
        when it is None); without one, nothing is written and `batch` may not have a cached prefix.
        """
        if self.driver is None:
            return self.local_forward(input_ids, positions, batch)
        self.driver.forward(input_ids, positions, batch)
        return self.driver.mirrored(lambda: self.local_forward(input_ids, positions, batch))

    def local_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """`forward` on this rank alone, sending nothing to the other ranks: for a caller that
        keeps them in step itself (the decode graph runner, whose graphs every rank replays)."""
        hidden = self.model.embed_tokens(input_ids)
        residual = None
        for layer in self.model.layers:
            hidden, residual = layer(hidden, residual, positions, batch)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor | None:
        """fp32 logits of the rows `indices` selects (e.g. `ForwardBatch.logits_indices`); all rows
        when None. With tensor parallelism each rank computes its vocabulary slice and rank 0
        gets the whole logits; the other ranks get None."""
        if self.driver is None:
            return self._logits(hidden, indices)
        self.driver.logits(indices)
        return self.driver.mirrored(lambda: self._logits(hidden, indices))

    def _logits(self, hidden: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor | None:
        if indices is not None:
            hidden = hidden.index_select(0, indices)
        logits = cpu_linear.linear(hidden, self.lm_head_weight, None, self.packed_lm_head, self.upcast).float()
        return self.tp.gather_columns(logits, self.shard.vocab_size)

    def _matmul_linears(self) -> list[Linear]:
        """The Linear modules of the layers (the lm_head is applied by `compute_logits`)."""
        return [m for m in self.modules() if isinstance(m, Linear) and m is not self.lm_head]

    def matmul_weight_bytes(self) -> int:
        weights = [m.weight for m in self._matmul_linears()] + [self.lm_head_weight]
        return sum(w.numel() * w.element_size() for w in weights)

    def prepack_cpu_weights(self, row_counts: frozenset[int]) -> None:
        """Keep every matmul weight, the lm_head's too, also prepacked for oneDNN, used for
        inputs of `row_counts` rows only (CPU only; see `cpu_linear`): `matmul_weight_bytes()`
        more memory."""
        for module in self._matmul_linears():
            module.packed = cpu_linear.prepack(module.weight, row_counts)
        self.packed_lm_head = cpu_linear.prepack(self.lm_head_weight, row_counts)

    def upcast_cpu_matmuls(self, upcast: cpu_linear.Upcast) -> None:
        """Multiply the half-precision weights in fp32 for inputs of `upcast.min_rows` rows or
        more (CPU without fast half matmuls; see `cpu_linear`), the lm_head's too."""
        for module in self._matmul_linears():
            module.upcast = upcast
        self.upcast = upcast

    def weight_sources(self) -> Iterator[WeightSource]:
        """Every tensor the checkpoint must provide: its name, the destination view, and the
        slice of it this rank holds (None: the whole tensor).

        Fused parameters appear once per source tensor, each with the rows it fills."""
        c, shard = self.config, self.shard
        d = c.head_dim
        vocab = Slice(0, shard.vocab_start, c.vocab_size)
        yield WeightSource("model.embed_tokens.weight", self.model.embed_tokens.weight, vocab)
        q_rows = Slice(0, shard.head_start * d, c.q_size)
        kv_rows = Slice(0, shard.kv_head_start * d, c.kv_size)
        gate_up_rows = Slice(0, shard.intermediate_start, c.intermediate_size)
        o_columns = Slice(1, shard.head_start * d, c.q_size)
        down_columns = Slice(1, shard.intermediate_start, c.intermediate_size)
        for i, layer in enumerate(self.model.layers):
            prefix = f"model.layers.{i}"
            attn, mlp = layer.self_attn, layer.mlp
            q, kv = attn.q_size, attn.kv_size
            qkv_rows = {"q_proj": (0, q, q_rows), "k_proj": (q, kv, kv_rows), "v_proj": (q + kv, kv, kv_rows)}
            for name, (start, size, part) in qkv_rows.items():
                yield WeightSource(
                    f"{prefix}.self_attn.{name}.weight", attn.qkv_proj.weight.narrow(0, start, size), part
                )
                if attn.qkv_proj.bias is not None:
                    yield WeightSource(
                        f"{prefix}.self_attn.{name}.bias", attn.qkv_proj.bias.narrow(0, start, size), part
                    )
            yield WeightSource(f"{prefix}.self_attn.o_proj.weight", attn.o_proj.weight, o_columns)
            if attn.o_proj.bias is not None:
                yield WeightSource(f"{prefix}.self_attn.o_proj.bias", attn.o_proj.bias)
            if attn.q_norm is not None and attn.k_norm is not None:
                yield WeightSource(f"{prefix}.self_attn.q_norm.weight", attn.q_norm.weight)
                yield WeightSource(f"{prefix}.self_attn.k_norm.weight", attn.k_norm.weight)
            inter = shard.intermediate_size
            for j, name in enumerate(("gate_proj", "up_proj")):
                yield WeightSource(
                    f"{prefix}.mlp.{name}.weight", mlp.gate_up_proj.weight.narrow(0, j * inter, inter), gate_up_rows
                )
                if mlp.gate_up_proj.bias is not None:
                    yield WeightSource(
                        f"{prefix}.mlp.{name}.bias", mlp.gate_up_proj.bias.narrow(0, j * inter, inter), gate_up_rows
                    )
            yield WeightSource(f"{prefix}.mlp.down_proj.weight", mlp.down_proj.weight, down_columns)
            if mlp.down_proj.bias is not None:
                yield WeightSource(f"{prefix}.mlp.down_proj.bias", mlp.down_proj.bias)
            yield WeightSource(f"{prefix}.input_layernorm.weight", layer.input_layernorm.weight)
            yield WeightSource(f"{prefix}.post_attention_layernorm.weight", layer.post_attention_layernorm.weight)
        yield WeightSource("model.norm.weight", self.model.norm.weight)
        if self.lm_head is not None:
            yield WeightSource("lm_head.weight", self.lm_head.weight, vocab)


@dataclass(frozen=True, slots=True)
class Slice:
    """Which part of a checkpoint tensor a rank holds: along `dim`, from `start`, as many as its
    destination has, of the `full` the checkpoint tensor has along `dim`."""

    dim: int
    start: int
    full: int


@dataclass(frozen=True, slots=True)
class WeightSource:
    name: str  # the checkpoint tensor
    dest: torch.Tensor  # where it goes (a view of a parameter)
    part: Slice | None = None  # None: the whole tensor

    @property
    def checkpoint_shape(self) -> list[int]:
        """The shape the checkpoint tensor must have."""
        shape = list(self.dest.shape)
        if self.part is not None:
            shape[self.part.dim] = self.part.full
        return shape
