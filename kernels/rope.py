"""Rotary position embeddings as Hugging Face Llama defines them (rotate-half layout).

The cos/sin table is computed once on the host in fp32 and indexed by absolute
position, so the same table serves prefill, chunked prefill and decode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """A validated `rope_scaling` entry of a Llama config.

    `kind` is "linear" (positions divided by `factor`) or "llama3" (Llama 3.1's
    frequency-dependent interpolation between `low_freq_factor` and `high_freq_factor`).
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"unsupported rope scaling type {self.kind!r}; supported: 'linear', 'llama3'")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(
                "llama3 rope scaling needs high_freq_factor > low_freq_factor > 0, "
                f"got {self.high_freq_factor} and {self.low_freq_factor}"
            )


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, computed exactly as transformers does."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    return _llama3_inv_freq(inv_freq, scaling)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Long wavelengths are divided by the factor, short ones are kept, and the band
    # between is interpolated smoothly (Llama 3.1 paper, section 3.4).
    low_freq_wavelen = s.original_max_position / s.low_freq_factor
    high_freq_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin_cache(
    head_dim: int,
    max_position: int,
    theta: float,
    scaling: RopeScaling | None = None,
) -> torch.Tensor:
    """fp32 table [max_position, head_dim]: cos of each frequency in the first half, sin in the second."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    positions = torch.arange(max_position, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    half = x.shape[-1] // 2
    x1 = x[..., :half].float()
    x2 = x[..., half:].float()
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x.copy_(rotated.to(x.dtype))


def apply_rope_reference_(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by the angle of each token's position [T]."""
    half = q.shape[-1] // 2
    table = cos_sin_cache.index_select(0, positions.long())
    cos = table[:, None, :half]
    sin = table[:, None, half:]
    _rotate_(q, cos, sin)
    _rotate_(k, cos, sin)
