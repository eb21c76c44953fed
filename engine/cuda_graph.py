"""Decode from static buffers, replaying one captured CUDA graph per batch-size bucket.

Every decode input (token ids, positions, KV slots, block tables, sequence lengths)
lives in a buffer allocated once at the largest bucket, and so does the split-K
attention scratch. A step writes its inputs into host staging buffers (pinned on
CUDA), copies them into the first rows, pads the rest of its bucket with harmless rows
(slot -1 writes no K/V, length 0 attends to nothing and yields zeros) and replays the
bucket's graph; the padded rows' outputs are dropped. On CPU, or with `enforce_eager`,
the very same static-buffer path runs eagerly, which is how its logic is tested
without a GPU.

Capture follows docs/GPU_NOTES: buffers and the KV cache exist before capture, every
bucket is warmed up (Triton compiles) on the capture stream first, graphs are captured
largest first into one shared memory pool, Python scalars baked in are the same for
every replay (`max_seqlen_q` 1, split count from the bucket size, the block tables'
row stride), and each graph's output is consumed before the next replay.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

import torch

from splitinfer import kernels
from splitinfer.engine.forward_batch import ForwardBatch
from splitinfer.engine.kv_cache import KVCache
from splitinfer.engine.model import LlamaForCausalLM

logger = logging.getLogger(__name__)


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every 16 up to max_num_seqs (which is always included)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    buckets += range(16, max_num_seqs, 16)
    return sorted(set(buckets) | {max_num_seqs})


@dataclass(frozen=True, slots=True)
class DecodeBuffers:
    """The per-sequence decode inputs at the largest bucket. `block_table_rows` holds a step's
    tables packed densely ([n, width] in its first n*width entries), so that only what the
    step uses crosses to the device; they are spread into `block_tables` there."""

    input_ids: torch.Tensor  # [max_bs] int64
    positions: torch.Tensor  # [max_bs] int64
    slot_mapping: torch.Tensor  # [max_bs] int64
    seq_lens: torch.Tensor  # [max_bs] int32
    block_table_rows: torch.Tensor  # [max_bs * max_blocks] int32

    @classmethod
    def allocate(cls, max_bs: int, max_blocks: int, device: torch.device, pin: bool = False) -> DecodeBuffers:
        def empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(numel, dtype=dtype, device=device, pin_memory=pin)

        return cls(
            input_ids=empty(max_bs, torch.int64),
            positions=empty(max_bs, torch.int64),
            slot_mapping=empty(max_bs, torch.int64),
            seq_lens=empty(max_bs, torch.int32),
            block_table_rows=empty(max_bs * max_blocks, torch.int32),
        )


class DecodeGraphRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: KVCache,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        use_cuda_graphs: bool,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = model.rope_cache.device
        self.buckets = decode_buckets(max_num_seqs)
        max_bs = self.buckets[-1]
        config = model.config
        on_cuda = self.device.type == "cuda"
        with torch.inference_mode():
            self.inputs = DecodeBuffers.allocate(max_bs, max_blocks_per_seq, self.device)
            # On CPU the staging buffers are the inputs themselves; on CUDA pinned host memory,
            # so that the copies are truly asynchronous.
            self.staging = DecodeBuffers.allocate(max_bs, max_blocks_per_seq, torch.device("cpu"), pin=True) \
                if on_cuda else self.inputs
            self.block_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=torch.int32, device=self.device)
            # One query per sequence: the query offsets never change.
            self.cu_seqlens_q = torch.arange(max_bs + 1, dtype=torch.int32, device=self.device)
            self.decode_workspace = torch.empty(
                kernels.decode_workspace_numel(max_bs, config.num_heads, config.head_dim),
                dtype=torch.float32, device=self.device,
            )
        # Marks when the last step's host-to-device copies were done, before staging is rewritten.
        self._staged = torch.cuda.Event() if on_cuda else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_outputs: dict[int, torch.Tensor] = {}
        if use_cuda_graphs:
            self.capture()

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, num_seqs: int) -> int:
        for bucket in self.buckets:
            if bucket >= num_seqs:
                return bucket
        raise ValueError(f"{num_seqs} sequences exceed the largest decode bucket {self.buckets[-1]}")

    def _forward(self, bs: int) -> torch.Tensor:
        batch = ForwardBatch(
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1],
            seq_lens=self.inputs.seq_lens[:bs],
            max_seqlen_q=1,
            slot_mapping=self.inputs.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            has_cached_prefix=True,
            decode_workspace=self.decode_workspace,
        )
        return self.model(self.inputs.input_ids[:bs], self.inputs.positions[:bs], batch, self.kv_cache)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        gc.collect()
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        # Warm up every bucket on the capture stream: Triton compiles (and loads modules)
        # now, since neither is allowed during capture. All rows are padding (length 0, slot -1).
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs in reversed(self.buckets):
                self._forward(bs)
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
        logger.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s",
                    len(self.graphs), self.buckets, time.perf_counter() - start)

    def _stage(
        self,
        input_ids: list[int],
        positions: list[int],
        slot_mapping: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        bs: int,
    ) -> int:
        """Write one step's inputs (padded to `bs` rows) into the staging buffers; returns the
        width of the packed block tables."""
        n = len(input_ids)
        width = max((len(t) for t in block_tables), default=0)
        if width > self.block_tables.shape[1]:
            raise ValueError(f"a block table of {width} blocks exceeds the {self.block_tables.shape[1]} the buffers hold")
        # The previous step's copies must have read the staging memory. They always have in
        # the engine (its sampler reads tokens back each step), so only query: no host sync.
        if self._staged is not None and not self._staged.query():
            self._staged.synchronize()
        s = self.staging
        for buffer, values, pad in ((s.input_ids, input_ids, 0), (s.positions, positions, 0),
                                    (s.slot_mapping, slot_mapping, -1), (s.seq_lens, seq_lens, 0)):
            array = buffer.numpy()
            array[:n] = values
            array[n:bs] = pad
        rows = s.block_table_rows.numpy()[: n * width].reshape(n, width)
        for row, table in zip(rows, block_tables):
            row[: len(table)] = table  # entries past a table's end are never read (lengths bound them)
        return width

    def _upload(self, n: int, bs: int, width: int) -> None:
        """Copy the staged rows to the device buffers and spread the packed tables into place."""
        if self.staging is not self.inputs:
            for src, dst in ((self.staging.input_ids, self.inputs.input_ids),
                             (self.staging.positions, self.inputs.positions),
                             (self.staging.slot_mapping, self.inputs.slot_mapping),
                             (self.staging.seq_lens, self.inputs.seq_lens)):
                dst[:bs].copy_(src[:bs], non_blocking=True)
            packed = n * width
            self.inputs.block_table_rows[:packed].copy_(self.staging.block_table_rows[:packed], non_blocking=True)
            self._staged.record()
        # Padding rows keep stale tables: with length 0 they read nothing.
        self.block_tables[:n, :width].copy_(self.inputs.block_table_rows[: n * width].view(n, width))

    @torch.inference_mode()
    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slot_mapping: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """Hidden states of one decode step for n sequences, as the whole bucket [bucket, hidden]:
        the n sequences' rows first, then the padding rows' (finite, meaningless; the caller
        drops them). n may be 0: then only padding runs, which is how `ModelRunner.probe`
        tests the device.

        The result may live in the graph's memory pool: consume it before the next call.
        """
        n = len(input_ids)
        bs = self.bucket_for(n)
        width = self._stage(input_ids, positions, slot_mapping, seq_lens, block_tables, bs)
        self._upload(n, bs, width)
        graph = self.graphs.get(bs)
        if graph is None:
            return self._forward(bs)
        graph.replay()
        return self.graph_outputs[bs]
