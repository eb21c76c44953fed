"""The pure-torch kernel references against naive math written out in the test.

These references are the CPU path (the torch backend) and the oracle of the Triton kernels,
so their own semantics (GQA mapping, causal alignment, padding slots, rope layout) are
pinned here.
"""

from __future__ import annotations

import pytest
import torch

from splitinfer import kernels
from splitinfer.kernels import AttentionMetadata, RopeScaling

TORCH = kernels.TorchBackend()


def paged_metadata(
    tables: torch.Tensor, seq_lens: torch.Tensor, cu: torch.Tensor, **fields: object
) -> AttentionMetadata:
    """A step's metadata for paged attention over a cached prefix (no K/V written)."""
    max_q = int((cu[1:] - cu[:-1]).max())
    return AttentionMetadata(
        cu_seqlens_q=cu, seq_lens=seq_lens, max_seqlen_q=max_q, block_tables=tables, has_cached_prefix=True, **fields
    )


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None = None
) -> torch.Tensor:
    """q [Lq, Hq, D] as the last Lq positions of k, v [Lk, Hkv, D]; K/V repeated per group. With a
    `window`, the query at position p sees keys p - window < j <= p (transformers' sliding window)."""
    lq, lk = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    key_pos, query_pos = torch.arange(lk)[None, :], torch.arange(lk - lq, lk)[:, None]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).to(q.dtype)


def test_rms_norm_with_residual_equals_add_then_norm() -> None:
    x, residual, weight = torch.randn(5, 64), torch.randn(5, 64), torch.randn(64)
    out, residual_out = TORCH.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(residual_out, x + residual)
    expected = weight * (x + residual) / ((x + residual).pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(out, expected)


def test_silu_and_mul_uses_the_first_half_as_gate() -> None:
    gate_up = torch.randn(3, 10)
    torch.testing.assert_close(TORCH.silu_and_mul(gate_up), torch.nn.functional.silu(gate_up[:, :5]) * gate_up[:, 5:])


@pytest.mark.parametrize(
    ("rope_scaling", "scaling"),
    [
        (None, None),
        ({"rope_type": "linear", "factor": 2.0}, RopeScaling("linear", 2.0)),
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            RopeScaling("llama3", 8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=64),
        ),
    ],
)
def test_rope_matches_transformers(rope_scaling: dict | None, scaling: RopeScaling | None) -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rope_scaling=dict(rope_scaling) if rope_scaling else None,
    )
    cache = kernels.rope_cos_sin_cache(32, 256, 10000.0, scaling)
    positions = torch.tensor([0, 1, 7, 100, 255])
    q, k = torch.randn(5, 4, 32), torch.randn(5, 2, 32)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    TORCH.apply_rope_(q, k, positions, cache)
    torch.testing.assert_close(q, q_ref[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, k_ref[0].transpose(0, 1), rtol=1e-6, atol=1e-6)


def test_store_kv_writes_slots_and_skips_padding() -> None:
    k_cache = torch.zeros(4, 2, 1, 3)
    v_cache = torch.zeros(4, 2, 1, 3)
    k, v = torch.randn(3, 1, 3), torch.randn(3, 1, 3)
    slots = torch.tensor([5, -1, 0])
    step = AttentionMetadata(
        cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32),
        seq_lens=torch.tensor([3], dtype=torch.int32),
        max_seqlen_q=3,
        slot_mapping=slots,
    )
    TORCH.store_kv(k, v, k_cache, v_cache, step)
    assert torch.equal(k_cache[2, 1], k[0]) and torch.equal(v_cache[0, 0], v[2])
    assert k_cache.count_nonzero() == 2 * 3  # the padding row wrote nothing


@pytest.mark.parametrize("group", [1, 4])
def test_flash_attention_varlen_is_causal_per_sequence(group: int) -> None:
    lengths = [1, 6, 13]
    q = torch.randn(sum(lengths), 2 * group, 32)
    k, v = torch.randn(sum(lengths), 2, 32), torch.randn(sum(lengths), 2, 32)
    cu = torch.tensor([0, 1, 7, 20], dtype=torch.int32)
    step = AttentionMetadata(
        cu_seqlens_q=cu, seq_lens=torch.tensor(lengths, dtype=torch.int32), max_seqlen_q=max(lengths)
    )
    out = TORCH.flash_attention_varlen(q, k, v, step, scale=0.3)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        torch.testing.assert_close(out[start:end], naive_attention(q[start:end], k[start:end], v[start:end], 0.3))


