"""Decode from static buffers, replaying one captured CUDA graph per batch-size bucket.

Every decode input (token ids, positions, KV slots, block tables, sequence lengths)
lives in a buffer allocated once at the largest bucket, and so does the split-K
attention scratch. A step writes its inputs into one host staging buffer (pinned on
CUDA), copies it to the device in one piece, pads the rest of its bucket with harmless
rows (slot -1 writes no K/V, length 0 attends to nothing and yields zeros) and replays
the bucket's graph; the padded rows' outputs are dropped. On CPU, or with
`enforce_eager`, the very same static-buffer path runs eagerly, which is how its logic
is tested without a GPU.

Block tables stay on the device between steps, one slot per running sequence
(`TableSlots`): a step sends only the block ids its sequences gained since they were
last seen, scatters them into their slots and gathers its rows from the slots in batch
order, so its host cost follows the batch size, not the total number of blocks.

Capture follows docs/GPU_NOTES: buffers and the KV cache exist before capture, every
bucket is warmed up (Triton compiles) on the capture stream first with padding in every
row, graphs are captured largest first into one shared memory pool, Python scalars baked
in are the same for every replay (`max_seqlen_q` 1, split count from the bucket size, the
block tables' row stride), and each graph's output is consumed before the next replay.

With tensor parallelism every rank holds its own runner, with its own buffers and graphs
(the all-reduces inside them included: NCCL collectives can be captured, as long as every
rank captures the same sequence and replays it in step). Rank 0's runner tells the workers'
to capture when it does, and before each step sends them what it staged (`decode_call`:
the padded rows and the block-table writes, so their slot tables mirror rank 0's); each
worker's runner uploads the same bytes and replays the same bucket (`follow`). On CPU the
same messages drive the eager static-buffer path, which is how this is tested without GPUs.
"""

from __future__ import annotations

import gc
import heapq
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from splitinfer import kernels
from splitinfer.engine.forward_batch import ForwardBatch
from splitinfer.engine.model import CausalLM

logger = logging.getLogger(__name__)


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every 16 up to max_num_seqs (which is always included)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    buckets += range(16, max_num_seqs, 16)
    return sorted(set(buckets) | {max_num_seqs})


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 64) * 64


