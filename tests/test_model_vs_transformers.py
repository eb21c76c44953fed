"""Our Llama forward against transformers' LlamaForCausalLM, in float32, on every variant."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hf_oracle import hf_logits, max_relative_error

from splitinfer.engine import cpu_linear
from splitinfer.engine.forward_batch import ForwardBatch
from splitinfer.engine.kv_cache import KVCache
from splitinfer.engine.loader import load_weights
from splitinfer.engine.model import CausalLM
from splitinfer.engine.model_config import ModelConfig
from splitinfer.engine.model_runner import ModelRunner
from splitinfer.engine.request import Request
from splitinfer.engine.scheduler import ScheduledSeq, SchedulerOutput
from splitinfer.protocol.sampling_params import SamplingParams

TOLERANCE = 1e-4


def load(path: Path, prepack_rows: frozenset[int] = frozenset()) -> CausalLM:
    model = CausalLM.build(ModelConfig.from_dir(path), torch.device("cpu"), torch.float32)
    load_weights(model, path)
    if prepack_rows:
        if cpu_linear.check_prepack(torch.float32) is not None:
            pytest.skip(f"no oneDNN prepacked matmuls: {cpu_linear.check_prepack(torch.float32)}")
        model.prepack_cpu_weights(prepack_rows)
    return model


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(length)]


@torch.inference_mode()
def packed_logits(model: CausalLM, prompts: list[list[int]], all_logits: bool) -> torch.Tensor:
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.tensor([i for p in prompts for i in range(len(p))])
    batch = ForwardBatch.for_prefill([len(p) for p in prompts], "cpu", all_logits=all_logits)
    return model.compute_logits(model(ids, positions, batch), batch.logits_indices)


def test_one_prompt_matches_transformers(variant_checkpoint: Path) -> None:
    model = load(variant_checkpoint)
    prompt = random_prompt(random.Random(0), 12, model.config.vocab_size)
    ours = packed_logits(model, [prompt], all_logits=True)
    assert max_relative_error(ours, hf_logits(variant_checkpoint, prompt)) <= TOLERANCE


@pytest.mark.parametrize("prepack", [False, True], ids=["default-matmul", "onednn-prepacked"])
def test_packed_batch_of_ragged_prompts_matches_transformers(variant_checkpoint: Path, prepack: bool) -> None:
    """41 rows of logits (with prepacked weights: the oneDNN path), then 3 (the default one)."""
    model = load(variant_checkpoint, frozenset({41}) if prepack else frozenset())
    rng = random.Random(1)
    prompts = [random_prompt(rng, n, model.config.vocab_size) for n in (1, 7, 33)]
    ours = packed_logits(model, prompts, all_logits=True)
    start = 0
    for prompt in prompts:
        reference = hf_logits(variant_checkpoint, prompt)
        assert max_relative_error(ours[start : start + len(prompt)], reference) <= TOLERANCE
        start += len(prompt)
    last_only = packed_logits(model, prompts, all_logits=False)
    assert last_only.shape == (3, model.config.vocab_size)
    torch.testing.assert_close(last_only, ours[torch.tensor([0, 7, 40])], rtol=1e-5, atol=1e-5)


def test_prefill_then_decode_through_paged_cache_matches_transformers(variant_checkpoint: Path) -> None:
    """Two sequences prefilled together, then 20 decode steps each, with shuffled,
    non-contiguous KV blocks; every step's logits against a full-sequence forward."""
    model = load(variant_checkpoint)
    vocab = model.config.vocab_size
    rng = random.Random(2)
    block_size = 4
    cache = KVCache.allocate(
        model.config.num_layers, 40, block_size, model.config.num_kv_heads, model.config.head_dim, torch.float32, "cpu"
    )
    cache.k.fill_(float("nan"))  # a read of an unwritten slot poisons the logits
    cache.v.fill_(float("nan"))
    runner = ModelRunner(model, cache, sampler=None, max_num_seqs=2, max_model_len=160, use_cuda_graphs=False)
    blocks = list(range(40))
    rng.shuffle(blocks)
    prompts = [random_prompt(rng, 5, vocab), random_prompt(rng, 18, vocab)]
    seqs = [Request(str(i), p, SamplingParams(max_tokens=21)) for i, p in enumerate(prompts)]
    seqs[0].block_table, seqs[1].block_table = blocks[:7], blocks[7:17]
    continuations = [random_prompt(rng, 20, vocab) for _ in prompts]

    def forward(new_tokens: list[int]) -> torch.Tensor:
        step = SchedulerOutput([ScheduledSeq(seq, n) for seq, n in zip(seqs, new_tokens)], [])
        ids, positions, batch = runner.prepare(step)
        for seq, n in zip(seqs, new_tokens):
            seq.num_computed_tokens += n
        return model.compute_logits(model(ids, positions, batch), batch.logits_indices)

    with torch.inference_mode():
        step_logits = [forward([len(p) for p in prompts])]
        for step in range(20):
            for seq, tokens in zip(seqs, continuations):
                seq.token_ids.append(tokens[step])
            step_logits.append(forward([1, 1]))

    for b, (prompt, tokens) in enumerate(zip(prompts, continuations)):
        reference = hf_logits(variant_checkpoint, prompt + tokens)
        ours = torch.stack([logits[b] for logits in step_logits])
        assert max_relative_error(ours, reference[len(prompt) - 1 :]) <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_load_runs_close_to_float32(tiny_checkpoint: Path, dtype: torch.dtype) -> None:
    config = ModelConfig.from_dir(tiny_checkpoint)
    model = CausalLM.build(config, torch.device("cpu"), dtype)
    load_weights(model, tiny_checkpoint)
    assert model.model.norm.weight.dtype == dtype and model.rope_cache.dtype == torch.float32
    prompt = random_prompt(random.Random(3), 9, config.vocab_size)
    ours = packed_logits(model, [prompt], all_logits=True)
    assert max_relative_error(ours, hf_logits(tiny_checkpoint, prompt)) <= 5e-2
