"""How the model runner packs a mixed step, what its warm-up runs, and how the attention
layer hands q, k, v to the kernels.

A mixed step (decodes beside prefill chunks) is packed decodes first, so that paged
attention sends them to the split-K decode kernel and only the longer rows to the prefill
kernel; the sampler still gets its rows in the step's order. The warm-up compiles every
kernel variant a step can launch outside the decode graphs, writing no K/V.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from launch_spy import LaunchSpy

from splitinfer.engine.forward_batch import ForwardBatch
from splitinfer.engine.kv_cache import KVCache
from splitinfer.engine.loader import load_weights
from splitinfer.engine.model import CausalLM
from splitinfer.engine.model_config import ModelConfig
from splitinfer.engine.model_runner import ModelRunner
from splitinfer.engine.request import Request
from splitinfer.engine.scheduler import ScheduledSeq, SchedulerOutput
from splitinfer.protocol.sampling_params import SamplingParams

BLOCK_SIZE = 4


def load(path: Path) -> CausalLM:
    model = CausalLM.build(ModelConfig.from_dir(path), torch.device("cpu"), torch.float32)
    load_weights(model, path)
    return model


def make_runner(model: CausalLM, num_blocks: int = 40, max_num_seqs: int = 4) -> ModelRunner:
    c = model.config
    cache = KVCache.allocate(c.num_layers, num_blocks, BLOCK_SIZE, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
    cache.k.normal_()
    cache.v.normal_()
    return ModelRunner(model, cache, sampler=None, max_num_seqs=max_num_seqs, max_model_len=64, use_cuda_graphs=False)


@torch.inference_mode()
def fresh_prefill_logits(model: CausalLM, tokens: list[int]) -> torch.Tensor:
    """The last position's logits of `tokens` prefilled alone, without any cache: the oracle."""
    batch = ForwardBatch.for_prefill([len(tokens)], "cpu")
    return model.compute_logits(model(torch.tensor(tokens), torch.arange(len(tokens)), batch), batch.logits_indices)[0]


def mixed_step_logits(model: CausalLM) -> tuple[torch.Tensor, list[Request], ForwardBatch]:
    """Four sequences: A and B prefilled, C half prefilled, D new. Then one step scheduled as
    [C's last chunk, A's decode, D's whole prompt, B's decode]; its logits (all four sample)."""
    runner = make_runner(model)
    rng = random.Random(0)
    blocks = list(range(40))
    rng.shuffle(blocks)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (9, 6, 11, 5)]
    seqs = [Request(name, p, SamplingParams(max_tokens=4)) for name, p in zip("ABCD", prompts)]
    for i, seq in enumerate(seqs):
        seq.block_table = blocks[5 * i : 5 * i + 5]
    a, b, c, d = seqs

    def run(items: list[ScheduledSeq]) -> tuple[torch.Tensor, ForwardBatch]:
        ids, positions, batch = runner.prepare(SchedulerOutput(items, []))
        logits = model.compute_logits(model(ids, positions, batch), batch.logits_indices)
        for item in items:
            item.seq.num_computed_tokens += item.num_new_tokens
        return logits, batch

    with torch.inference_mode():
        run([ScheduledSeq(a, 9), ScheduledSeq(b, 6), ScheduledSeq(c, 4)])
        a.token_ids.append(7)
        b.token_ids.append(11)
        logits, batch = run([ScheduledSeq(c, 7), ScheduledSeq(a, 1), ScheduledSeq(d, 5), ScheduledSeq(b, 1)])
    return logits, [c, a, d, b], batch


