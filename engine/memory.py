"""How many KV-cache blocks fit: from free GPU memory after a profiling forward, or from a size on CPU."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


def blocks_from_budget(budget_bytes: float, bytes_per_block: int) -> int:
    return max(int(budget_bytes // bytes_per_block), 0)


def kv_budget(
    total: int, free: int, torch_reserved: int, torch_peak: int, utilization: float, reserve: int = 0
) -> float:
    """Bytes left for the KV cache, vLLM's accounting: the engine may use `utilization` of the
    device's `total` memory; from that subtract the torch peak of the profiling run (weights
    plus the largest activations and the sampler's temporaries), what lives outside torch's
    allocator (CUDA context, cuBLAS workspaces: the device's used memory, `total - free`,
    minus what torch has reserved) and `reserve`, bytes that will be allocated after the KV
    cache (the CUDA graphs' memory pool)."""
    non_torch = max((total - free) - torch_reserved, 0)
    return total * utilization - torch_peak - non_torch - reserve


def cuda_kv_budget(device: torch.device, utilization: float, profile: Callable[[], None], reserve: int = 0) -> float:
    """Bytes left for the KV cache on `device` after a worst-case forward (`profile`); see `kv_budget`."""
    check_utilization(utilization)
    begin_profile(device)
    profile()
    return measured_budget(device, utilization, reserve)


def check_utilization(utilization: float) -> None:
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")


def begin_profile(device: torch.device) -> None:
    """Start measuring: release cached blocks and reset the peak, so that the profiling
    forward's peak is what `measured_budget` reads. (Tensor-parallel workers run this and
    `measured_budget` around their share of rank 0's profiling forward.)"""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


def measured_budget(device: torch.device, utilization: float, reserve: int) -> float:
    """The KV budget (`kv_budget`) from the peak since `begin_profile` and the device's free memory now."""
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    budget = kv_budget(total, free, reserved, peak, utilization, reserve)
    logger.info(
        "GPU memory on %s: %.2f GiB total, x %.2f utilization; profiling peak %.2f GiB, outside torch %.2f GiB, "
        "CUDA graphs %.2f GiB; %.2f GiB left for the KV cache",
        device,
        total / 2**30,
        utilization,
        peak / 2**30,
        max((total - free) - reserved, 0) / 2**30,
        reserve / 2**30,
        budget / 2**30,
    )
    return budget
