"""Tensor parallelism on CPU over gloo: a model split over 2 ranks computes the logits of the
unsplit one, for every family and the KV-head layouts (split, and replicated when there are
fewer KV heads than ranks), through a fresh prefill and a mixed step over the paged KV cache;
each rank holds and reads about half the weights; splits the model does not allow are refused
before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import FAMILIES, VARIANTS
from procs import free_port
from tp_worker import BUDGETS, agree_rank, idle_rank, load, run_rank, two_steps

from splitinfer.engine import tp_ranks
from splitinfer.engine.errors import ConfigError, EngineDeadError
from splitinfer.engine.isolation import IsolatingExecutor
from splitinfer.engine.model_config import ModelConfig
from splitinfer.engine.parallel import ShardPlan, TensorParallel, check_tensor_parallel
from splitinfer.engine.tp_ranks import STOP, Driver

TOL = 1e-4
CASES = {
    "llama (GQA 2:1, 2 KV heads split)": FAMILIES["llama"],
    "llama (1 KV head, replicated; tied embeddings)": VARIANTS["gqa4-llama3-tied"],
    "llama (biases, 3 shards)": VARIANTS["gqa2-linear-bias"],
    "qwen2 (q/k/v bias)": FAMILIES["qwen2"],
    "llama (a vocabulary of 509: the last rank's slice is shorter)": ("--vocab", "509", "--no-tie", "--seed", "9"),
    "qwen3 (q/k norms)": FAMILIES["qwen3"],
    "mistral (sliding window, 1 KV head)": FAMILIES["mistral"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_compute_the_logits_of_one(make_checkpoint, tmp_path: Path, case: str) -> None:
    checkpoint = make_checkpoint(*CASES[case])
    model, whole_read = load(checkpoint)
    reference = two_steps(model)
    whole_params = sum(p.numel() * p.element_size() for p in model.parameters())
    mp.spawn(run_rank, (2, free_port(), str(checkpoint), str(tmp_path)), nprocs=2, join=True)
    logits = torch.load(tmp_path / "logits.pt")
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max().item() < TOL
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # Half of every split weight; the norms (and replicated KV heads) are whole on each rank.
        assert 0.45 < report["param_bytes"] / whole_params < 0.6, report
        assert 0.45 < report["read_bytes"] / whole_read < 0.6, report


def test_every_rank_learns_every_ranks_kv_budget(tmp_path: Path) -> None:
    """KV sizing on CUDA: each rank measures its own free memory; all must see every rank's
    budget (rank 0 sizes the cache by the smallest), whatever the order they arrive in."""
    mp.spawn(agree_rank, (3, free_port(), str(tmp_path)), nprocs=3, join=True)
    for rank in range(3):
        assert json.loads((tmp_path / f"budgets{rank}.json").read_text()) == BUDGETS


def test_a_worker_waits_for_the_next_call_longer_than_rank_0s_timeout(tmp_path: Path) -> None:
    """An idle engine sends its workers nothing: their wait for the next call must outlast
    rank 0's collective timeout (which only bounds rank 0's own waits)."""
    mp.spawn(idle_rank, (free_port(), str(tmp_path)), nprocs=2, join=True)
    assert json.loads((tmp_path / "received.json").read_text()) == [STOP, [7]]


class StubRunner:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.probes = 0

    def execute(self, plan: object, masks: object) -> None:
        raise self.error

    def probe(self) -> None:
        self.probes += 1


def test_ranks_out_of_step_stop_the_engine_without_a_probe_or_a_retry() -> None:
    """A mirrored call that failed on rank 0 leaves the workers inside it: the probe (itself a
    mirrored call) would pair with their pending collective, so the step must not be retried."""
    runner = StubRunner(EngineDeadError("a tensor-parallel call failed midway"))
    with pytest.raises(EngineDeadError):
        IsolatingExecutor(runner).execute([])
    assert runner.probes == 0
    driver = Driver(StubChannel(), [])
    driver.collective_failed(RuntimeError("out of memory"))
    with pytest.raises(EngineDeadError, match="out of step"):
        driver.bind_kv(4, 16)  # nothing is sent after that
    assert driver.channel.sent == []


class StubChannel:
    def __init__(self) -> None:
        self.sent: list[int] = []

    def send(self, op: int, ints: list[int], tensors: list) -> None:
        self.sent.append(op)


class DeadWorker:
    stopped = False

    def dead_worker(self) -> str:
        return "tensor-parallel rank 1 (pid 4242) exited (killed by signal 9)"


def test_rank_0_stuck_after_a_worker_died_exits_by_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replayed CUDA graph's all-reduce with a dead rank never returns: the watchdog, having
    told the engine, exits the process when it has not stopped `STUCK_EXIT_S` later."""
    monkeypatch.setattr(tp_ranks, "STUCK_EXIT_S", 0.2)
    told: list[str] = []
    exits: list[int] = []
    thread = tp_ranks.watch_workers(DeadWorker(), told.append, interval_s=0.01, exit_process=exits.append)
    thread.join(5)
    assert told == [DeadWorker().dead_worker()] and exits == [1]


def test_the_shard_plan_covers_every_head_and_row_once() -> None:
    for heads, kv, size in [(8, 8, 4), (8, 2, 2), (8, 2, 4), (8, 1, 8), (32, 8, 8)]:
        fields = dict(num_heads=heads, num_kv_heads=kv, intermediate_size=64, vocab_size=1001, path=Path("m"))
        config = _config(**fields)
        plans = [ShardPlan.of(config, TensorParallel(r, size)) for r in range(size)]
        assert sorted(h for p in plans for h in range(p.head_start, p.head_start + p.num_heads)) == list(range(heads))
        assert sum(p.vocab_count for p in plans) == 1001
        assert [p.vocab_start for p in plans] == sorted(p.vocab_start for p in plans)
        for p in plans:  # each rank's q heads read only its KV heads
            group = heads // kv
            needed = {h // group for h in range(p.head_start, p.head_start + p.num_heads)}
            assert needed <= set(range(p.kv_head_start, p.kv_head_start + p.num_kv_heads))


def _config(**fields) -> ModelConfig:
    config = object.__new__(ModelConfig)
    for name, value in fields.items():
        object.__setattr__(config, name, value)
    return config


@pytest.mark.parametrize(
    ("fields", "size", "message"),
    [
        (dict(num_heads=6, num_kv_heads=2, intermediate_size=64), 4, "6 attention heads"),
        (dict(num_heads=8, num_kv_heads=3, intermediate_size=64), 2, "3 KV heads"),
        (dict(num_heads=8, num_kv_heads=8, intermediate_size=66), 4, "intermediate size 66"),
        (dict(num_heads=8, num_kv_heads=8, intermediate_size=64), 0, "at least 1"),
    ],
)
def test_splits_the_model_does_not_allow_are_refused(fields: dict, size: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_tensor_parallel(_config(**fields, vocab_size=100, path=Path("m")), size)
