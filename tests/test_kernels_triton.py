"""Every Triton kernel against its torch reference, through the launchers the GPU runs.

Without CUDA the kernels run under the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1); with CUDA the same tests run the compiled kernels. Outputs are
poisoned with NaN first, so an element the kernel forgets to write fails the test.
bf16 cases run only with CUDA: the interpreter multiplies bf16 bit patterns in `tl.dot`.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton")

from splitinfer.kernels import AttentionMetadata, attention, norm, rope
from splitinfer.kernels.activation import silu_and_mul_reference
from splitinfer.kernels.activation_triton import silu_and_mul_triton
from splitinfer.kernels.attention_triton import flash_attention_varlen_triton, paged_prefill_attention_triton
from splitinfer.kernels.kv_store import store_kv_reference
from splitinfer.kernels.kv_store_triton import store_kv_triton
from splitinfer.kernels.norm_triton import rms_norm_triton
from splitinfer.kernels.paged_decode_triton import paged_decode_attention_triton
from splitinfer.kernels.rope_triton import apply_rope_triton_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 runs only compiled on a GPU: the interpreter multiplies bf16 bit patterns in tl.dot.
BF16 = pytest.param(
    torch.bfloat16,
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(DEVICE != "cuda", reason="bf16 kernels need CUDA (interpreter bf16 dot is wrong)"),
    ],
    id="bf16",
)
DTYPES = [torch.float32, torch.float16, BF16]
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
TOKENS = [1, 5, 37, 130]


def randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(dtype)


def poisoned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def ragged_lengths(total: int, seed: int) -> list[int]:
    """Split `total` tokens into up to 5 sequences of random, uneven lengths."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, total), min(4, total - 1))) if total > 1 else []
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", [64, 96])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype: torch.dtype, tokens: int, hidden: int, with_residual: bool) -> None:
    x, weight = randn(tokens, hidden, dtype=dtype), randn(hidden, dtype=dtype)
    residual = randn(tokens, hidden, dtype=dtype) if with_residual else None
    out, residual_out = poisoned(x.shape, dtype), poisoned(x.shape, dtype)
    result = rms_norm_triton(x, weight, 1e-5, residual, out=out, residual_out=residual_out)
    expected = norm.rms_norm_reference(x, weight, 1e-5, residual)
    if with_residual:
        torch.testing.assert_close(result[0], expected[0], **TOL[dtype])
        torch.testing.assert_close(result[1], expected[1], **TOL[dtype])
    else:
        torch.testing.assert_close(result, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_and_mul(dtype: torch.dtype, tokens: int) -> None:
    gate_up = randn(tokens, 2 * 1100, dtype=dtype)  # 1100 > one 1024-wide block: two column blocks
    out = silu_and_mul_triton(gate_up, out=poisoned((tokens, 1100), dtype))
    torch.testing.assert_close(out, silu_and_mul_reference(gate_up), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim"), [(4, 4, 32), (8, 2, 64), (32, 4, 128)])
def test_rope(dtype: torch.dtype, tokens: int, q_heads: int, kv_heads: int, head_dim: int) -> None:
    cache = rope.rope_cos_sin_cache(
        head_dim, 4096, 500000.0, rope.RopeScaling("llama3", 8.0, original_max_position=1024)
    ).to(DEVICE)
    positions = torch.randint(0, 4096, (tokens,), device=DEVICE)
    # q and k as strided views of one qkv projection, as the model passes them.
    qkv = randn(tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q = qkv[:, : q_heads * head_dim].view(tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    q_ref, k_ref = q.clone(), k.clone()
    untouched = qkv[:, (q_heads + kv_heads) * head_dim :].clone()
    rope.apply_rope_reference_(q_ref, k_ref, positions, cache)
    apply_rope_triton_(q, k, positions, cache)
    torch.testing.assert_close(q, q_ref, **TOL[dtype])
    torch.testing.assert_close(k, k_ref, **TOL[dtype])
    assert torch.equal(qkv[:, (q_heads + kv_heads) * head_dim :], untouched), "rope wrote into v"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_store_kv_with_padding_slots(dtype: torch.dtype, tokens: int) -> None:
    num_blocks, block_size, kv_heads, head_dim = 20, 16, 2, 32
    k, v = randn(tokens, kv_heads, head_dim, dtype=dtype), randn(tokens, kv_heads, head_dim, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:tokens]
    slots[::3] = -1  # padding rows
    caches = [poisoned((num_blocks, block_size, kv_heads, head_dim), dtype) for _ in range(4)]
    store_kv_reference(k, v, caches[0], caches[1], slots)
    store_kv_triton(k, v, caches[2], caches[3], slots)
    torch.testing.assert_close(caches[2], caches[0], equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(caches[3], caches[1], equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_flash_attention_varlen(dtype: torch.dtype, tokens: int, group: int, head_dim: int) -> None:
    kv_heads = 2
    lengths = ragged_lengths(tokens, seed=tokens * group)
    q = randn(tokens, kv_heads * group, head_dim, dtype=dtype)
    k, v = randn(tokens, kv_heads, head_dim, dtype=dtype), randn(tokens, kv_heads, head_dim, dtype=dtype)
    cu = cu_seqlens(lengths)
    out = flash_attention_varlen_triton(q, k, v, cu, max(lengths), out=poisoned(q.shape, dtype))
    expected = attention.flash_attention_varlen_reference(q.float(), k.float(), v.float(), cu, max(lengths))
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("window", [1, 17, 200])
def test_flash_attention_varlen_with_sliding_window(dtype: torch.dtype, group: int, window: int) -> None:
    """Fresh sequences up to 70 tokens under a window W: W = 1 (each query its own key), W = 17
    (the second query block starts past the key tiles wholly before its window, and the first
    block's last rows see no key in its first tile), W = 200, longer than every sequence."""
    kv_heads, head_dim, lengths = 2, 32, [1, 9, 70, 50]
    q = randn(sum(lengths), kv_heads * group, head_dim, dtype=dtype)
    k, v = (randn(sum(lengths), kv_heads, head_dim, dtype=dtype) for _ in range(2))
    cu = cu_seqlens(lengths)
    out = flash_attention_varlen_triton(q, k, v, cu, max(lengths), out=poisoned(q.shape, dtype), window=window)
    expected = attention.flash_attention_varlen_reference(
        q.float(), k.float(), v.float(), cu, max(lengths), window=window
    )
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])


def paged_case(
    lengths_q: list[int],
    context: list[int],
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int = 16,
    seed: int = 0,
):
    """Caches filled with random K/V, and each sequence's blocks scattered at shuffled ids."""
    rng = random.Random(seed)
    blocks_per_seq = [-(-n // block_size) for n in context]
    ids = list(range(sum(blocks_per_seq) + 3))
    rng.shuffle(ids)
    width = max(blocks_per_seq)
    tables, start = [], 0
    for n in blocks_per_seq:
        tables.append(ids[start : start + n] + [-1] * (width - n))
        start += n
    k_cache = randn(len(ids), block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = randn(len(ids), block_size, kv_heads, head_dim, dtype=dtype)
    return (
        k_cache,
        v_cache,
        torch.tensor(tables, dtype=torch.int32, device=DEVICE),
        torch.tensor(context, dtype=torch.int32, device=DEVICE),
        cu_seqlens(lengths_q),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_paged_prefill_over_cached_prefix(dtype: torch.dtype, group: int, head_dim: int) -> None:
    """Chunks of new tokens (37, 5, 1, 130 of them) at the end of longer cached contexts."""
    lengths_q, context = [37, 5, 1, 130, 12], [37, 90, 200, 160, 12]
    k_cache, v_cache, tables, seq_lens, cu = paged_case(lengths_q, context, 2, head_dim, dtype, seed=group)
    q = randn(sum(lengths_q), 2 * group, head_dim, dtype=dtype)
    out = paged_prefill_attention_triton(
        q, k_cache, v_cache, tables, seq_lens, cu, max(lengths_q), head_dim**-0.5, out=poisoned(q.shape, dtype)
    )
    expected = attention.paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables, seq_lens, cu)
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("window", [1, 45])
def test_paged_prefill_with_sliding_window(dtype: torch.dtype, group: int, window: int) -> None:
    """Chunks over cached prefixes under a window W: one chunk (positions 30-59) starts before
    position W, so its first queries see back to 0 and its last do not; one (85-89) sees only
    part of its prefix; a single query at 199; whole prompts (37 and 12 tokens) with no prefix."""
    lengths_q, context = [37, 5, 1, 30, 12], [37, 90, 200, 60, 12]
    k_cache, v_cache, tables, seq_lens, cu = paged_case(lengths_q, context, 2, 32, dtype, seed=group + window)
    q = randn(sum(lengths_q), 2 * group, 32, dtype=dtype)
    out = paged_prefill_attention_triton(
        q, k_cache, v_cache, tables, seq_lens, cu, max(lengths_q), 0.2, out=poisoned(q.shape, dtype), window=window
    )
    expected = attention.paged_attention_reference(
        q.float(), k_cache.float(), v_cache.float(), tables, seq_lens, cu, 0.2, window=window
    )
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_decode(dtype: torch.dtype, group: int, head_dim: int, num_splits: int) -> None:
    """One query per sequence; contexts from 1 token to several split slices, one a padding row (0)."""
    context = [1, 17, 300, 64, 0]
    k_cache, v_cache, tables, seq_lens, cu = paged_case(
        [1] * 5, [max(n, 1) for n in context], 2, head_dim, dtype, seed=group
    )
    seq_lens[4] = 0  # a CUDA-graph padding row: attends to nothing, must write zeros
    q = randn(5, 2 * group, head_dim, dtype=dtype)
    out = paged_decode_attention_triton(
        q, k_cache, v_cache, tables, seq_lens, cu, head_dim**-0.5, num_splits=num_splits, out=poisoned(q.shape, dtype)
    )
    expected = attention.paged_attention_reference(
        q[:4].float(), k_cache.float(), v_cache.float(), tables[:4], seq_lens[:4], cu[:5]
    )
    torch.testing.assert_close(out[:4].float(), expected, **TOL[dtype])
    assert torch.equal(out[4], torch.zeros_like(out[4]))


def poison_before_window(
    caches: tuple[torch.Tensor, ...], tables: torch.Tensor, context: list[int], window: int
) -> None:
    """NaN at every cached position before each single-query sequence's window, which a kernel
    that read one would carry into its output."""
    block_size = caches[0].shape[1]
    for b, length in enumerate(context):
        positions = torch.arange(max(0, length - window), device=DEVICE)
        for cache in caches:
            cache[tables[b, positions // block_size].long(), positions % block_size] = float("nan")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [1, 64, 100])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_decode_with_sliding_window(dtype: torch.dtype, window: int, num_splits: int) -> None:
    """Split-K decode over the last W keys of contexts shorter than, equal to (64) and much longer
    than W (300), and a padding row: the splits divide [max(0, L - W), L) (with W = 100 and 4
    splits, two slices are empty), the merge reads the same slices, and no position before
    the window is read (each holds NaN)."""
    context, head_dim = [1, 17, 300, 64, 0], 64
    k_cache, v_cache, tables, seq_lens, cu = paged_case(
        [1] * 5, [max(n, 1) for n in context], 2, head_dim, dtype, seed=window
    )
    seq_lens[4] = 0  # a CUDA-graph padding row: attends to nothing, must write zeros
    q = randn(5, 8, head_dim, dtype=dtype)
    expected = attention.paged_attention_reference(
        q[:4].float(), k_cache.float(), v_cache.float(), tables[:4], seq_lens[:4], cu[:5], window=window
    )
    poison_before_window((k_cache, v_cache), tables, context, window)
    out = paged_decode_attention_triton(
        q,
        k_cache,
        v_cache,
        tables,
        seq_lens,
        cu,
        head_dim**-0.5,
        num_splits=num_splits,
        out=poisoned(q.shape, dtype),
        window=window,
    )
    torch.testing.assert_close(out[:4].float(), expected, **TOL[dtype])
    assert torch.equal(out[4], torch.zeros_like(out[4]))


def test_paged_decode_in_a_preallocated_workspace_matches_per_call_scratch() -> None:
    """The graph runner's split-K scratch: garbage left from earlier steps must not leak into
    the result, and a workspace too small for the batch is refused, not overrun."""
    from splitinfer.kernels import decode_workspace_numel

    context = [3, 200, 64]
    k_cache, v_cache, tables, seq_lens, cu = paged_case([1] * 3, context, 2, 64, torch.float32, seed=5)
    q = randn(3, 8, 64, dtype=torch.float32)
    fresh = paged_decode_attention_triton(q, k_cache, v_cache, tables, seq_lens, cu, 0.125, num_splits=4)
    workspace = torch.full((decode_workspace_numel(8, 8, 64),), float("nan"), device=DEVICE)
    reused = paged_decode_attention_triton(
        q, k_cache, v_cache, tables, seq_lens, cu, 0.125, num_splits=4, workspace=workspace
    )
    torch.testing.assert_close(reused, fresh, atol=0, rtol=0)
    with pytest.raises(ValueError, match="workspace"):
        paged_decode_attention_triton(
            q, k_cache, v_cache, tables, seq_lens, cu, 0.125, num_splits=4, workspace=workspace[:100]
        )


def test_whole_model_through_triton_matches_torch_path(tiny_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny model with SPLITINFER_KERNELS=triton: same logits (prefill and paged decode) and greedy tokens.

    Each backend gets its own engine, built after the variable is set and with graphs off: on a
    GPU, graphs captured under one backend would replay its kernels under the other."""
    from splitinfer.engine import LLM, SamplingParams

    prompts = [[3, 17, 42, 99, 5], list(range(100, 137))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def logits_and_tokens():
        from splitinfer.engine.model_runner import ModelRunner
        from splitinfer.engine.request import Request
        from splitinfer.engine.scheduler import ScheduledSeq, SchedulerOutput

        llm = LLM(tiny_checkpoint, device=DEVICE, dtype="float32", num_kv_blocks=64, enforce_eager=True)
        seqs = [Request(str(i), p, params, block_table=list(range(4 * i, 4 * i + 4))) for i, p in enumerate(prompts)]
        runner = ModelRunner(llm.engine.model, llm.engine.kv_cache, None, 4, 64, use_cuda_graphs=False)
        model = llm.engine.model

        def forward(new_tokens: list[int]) -> torch.Tensor:
            ids, positions, batch = runner.prepare(
                SchedulerOutput([ScheduledSeq(s, n) for s, n in zip(seqs, new_tokens)], [])
            )
            for seq, n in zip(seqs, new_tokens):
                seq.num_computed_tokens += n
            return model.compute_logits(model(ids, positions, batch), batch.logits_indices)

        with torch.inference_mode():
            prefill = forward([len(p) for p in prompts])
            for seq in seqs:
                seq.token_ids.append(7)
            decode = forward([1, 1])
        return prefill, decode, [o.token_ids for o in llm.generate(prompts, params)]

    monkeypatch.setenv("SPLITINFER_KERNELS", "torch")
    expected = logits_and_tokens()
    monkeypatch.setenv("SPLITINFER_KERNELS", "triton")
    from splitinfer.kernels import dispatch

    launches: list[str] = []
    for module, name in [
        (dispatch._triton("paged_decode_triton"), "paged_decode_attention_triton"),
        (dispatch._triton("attention_triton"), "flash_attention_varlen_triton"),
        (dispatch._triton("norm_triton"), "rms_norm_triton"),
    ]:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: launches.append(_n) or _f(*a, **k))
    actual = logits_and_tokens()
    assert {"paged_decode_attention_triton", "flash_attention_varlen_triton", "rms_norm_triton"} <= set(launches)
    torch.testing.assert_close(actual[0], expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(actual[1], expected[1], atol=1e-4, rtol=1e-4)
    assert actual[2] == expected[2]


def fused_qkv(tokens: int, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """q, k, v as the model hands them over: strided views of one [T, (Hq + 2 Hkv) * D] projection
    (token stride (Hq + 2 Hkv) * D), and that projection."""
    qkv = randn(tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype)
    sizes = [heads * head_dim for heads in (q_heads, kv_heads, kv_heads)]
    q, k, v = (t.view(tokens, -1, head_dim) for t in qkv.split(sizes, dim=-1))
    return qkv, q, k, v


@pytest.mark.parametrize("head_dim", [8, 32])
@pytest.mark.parametrize("op", ["store_kv", "varlen", "paged_prefill", "paged_decode"])
def test_kernels_take_q_k_v_as_strided_views_of_one_qkv_projection(op: str, head_dim: int) -> None:
    """Each kernel indexes through the token and head strides it is given (the reference gets
    dense copies) and leaves the projection alone. head_dim 8 also runs the head dim padded to
    16, the smallest K of a GPU `tl.dot` (RoPE on these views: test_rope)."""
    dtype, q_heads, kv_heads = torch.float32, 4, 2
    scale = head_dim**-0.5
    if op in ("store_kv", "varlen"):
        lengths = [5, 1, 9]
        qkv, q, k, v = fused_qkv(sum(lengths), q_heads, kv_heads, head_dim, dtype)
    else:
        lengths, context = ([5, 1, 9], [12, 20, 9]) if op == "paged_prefill" else ([1] * 4, [1, 70, 16, 33])
        k_cache, v_cache, tables, seq_lens, cu = paged_case(lengths, context, kv_heads, head_dim, dtype, seed=head_dim)
        qkv, q, _, _ = fused_qkv(sum(lengths), q_heads, kv_heads, head_dim, dtype)
    assert not q.is_contiguous() and q.stride(0) == (q_heads + 2 * kv_heads) * head_dim
    before = qkv.clone()
    if op == "store_kv":
        slots = torch.randperm(40 * 4, device=DEVICE)[: k.shape[0]]
        slots[::4] = -1
        caches = [poisoned((40, 4, kv_heads, head_dim), dtype) for _ in range(4)]
        store_kv_triton(k, v, caches[0], caches[1], slots)
        store_kv_reference(k.contiguous(), v.contiguous(), caches[2], caches[3], slots)
        torch.testing.assert_close(caches[0], caches[2], equal_nan=True, atol=0, rtol=0)
        torch.testing.assert_close(caches[1], caches[3], equal_nan=True, atol=0, rtol=0)
    elif op == "varlen":
        cu = cu_seqlens(lengths)
        out = flash_attention_varlen_triton(q, k, v, cu, max(lengths), scale, out=poisoned(q.shape, dtype))
        expected = attention.flash_attention_varlen_reference(
            q.contiguous(), k.contiguous(), v.contiguous(), cu, max(lengths), scale
        )
        torch.testing.assert_close(out, expected, **TOL[dtype])
    elif op == "paged_prefill":
        out = paged_prefill_attention_triton(
            q, k_cache, v_cache, tables, seq_lens, cu, max(lengths), scale, out=poisoned(q.shape, dtype)
        )
        expected = attention.paged_attention_reference(q.contiguous(), k_cache, v_cache, tables, seq_lens, cu, scale)
        torch.testing.assert_close(out, expected, **TOL[dtype])
    else:
        out = paged_decode_attention_triton(
            q, k_cache, v_cache, tables, seq_lens, cu, scale, num_splits=4, out=poisoned(q.shape, dtype)
        )
        expected = attention.paged_attention_reference(q.contiguous(), k_cache, v_cache, tables, seq_lens, cu, scale)
        torch.testing.assert_close(out, expected, **TOL[dtype])
    assert torch.equal(qkv, before), f"{op} wrote into its inputs"


def test_attention_tiles_meet_the_gpu_tl_dot_minimum_at_head_dim_8(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the GPU `tl.dot` needs K >= 16 (the interpreter accepts less): the head-dim tile is the
    K of q @ k^T, so a model with head_dim < 16 must still launch BLOCK_D = 16."""
    from launch_spy import LaunchSpy

    from splitinfer.kernels import attention_triton, paged_decode_triton

    prefill = LaunchSpy.install(monkeypatch, attention_triton, "_attention_kernel")
    decode = LaunchSpy.install(monkeypatch, paged_decode_triton, "_decode_split_kernel")
    qkv, q, k, v = fused_qkv(3, 4, 2, 8, torch.float32)
    flash_attention_varlen_triton(q, k, v, cu_seqlens([3]), 3)
    k_cache, v_cache, tables, seq_lens, cu = paged_case([1, 2], [3, 5], 2, 8, torch.float32)
    paged_prefill_attention_triton(q, k_cache, v_cache, tables, seq_lens, cu, 2, 0.3)
    paged_decode_attention_triton(q[:2], k_cache, v_cache, tables, seq_lens, cu_seqlens([1, 1]), 0.3, num_splits=2)
    launches = [kwargs for _, _, kwargs in prefill.launches + decode.launches]
    assert len(launches) == 3
    for kwargs in launches:
        assert kwargs["BLOCK_D"] == 16
        assert min(kwargs.get("BLOCK_M", 16), kwargs.get("BLOCK_H", 16), kwargs["BLOCK_N"]) >= 16


def specialization_keys(spy, kernel) -> set[tuple]:
    """The key Triton compiles each recorded launch of `kernel` under (types, divisibility by 16,
    equality to 1, pointer alignment): distinct keys are distinct binaries. Computed for sm_90
    by the JIT's own binder, without a GPU and without compiling."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    raw = getattr(kernel, "fn", kernel)  # the interpreter's and the JIT's wrappers both keep it
    options = getattr(kernel, "kwargs", None) or {
        "do_not_specialize": kernel.do_not_specialize,
        "do_not_specialize_on_alignment": kernel.do_not_specialize_on_alignment,
    }
    names = ("do_not_specialize", "do_not_specialize_on_alignment")
    jit = JITFunction(raw, **{name: options.get(name) for name in names})
    binder = create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32)))
    return {repr(binder(*args, **kwargs)[1]) for _, args, kwargs in spy.launches}


def test_per_step_values_do_not_compile_new_kernel_variants(monkeypatch: pytest.MonkeyPatch) -> None:
    """The block-table width changes from step to step in eager steps, and a mixed step hands the
    prefill kernel metadata slices at any offset: neither may be part of the key the kernels are
    compiled under, or each new value compiles (0.5-2 s) mid-serving."""
    from launch_spy import LaunchSpy

    from splitinfer.kernels import attention_triton, paged_decode_triton, select_backend

    monkeypatch.setenv("SPLITINFER_KERNELS", "triton")
    backend = select_backend(DEVICE)
    prefill_kernel, decode_kernel = attention_triton._attention_kernel, paged_decode_triton._decode_split_kernel
    # Only the launch arguments matter here: the kernels need not run.
    prefill = LaunchSpy.install(monkeypatch, attention_triton, "_attention_kernel", run=False)
    decode = LaunchSpy.install(monkeypatch, paged_decode_triton, "_decode_split_kernel", run=False)
    LaunchSpy.install(monkeypatch, paged_decode_triton, "_decode_merge_kernel", run=False)
    qkv, q, _, _ = fused_qkv(15, 4, 2, 16, torch.float32)
    for width in (1, 2, 3, 16, 17, 32):
        for decodes in (0, 1, 2, 3):
            k_cache, v_cache, tables, seq_lens, cu = paged_case(
                [1] * decodes + [3] * (5 - decodes), [3] * 5, 2, 16, torch.float32
            )
            tables = torch.cat([tables, tables.new_zeros(5, width - tables.shape[1])], 1) if width > 1 else tables
            mixed = AttentionMetadata(
                cu_seqlens_q=cu,
                seq_lens=seq_lens,
                max_seqlen_q=3,
                block_tables=tables,
                has_cached_prefix=True,
                num_decode_seqs=decodes,
            )
            backend.paged_attention(q[: cu[-1]], k_cache, v_cache, mixed, 0.25)
            decode_only = AttentionMetadata(
                cu_seqlens_q=cu_seqlens([1] * 5),
                seq_lens=seq_lens,
                max_seqlen_q=1,
                block_tables=tables,
                has_cached_prefix=True,
            )
            backend.paged_attention(q[:5], k_cache, v_cache, decode_only, 0.25)
    assert len(prefill.launches) == 24 and len(decode.launches) == 24 + 18
    assert len(specialization_keys(prefill, prefill_kernel)) == 1
    assert len(specialization_keys(decode, decode_kernel)) == 1


@pytest.mark.parametrize("window", [None, 20])
def test_mixed_step_attention_gives_decodes_to_the_decode_kernel(
    window: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decodes packed first, then prefill chunks: the decode kernel takes the first rows, the
    prefill kernel the rest (absolute token offsets), both into one output equal to the reference;
    a layer's sliding window reaches both kernels (a decode at 69 sees 50-69, one at 16 all 17
    keys; the chunk at 24-29 sees from 5-10 on), and no window compiles neither's SLIDING path."""
    from launch_spy import LaunchSpy

    from splitinfer.kernels import attention_triton, paged_decode_triton, select_backend

    monkeypatch.setenv("SPLITINFER_KERNELS", "triton")
    backend = select_backend(DEVICE)
    prefill = LaunchSpy.install(monkeypatch, attention_triton, "_attention_kernel")
    decode = LaunchSpy.install(monkeypatch, paged_decode_triton, "_decode_split_kernel")
    lengths_q, context = [1, 1, 1, 6, 9], [70, 1, 17, 30, 9]
    k_cache, v_cache, tables, seq_lens, cu = paged_case(lengths_q, context, 2, 32, torch.float32, seed=3)
    _, q, _, _ = fused_qkv(sum(lengths_q), 8, 2, 32, torch.float32)
    metadata = AttentionMetadata(
        cu_seqlens_q=cu,
        seq_lens=seq_lens,
        max_seqlen_q=9,
        block_tables=tables,
        has_cached_prefix=True,
        num_decode_seqs=3,
    )
    out = backend.paged_attention(q, k_cache, v_cache, metadata, 0.2, window=window)
    expected = attention.paged_attention_reference(
        q.contiguous(), k_cache, v_cache, tables, seq_lens, cu, 0.2, window=window
    )
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    assert [grid[0] for grid, _, _ in decode.launches] == [3]
    assert [grid[2] for grid, _, _ in prefill.launches] == [2]
    assert [kwargs["SLIDING"] for _, _, kwargs in prefill.launches + decode.launches] == [window is not None] * 2


def test_every_window_shares_one_binary_per_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The window is a runtime argument: windows of any value (1, a multiple of 16, odd, large)
    compile one SLIDING binary per kernel, and no window the plain one."""
    from launch_spy import LaunchSpy

    from splitinfer.kernels import attention_triton, paged_decode_triton

    kernels = {
        "prefill": attention_triton._attention_kernel,
        "split": paged_decode_triton._decode_split_kernel,
        "merge": paged_decode_triton._decode_merge_kernel,
    }
    spies = {
        "prefill": LaunchSpy.install(monkeypatch, attention_triton, "_attention_kernel", run=False),
        "split": LaunchSpy.install(monkeypatch, paged_decode_triton, "_decode_split_kernel", run=False),
        "merge": LaunchSpy.install(monkeypatch, paged_decode_triton, "_decode_merge_kernel", run=False),
    }
    k_cache, v_cache, tables, seq_lens, cu = paged_case([1, 3], [40, 9], 2, 16, torch.float32)
    q = randn(4, 4, 16, dtype=torch.float32)
    decode_cu = cu_seqlens([1, 1])
    for window in (None, 1, 16, 33, 4096):
        paged_prefill_attention_triton(q, k_cache, v_cache, tables, seq_lens, cu, 3, 0.25, window=window)
        flash_attention_varlen_triton(q, q[:, :2], q[:, :2], cu, 3, 0.25, window=window)
        paged_decode_attention_triton(
            q[:2], k_cache, v_cache, tables, seq_lens, decode_cu, 0.25, num_splits=4, window=window
        )
    launches_per_window = {"prefill": 2, "split": 1, "merge": 1}  # prefill: paged, then fresh
    for name, spy in spies.items():
        per_window = launches_per_window[name]
        flags = [kwargs["SLIDING"] for _, _, kwargs in spy.launches]
        assert flags == [False] * per_window + [True] * 4 * per_window
        assert len(specialization_keys(spy, kernels[name])) == 2 * per_window, name
