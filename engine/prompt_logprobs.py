"""Prompt logprobs: how likely the model found each prompt token, from the prefill's own forward.

A prompt position q's hidden state gives the distribution of token q + 1, so scoring a
prompt needs the lm_head over every prompt position, not only the last one. A step's
scored positions (`ScoringPlan`, built by the model runner from `Request.scored_positions`)
may be thousands of rows, and their logits [rows, vocab] in fp32 would be gigabytes for a
large vocabulary; `score` therefore runs the lm_head, the log-softmax and the top-k over
slices of at most `MAX_SLICE_ELEMENTS` logits and keeps only each row's few numbers. Every
slice is read back in one copy (float64 holds every fp32 value and token id exactly).

The log-probabilities are of the model's raw distribution, as the sampler's are: no
temperature, penalty, bias or grammar applies to a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splitinfer.engine.model import CausalLM
from splitinfer.protocol import TokenLogprobs

# 2**24 fp32 logits are 64 MiB; the log-softmax and the top-k add about two more such tensors.
MAX_SLICE_ELEMENTS = 2**24


@dataclass(slots=True)
class ScoringPlan:
    """The rows of a step's hidden states that score prompt tokens: for each, the packed row,
    the prompt token it scores, and how many top alternatives its request asked for; and,
    per request, how many consecutive rows are its (in order)."""

    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    requests: list[tuple[str, int]] = field(default_factory=list)  # (request id, row count)

    def add(self, request_id: str, rows: range, targets: list[int], top_k: int) -> None:
        if rows:
            self.rows += rows
            self.targets += targets
            self.top_k += [top_k] * len(rows)
            self.requests.append((request_id, len(rows)))

    def __bool__(self) -> bool:
        return bool(self.rows)


def slice_rows(vocab_size: int) -> int:
    """How many rows one slice scores at once."""
    return max(1, MAX_SLICE_ELEMENTS // vocab_size)


@torch.inference_mode()
def score(model: CausalLM, hidden: torch.Tensor, plan: ScoringPlan) -> dict[str, tuple[TokenLogprobs, ...]]:
    """Each planned row's entry (its target's logprob and rank, and the top-k), grouped by request."""
    entries: list[TokenLogprobs] = []
    k = max(plan.top_k)
    step = slice_rows(model.config.vocab_size)
    device = hidden.device
    for start in range(0, len(plan.rows), step):
        end = min(start + step, len(plan.rows))
        rows = torch.tensor(plan.rows[start:end], dtype=torch.int64).to(device, non_blocking=True)
        entries += _score_slice(model, hidden, rows, plan.targets[start:end], plan.top_k[start:end], k)
    out: dict[str, tuple[TokenLogprobs, ...]] = {}
    first = 0
    for request_id, count in plan.requests:
        out[request_id] = tuple(entries[first : first + count])
        first += count
    return out


def _score_slice(
    model: CausalLM, hidden: torch.Tensor, rows: torch.Tensor, targets: list[int], top_k: list[int], k: int
) -> list[TokenLogprobs]:
    logprobs = model.compute_logits(hidden, rows).log_softmax(dim=-1)
    target_ids = torch.tensor(targets, dtype=torch.int64).to(logprobs.device, non_blocking=True)
    chosen = logprobs.gather(1, target_ids[:, None])
    # Ties count in the token's favour, as vLLM ranks: 1 + the tokens strictly more likely.
    rank = (logprobs > chosen).sum(dim=-1, keepdim=True, dtype=torch.int32) + 1  # int32: twice as fast as int64
    parts = [chosen.double(), rank.double()]
    if k:
        top_values, top_ids = logprobs.topk(k, dim=-1)
        parts += [top_values.double(), top_ids.double()]
    table = torch.cat(parts, dim=1).tolist()  # the slice's one wait for the device
    return [
        # Refuses a NaN (a broken forward): the isolating executor pins it on the request.
        TokenLogprobs(
            targets[i],
            values[0],
            [(int(values[2 + k + j]), values[2 + j]) for j in range(top_k[i])],
            rank=int(values[1]),
        )
        for i, values in enumerate(table)
    ]
