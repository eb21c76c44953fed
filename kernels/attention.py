"""Attention over ragged (packed) batches: fresh prefill and paged KV-cache reads.

Both take queries packed as [T, Hq, D] with `cu_seqlens` marking where each sequence
starts, and support grouped-query attention (Hq a multiple of Hkv) without repeating
K/V, and an optional sliding window W (Mistral's, transformers' `sliding_window_overlay`):
on top of the causal mask, a query at absolute position p sees keys p - W < j <= p, W keys
counting its own; `window=None` is plain causal attention. The references loop over
sequences and call torch's SDPA; they are the oracle the Triton kernels are tested
against. `paged_attention_cpu` is the CPU path (the torch backend's, wherever it runs):
the same math, with the single-query (decode) rows of a step batched into a few SDPA
calls, since a loop of small calls per sequence and layer costs more than the attention
itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def check_window(window: int | None, causal: bool = True) -> None:
    """Refuse a window the attention ops cannot honour: it must count at least the query's own
    key, and it narrows causal attention (a bidirectional window is not defined here)."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if not causal:
        raise ValueError("a sliding window needs causal attention")


def visible_keys(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[Lq, Lk] bool: whether each key position is visible to each query position (causal, and
    within the last `window` positions when there is a window)."""
    visible = key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        visible &= key_pos[None, :] > query_pos[:, None] - window
    return visible


def first_visible_key(length: int, num_queries: int, window: int) -> int:
    """The earliest key position that any of a sequence's last `num_queries` queries (out of
    `length` positions) sees through a sliding `window`: the first query's, since later ones
    see later keys. Keys and blocks before it need not be read."""
    return max(0, length - num_queries - window + 1)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, window: int | None = None
) -> torch.Tensor:
    """q [Lq, Hq, D] against k, v [Lk, Hkv, D]; the queries are the last Lq positions of the Lk keys.
    With a `window` (causal only), each query sees its last `window` positions.

    SDPA gets 4-d inputs: with 3-d ones CPU torch takes its slow math path (3-7x slower
    for a 512-2048 token prefill than its flash kernel)."""
    lq, lk = q.shape[0], k.shape[0]
    mask = None
    is_causal = causal and 1 < lq == lk  # top-left aligned, which is the same when lq == lk
    if window is not None:
        # Keys before the first query's window are invisible to every query: they are not attended.
        first = first_visible_key(lk, lq, window)
        k, v = k[first:], v[first:]
        is_causal = False
        if lq > 1:  # a single query sees every key that is left
            query_pos = torch.arange(lk - lq, lk, device=q.device)
            mask = visible_keys(query_pos, torch.arange(first, lk, device=q.device), window)
    elif causal and 1 < lq < lk:
        # Bottom-right aligned: query i sits at absolute position lk - lq + i.
        query_pos = torch.arange(lk - lq, lk, device=q.device)
        mask = visible_keys(query_pos, torch.arange(lk, device=q.device), None)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def flash_attention_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
) -> torch.Tensor:
    """Self-attention within each packed sequence: q [T, Hq, D], k, v [T, Hkv, D] -> [T, Hq, D];
    with a `window` (causal only), each query sees its last `window` positions."""
    del max_seqlen  # only the Triton launch grid needs it
    check_window(window, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            out[start:end] = _attend(q[start:end], k[start:end], v[start:end], scale, causal, window)
    return out


def gather_kv(cache: torch.Tensor, block_table_row: torch.Tensor, length: int, first_block: int = 0) -> torch.Tensor:
    """One sequence's tokens from the start of its block `first_block` up to `length`, read from
    `cache` [N, block, Hkv, D] through its block table."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = cache.index_select(0, block_table_row[first_block:num_blocks].long())
    return blocks.reshape(-1, *cache.shape[2:])[: length - first_block * block_size]


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float | None = None,
    max_seqlen_q: int | None = None,
    workspace: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of packed queries q [T, Hq, D] over each sequence's cached context.

    Sequence b owns queries `cu_seqlens_q[b]:cu_seqlens_q[b+1]`, which are its last
    positions out of `seq_lens[b]`; its keys are read through `block_tables[b]`,
    causally by absolute position, and with a `window` only the last `window` positions of
    each query (blocks wholly before that are not read). The caches must already hold the
    new tokens.
    """
    del max_seqlen_q, workspace  # only the Triton launch and its scratch need them
    check_window(window)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        _paged_sequence(q, out, k_cache, v_cache, block_tables[b], length, bounds[b], bounds[b + 1], scale, window)
    return out


def _paged_sequence(
    q: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    length: int,
    start: int,
    end: int,
    scale: float,
    window: int | None,
) -> None:
    """out[start:end] = one sequence's queries q[start:end] over its first `length` cached tokens
    (the last `window` positions of each query, with a window)."""
    if end == start:
        return
    if length == 0:  # a CUDA-graph padding row attends to nothing
        out[start:end] = 0
        return
    # The blocks before the first query's window hold no visible key: they are not gathered.
    first_block = 0 if window is None else first_visible_key(length, end - start, window) // k_cache.shape[1]
    k = gather_kv(k_cache, table, length, first_block)
    v = gather_kv(v_cache, table, length, first_block)
    out[start:end] = _attend(q[start:end], k.to(q.dtype), v.to(q.dtype), scale, causal=True, window=window)


# Decode rows attend in groups, one SDPA call each, over contexts gathered and padded to the
# group's longest: rows of similar lengths together (so that at least DECODE_FILL of what is
# gathered is real context), and at most DECODE_GATHER_TOKENS padded tokens per group (which
# bounds the scratch, per K and V, to that many tokens x Hkv x D). With a sliding window a row
# gathers only from its first block holding a visible key, so its "length" here is that span:
# a long context under a small window costs what the window costs.
DECODE_FILL = 0.8
DECODE_GATHER_TOKENS = 1 << 16


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    """Single-query sequences that attend in one SDPA call, and how to gather their contexts."""

    rows: slice | torch.Tensor  # their query rows in the packed batch
    block_ids: torch.Tensor  # [n * blocks] the blocks to gather, each row padded with block 0
    padding_rows: torch.Tensor  # gathered token rows (of n * context) no query sees: zeroed after the gather
    visible: torch.Tensor  # [n, 1, 1, context] bool: the attention mask
    live: torch.Tensor | None  # [n, 1, 1] bool: rows with a context (padding rows give zeros); None: all
    num_seqs: int
    context: int


@dataclass(frozen=True, slots=True)
class PagedAttentionPlan:
    """How `paged_attention_cpu` splits one batch: the same for every layer of a forward, so it
    is made once per step (`plan_paged_attention_cpu`, through `AttentionMetadata.cpu_plan`)."""

    bounds: list[int]  # cu_seqlens_q as host ints
    lengths: list[int]  # seq_lens as host ints
    multi_query: list[int]  # sequences attended one by one (prefill chunks over a cached prefix)
    decode_groups: list[DecodeGroup]
    window: int | None  # the sliding window the decode groups were gathered for


def plan_paged_attention_cpu(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    block_size: int,
    window: int | None = None,
) -> PagedAttentionPlan:
    """Which sequences `paged_attention_cpu` attends one by one and how it groups the rest; with a
    `window`, each decode row gathers only the blocks that can hold a key it sees. Host work: it
    reads the lengths back, so it syncs with the device."""
    check_window(window)
    bounds, lengths = cu_seqlens_q.tolist(), seq_lens.tolist()
    decodes = [b for b in range(len(lengths)) if bounds[b + 1] - bounds[b] == 1]
    multi = [b for b in range(len(lengths)) if bounds[b + 1] - bounds[b] > 1]
    spans = lengths if window is None else [_window_span(n, window, block_size) for n in lengths]
    groups = [
        _plan_decode_group(block_tables, seq_lens, bounds, spans, group, block_size, window)
        for group in decode_groups(spans, decodes)
    ]
    return PagedAttentionPlan(bounds, lengths, multi, groups, window)


def _window_span(length: int, window: int, block_size: int) -> int:
    """Tokens a decode row of `length` gathers under `window`: from the start of the block
    holding its first visible key (position length - window) to its end."""
    return length - first_visible_key(length, 1, window) // block_size * block_size


def decode_groups(lengths: list[int], seqs: list[int]) -> list[list[int]]:
    """`seqs` split into groups of similar `lengths`, longest first (see DECODE_FILL)."""
    groups: list[list[int]] = []
    group: list[int] = []
    total = 0
    for b in sorted(seqs, key=lengths.__getitem__, reverse=True):  # stable: equal lengths keep their order
        if group:
            padded = (len(group) + 1) * lengths[group[0]]
            if padded > DECODE_GATHER_TOKENS or total + lengths[b] < DECODE_FILL * padded:
                groups.append(group)
                group, total = [], 0
        group.append(b)
        total += lengths[b]
    if group:
        groups.append(group)
    return groups


def _plan_decode_group(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    bounds: list[int],
    spans: list[int],
    seqs: list[int],
    block_size: int,
    window: int | None,
) -> DecodeGroup:
    """One group's gather and mask; `spans`: the tokens each sequence gathers (its length, or
    with a `window` from the block holding its first visible key)."""
    device, n = seq_lens.device, len(seqs)
    whole = seqs == list(range(len(bounds) - 1))  # every sequence of the batch, in order: no index shuffling
    rows = slice(0, n) if whole else torch.tensor([bounds[b] for b in seqs], device=device)
    index = slice(None) if whole else torch.tensor(seqs, device=device)
    lens = seq_lens[index].long()
    num_blocks = -(-max(spans[b] for b in seqs) // block_size)
    context = num_blocks * block_size
    blocks = torch.arange(num_blocks, device=device)[None, :]  # each row's table entries to read
    positions = torch.arange(context, device=device)[None, :]  # each gathered slot's token position
    if window is None:
        table = block_tables[index, :num_blocks]
    else:
        first = (lens[:, None] - window).clamp(min=0) // block_size  # first_visible_key(lens, 1, window), by row
        blocks, positions = blocks + first, positions + first * block_size
        # Past its own blocks a row's entries may run off the table: they are replaced below.
        table = block_tables[index].gather(1, blocks.clamp(max=block_tables.shape[1] - 1))
    # Entries past a sequence's own blocks may be -1 or stale: read block 0 there (masked).
    owned = blocks * block_size < lens[:, None]
    block_ids = torch.where(owned, table.long(), 0).flatten()
    visible = positions < lens[:, None]
    if window is not None:
        visible &= positions >= lens[:, None] - window
    # Slots past a length hold whatever the cache held (uninitialised memory, maybe NaN, which
    # a mask does not stop: NaN * 0 is NaN), so they are zeroed, as are the few before a row's
    # window in its first block; they are few, hence by index.
    padding_rows = (~visible).flatten().nonzero().squeeze(1)
    live = None if min(spans[b] for b in seqs) > 0 else (lens > 0)[:, None, None]
    return DecodeGroup(rows, block_ids, padding_rows, visible[:, None, None, :], live, n, context)


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float | None = None,
    *,
    window: int | None = None,
    plan: PagedAttentionPlan | None = None,
) -> torch.Tensor:
    """`paged_attention_reference`'s result, faster on CPU: the sequences with one query (decodes)
    attend together in a few groups of similar context lengths (with a `window`, of the spans
    they gather); the others (prefill chunks over a cached prefix) one by one. `plan`: this
    batch's for this window, if already made."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if plan is None:
        plan = plan_paged_attention_cpu(block_tables, seq_lens, cu_seqlens_q, k_cache.shape[1], window)
    elif plan.window != window:
        raise ValueError(f"paged_attention_cpu: the plan was made for window {plan.window}, not {window}")
    out = torch.empty_like(q)
    bounds = plan.bounds
    for b in plan.multi_query:
        length = plan.lengths[b]
        _paged_sequence(q, out, k_cache, v_cache, block_tables[b], length, bounds[b], bounds[b + 1], scale, window)
    for group in plan.decode_groups:
        _attend_decode_group(q, out, k_cache, v_cache, group, scale)
    return out


def _attend_decode_group(
    q: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: DecodeGroup,
    scale: float,
) -> None:
    n, num_heads, dim, kv_heads = group.num_seqs, q.shape[1], q.shape[2], k_cache.shape[2]
    if group.context == 0:  # padding rows only
        out[group.rows] = 0
        return

    def gather(cache: torch.Tensor) -> torch.Tensor:  # [n, Hkv, context, D]
        tokens = cache.index_select(0, group.block_ids).view(n * group.context, kv_heads, dim)
        tokens.index_fill_(0, group.padding_rows, 0)
        return tokens.view(n, group.context, kv_heads, dim).transpose(1, 2).to(q.dtype)

    queries = q[group.rows].view(n, kv_heads, num_heads // kv_heads, dim)  # a KV head's query group on one axis
    attended = F.scaled_dot_product_attention(
        queries, gather(k_cache), gather(v_cache), attn_mask=group.visible, scale=scale
    )
    attended = attended.reshape(n, num_heads, dim)
    # A padding row (length 0) masks everything: zeros, as the reference gives.
    out[group.rows] = attended if group.live is None else torch.where(group.live, attended, 0)
