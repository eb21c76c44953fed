"""The engine's device setup, the parts whose logic runs on CPU: which device it binds to,
when decode graphs are captured, and how the KV cache is sized from free GPU memory.
tests/test_gpu_engine.py runs the same paths on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitinfer.engine import EngineConfig, EngineCore
from splitinfer.engine.engine_core import graphs_off_reason, resolve_device
from splitinfer.engine.memory import kv_budget
from splitinfer.engine.sampler import Sampler

GiB = 2**30


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_a_cuda_device_without_cuda_is_refused_by_name(device: str) -> None:
    with pytest.raises(ValueError, match=f"device '{device}': CUDA is not available"):
        resolve_device(device)


def test_auto_and_cpu_devices_resolve_without_cuda_calls() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    ("device", "enforce_eager", "triton", "expected"),
    [
        ("cuda:0", False, True, None),
        ("cuda:1", True, True, "enforce_eager"),
        ("cuda:0", False, False, "torch kernel backend"),
        ("cpu", False, True, "not on CUDA"),
    ],
)
def test_graphs_are_captured_only_on_cuda_with_triton_kernels(
    device: str, enforce_eager: bool, triton: bool, expected: str | None
) -> None:
    """The torch backend plans attention with .tolist() and nonzero, illegal during capture: an
    engine on CUDA without Triton must run decode eagerly rather than fail at start."""
    reason = graphs_off_reason(torch.device(device), enforce_eager, triton)
    assert reason == expected if expected is None else expected in reason


def test_kv_budget_subtracts_peak_memory_outside_torch_and_the_graph_reserve() -> None:
    total, free, reserved, peak = 80 * GiB, 60 * GiB, 18 * GiB, 16 * GiB  # 2 GiB used outside torch
    assert kv_budget(total, free, reserved, peak, 0.9) == pytest.approx(0.9 * 80 * GiB - 16 * GiB - 2 * GiB)
    assert kv_budget(total, free, reserved, peak, 0.9, reserve=GiB) == pytest.approx(0.9 * 80 * GiB - 19 * GiB)
    # torch reserving more than the device reports used (a race with a release) counts nothing outside torch
    assert kv_budget(total, 70 * GiB, reserved, peak, 0.5) == pytest.approx(40 * GiB - 16 * GiB)


def test_the_profiling_forward_runs_the_sampler_at_max_num_seqs_with_every_feature(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sampler's [rows, vocab] temporaries (sort, softmax, penalties, logprobs) must be in
    the profiled peak, or the KV cache takes the memory they need and the first busy
    sampling step runs out of it. Profiling must not move the default generator either."""
    core = EngineCore(
        EngineConfig(
            model=str(tiny_checkpoint),
            device="cpu",
            dtype="float32",
            max_num_seqs=6,
            max_num_batched_tokens=64,
            num_kv_blocks=32,
        )
    )
    calls: list[tuple[tuple[int, ...], list]] = []
    original = Sampler.__call__

    def spy(self: Sampler, logits: torch.Tensor, seqs: list) -> object:
        calls.append((tuple(logits.shape), seqs))
        return original(self, logits, seqs)

    monkeypatch.setattr(Sampler, "__call__", spy)
    state = core.sampler.default_generator.get_state()
    core._profile_forward()
    ((shape, seqs),) = calls
    assert shape == (6, core.model_config.vocab_size)
    p = seqs[0].params
    assert p.top_k and p.top_p < 1 and p.min_p and p.has_penalties and p.logit_bias and p.logprobs == 20
    assert torch.equal(core.sampler.default_generator.get_state(), state)
