"""Batched next-token sampling with per-request temperature, top-k, top-p and seeds."""

from __future__ import annotations

import torch

from splitinfer.engine.sampling_params import SamplingParams


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """One token id per row of fp32 `logits` [B, V], each row by its own params.

    Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which picks
    token i with probability p_i like multinomial, without a host sync; a row with a
    generator draws its noise from it, so its tokens do not depend on its batch-mates.
    """
    greedy_tokens = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy_tokens
    device = logits.device
    vocab = logits.shape[-1]
    temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)

    sorted_logits, sorted_ids = (logits / temperature[:, None]).sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)
    drop = ranks[None, :] >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Keep a token while the mass before it is still below top_p (the top token always stays).
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)

    noise = torch.empty_like(probs)
    for row, generator in enumerate(generators):
        noise[row].exponential_(generator=generator)
    choice = (probs / noise.clamp_min(1e-10)).argmax(dim=-1, keepdim=True)
    sampled = sorted_ids.gather(1, choice).squeeze(1)
    is_greedy = torch.tensor([p.greedy for p in params], device=device)
    return torch.where(is_greedy, greedy_tokens, sampled)