def test_mixed_step_packs_decodes_first_and_keeps_logits_in_step_order(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPLITINFER_KERNELS", "torch")
    model = load(tiny_checkpoint)
    logits, in_step_order, batch = mixed_step_logits(model)
    # Packed: A's decode, B's decode, C's chunk of 7, D's 5 tokens.
    assert batch.cu_seqlens_q.tolist() == [0, 1, 2, 9, 14]
    assert batch.seq_lens.tolist() == [10, 7, 11, 5]
    assert batch.num_decode_seqs == 2 and batch.max_seqlen_q == 7
    assert batch.logits_indices.tolist() == [8, 0, 13, 1]  # C, A, D, B: the step's order
    for row, seq in zip(logits, in_step_order):
        torch.testing.assert_close(row, fresh_prefill_logits(model, seq.token_ids), atol=1e-4, rtol=1e-4)


def test_mixed_step_through_triton_sends_decodes_to_the_decode_kernel(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the interpreter: the mixed step's logits equal the torch path's, the decode kernel
    runs the two decode rows and the prefill kernel only the two longer ones. The backend is
    picked when a model is built, so each backend gets its own model."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SPLITINFER_KERNELS", "torch")
    expected, _, _ = mixed_step_logits(load(tiny_checkpoint))
    monkeypatch.setenv("SPLITINFER_KERNELS", "triton")
    model = load(tiny_checkpoint)
    assert model.backend.uses_triton
    from splitinfer.kernels import attention_triton, paged_decode_triton

    prefill = LaunchSpy.install(monkeypatch, attention_triton, "_attention_kernel")
    decode = LaunchSpy.install(monkeypatch, paged_decode_triton, "_decode_split_kernel")
    actual, _, _ = mixed_step_logits(model)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    layers = model.config.num_layers
    # The first step (no cached prefix) ran the fresh varlen kernel; the mixed step, per layer,
    # the decode kernel over 2 sequences and the paged prefill kernel over 2.
    assert [grid[0] for grid, _, _ in decode.launches] == [2] * layers
    paged = [grid[2] for grid, _, kwargs in prefill.launches if kwargs["PAGED"]]
    assert paged == [2] * layers


def test_attention_hands_the_kernels_views_of_the_qkv_projection(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No copies of q, k, v: RoPE, the KV store and attention get strided views of one tensor."""
    model = load(tiny_checkpoint)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    rope = model.backend.apply_rope_
    monkeypatch.setattr(model.backend, "apply_rope_", lambda q, k, *a: seen.append((q, k)) or rope(q, k, *a))
    fresh_prefill_logits(model, [1, 2, 3, 4, 5])
    assert len(seen) == model.config.num_layers
    for q, k in seen:
        assert not q.is_contiguous() and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        assert k.data_ptr() - q.data_ptr() == q.shape[1] * q.shape[2] * q.element_size()


def written_bytes(before: torch.Tensor, after: torch.Tensor) -> int:
    """How many bytes of a cache changed (bits compared: NaN != NaN would count untouched ones)."""
    return int((before.view(torch.uint8) != after.view(torch.uint8)).sum())


def test_warm_up_runs_every_decode_split_count_and_writes_no_kv(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the interpreter, with the split count made to vary by batch size as on a GPU (on
    CPU it is always 4): a mixed step at each count, a paged prefill and a fresh prefill, and
    not one bit of the KV cache written."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SPLITINFER_KERNELS", "triton")
    from splitinfer.kernels import attention_triton, paged_decode_triton

    monkeypatch.setattr(
        paged_decode_triton, "decode_num_splits", lambda batch, kv_heads, device: {1: 4, 2: 2}.get(batch, 1)
    )
    runner = make_runner(load(tiny_checkpoint), num_blocks=3, max_num_seqs=5)
    k_before, v_before = runner.kv_cache.k.clone(), runner.kv_cache.v.clone()
    prefill = LaunchSpy.install(monkeypatch, attention_triton, "_attention_kernel")
    decode = LaunchSpy.install(monkeypatch, paged_decode_triton, "_decode_split_kernel")
    assert runner.warm_up() == [1, 2, 4]
    assert written_bytes(k_before, runner.kv_cache.k) == 0 and written_bytes(v_before, runner.kv_cache.v) == 0
    assert {grid[2] for grid, _, _ in decode.launches} == {1, 2, 4}
    assert {kwargs["PAGED"] for _, _, kwargs in prefill.launches} == {True, False}
    tables = [args[6] for _, args, kwargs in prefill.launches if kwargs["PAGED"]]
    tables += [args[3] for _, args, _ in decode.launches]
    assert tables and not any(t.any() for t in tables), "the warm-up read a block other than 0"


def test_warm_up_runs_nothing_with_the_torch_kernels(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITINFER_KERNELS", "torch")
    runner = make_runner(load(tiny_checkpoint))
    monkeypatch.setattr(runner.model, "forward", lambda *a, **k: pytest.fail("the warm-up ran a forward"))
    assert runner.warm_up() == []


def test_engine_warms_up_when_built(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from splitinfer.engine.engine_core import EngineConfig, EngineCore

    calls: list[ModelRunner] = []
    monkeypatch.setattr(ModelRunner, "warm_up", lambda self: calls.append(self) or [])
    core = EngineCore(
        EngineConfig(
            model=str(tiny_checkpoint), device="cpu", num_kv_blocks=16, max_num_seqs=2, max_num_batched_tokens=32
        )
    )
    assert calls == [core.runner]
