"""Decode from static buffers, replaying one captured CUDA graph per batch-size bucket.

Every decode input (token ids, positions, KV slots, block tables, sequence lengths)
lives in a buffer allocated once at the largest bucket. A step copies its inputs into
the first rows, pads the rest of its bucket with harmless rows (slot -1 writes no K/V,
length 0 attends to nothing and yields zeros) and replays the bucket's graph; the
padded rows' outputs are dropped. On CPU, or with `enforce_eager`, the very same
static-buffer path runs eagerly, which is how its logic is tested without a GPU.

Capture follows docs/GPU_NOTES: buffers and the KV cache exist before capture, every
bucket is warmed up (Triton compiles) on the capture stream first, graphs are captured
largest first into one shared memory pool, Python scalars baked in are the same for
every replay (`max_seqlen_q` 1, split count from the bucket size), and each graph's
output is consumed before the next replay.
"""

from __future__ import annotations

import gc
import logging
import time

import torch

from splitinfer.engine.forward_batch import ForwardBatch
from splitinfer.engine.kv_cache import KVCache
from splitinfer.engine.model import LlamaForCausalLM

logger = logging.getLogger(__name__)


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every 16 up to max_num_seqs (which is always included)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    buckets += range(16, max_num_seqs, 16)
    return sorted(set(buckets) | {max_num_seqs})


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
        with torch.inference_mode():
            self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=self.device)
            self.positions = torch.zeros(max_bs, dtype=torch.int64, device=self.device)
            self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=self.device)
            self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=self.device)
            self.block_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=torch.int32, device=self.device)
            # One query per sequence: the query offsets never change.
            self.cu_seqlens_q = torch.arange(max_bs + 1, dtype=torch.int32, device=self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_outputs: dict[int, torch.Tensor] = {}
        if use_cuda_graphs:
            self.capture()

    def bucket_for(self, num_seqs: int) -> int:
        for bucket in self.buckets:
            if bucket >= num_seqs:
                return bucket
        raise ValueError(f"{num_seqs} sequences exceed the largest decode bucket {self.buckets[-1]}")

    def _forward(self, bs: int) -> torch.Tensor:
        batch = ForwardBatch(
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            max_seqlen_q=1,
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            has_cached_prefix=True,
        )
        return self.model(self.input_ids[:bs], self.positions[:bs], batch, self.kv_cache)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        gc.collect()
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        # Warm up every bucket on the capture stream: Triton compiles (and loads modules)
        # now, since neither is allowed during capture. The padding rows make this harmless.
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

    def _load(self, buffer: torch.Tensor, values: list, fill: int, n: int, bs: int, dtype: torch.dtype) -> None:
        buffer[:n].copy_(torch.tensor(values, dtype=dtype), non_blocking=True)
        if bs > n:
            buffer[n:bs].fill_(fill)

    @torch.inference_mode()
    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slot_mapping: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """Hidden states [n, hidden] of one decode step for n sequences."""
        n = len(input_ids)
        bs = self.bucket_for(n)
        self._load(self.input_ids, input_ids, 0, n, bs, torch.int64)
        self._load(self.positions, positions, 0, n, bs, torch.int64)
        self._load(self.slot_mapping, slot_mapping, -1, n, bs, torch.int64)
        self._load(self.seq_lens, seq_lens, 0, n, bs, torch.int32)
        width = max(len(t) for t in block_tables)
        if width > self.block_tables.shape[1]:
            raise ValueError(f"a block table of {width} blocks exceeds the {self.block_tables.shape[1]} the buffers hold")
        rows = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        # Only the first `width` columns are written: the kernels never read past a sequence's length.
        self.block_tables[:n, :width].copy_(rows, non_blocking=True)
        graph = self.graphs.get(bs)
        if graph is None:
            return self._forward(bs)[:n]
        graph.replay()
        return self.graph_outputs[bs][:n]