@pytest.mark.parametrize("group", [1, 8])
def test_paged_attention_reads_context_through_shuffled_block_tables(group: int) -> None:
    """Decode (1 query), chunked prefill (4 queries over a cached prefix) and full prefill in one batch."""
    torch.manual_seed(0)
    block_size, num_blocks, kv_heads, dim = 4, 16, 2, 32
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    seq_lens = [9, 11, 3]
    query_lens = [1, 4, 3]
    tables = torch.tensor([[7, 2, 12, -1], [0, 15, 5, 9], [3, -1, -1, -1]], dtype=torch.int32)
    cu = torch.tensor([0, 1, 5, 8], dtype=torch.int32)
    q = torch.randn(8, kv_heads * group, dim)
    out = TORCH.paged_attention(
        q, k_cache, v_cache, paged_metadata(tables, torch.tensor(seq_lens, dtype=torch.int32), cu)
    )
    for b, (length, n_q) in enumerate(zip(seq_lens, query_lens)):
        blocks = tables[b][tables[b] >= 0].long()
        k = k_cache[blocks].reshape(-1, kv_heads, dim)[:length]
        v = v_cache[blocks].reshape(-1, kv_heads, dim)[:length]
        start = cu[b].item()
        torch.testing.assert_close(out[start : start + n_q], naive_attention(q[start : start + n_q], k, v, dim**-0.5))


