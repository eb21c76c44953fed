"""The Triton attention kernels compiled on a GPU, where the interpreter cannot take them: bf16
split-K decode at every split count an H200 picks and at long contexts, caches past 2^31
elements (int64 offsets), and the decode rows of a mixed step against the decode-only graph.

Every test needs CUDA and is skipped without it (scripts/gpu_check.sh runs them). Errors are
measured per (row, head) relative to the fp32 reference's norm: attention over thousands of
keys averages its values down to ~1e-2, where an absolute tolerance would pass anything.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from launch_spy import LaunchSpy

from splitinfer.kernels.attention import paged_attention_reference

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]

# One query per sequence: 1 token, around one BLOCK_N tile (64) of the kernel, past 4096, and 32k.
DECODE_CONTEXTS = [1, 63, 64, 65, 4097, 32768]
BLOCK_SIZE = 16


@pytest.fixture(autouse=True)
def release_gpu_memory() -> Iterator[None]:
    yield
    gc.collect()
    torch.cuda.empty_cache()


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest error of any [.., D] vector relative to the reference vector's norm."""
    diff = (out.float() - expected).norm(dim=-1)
    return float((diff / expected.norm(dim=-1).clamp_min(1e-6)).max())


def scattered_tables(contexts: list[int], block_ids: list[int], seed: int) -> torch.Tensor:
    """Each sequence's blocks drawn in shuffled order from `block_ids`, rows padded with -1."""
    ids = list(block_ids)
    random.Random(seed).shuffle(ids)
    width = max(-(-n // BLOCK_SIZE) for n in contexts)
    rows = []
    for n in contexts:
        count = -(-n // BLOCK_SIZE)
        owned, ids = ids[:count], ids[count:]
        rows.append(owned + [-1] * (width - count))
    return torch.tensor(rows, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_splits", [16, 8, 4, 2, 1])
def test_bf16_decode_at_every_split_count_matches_the_fp32_reference(num_splits: int, head_dim: int) -> None:
    """The split counts an H200 picks for batches of 1 to 33+ (`decode_num_splits`), over
    contexts shorter than one slice, around a tile boundary and 32k long, plus a padding row."""
    from splitinfer.kernels.paged_decode_triton import paged_decode_attention_triton

    torch.manual_seed(num_splits * head_dim)
    kv_heads, group = 8, 4
    contexts = DECODE_CONTEXTS + [0]  # a CUDA-graph padding row: reads nothing, writes zeros
    num_blocks = sum(-(-n // BLOCK_SIZE) for n in contexts) + 5
    tables = scattered_tables(contexts, list(range(num_blocks)), seed=num_splits)
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, head_dim, device="cuda").to(torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    seq_lens = torch.tensor(contexts, dtype=torch.int32, device="cuda")
    cu = torch.arange(len(contexts) + 1, dtype=torch.int32, device="cuda")
    # Scaled up so that some rows attend sharply: the merge of slices must keep the true maximum.
    q = (2 * torch.randn(len(contexts), kv_heads * group, head_dim, device="cuda")).to(torch.bfloat16)
    out = paged_decode_attention_triton(
        q,
        k_cache,
        v_cache,
        tables,
        seq_lens,
        cu,
        head_dim**-0.5,
        num_splits=num_splits,
        out=torch.full_like(q, float("nan")),
    )
    live = len(DECODE_CONTEXTS)
    expected = paged_attention_reference(
        q[:live].float(),
        k_cache.float(),
        v_cache.float(),
        tables[:live],
        seq_lens[:live],
        cu[: live + 1],
        head_dim**-0.5,
    )
    assert not out.isnan().any()
    assert torch.equal(out[live:], torch.zeros_like(out[live:]))
    for row, context in enumerate(DECODE_CONTEXTS):
        error = relative_error(out[row], expected[row])
        assert error < 2e-2, f"context {context}, {num_splits} splits: relative error {error:.2e}"


def test_kernels_address_a_kv_cache_past_2_31_elements() -> None:
    """One layer's K (and V) of 131,136 blocks x 16 x 8 x 128 holds 2.15e9 elements, 4.3 GB in
    bf16: every block used here starts past element 2^31, so an int32 offset anywhere in
    store_kv, paged prefill or split-K decode writes or reads the wrong place (or faults)."""
    from splitinfer.kernels.attention_triton import paged_prefill_attention_triton
    from splitinfer.kernels.kv_store_triton import store_kv_triton
    from splitinfer.kernels.paged_decode_triton import paged_decode_attention_triton

    kv_heads, head_dim, group = 8, 128, 4
    per_block = BLOCK_SIZE * kv_heads * head_dim
    num_blocks = 2**31 // per_block + 64
    cache_bytes = 2 * num_blocks * per_block * 2
    if torch.cuda.mem_get_info()[0] < cache_bytes + 2 * 2**30:
        pytest.skip(f"needs {cache_bytes / 2**30 + 2:.1f} GiB of free GPU memory")
    torch.manual_seed(0)
    k_cache = torch.empty(num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.empty_like(k_cache)
    assert k_cache.numel() > 2**31
    contexts, q_lens = [300, 17, 64, 129], [40, 17, 1, 5]
    used = sum(-(-n // BLOCK_SIZE) for n in contexts)
    top = list(range(num_blocks - used, num_blocks))
    assert top[0] * per_block >= 2**31
    k_cache[top[0] :].fill_(float("nan"))  # what store_kv fails to write stays NaN
    v_cache[top[0] :].fill_(float("nan"))
    tables = scattered_tables(contexts, top, seed=1)
    seq_lens = torch.tensor(contexts, dtype=torch.int32, device="cuda")

    # Every context token written by store_kv (with two padding rows), then checked in place.
    host_tables = tables.tolist()
    slots = [
        host_tables[b][pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        for b, n in enumerate(contexts)
        for pos in range(n)
    ]
    slots = torch.tensor([-1] + slots + [-1], dtype=torch.int64, device="cuda")
    k_new = torch.randn(slots.shape[0], kv_heads, head_dim, device="cuda").to(torch.bfloat16)
    v_new = torch.randn_like(k_new)
    store_kv_triton(k_new, v_new, k_cache, v_cache, slots)
    torch.cuda.synchronize()
    flat_k, flat_v = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
    assert torch.equal(flat_k[slots[1:-1]], k_new[1:-1]) and torch.equal(flat_v[slots[1:-1]], v_new[1:-1])

    # The reference reads a compact fp32 copy of the used blocks, through remapped tables.
    remap = torch.full((num_blocks,), -1, dtype=torch.int32, device="cuda")
    remap[top[0] :] = torch.arange(used, dtype=torch.int32, device="cuda")
    small_tables = torch.where(tables >= 0, remap[tables.clamp_min(0).long()], -1)
    small_k, small_v = k_cache[top[0] :].float(), v_cache[top[0] :].float()

    cu = torch.tensor([0, *q_lens], dtype=torch.int32, device="cuda").cumsum(0, dtype=torch.int32)
    q = torch.randn(sum(q_lens), kv_heads * group, head_dim, device="cuda").to(torch.bfloat16)
    out = paged_prefill_attention_triton(q, k_cache, v_cache, tables, seq_lens, cu, max(q_lens), head_dim**-0.5)
    expected = paged_attention_reference(q.float(), small_k, small_v, small_tables, seq_lens, cu, head_dim**-0.5)
    assert relative_error(out, expected) < 2e-2, "paged prefill"

    q1 = torch.randn(len(contexts), kv_heads * group, head_dim, device="cuda").to(torch.bfloat16)
    cu1 = torch.arange(len(contexts) + 1, dtype=torch.int32, device="cuda")
    expected = paged_attention_reference(q1.float(), small_k, small_v, small_tables, seq_lens, cu1, head_dim**-0.5)
    for splits in (16, 1):
        out = paged_decode_attention_triton(
            q1, k_cache, v_cache, tables, seq_lens, cu1, head_dim**-0.5, num_splits=splits
        )
        assert relative_error(out, expected) < 2e-2, f"decode with {splits} splits"


def test_mixed_step_decode_rows_equal_the_decode_only_graph(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three decodes through their captured graph, then the same three beside a prefill chunk
    in one eager mixed step (scheduled first, packed after them): the decode rows go through
    the split-K decode kernel there too, and their logits agree within bf16 tolerance."""
    from splitinfer.engine import EngineConfig, EngineCore, SamplingParams
    from splitinfer.engine.request import Request
    from splitinfer.engine.scheduler import ScheduledSeq, SchedulerOutput
    from splitinfer.kernels import paged_decode_triton

    num_blocks = 256
    core = EngineCore(
        EngineConfig(
            model=str(tiny_checkpoint),
            device="cuda",
            dtype="bfloat16",
            max_num_seqs=8,
            block_size=BLOCK_SIZE,
            num_kv_blocks=num_blocks,
            max_num_batched_tokens=256,
        )
    )
    assert core.runner.graph_runner.graphs, "no CUDA graphs were captured"
    greedy = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    for i in range(3):
        core.add_request(f"d{i}", [(7 * i + j) % 500 for j in range(20 + 9 * i)], greedy)
    core.step()  # prefills all three and samples their first tokens
    seqs = list(core.scheduler.running.values())
    assert len(seqs) == 3 and all(seq.num_uncomputed_tokens == 1 for seq in seqs)
    for seq in seqs:
        assert core.kv_manager.allocate(seq, 1)
    decode_only = SchedulerOutput([ScheduledSeq(seq, 1) for seq in seqs], [])
    assert decode_only.is_decode_only
    graph_logits = core.runner.compute_logits(decode_only).clone()

    # A new prompt of 37 tokens in blocks no running sequence holds (nothing else runs after).
    held = {block for seq in seqs for block in seq.block_table}
    prompt = [(5 * j + 3) % 500 for j in range(37)]
    chunk = Request("p", prompt, greedy, block_table=[b for b in range(num_blocks) if b not in held][-3:])
    decode = LaunchSpy.install(monkeypatch, paged_decode_triton, "_decode_split_kernel")
    mixed = SchedulerOutput([ScheduledSeq(chunk, len(prompt))] + [ScheduledSeq(seq, 1) for seq in seqs], [])
    mixed_logits = core.runner.compute_logits(mixed)
    assert [grid[0] for grid, _, _ in decode.launches] == [3] * core.model_config.num_layers
    torch.testing.assert_close(mixed_logits[1:], graph_logits, atol=5e-2, rtol=5e-2)
    assert relative_error(mixed_logits[1:], graph_logits) < 2e-2
