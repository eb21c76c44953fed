"""One tensor-parallel rank for tests/test_tensor_parallel.py: build the model's shard, load it,
run the same two steps as the single-rank reference (`two_steps`), and write what it saw.

    torch.multiprocessing.spawn(run_rank, (world, port, checkpoint, out_dir), nprocs=world)
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist

from splitinfer.engine.forward_batch import ForwardBatch
from splitinfer.engine.kv_cache import KVCache
from splitinfer.engine.loader import load_weights
from splitinfer.engine.model import CausalLM
from splitinfer.engine.model_config import ModelConfig
from splitinfer.engine.parallel import SINGLE, TensorParallel
from splitinfer.engine.tp_ranks import STOP, Rendezvous, StepChannel, agree_on_budget

BLOCK_SIZE = 4
NUM_BLOCKS = 16
# Two steps of three sequences: (new tokens, position of the first, block table).
FIRST_STEP = [(list(range(3, 14)), 0, [0, 1, 2]), (list(range(20, 27)), 0, [3, 4])]
SECOND_STEP = [
    ([14], 11, [0, 1, 2]),  # A's decode after its 11-token prefill
    (list(range(27, 32)), 7, [3, 4, 5]),  # B's next chunk, over its cached 7 tokens
    (list(range(40, 46)), 0, [6, 7]),  # C, fresh
]


def batch_of(
    step: list[tuple[list[int], int, list[int]]], all_logits: bool
) -> tuple[torch.Tensor, torch.Tensor, ForwardBatch]:
    ids, positions, slots, cu, seq_lens = [], [], [], [0], []
    for tokens, start, table in step:
        ids += tokens
        span = range(start, start + len(tokens))
        positions += span
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in span]
        cu.append(cu[-1] + len(tokens))
        seq_lens.append(start + len(tokens))
    width = max(len(table) for _, _, table in step)
    batch = ForwardBatch(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        max_seqlen_q=max(len(tokens) for tokens, _, _ in step),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor([t + [-1] * (width - len(t)) for _, _, t in step], dtype=torch.int32),
        has_cached_prefix=any(start > 0 for _, start, _ in step),
        num_decode_seqs=sum(len(tokens) == 1 for tokens, _, _ in step),
        logits_indices=None if all_logits else torch.tensor(cu[1:], dtype=torch.int64) - 1,
    )
    return torch.tensor(ids), torch.tensor(positions), batch


@torch.inference_mode()
def two_steps(model: CausalLM) -> torch.Tensor | None:
    """Logits of a fresh two-sequence prefill (every row), then of a mixed step (a decode, a
    chunk over a cached prefix, a fresh prompt; the sampling rows): rank 0's, else None."""
    cache = KVCache.allocate(
        model.config.num_layers,
        NUM_BLOCKS,
        BLOCK_SIZE,
        model.shard.num_kv_heads,
        model.config.head_dim,
        torch.float32,
        "cpu",
    )
    model.bind_kv_cache(cache)
    out = []
    for step, all_logits in ((FIRST_STEP, True), (SECOND_STEP, False)):
        ids, positions, batch = batch_of(step, all_logits)
        out.append(model.compute_logits(model(ids, positions, batch), batch.logits_indices))
    return None if out[0] is None else torch.cat(out)


def load(checkpoint: Path, tp: TensorParallel = SINGLE) -> tuple[CausalLM, int]:
    model = CausalLM.build(ModelConfig.from_dir(checkpoint), torch.device("cpu"), torch.float32, tp)
    return model, load_weights(model, checkpoint).num_bytes


def run_rank(rank: int, world: int, port: int, checkpoint: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model, read = load(Path(checkpoint), TensorParallel(rank, world, dist.group.WORLD))
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        logits = two_steps(model)
        report = {
            "rank": rank,
            "param_bytes": params,
            "read_bytes": read,
            "maxrss_growth_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
        if logits is not None:
            torch.save(logits, Path(out_dir, "logits.pt"))
    finally:
        dist.destroy_process_group()


BUDGETS = [5e9, 3e9, 4e9]  # each rank's "free memory" for the KV budget agreement


def agree_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """Agree on the KV budget with the other ranks, each passing its own (`BUDGETS[rank]`)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        budgets = agree_on_budget(BUDGETS[rank], dist.group.WORLD)
        Path(out_dir, f"budgets{rank}.json").write_text(json.dumps(budgets))
    finally:
        dist.destroy_process_group()


IDLE_S = 3.0  # longer than rank 0's timeout in `idle_rank`


def idle_rank(rank: int, port: int, out_dir: str) -> None:
    """Rank 0 (with a 1 s collective timeout) sends nothing for `IDLE_S`, as an idle engine
    does, then one call; the worker, waiting all along, must still get it."""
    channel = StepChannel(Rendezvous("127.0.0.1", port, 2, "gloo", timeout_s=1.0).init(rank)[1])
    try:
        if rank == 0:
            time.sleep(IDLE_S)
            channel.send(STOP, [7], [])
        else:
            op, ints, _ = channel.receive()
            Path(out_dir, "received.json").write_text(json.dumps([op, ints]))
    finally:
        dist.destroy_process_group()
