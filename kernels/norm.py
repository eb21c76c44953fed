"""RMSNorm, optionally fused with the residual add that precedes it in every Llama block."""

from __future__ import annotations

import torch


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`weight * x / rms(x)` over the last dim, math in fp32, result in `x.dtype`.

    With `residual`, first forms `residual_out = x + residual` (in `x.dtype`, as the
    unfused model would store it) and returns `(rms_norm(residual_out), residual_out)`.
    """
    if residual is not None:
        x = x + residual
        residual_out = x
    x32 = x.float()
    variance = x32.pow(2).mean(dim=-1, keepdim=True)
    # Hugging Face casts back to the input dtype before multiplying by the weight;
    # doing the same keeps bf16 results bit-compatible with the checkpoint's reference.
    out = weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)
    return out if residual is None else (out, residual_out)
