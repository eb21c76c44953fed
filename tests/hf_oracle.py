"""transformers as the numerical oracle (tests only; the package never imports it)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=8)
def hf_model(path: Path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.inference_mode()
def hf_logits(path: Path, token_ids: list[int]) -> torch.Tensor:
    """Logits [len, vocab] for every position of one sequence."""
    return hf_model(path)(torch.tensor([token_ids])).logits[0].float()


def max_relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference over the largest reference magnitude."""
    return ((ours - reference).abs().max() / reference.abs().max()).item()