@dataclass(frozen=True, slots=True)
class DecodeStep:
    """One decode step's inputs, one entry per sequence, as the host has them: the token each
    feeds, its position, the KV slot it writes (-1: none), its length after the step, and its
    block table (the sequence's own append-only list, which `TableSlots` keys on)."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]

    @property
    def num_seqs(self) -> int:
        return len(self.input_ids)

    @classmethod
    def empty(cls) -> DecodeStep:
        """No sequence: a bucket of padding rows only."""
        return cls([], [], [], [], [])


@dataclass(frozen=True, slots=True)
class DecodeInputs:
    """One decode step's inputs as views into one byte buffer, so that a step crosses to the
    device in a single copy of its first `nbytes(m)` bytes: a fixed header with the
    per-row inputs at the largest bucket, then the step's `m` block-table writes (flat
    indices into the slot tables, int64, followed by the block ids, int32)."""

    raw: torch.Tensor  # [nbytes(max_writes)] uint8
    input_ids: torch.Tensor  # [max_bs] int64
    positions: torch.Tensor  # [max_bs] int64
    slot_mapping: torch.Tensor  # [max_bs] int64 (-1: a padding row, writes no K/V)
    table_slots: torch.Tensor  # [max_bs] int64: row i's block table is slot_tables[table_slots[i]]
    seq_lens: torch.Tensor  # [max_bs] int32 (0: a padding row, attends to nothing)
    header_bytes: int

    @classmethod
    def allocate(cls, max_bs: int, max_writes: int, device: torch.device, pin: bool = False) -> DecodeInputs:
        fields = (
            ("input_ids", torch.int64),
            ("positions", torch.int64),
            ("slot_mapping", torch.int64),
            ("table_slots", torch.int64),
            ("seq_lens", torch.int32),
        )
        header_bytes = sum(_aligned(max_bs * dtype.itemsize) for _, dtype in fields)
        # Sized for the worst step; only the header needs initialising (on the host, pages of the
        # write region that are never written are never resident).
        raw = torch.empty(header_bytes + 12 * max_writes, dtype=torch.uint8, device=device, pin_memory=pin)
        raw[:header_bytes].zero_()
        views, offset = {}, 0
        for name, dtype in fields:
            views[name] = raw[offset : offset + max_bs * dtype.itemsize].view(dtype)
            offset += _aligned(max_bs * dtype.itemsize)
        views["slot_mapping"].fill_(-1)  # every row starts as padding
        return cls(raw=raw, header_bytes=header_bytes, **views)

    def rows(self) -> tuple[torch.Tensor, ...]:
        """The per-row buffers, in the order a step's rows are staged, sent and followed."""
        return (self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.table_slots)

    def nbytes(self, num_writes: int) -> int:
        return self.header_bytes + 12 * num_writes

    def table_writes(self, num_writes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The views holding a step's `num_writes` block-table writes: (flat indices, block ids)."""
        start, mid = self.header_bytes, self.header_bytes + 8 * num_writes
        return self.raw[start:mid].view(torch.int64), self.raw[mid : mid + 4 * num_writes].view(torch.int32)


class TableSlots:
    """Host-side bookkeeping of the device's slot tables: which block-table list each slot
    holds, and how many of its entries are already on the device, so that a step uploads
    only what was appended since that list was last seen.

    Why an entry on the device is never stale: a slot is keyed by the list object itself
    (`Request.block_table`), and a strong reference is kept (until another table claims the
    slot: at most `num_slots` lists), so no other list can take its `id` while it owns the
    slot. The engine changes a block table in exactly two ways
    (engine/kv_manager.py): `KVCacheManager.allocate` extends the list in place, and every
    other change (freeing on preemption, finish or abort; prefix-cache admission; the
    engine's reset) binds `seq.block_table` to a new list. A given list therefore only ever
    grows by appends, so the first `uploaded` entries the device holds for it are still its
    first entries. A new list (a preempted request readmitted, a new request) is a miss and
    gets a whole row, even if its blocks happen to be the old ones. As a tripwire against a
    future in-place edit, a list that got shorter, or whose last uploaded entry changed, is
    uploaded whole again. `forget` drops everything (after a step failed half-way).
    """

    def __init__(self, num_slots: int, width: int) -> None:
        self.num_slots = num_slots
        self.width = width
        self.forget()

    def forget(self) -> None:
        """Hold nothing: every table is written whole the next time it comes."""
        self._owner: list[list[int] | None] = [None] * self.num_slots
        self._uploaded = [0] * self.num_slots
        self._last = [0] * self.num_slots  # owner[uploaded - 1] when it was uploaded
        self._slot_of: dict[int, int] = {}  # id(owner) -> slot
        self._used = [0] * self.num_slots  # the last step that used each slot: claims take the oldest
        self._step = 0

    def plan(self, tables: list[list[int]]) -> tuple[list[int], list[int], list[int]]:
        """The slot of each table (at most `num_slots` of them), and the writes (flat indices
        into the slot tables, block ids) that bring those slots up to date."""
        if len(tables) > self.num_slots:
            raise ValueError(f"{len(tables)} block tables exceed the {self.num_slots} slots")
        self._step += 1
        step, slot_of, used, uploaded, last = self._step, self._slot_of, self._used, self._uploaded, self._last
        slots: list[int] = []
        index: list[int] = []
        values: list[int] = []
        misses: list[int] = []
        for table in tables:
            slot = slot_of.get(id(table), -1)
            if slot < 0:
                misses.append(len(slots))
            else:
                used[slot] = step
                size = len(table)
                if size != uploaded[slot] or (size and table[-1] != last[slot]):
                    self._write(slot, table, index, values)
            slots.append(slot)
        if misses:
            self._claim(tables, slots, misses, index, values)
        return slots, index, values

    def _claim(
        self, tables: list[list[int]], slots: list[int], misses: list[int], index: list[int], values: list[int]
    ) -> None:
        """Give each missed table a slot, the least recently used first (none this step uses),
        and write it whole."""
        step, owner, slot_of, used = self._step, self._owner, self._slot_of, self._used
        idle = (s for s in range(self.num_slots) if used[s] != step)
        free = heapq.nsmallest(len(misses), idle, key=used.__getitem__)
        free.reverse()
        for i in misses:
            table = tables[i]
            slot = slot_of.get(id(table), -1)  # the same list twice in one batch
            if slot < 0:
                slot = free.pop()
                if owner[slot] is not None:
                    del slot_of[id(owner[slot])]
                owner[slot], self._uploaded[slot], used[slot] = table, 0, step
                slot_of[id(table)] = slot
            slots[i] = slot
            self._write(slot, table, index, values)

    def _write(self, slot: int, table: list[int], index: list[int], values: list[int]) -> None:
        """Append the writes of what `table` gained since the slot was last written."""
        done, size = self._uploaded[slot], len(table)
        if size > self.width:
            raise ValueError(f"a block table of {size} blocks exceeds the {self.width} the buffers hold")
        if done and (done > size or table[done - 1] != self._last[slot]):
            done = 0  # not an append-only list after all: write it whole
        if size > done:
            base = slot * self.width
            index += range(base + done, base + size)
            values += table[done:]
            self._uploaded[slot], self._last[slot] = size, table[-1]


class DecodeGraphRunner:
    def __init__(
        self,
        model: CausalLM,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        use_cuda_graphs: bool,
    ) -> None:
        """`model` with its KV cache bound (`CausalLM.bind_kv_cache`): the graphs write and
        read K/V through the layers' views as they are at capture."""
        self.model = model
        self.device = model.rope_cache.device
        self.buckets = decode_buckets(max_num_seqs)
        max_bs = self.buckets[-1]
        config = model.config
        on_cuda = self.device.type == "cuda"
        # A step writes at most every entry of its tables (all of them new lists).
        max_writes = max_bs * max_blocks_per_seq
        with torch.inference_mode():
            self.inputs = DecodeInputs.allocate(max_bs, max_writes, self.device)
            # On CPU the staging buffer is the inputs themselves; on CUDA pinned host memory,
            # so that the copy is truly asynchronous.
            self.staging = (
                DecodeInputs.allocate(max_bs, max_writes, torch.device("cpu"), pin=True) if on_cuda else self.inputs
            )
            # Each running sequence's block table, kept on the device across steps (see
            # TableSlots); a step gathers its rows into `block_tables` in batch order.
            self.slot_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=torch.int32, device=self.device)
            self.block_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=torch.int32, device=self.device)
            # One query per sequence: the query offsets never change.
            self.cu_seqlens_q = torch.arange(max_bs + 1, dtype=torch.int32, device=self.device)
            self.decode_workspace = torch.empty(
                kernels.decode_workspace_numel(max_bs, model.shard.num_heads, config.head_dim),
                dtype=torch.float32,
                device=self.device,
            )
        self.table_slots = TableSlots(max_bs, max_blocks_per_seq)
        # Host views of the staging header, written every step.
        s = self.staging
        # Padding rows: slot -1 writes no K/V; every other field 0 (length 0 attends to nothing).
        pads = (0, 0, -1, 0, 0)
        self._host_rows = [(buffer.numpy(), pad) for buffer, pad in zip(s.rows(), pads)]
        # Marks when the last step's host-to-device copy was done, before staging is rewritten.
        self._staged = torch.cuda.Event() if on_cuda else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_outputs: dict[int, torch.Tensor] = {}
        # Rank 0 of several: the workers build their runners (and capture) alongside this one.
        self.driver = model.driver
        if self.driver is not None:
            self.driver.decode_runner(max_num_seqs, max_blocks_per_seq, use_cuda_graphs)
        if use_cuda_graphs:
            self._mirrored(self.capture)

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, num_seqs: int) -> int:
        for bucket in self.buckets:
            if bucket >= num_seqs:
                return bucket
        raise ValueError(f"{num_seqs} sequences exceed the largest decode bucket {self.buckets[-1]}")

    def _forward(self, bs: int) -> torch.Tensor:
        # A new metadata object per call, of views into the static buffers (the same memory at
        # every call, which is what a graph captures): it may carry per-step state (the torch
        # path's plan), which must not outlive the step.
        batch = ForwardBatch(
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1],
            seq_lens=self.inputs.seq_lens[:bs],
            max_seqlen_q=1,
            slot_mapping=self.inputs.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            has_cached_prefix=True,
            decode_workspace=self.decode_workspace,
        )
        # This rank only: with tensor parallelism each rank runs (or captures) its own step.
        return self.model.local_forward(self.inputs.input_ids[:bs], self.inputs.positions[:bs], batch)

    def _mirrored(self, run: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
        """`run()`, which the other ranks run too (`Driver.mirrored`), if there are any."""
        return run() if self.driver is None else self.driver.mirrored(run)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run every bucket once, largest first, with padding in every row (slot -1 writes no
        K/V, length 0 attends to nothing), whatever a previous step left in the buffers. On
        CUDA this is what compiles and loads the Triton kernels before capture."""
        self.inputs.input_ids.zero_()
        self.inputs.positions.zero_()
        self.inputs.slot_mapping.fill_(-1)
        self.inputs.seq_lens.zero_()
        for bs in reversed(self.buckets):
            self._forward(bs)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        gc.collect()
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        # Warm up on the capture stream: neither compiling nor loading modules is allowed during capture.
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.warm_up()
        torch.cuda.synchronize()
        pool = None
        gc.freeze()
        try:
            for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool memory
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.graph_outputs[bs] = self._forward(bs)
                pool = graph.pool() if pool is None else pool
                self.graphs[bs] = graph
        finally:
            gc.unfreeze()
        torch.cuda.synchronize()
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s) in %.1f s",
            len(self.graphs),
            self.buckets,
            time.perf_counter() - start,
        )

    def _stage(self, step: DecodeStep, bs: int) -> tuple[int, int]:
        """Write one step's inputs (padded to `bs` rows) and its block-table writes into the
        staging buffer; returns the number of writes and the width of the longest table."""
        slots, index, values = self.table_slots.plan(step.block_tables)
        # The previous step's copy must have read the staging memory. It always has in the
        # engine (its sampler reads tokens back each step), so only query: no host sync.
        if self._staged is not None and not self._staged.query():
            self._staged.synchronize()
        n = step.num_seqs
        for (array, pad), values_of_rows in zip(
            self._host_rows, (step.input_ids, step.positions, step.slot_mapping, step.seq_lens, slots)
        ):
            array[:n] = values_of_rows
            array[n:bs] = pad
        if index:
            index_buffer, value_buffer = self.staging.table_writes(len(index))
            index_buffer.numpy()[:] = index
            value_buffer.numpy()[:] = values
        return len(index), max(map(len, step.block_tables), default=0)

    def _upload(self, n: int, num_writes: int, width: int) -> None:
        """Copy the staged step to the device in one piece, apply its block-table writes to the
        slot tables and gather the n rows' tables (their first `width` entries) into
        `block_tables`. Entries past a table's end, and padding rows, keep stale blocks: lengths
        bound what attention reads. Device-side indexing only: no host sync, no allocation."""
        if self.staging is not self.inputs:
            size = self.inputs.nbytes(num_writes)
            self.inputs.raw[:size].copy_(self.staging.raw[:size], non_blocking=True)
            self._staged.record()
        if num_writes:
            self.slot_tables.view(-1).index_copy_(0, *self.inputs.table_writes(num_writes))
        if n:
            torch.index_select(
                self.slot_tables[:, :width], 0, self.inputs.table_slots[:n], out=self.block_tables[:n, :width]
            )

    @torch.inference_mode()
    def load_step(self, step: DecodeStep) -> int:
        """Put a decode step's inputs for its n sequences into the static buffers' first rows, pad
        the rest of its bucket, and return the bucket (what `run` does before the forward).

        Only what a block table gained since it was last passed in crosses to the device, so a
        list passed again must have changed by appends only, as `Request.block_table` does
        (`TableSlots` says why); any other change must come as a new list.

        Not with tensor parallelism: the workers' tables would miss these writes (`run` sends them)."""
        if self.driver is not None:
            raise RuntimeError("load_step would leave the tensor-parallel workers' block tables behind; use run")
        return self._load(step)[0]

    def _load(self, step: DecodeStep) -> tuple[int, int, int]:
        """`load_step`, returning (bucket, block-table writes, width of the longest table)."""
        n = step.num_seqs
        bs = self.bucket_for(n)
        try:
            num_writes, width = self._stage(step, bs)
            self._upload(n, num_writes, width)
        except BaseException:
            self.table_slots.forget()  # which writes reached the device is unknown now
            raise
        return bs, num_writes, width

    @torch.inference_mode()
    def run(self, step: DecodeStep) -> torch.Tensor:
        """Hidden states of one decode step for n sequences, as the whole bucket [bucket, hidden]:
        the n sequences' rows first, then the padding rows' (finite, meaningless; the caller
        drops them). n may be 0: then only padding runs, which is how `ModelRunner.probe`
        tests the device (`DecodeStep.empty()`).

        The result may live in the graph's memory pool: consume it before the next call.
        """
        bs, num_writes, width = self._load(step)
        if self.driver is not None:
            self.driver.decode(*self.decode_call(bs, step.num_seqs, num_writes, width))
        return self._mirrored(lambda: self._replay(bs))

    def _replay(self, bs: int) -> torch.Tensor:
        """The loaded step's forward: the bucket's graph, or the same forward run eagerly."""
        graph = self.graphs.get(bs)
        if graph is None:
            return self._forward(bs)
        graph.replay()
        return self.graph_outputs[bs]

    def decode_call(self, bs: int, n: int, num_writes: int, width: int) -> tuple[list[int], list[torch.Tensor]]:
        """What the other ranks need to run the step just staged here (`follow`): its sizes,
        the padded rows and the block-table writes, all host tensors (no device sync)."""
        rows = [buffer[:bs] for buffer in self.staging.rows()]
        return [bs, n, num_writes, width], [*rows, *self.staging.table_writes(num_writes)]

    @torch.inference_mode()
    def follow(self, ints: list[int], tensors: list[torch.Tensor]) -> torch.Tensor:
        """A worker's side of `run`: stage what rank 0 staged (`decode_call`), upload it the
        same way and run the same bucket; returns its hidden states [bucket, hidden]."""
        bs, n, num_writes, width = ints
        if self._staged is not None and not self._staged.query():
            self._staged.synchronize()  # the previous step's copy has read the staging memory
        rows = self.staging.rows()
        for dest, src in zip(rows, tensors):
            dest[:bs].copy_(src)
        if num_writes:
            for dest, src in zip(self.staging.table_writes(num_writes), tensors[len(rows) :]):
                dest.copy_(src)
        self._upload(n, num_writes, width)
        return self._replay(bs)

    def check_block_tables(self, block_tables: list[list[int]]) -> None:
        """Raise unless the device's `block_tables` rows begin with these tables, in order
        (what the last `run` was given, if they have not changed since). For tests and
        debugging: it waits for the device."""
        rows = self.block_tables[: len(block_tables)].tolist()
        for i, (row, table) in enumerate(zip(rows, block_tables)):
            if row[: len(table)] != list(table):
                raise RuntimeError(f"row {i} of the device block tables is {row[: len(table)]}, expected {list(table)}")
