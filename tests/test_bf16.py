"""Half precision on CPU, end to end, for every family: bf16 logits within a stated tolerance of
transformers in bf16, greedy tokens equal on a short run with chunked prefill and a cached
prefix, preemption and seeded sampling in bf16, and float16 loading. The HTTP acceptance
tests run in bf16 too (test_server_e2e.py's `dtype` fixture)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hf_oracle import hf_greedy_top, hf_logits, max_relative_error

from splitinfer.engine import LLM, SamplingParams
from splitinfer.engine.forward_batch import ForwardBatch
from splitinfer.engine.loader import load_weights
from splitinfer.engine.model import CausalLM
from splitinfer.engine.model_config import ModelConfig

# bf16 keeps 8 bits of mantissa, and on these random tiny models (whose layers amplify, so that
# greedy runs do not loop) transformers' own bf16 logits are 2-11% (of the largest logit) away
# from fp32, measured per family. Ours must be as close to transformers' bf16 as that, and no
# farther from fp32 than transformers' bf16 is, give or take a quarter: a wrong cast, a norm
# or softmax in bf16 instead of fp32, or an ignored dtype would break one bound or the other.
BF16_TOLERANCE = 0.08
SHORT_RUN = 4  # greedy tokens compared: past a few, a near-tie may round either way in bf16
TOP = 3  # a parting of two greedy runs is a near-tie when each chose the other's top-3 token


def random_prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 400) for _ in range(n)] for n in lengths]


def test_bf16_logits_are_as_close_to_transformers_and_fp32_as_transformers_bf16_is(family_checkpoint: Path) -> None:
    model = CausalLM.build(ModelConfig.from_dir(family_checkpoint), torch.device("cpu"), torch.bfloat16)
    load_weights(model, family_checkpoint)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    prompt = random_prompts(2, (90,))[0]
    batch = ForwardBatch.for_prefill([len(prompt)], "cpu", all_logits=True)
    with torch.inference_mode():
        ours = model.compute_logits(model(torch.tensor(prompt), torch.arange(len(prompt)), batch))
    reference, fp32 = hf_logits(family_checkpoint, prompt, torch.bfloat16), hf_logits(family_checkpoint, prompt)
    assert max_relative_error(ours, reference) <= BF16_TOLERANCE
    assert max_relative_error(ours, fp32) <= 1.25 * max_relative_error(reference, fp32)
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
    assert max_relative_error(ours, fp32) > 1e-3, "measurably not fp32: the model must compute in bf16"


def assert_close_greedy(ours: list[int], our_tops: list[list[int]], theirs: list[int], their_tops: list[list[int]]):
    """Greedy runs of two half-precision engines: equal, except that from the first token where
    they part, each chose a token the other ranked in its top few (a near-tie that rounding
    decided), after which they continue from different texts and are not compared."""
    for step, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            assert a in their_tops[step] and b in our_tops[step], f"step {step}: {a} vs {b}, not a near-tie"
            return False
    return True


def test_bf16_greedy_equals_transformers_bf16_on_a_short_run(family_checkpoint: Path) -> None:
    """Batched with chunked prefill (so a prompt's rows are computed beside others', where
    matmuls of many rows may round differently from transformers' one-prompt matmuls) and with
    a cached prefix."""
    llm = LLM(family_checkpoint, device="cpu", dtype="bfloat16", max_num_batched_tokens=32, max_num_seqs=8)
    assert llm.engine.kv_cache.k.dtype == torch.bfloat16
    prompts = random_prompts(4, (3, 30, 70, 12, 45))
    prompts.append(prompts[2][:50] + [5, 6, 7])  # its first 3 blocks come from the prefix cache
    params = SamplingParams(max_tokens=SHORT_RUN, temperature=0.0, ignore_eos=True, logprobs=TOP)
    outs = llm.generate(prompts[:-1], params) + llm.generate(prompts[-1:], params)
    assert llm.engine.stats().kv.prefix_hit_tokens >= 48
    identical = 0
    for prompt, out in zip(prompts, outs):
        our_tops = [[out.token_ids[i], *(t for t, _ in entry.top)] for i, entry in enumerate(out.logprobs)]
        theirs, their_tops = hf_greedy_top(family_checkpoint, prompt, SHORT_RUN, torch.bfloat16, TOP)
        identical += assert_close_greedy(out.token_ids, our_tops, theirs, their_tops)
    assert identical >= len(prompts) - 2, "most runs must not meet a near-tie at all"


def test_bf16_preemption_loses_no_token_and_frees_every_block(tiny_checkpoint: Path) -> None:
    """A pool too small for the batch preempts and recomputes in bf16; every request still gets
    all its tokens, equal to a roomy pool's, and no block stays used."""
    prompts = random_prompts(5, (20, 45, 70, 33, 64, 12))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    def run(num_kv_blocks: int) -> tuple[list[list[int]], LLM]:
        llm = LLM(
            tiny_checkpoint,
            device="cpu",
            dtype="bfloat16",
            num_kv_blocks=num_kv_blocks,
            max_num_seqs=8,
            max_num_batched_tokens=128,
            enable_prefix_caching=False,
        )
        return [o.token_ids for o in llm.generate(prompts, params)], llm

    roomy, _ = run(128)
    tight, llm = run(12)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0, "the pool was meant to be too small to avoid preemption"
    assert stats.kv.used_blocks == 0
    assert [len(t) for t in tight] == [24] * len(prompts)
    # A recomputed prefill rounds in another order than the decodes it replaces; the first
    # tokens of every request are computed before any preemption can touch them.
    assert [t[:SHORT_RUN] for t in tight] == [t[:SHORT_RUN] for t in roomy]


def test_bf16_seeded_sampling_is_reproducible(tiny_checkpoint: Path) -> None:
    llm = LLM(tiny_checkpoint, device="cpu", dtype="bfloat16", max_num_seqs=4)
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, top_k=50, seed=11, logprobs=2)
    first, second = (llm.generate([[3, 4, 5, 6]], params)[0] for _ in range(2))
    assert first.token_ids == second.token_ids
    assert all(entry.logprob <= 0.0 for entry in first.logprobs)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_loads_a_float32_checkpoint_and_generates(tiny_checkpoint: Path, dtype: str) -> None:
    llm = LLM(tiny_checkpoint, device="cpu", dtype=dtype, max_num_seqs=4)
    assert llm.engine.model.model.norm.weight.dtype == getattr(torch, dtype)
    out = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 16, 40])
