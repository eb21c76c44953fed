"""The engine's tensor-parallel ranks: rank 0 is the engine process itself; ranks 1..N-1 are
worker processes it starts, each holding its shard of the model (`parallel.py`).

Rank 0 keeps the scheduler, the block pool and the sampler. Its model carries a `Driver`:
every call rank 0 makes on the model (a forward, logits of some rows, binding the KV cache)
is first sent to the workers over `StepChannel`, which then make the same call on their
shard, so the collectives inside the model (all-reduces, the logits gather) meet in the
same order on every rank. Workers never schedule or sample; they only follow. Whatever
rank 0 runs (steps, warm-up, the KV profiling forward, prompt scoring in slices, the
liveness probe) is mirrored without any of it knowing. Two things are mirrored at a
coarser grain: the decode graph runner (every rank builds its own, captures its own graphs
and replays the bucket rank 0 names, `cuda_graph.py`), and the KV sizing on CUDA (every
rank measures its own free memory around the profiling forward; the smallest budget wins).

`StepChannel` packs one call into two broadcasts over a CPU gloo group (a fixed header of
int64s, then one int64 payload holding every tensor), whatever backend the model's own
collectives use.

Faults: a worker that dies makes rank 0's next collective fail (gloo sees the connection
close) or time out (`COLLECTIVE_TIMEOUT_S`); the driver turns that into `EngineDeadError`
naming the rank, which stops the engine the usual way (in-flight requests end, clients are
told). A watchdog thread also notices a worker's exit while rank 0 is not in a collective
(between steps, or while loading). Workers exit when rank 0 goes away: their wait for the
next call fails, and on Linux the kernel signals them when their parent dies.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from splitinfer.engine import memory
from splitinfer.engine.cuda_graph import DecodeGraphRunner
from splitinfer.engine.errors import EngineDeadError
from splitinfer.engine.forward_batch import ForwardBatch
from splitinfer.engine.kv_cache import KVCache
from splitinfer.engine.parallel import TensorParallel

logger = logging.getLogger(__name__)
T = TypeVar("T")

COLLECTIVE_TIMEOUT_S = 60.0  # rank 0's limit: a rank silent this long in a collective counts as hung
# A worker's limit, its wait for rank 0's next call included: an idle engine sends nothing for
# as long as it is idle. (Each process sets its own; rank 0's death closes the connections,
# and the kernel's death signal ends a worker anyway.)
WORKER_TIMEOUT_S = 365 * 24 * 3600.0
# Set by the engine process: how long after a worker's death rank 0 may take to stop by
# itself before it exits on the spot (it may be blocked in a collective with the dead rank
# that never returns, such as an all-reduce replayed from a CUDA graph). None: never.
STUCK_EXIT_S: float | None = None
HEADER = 64  # int64s of a call's header
FORWARD, LOGITS, BIND_KV, STOP, DECODE_RUNNER, DECODE, MEMORY_BEGIN, MEMORY_END = range(1, 9)
_DTYPES = {torch.int64: 1, torch.int32: 2}
_DTYPE_OF = {code: dtype for dtype, code in _DTYPES.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True, slots=True)
class Rendezvous:
    """Where the ranks meet: torch.distributed's TCP store on rank 0's host."""

    address: str
    port: int
    world_size: int
    backend: str  # "gloo" (CPU) or "nccl" (CUDA)
    timeout_s: float = COLLECTIVE_TIMEOUT_S  # rank 0's, in every collective (workers wait longer)
    join_timeout_s: float | None = None  # rank 0's wait for the others to join; None: timeout_s

    def init(
        self, rank: int, dead_peer: Callable[[], str | None] = lambda: None
    ) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
        """Join the group: (the model's group, the CPU group calls travel on). Rank 0 hosts the
        store and first waits for every other rank to check in, asking `dead_peer` (what has
        exited, said for a log line) meanwhile: a worker that dies while starting ends the
        wait at once with EngineDeadError, instead of the group's timeout."""
        store_timeout = datetime.timedelta(seconds=self.timeout_s)
        store = dist.TCPStore(
            self.address, self.port, self.world_size, is_master=rank == 0, timeout=store_timeout, wait_for_workers=False
        )
        if rank == 0:
            self._wait_for_ranks(store, dead_peer)
        else:
            store.set(f"joined/{rank}", "1")
        timeout = datetime.timedelta(seconds=self.timeout_s if rank == 0 else WORKER_TIMEOUT_S)
        try:
            dist.init_process_group(self.backend, store=store, rank=rank, world_size=self.world_size, timeout=timeout)
            cpu = dist.new_group(backend="gloo", timeout=timeout) if self.backend != "gloo" else dist.group.WORLD
        except Exception as exc:  # a rank that died after checking in: its connection never comes
            if rank != 0:
                raise
            raise EngineDeadError(dead_peer() or f"the tensor-parallel group could not form: {exc}") from exc
        return dist.group.WORLD, cpu

    def _wait_for_ranks(self, store: dist.TCPStore, dead_peer: Callable[[], str | None]) -> None:
        keys = [f"joined/{rank}" for rank in range(1, self.world_size)]
        limit = self.join_timeout_s or self.timeout_s
        deadline = time.monotonic() + limit
        while not store.check(keys):
            why = dead_peer()
            if why is not None:
                raise EngineDeadError(f"{why} while the ranks were starting")
            if time.monotonic() > deadline:
                missing = [key.removeprefix("joined/") for key in keys if not store.check([key])]
                raise EngineDeadError(f"tensor-parallel ranks {', '.join(missing)} did not join within {limit:.0f} s")
            time.sleep(0.05)


class StepChannel:
    """Rank 0's calls to the workers: an op, a few ints, a few integer tensors (or None)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def send(self, op: int, ints: list[int], tensors: list[torch.Tensor | None]) -> None:
        header = [op, len(ints), len(tensors), *ints]
        payload = []
        for tensor in tensors:
            if tensor is None:
                header += [0, -1, 0, 0]
                continue
            shape = list(tensor.shape) + [1] * (2 - tensor.dim())
            header += [_DTYPES[tensor.dtype], tensor.dim(), *shape]
            payload.append(tensor.detach().reshape(-1).to("cpu", torch.int64))
        if len(header) > HEADER:
            raise ValueError(f"a tensor-parallel call needs {len(header)} header fields, more than {HEADER}")
        packed = torch.zeros(HEADER, dtype=torch.int64)
        packed[: len(header)] = torch.tensor(header, dtype=torch.int64)
        dist.broadcast(packed, src=0, group=self.group)
        data = torch.cat(payload) if payload else torch.empty(0, dtype=torch.int64)
        if data.numel():  # as `receive` decides: by the element count, empty tensors included
            dist.broadcast(data, src=0, group=self.group)

    def receive(self) -> tuple[int, list[int], list[torch.Tensor | None]]:
        packed = torch.empty(HEADER, dtype=torch.int64)
        dist.broadcast(packed, src=0, group=self.group)
        header = packed.tolist()
        op, n_ints, n_tensors = header[0], header[1], header[2]
        ints = header[3 : 3 + n_ints]
        specs = [header[3 + n_ints + 4 * i : 7 + n_ints + 4 * i] for i in range(n_tensors)]
        total = sum(rows * cols for _, dim, rows, cols in specs if dim >= 0)
        payload = torch.empty(total, dtype=torch.int64)
        if total:
            dist.broadcast(payload, src=0, group=self.group)
        tensors: list[torch.Tensor | None] = []
        offset = 0
        for code, dim, rows, cols in specs:
            if dim < 0:
                tensors.append(None)
                continue
            flat = payload[offset : offset + rows * cols].to(_DTYPE_OF[code])
            offset += rows * cols
            tensors.append(flat.view(rows, cols) if dim == 2 else flat.view(rows) if dim == 1 else flat.view(()))
        return op, ints, tensors


def _forward_call(input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch):
    ints = [batch.max_seqlen_q, int(batch.has_cached_prefix), batch.num_decode_seqs]
    tensors = [input_ids, positions, batch.cu_seqlens_q, batch.seq_lens, batch.slot_mapping, batch.block_tables]
    return ints, tensors


def _forward_args(ints: list[int], tensors: list, device: torch.device):
    input_ids, positions, cu, seq_lens, slots, tables = (t.to(device) if t is not None else None for t in tensors)
    batch = ForwardBatch(
        cu_seqlens_q=cu,
        seq_lens=seq_lens,
        max_seqlen_q=ints[0],
        slot_mapping=slots,
        block_tables=tables,
        has_cached_prefix=bool(ints[1]),
        num_decode_seqs=ints[2],
    )
    return input_ids, positions, batch


def first_exited(workers: list[mp.Process], first_rank: int = 1) -> str | None:
    """The first of `workers` (rank first_rank + i is workers[i]) that has exited, said for a
    log line; None while all live."""
    for rank, proc in enumerate(workers, start=first_rank):
        if proc.exitcode is not None:
            how = f"killed by signal {-proc.exitcode}" if proc.exitcode < 0 else f"exit status {proc.exitcode}"
            return f"tensor-parallel rank {rank} (pid {proc.pid}) exited ({how})"
    return None


class Driver:
    """Rank 0's side: sends each model call to the workers first, and watches them."""

    def __init__(self, channel: StepChannel, workers: list[mp.Process]) -> None:
        self.channel = channel
        self.workers = workers  # rank i + 1 is workers[i]
        self._stopped = False
        self._broken: str | None = None  # why the ranks are out of step, once they are

    @property
    def stopped(self) -> bool:
        """Whether `stop` was called: workers exiting after it are no failure."""
        return self._stopped

    def dead_worker(self) -> str | None:
        """Which worker has exited, said for a log line; None while all live."""
        return first_exited(self.workers)

    def _dead_worker_soon(self, wait_s: float = 2.0) -> str | None:
        """`dead_worker`, after giving a dying worker `wait_s` to be seen exited: a killed
        peer's closed connection can reach rank 0 before its process is reaped."""
        if not self.workers:  # all on other hosts: nothing here to see exit
            return None
        deadline = time.monotonic() + wait_s
        while (why := self.dead_worker()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return why

    def _send(self, op: int, ints: list[int], tensors: list) -> None:
        if self._broken is not None:  # the workers are stuck in an earlier call: never send another
            raise EngineDeadError(self._broken)
        try:
            self.channel.send(op, ints, tensors)
        except RuntimeError as exc:  # gloo: a peer closed, or the timeout passed
            raise self._peer_lost(exc) from exc

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> None:
        self._send(FORWARD, *_forward_call(input_ids, positions, batch))

    def logits(self, indices: torch.Tensor | None) -> None:
        self._send(LOGITS, [], [indices])

    def bind_kv(self, num_blocks: int, block_size: int) -> None:
        self._send(BIND_KV, [num_blocks, block_size], [])

    def _peer_lost(self, exc: RuntimeError) -> EngineDeadError:
        """What a failed exchange with the workers means: one died, or stopped answering."""
        return EngineDeadError(self._dead_worker_soon() or f"a tensor-parallel rank stopped answering: {exc}")

    def decode_runner(self, max_num_seqs: int, max_blocks_per_seq: int, use_cuda_graphs: bool) -> None:
        """Workers build their decode graph runners (capturing, if asked, as rank 0 does now)."""
        self._send(DECODE_RUNNER, [max_num_seqs, max_blocks_per_seq, int(use_cuda_graphs)], [])

    def decode(self, ints: list[int], tensors: list[torch.Tensor]) -> None:
        """Workers run the decode step rank 0's runner staged (`DecodeGraphRunner.decode_call`)."""
        self._send(DECODE, ints, tensors)

    def memory_begin(self) -> None:
        """Workers start measuring their device memory (`memory.begin_profile`)."""
        self._send(MEMORY_BEGIN, [], [])

    def smallest_budget(self, budget: float, utilization: float, reserve: int) -> float:
        """Each worker's KV budget after the profiling forward since `memory_begin`, measured as
        rank 0 measured `budget`: the smallest, since every rank allocates as many blocks."""
        self._send(MEMORY_END, [round(utilization * 1e6), reserve], [])
        try:
            budgets = agree_on_budget(budget, self.channel.group)
        except RuntimeError as exc:
            raise self._peer_lost(exc) from exc
        rank = min(range(len(budgets)), key=budgets.__getitem__)
        logger.info(
            "KV budget per rank (GiB): %s; the smallest (rank %d) sizes the cache",
            ", ".join(f"{b / 2**30:.2f}" for b in budgets),
            rank,
        )
        return budgets[rank]

    def mirrored(self, run: Callable[[], T]) -> T:
        """`run()`, a call the other ranks are making too: if it fails here they are left
        waiting in a collective, so any failure is fatal (`collective_failed`)."""
        try:
            return run()
        except Exception as exc:
            raise self.collective_failed(exc) from exc

    def collective_failed(self, exc: Exception) -> EngineDeadError:
        """What a failure inside a mirrored call means: a rank is gone, or rank 0 failed midway
        and left the others waiting in a collective. Either way the ranks are out of step."""
        self._broken = (
            self._dead_worker_soon() or f"a tensor-parallel call failed midway, the ranks are out of step: {exc!r}"
        )
        return EngineDeadError(self._broken)

    def stop(self) -> None:
        """Tell the workers to exit and wait for them (killing any that do not)."""
        if self._stopped:
            return
        self._stopped = True
        if self.dead_worker() is None:
            try:
                self.channel.send(STOP, [], [])
            except RuntimeError:
                pass
        for proc in self.workers:
            proc.join(timeout=10)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        if dist.is_initialized():
            dist.destroy_process_group()


def agree_on_budget(budget: float, group: dist.ProcessGroup) -> list[float]:
    """Every rank's KV budget in bytes, in rank order (each rank passes its own)."""
    mine = torch.tensor([int(budget)], dtype=torch.int64)
    budgets = [torch.empty(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(budgets, mine, group=group)
    return [float(b.item()) for b in budgets]


def watch_workers(
    driver: Driver,
    on_death: Callable[[str], None],
    interval_s: float = 0.5,
    exit_process: Callable[[int], None] = os._exit,
) -> threading.Thread:
    """A daemon thread that calls `on_death(why)` once when a worker exits unasked; then, if
    `STUCK_EXIT_S` is set and the process is still here that long after, it logs why and
    calls `exit_process(1)`: rank 0 is stuck in a collective with the dead rank."""

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(interval_s):
            if driver.stopped:
                return
            why = driver.dead_worker()
            if why is not None:
                on_death(why)
                if STUCK_EXIT_S is not None and not stop.wait(STUCK_EXIT_S):
                    logger.critical("%s, and the engine has not stopped %.0f s later: exiting now", why, STUCK_EXIT_S)
                    exit_process(1)
                return

    thread = threading.Thread(target=watch, name="tp-watchdog", daemon=True)
    thread.start()
    return thread


# The workers -------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: be sent SIGKILL when the engine process dies, whatever killed it."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: a worker still exits when its next collective fails


def worker_main(
    rank: int, rendezvous: Rendezvous, build: Callable[[object], object], parent_pid: int, log_level: int
) -> None:
    """A worker's life: join the group, build and load its shard (`build(tp)` returns the
    model), then follow rank 0's calls until STOP or until rank 0 is gone. It logs as the
    engine does (same stream, same level), each line marked with its rank."""
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the engine, which stops the workers
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    model_group, cpu_group = rendezvous.init(rank)
    logger.info("tensor-parallel rank %d (pid %d) joined; loading its shard", rank, os.getpid())
    model = build(TensorParallel(rank, rendezvous.world_size, model_group))
    channel = StepChannel(cpu_group)
    device = model.rope_cache.device
    hidden = None
    runner: DecodeGraphRunner | None = None
    try:
        with torch.inference_mode():
            while True:
                op, ints, tensors = channel.receive()
                if op in (MEMORY_BEGIN, BIND_KV, DECODE_RUNNER):
                    hidden = None  # the last forward's activations would count against the KV cache
                if op == FORWARD:
                    hidden = model(*_forward_args(ints, tensors, device))
                elif op == LOGITS:
                    indices = tensors[0].to(device) if tensors[0] is not None else None
                    model.compute_logits(hidden, indices)
                elif op == BIND_KV:
                    num_blocks, block_size = ints
                    c = model.config
                    model.bind_kv_cache(
                        KVCache.allocate(
                            c.num_layers,
                            num_blocks,
                            block_size,
                            model.shard.num_kv_heads,
                            c.head_dim,
                            next(model.parameters()).dtype,
                            device,
                        )
                    )
                elif op == DECODE_RUNNER:
                    max_num_seqs, max_blocks_per_seq, use_cuda_graphs = ints
                    runner = DecodeGraphRunner(model, max_num_seqs, max_blocks_per_seq, bool(use_cuda_graphs))
                elif op == DECODE:
                    hidden = runner.follow(ints, tensors)
                elif op == MEMORY_BEGIN:
                    memory.begin_profile(device)
                elif op == MEMORY_END:
                    utilization_ppm, reserve = ints
                    budget = memory.measured_budget(device, utilization_ppm / 1e6, reserve)
                    agree_on_budget(budget, cpu_group)
                elif op == STOP:
                    return
    except RuntimeError as exc:
        # Rank 0 gone (its connection closed) ends this worker quietly; anything else is said.
        if not dist.is_initialized() or "Connection closed" not in str(exc):
            logger.exception("tensor-parallel rank %d failed", rank)
        return
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
