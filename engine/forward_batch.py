"""The inputs of one model forward over a packed batch of sequences, beyond the tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitinfer.kernels import AttentionMetadata


@dataclass(slots=True)
class ForwardBatch(AttentionMetadata):
    """The attention metadata of one forward (`kernels.AttentionMetadata`: where each
    sequence's new tokens sit in the packed batch and in the KV cache, which every layer's
    attention reads), plus which rows need logits:

    - `logits_indices` [S] int64: which rows to compute logits for (the last token of each
      sequence that samples, in the step's order, whatever order the rows are packed in);
      None computes logits for every token.
    """

    logits_indices: torch.Tensor | None = None

    @classmethod
    def for_prefill(cls, lengths: list[int], device: torch.device | str, all_logits: bool = False) -> ForwardBatch:
        """Packed prefill of fresh sequences that writes no K/V (no slots): attention over the
        batch alone."""
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return cls(
            cu_seqlens_q=cu.to(device),
            seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
            max_seqlen_q=max(lengths),
            logits_indices=None if all_logits else (cu[1:] - 1).to(device=device, dtype=torch.int64),
        )