def test_upcast_matmuls_equal_fp32_math_rounded_once(dtype: torch.dtype, rows: int) -> None:
    """`cpu_linear.Upcast`: a half weight multiplied in fp32, chunk by chunk through a scratch
    smaller than the weight (3 chunks here, the last one short), with a bias; equal to the fp32
    product of the same half values, rounded once to the half dtype (a wrong chunk offset or a
    lost bias is off by whole units)."""
    from splitinfer.engine import cpu_linear

    weight, x, bias = torch.randn(100, 48).to(dtype), torch.randn(rows, 48).to(dtype), torch.randn(100).to(dtype)
    upcast = cpu_linear.Upcast(min_rows=16, chunk=40 * 48)
    expected = (x.float() @ weight.float().t() + bias.float()).to(dtype)
    got = cpu_linear.linear(x, weight, bias, None, upcast)
    assert got.dtype == dtype
    if rows >= 16:  # within one rounding step: the chunks' sums may be ordered differently
        torch.testing.assert_close(got.float(), expected.float(), atol=1e-3, rtol=2**-7)
    else:  # below min_rows: the half-precision matmul itself
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, bias))


def test_an_engine_in_bf16_takes_the_upcast_path_only_where_half_matmuls_are_slow(tiny_checkpoint: Path) -> None:
    from splitinfer.engine import cpu_linear

    llm = LLM(tiny_checkpoint, device="cpu", dtype="bfloat16", max_num_seqs=4)
    slow = cpu_linear.half_matmul_is_slow(torch.bfloat16)
    linears = [m for m in llm.engine.model.modules() if isinstance(m, torch.nn.Module) and hasattr(m, "upcast")]
    assert linears and all((m.upcast is not None) == slow for m in linears)
    assert not cpu_linear.half_matmul_is_slow(torch.float32)


def test_auto_dtype_on_cpu_follows_the_measured_bf16_matmul_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` on CPU: bfloat16 only where bf16 matmuls measure at least 1.5x fp32's speed (native
    bf16), float32 elsewhere; here first as measured on this machine, then for the two kinds."""
    from splitinfer.engine import cpu_linear
    from splitinfer.engine.engine_core import resolve_dtype

    cpu = torch.device("cpu")
    fast = cpu_linear.half_matmul_speedup(torch.bfloat16) >= cpu_linear.HALF_DEFAULT_SPEEDUP
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if fast else torch.float32)
    for speedup, expected in [(4.0, torch.bfloat16), (1.2, torch.float32), (0.01, torch.float32)]:
        monkeypatch.setattr(cpu_linear, "half_matmul_speedup", lambda dtype, s=speedup: s)
        assert resolve_dtype("auto", cpu) == expected, speedup
    assert resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
