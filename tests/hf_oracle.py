"""transformers as the numerical oracle (tests only; the package never imports it)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=12)
def hf_model(path: Path, dtype: torch.dtype = torch.float32):
    """The checkpoint in transformers: fp32 with eager attention (the exact reference), or in
    half precision with SDPA (what a transformers user runs, and what our CPU path computes)."""
    from transformers import AutoModelForCausalLM

    attention = "eager" if dtype == torch.float32 else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention)
    return model.eval()


@torch.inference_mode()
def hf_logits(path: Path, token_ids: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits [len, vocab] for every position of one sequence."""
    return hf_model(path, dtype)(torch.tensor([token_ids])).logits[0].float()


def max_relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference over the largest reference magnitude."""
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def _generate(path: Path, prompt: list[int], max_new_tokens: int, dtype: torch.dtype, eos: list[int] | None, **extra):
    """transformers' greedy `generate` on one prompt; with `eos` None it never stops early."""
    with torch.inference_mode():
        return hf_model(path, dtype).generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
            **extra,
        )


def hf_greedy(
    path: Path, prompt: list[int], max_new_tokens: int, dtype: torch.dtype = torch.float32, eos: list[int] | None = None
) -> list[int]:
    """transformers' greedy tokens for one prompt, stopping only at `eos` (none: never early)."""
    return _generate(path, prompt, max_new_tokens, dtype, eos)[0, len(prompt) :].tolist()


def hf_greedy_top(
    path: Path, prompt: list[int], max_new_tokens: int, dtype: torch.dtype, k: int
) -> tuple[list[int], list[list[int]]]:
    """transformers' greedy tokens for one prompt, and the `k` most likely ids at each step."""
    out = _generate(path, prompt, max_new_tokens, dtype, None, output_scores=True, return_dict_in_generate=True)
    tops = [scores[0].topk(k).indices.tolist() for scores in out.scores]
    return out.sequences[0, len(prompt) :].tolist(), tops