def scattered_context(
    seq_lens: list[int], block_size: int, kv_heads: int, dim: int, num_blocks: int = 64, width: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache, tables): each sequence's blocks at random ids, numbers at the positions
    it owns and NaN everywhere else; past its blocks, a table row holds -1 (odd rows) or stale ids."""
    k_cache = torch.full((num_blocks, block_size, kv_heads, dim), float("nan"))
    v_cache = torch.full((num_blocks, block_size, kv_heads, dim), float("nan"))
    free = torch.randperm(num_blocks).tolist()
    tables = torch.randint(0, num_blocks, (len(seq_lens), width), dtype=torch.int32)  # stale entries
    for b, length in enumerate(seq_lens):
        owned = [free.pop() for _ in range(-(-length // block_size))]
        tables[b, : len(owned)] = torch.tensor(owned, dtype=torch.int32)
        if b % 2:
            tables[b, len(owned) :] = -1
        for pos in range(length):  # only the positions a sequence owns hold numbers
            k_cache[owned[pos // block_size], pos % block_size] = torch.randn(kv_heads, dim)
            v_cache[owned[pos // block_size], pos % block_size] = torch.randn(kv_heads, dim)
    return k_cache, v_cache, tables


def sequence_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first `length` keys and values, read block by block through its table row."""
    blocks = table[: -(-length // k_cache.shape[1])].long()
    return tuple(cache[blocks].reshape(-1, *cache.shape[2:])[:length] for cache in (k_cache, v_cache))


@pytest.mark.parametrize("group", [1, 3, 8])
def test_cpu_paged_attention_batches_decodes_with_the_reference_result(
    group: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU path attends every single-query row together: odd lengths, padding rows (length
    0), -1 and stale table entries past each sequence's blocks, a NaN-poisoned cache beyond
    every length, prefill chunks among the decodes, and groups split by the gather budget."""
    from splitinfer.kernels import attention

    torch.manual_seed(1)
    block_size, kv_heads, dim = 4, 2, 16
    seq_lens = [5, 0, 17, 1, 9, 4, 23, 0, 13]
    query_lens = [1, 1, 1, 1, 3, 1, 1, 1, 1]
    k_cache, v_cache, tables = scattered_context(seq_lens, block_size, kv_heads, dim)
    cu = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), kv_heads * group, dim)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    monkeypatch.setattr(attention, "DECODE_GATHER_TOKENS", 40)  # several decode groups
    out = attention.paged_attention_cpu(q, k_cache, v_cache, tables, lens, cu, scale=0.25)
    assert not out.isnan().any()
    for b, (length, n_q) in enumerate(zip(seq_lens, query_lens)):
        start = int(cu[b])
        if length == 0:
            assert torch.equal(out[start : start + n_q], torch.zeros(n_q, kv_heads * group, dim))
            continue
        k, v = sequence_kv(k_cache, v_cache, tables[b], length)
        torch.testing.assert_close(
            out[start : start + n_q], naive_attention(q[start : start + n_q], k, v, 0.25), atol=1e-5, rtol=1e-5
        )
    monkeypatch.setattr(attention, "DECODE_GATHER_TOKENS", 1 << 16)
    whole = attention.paged_attention_cpu(q[:4], k_cache, v_cache, tables[:4], lens[:4], cu[:5], scale=0.25)
    torch.testing.assert_close(whole, out[:4])  # a batch of decodes only, in one group


@pytest.mark.parametrize("window", [1, 3, 6, 8, 100])
@pytest.mark.parametrize("group", [1, 3])
def test_cpu_paged_attention_with_a_window_reads_nothing_outside_it(
    group: int, window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sliding window W over block size 4 (W = 1, below a block, not a multiple of it, a
    multiple, larger than every context): decode rows of mixed lengths (0, shorter and longer
    than W) in several groups, and prefill chunks whose first queries see back to position 0 or
    not. Every position no query of its sequence sees is NaN in the cache, so reading one
    would show; and a decode group gathers at most the blocks a window spans, whatever the
    context. The reference gets the same answer from the same poisoned cache."""
    from splitinfer.kernels import attention

    torch.manual_seed(5)
    block_size, kv_heads, dim = 4, 2, 16
    seq_lens = [5, 0, 23, 1, 17, 6, 30, 0, 13, 9]
    query_lens = [1, 1, 1, 1, 9, 1, 1, 1, 1, 4]
    k_cache, v_cache, tables = scattered_context(seq_lens, block_size, kv_heads, dim)
    cu = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), kv_heads * group, dim)
    expected = [
        naive_attention(q[cu[b] : cu[b + 1]], *sequence_kv(k_cache, v_cache, tables[b], length), 0.25, window)
        for b, length in enumerate(seq_lens)
    ]
    for b, (length, n_q) in enumerate(zip(seq_lens, query_lens)):
        for pos in range(length - n_q + 1 - window):  # before the first query's window
            for cache in (k_cache, v_cache):
                cache[tables[b, pos // block_size], pos % block_size] = float("nan")
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    monkeypatch.setattr(attention, "DECODE_GATHER_TOKENS", 24)  # several decode groups
    plan = attention.plan_paged_attention_cpu(tables, lens, cu, block_size, window)
    assert len(plan.decode_groups) > 1
    assert max(g.context for g in plan.decode_groups) <= -(-(window + block_size - 1) // block_size) * block_size
    for out in (
        attention.paged_attention_cpu(q, k_cache, v_cache, tables, lens, cu, scale=0.25, window=window, plan=plan),
        attention.paged_attention_reference(q, k_cache, v_cache, tables, lens, cu, scale=0.25, window=window),
    ):
        assert not out.isnan().any()
        for b, length in enumerate(seq_lens):
            rows = out[cu[b] : cu[b + 1]]
            if length == 0:
                assert torch.equal(rows, torch.zeros_like(rows))
            else:
                torch.testing.assert_close(rows, expected[b], atol=1e-5, rtol=1e-5)


def test_decode_groups_cover_every_row_once_with_bounded_padding() -> None:
    from splitinfer.kernels import attention

    lengths = [5, 0, 700, 17, 1, 9, 700, 4, 23, 0, 13, 350, 360, 2000, 1]
    seqs = [b for b in range(len(lengths)) if b != 4]
    groups = attention.decode_groups(lengths, seqs)
    assert sorted(b for g in groups for b in g) == seqs
    for group in groups:
        longest = max(lengths[b] for b in group)
        assert (
            lengths[group[0]] == longest and len(group) * longest <= attention.DECODE_GATHER_TOKENS or len(group) == 1
        )
        assert sum(lengths[b] for b in group) >= attention.DECODE_FILL * len(group) * longest or len(group) == 1
    assert [b for g in groups for b in g if lengths[b] == 700] == [2, 6], "equal lengths keep their order"


def test_a_plan_made_once_per_window_serves_every_layer_with_that_window() -> None:
    """Layers alternating full and sliding-window attention (as Mistral-style and Qwen checkpoints
    mix them): one plan per window, made once, each reused by its layers; a plan is refused for
    another window, whose decode rows it would gather wrongly."""
    from splitinfer.kernels import attention

    torch.manual_seed(2)
    k_cache, v_cache = torch.randn(2, 16, 4, 2, 8)
    tables = torch.randperm(16)[:12].view(3, 4).int()
    lens = torch.tensor([13, 6, 9], dtype=torch.int32)
    cu = torch.tensor([0, 1, 4, 5], dtype=torch.int32)
    step = paged_metadata(tables, lens, cu)
    plans = {window: step.cpu_plan(4, window) for window in (None, 5)}
    assert plans[None] is not plans[5]
    for _ in range(2):  # four "layers": other queries, the plan of their window
        for window in (None, 5):
            q = torch.randn(5, 4, 8)
            torch.testing.assert_close(
                TORCH.paged_attention(q, k_cache, v_cache, step, window=window),
                attention.paged_attention_reference(q, k_cache, v_cache, tables, lens, cu, window=window),
            )
    assert step.cpu_plan(block_size=4) is plans[None], "the step's plan was made again"
    assert step.cpu_plan(4, window=5) is plans[5], "the step's windowed plan was made again"
    with pytest.raises(ValueError, match="window"):
        attention.paged_attention_cpu(q, k_cache, v_cache, tables, lens, cu, window=3, plan=plans[5])


@pytest.mark.parametrize("window", [1, 4, 6, 50])
def test_flash_attention_varlen_with_a_window_sees_only_the_last_window_keys(window: int) -> None:
    """Each query at position p attends to keys p - W < j <= p of its own sequence (W = 1 is the
    query's own value; W = 50, longer than every sequence, is plain causal attention)."""
    torch.manual_seed(4)
    lengths = [1, 6, 13]
    q = torch.randn(sum(lengths), 8, 32)
    k, v = torch.randn(sum(lengths), 2, 32), torch.randn(sum(lengths), 2, 32)
    cu = torch.tensor([0, 1, 7, 20], dtype=torch.int32)
    step = AttentionMetadata(
        cu_seqlens_q=cu, seq_lens=torch.tensor(lengths, dtype=torch.int32), max_seqlen_q=max(lengths)
    )
    out = TORCH.flash_attention_varlen(q, k, v, step, scale=0.3, window=window)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        expected = naive_attention(q[start:end], k[start:end], v[start:end], 0.3, window)
        torch.testing.assert_close(out[start:end], expected)
    if window == 1:
        torch.testing.assert_close(out, v.repeat_interleave(4, dim=1))


def test_a_window_must_be_a_positive_int_over_causal_attention() -> None:
    from splitinfer.kernels import attention

    q, k = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    for bad in (0, -4, 2.0, True):
        with pytest.raises(ValueError, match="window"):
            attention.flash_attention_varlen_reference(q, k, k, cu, 3, window=bad)
    with pytest.raises(ValueError, match="causal"):
        attention.flash_attention_varlen_reference(q, k, k, cu, 3, causal=False, window=2)
    with pytest.raises(ValueError, match="window"):
        attention.plan_paged_attention_cpu(torch.zeros(1, 1, dtype=torch.int32), cu[1:], cu, 4, window=0)


def test_references_take_q_k_v_as_strided_views_of_one_qkv_projection() -> None:
    """The model hands every op views into its fused qkv projection (no copies): RoPE must
    rotate them in place inside that tensor, and each op must give what it gives dense inputs."""
    from splitinfer.kernels import attention, kv_store, rope

    torch.manual_seed(3)
    heads, kv_heads, dim, lengths = 4, 2, 16, [1, 1, 5, 1]
    tokens = sum(lengths)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    q, k, v = (t.view(tokens, -1, dim) for t in qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1))
    dense = [t.clone() for t in (q, k, v)]
    positions = torch.tensor([3, 9, 0, 1, 2, 3, 4, 7])
    table = kernels.rope_cos_sin_cache(dim, 16, 10000.0)
    rope.apply_rope_reference_(q, k, positions, table)
    rope.apply_rope_reference_(dense[0], dense[1], positions, table)
    assert torch.equal(qkv[:, : heads * dim].view(tokens, heads, dim), dense[0]), "RoPE lost its in-place write"
    assert torch.equal(q, dense[0]) and torch.equal(k, dense[1]) and torch.equal(v, dense[2])

    caches = [torch.zeros(8, 4, kv_heads, dim) for _ in range(4)]
    slots = torch.tensor([12, 31, 0, 1, 2, 3, 4, 20])
    kv_store.store_kv_reference(k, v, caches[0], caches[1], slots)
    kv_store.store_kv_reference(dense[1], dense[2], caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])

    cu = torch.tensor([0, 1, 2, 7, 8], dtype=torch.int32)
    assert torch.equal(
        attention.flash_attention_varlen_reference(q, k, v, cu, 5),
        attention.flash_attention_varlen_reference(*dense, cu, 5),
    )
    # Decodes first (one SDPA group over a slice of q), a prefill chunk, then a decode out of line.
    tables = torch.tensor([[3], [7], [0], [5]], dtype=torch.int32).repeat(1, 2)
    lens = torch.tensor([4, 4, 5, 2], dtype=torch.int32)
    for n in (4, 2):  # the whole step; its two leading decodes alone (a slice of q, viewed per KV group)
        args = (caches[0], caches[1], tables[:n], lens[:n], cu[: n + 1])
        assert torch.equal(
            attention.paged_attention_cpu(q[: cu[n]], *args), attention.paged_attention_cpu(dense[0][: cu[n]], *args)
        )
