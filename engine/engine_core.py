"""The engine core: the step API the engine process drives and the offline `LLM` wraps.

    core = EngineCore(EngineConfig(model="path"))
    core.add_request("r1", prompt_token_ids, SamplingParams(max_tokens=32))
    while core.has_unfinished():
        for out in core.step():   # (request_id, new_token_ids, finish_reason, logprobs)
            ...
    core.abort("r1")              # frees its KV blocks at once; the next step reports it

One step schedules (continuous batching, chunked prefill, preemption), runs one
forward and samples, then updates every sequence and frees finished ones' blocks.

A request with a constraint (`SamplingParams.constraint`) first waits for its grammar to
compile on a worker thread (`grammar.py`), outside the scheduler, so it holds up nobody;
once compiled it is queued like any other, and each step computes the constrained rows'
token masks while the forward runs.

No request can take the others down with it. A forward that raises is re-run in parts
until the failing requests are found (`isolation.py`); those end with finish reason
"error" and their blocks are freed, while the rest of the batch carries on as if nothing
had happened. A failure in the bookkeeping around the forward fails the request it was
about; one in the scheduler itself, whose state can then no longer be trusted, fails
every request and rebuilds the scheduler and the block pool. Only when a forward with no
request in it fails too (a broken device) does `step` raise, with `EngineDeadError`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from splitinfer import kernels
from splitinfer.engine import cpu_linear, prompt_logprobs
from splitinfer.engine.block_pool import BlockPool, BlockPoolStats
from splitinfer.engine.config import EngineConfig
from splitinfer.engine.cuda_graph import decode_buckets
from splitinfer.engine.errors import ConfigError, ContextLengthError, EngineDeadError, RequestError
from splitinfer.engine.forward_batch import ForwardBatch
from splitinfer.engine.grammar import GrammarCompiler, GrammarError, MaskBuilder
from splitinfer.engine.isolation import IsolatingExecutor, ItemResult
from splitinfer.engine.kv_cache import KVCache
from splitinfer.engine.kv_manager import KVCacheManager
from splitinfer.engine.loader import load_weights
from splitinfer.engine.memory import blocks_from_budget, check_utilization, cuda_kv_budget
from splitinfer.engine.model import CausalLM
from splitinfer.engine.model_config import ModelConfig
from splitinfer.engine.model_runner import ModelRunner
from splitinfer.engine.parallel import SINGLE, TensorParallel, check_tensor_parallel
from splitinfer.engine.prompt_logprobs import ScoringPlan
from splitinfer.engine.request import Request, RequestStatus
from splitinfer.engine.sampler import Sampler
from splitinfer.engine.scheduler import ScheduledSeq, Scheduler
from splitinfer.engine.tp_layout import Layout, layout_of
from splitinfer.engine.tp_ranks import (
    Driver,
    Rendezvous,
    StepChannel,
    first_exited,
    free_port,
    watch_workers,
    worker_main,
)
from splitinfer.protocol import RequestOutput, TokenLogprobs
from splitinfer.protocol.sampling_params import MAX_LOGPROBS, SamplingParams

logger = logging.getLogger(__name__)

# Beyond the measured graph pool and workspace: the capture stream's own cuBLAS workspace (up to
# 32 MiB on Hopper), the static decode buffers, and headroom for allocator rounding.
GRAPH_FIXED_RESERVE = 256 * 2**20


def resolve_device(device: str | torch.device) -> torch.device:
    """ "auto" is CUDA when available, else CPU. A CUDA device always comes back with its index
    ("cuda" is the current device), since the engine makes it the current device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r}: CUDA is not available on this machine (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'})"
        )
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def build_shard(
    config: ModelConfig,
    device: str,
    dtype: torch.dtype,
    prepack_rows: frozenset[int],
    upcast: bool,
    tp: TensorParallel,
) -> CausalLM:
    """A tensor-parallel worker's model: its shard, built and loaded on its device, its CPU
    matmuls set up as rank 0 sets up its own (a slower rank makes every all-reduce wait)."""
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    model = CausalLM.build(config, torch_device, dtype, tp)
    load_weights(model, config.path)
    if prepack_rows and cpu_linear.enough_memory_for(model.matmul_weight_bytes()):
        model.prepack_cpu_weights(prepack_rows)
    if upcast:
        model.upcast_cpu_matmuls(cpu_linear.Upcast())
    return model


def graphs_off_reason(device: torch.device, enforce_eager: bool, triton_kernels: bool) -> str | None:
    """Why decode runs without CUDA graphs, or None when they are captured. The torch kernel
    backend plans paged attention on the host (`.tolist()`, `nonzero`), which is illegal
    while a stream is capturing, so graphs need the Triton kernels."""
    if device.type != "cuda":
        return "not on CUDA"
    if enforce_eager:
        return "enforce_eager"
    if not triton_kernels:
        return "the torch kernel backend (SPLITINFER_KERNELS=torch, or triton not installed) syncs with the host"
    return None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """ "auto" is bfloat16 on CUDA; on CPU, bfloat16 only where its matmuls were measured at least
    `HALF_DEFAULT_SPEEDUP` times as fast as fp32's (native bf16, e.g. AMX), else float32: without
    them bf16 prefill and batches run slower (README, Performance). Any other name is one
    `EngineConfig` accepted, which is torch's own name for it."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16
    speedup = cpu_linear.half_matmul_speedup(torch.bfloat16)
    chosen = torch.bfloat16 if speedup >= cpu_linear.HALF_DEFAULT_SPEEDUP else torch.float32
    logger.info(
        "dtype auto on CPU: %s (bf16 matmuls measured at %.2fx fp32's speed here; bf16 needs %.1fx)",
        str(chosen).removeprefix("torch."),
        speedup,
        cpu_linear.HALF_DEFAULT_SPEEDUP,
    )
    return chosen


@dataclass(slots=True)
class Counters:
    """What the engine has done since it started, for throughput and the /metrics counters."""

    num_preemptions: int = 0
    computed_tokens: int = 0  # tokens fed through the model (prompts, recomputation, decode inputs)
    prompt_tokens: int = 0  # of those, prompt positions (recomputed ones again after a preemption)
    generated_tokens: int = 0

    def count(self, item: ScheduledSeq) -> None:
        """A scheduled sequence whose step succeeded."""
        self.computed_tokens += item.num_new_tokens
        self.prompt_tokens += item.num_prompt_tokens
        self.generated_tokens += item.samples


@dataclass(frozen=True, slots=True)
class EngineStats:
    waiting: int
    running: int
    kv: BlockPoolStats
    num_preemptions: int
    computed_tokens: int  # tokens fed through the model (prompts, recomputation, decode inputs)
    prompt_tokens: int  # of those, prompt positions (recomputed ones again after a preemption)
    generated_tokens: int


def upcasts(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether half-precision matmuls of many rows run in fp32 (`cpu_linear.Upcast`)."""
    return device.type == "cpu" and cpu_linear.half_matmul_is_slow(dtype)


def prepack_rows(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> frozenset[int]:
    """The decode batch sizes CPU matmul weights are prepacked for; none when off."""
    if device.type != "cpu" or not config.cpu_weight_prepack or cpu_linear.check_prepack(dtype):
        return frozenset()
    # Decode batches are padded to these sizes, so the set of shapes oneDNN sees stays fixed.
    return frozenset(cpu_linear.packed_row_counts(decode_buckets(config.max_num_seqs)))


def run_worker_host(config: EngineConfig) -> int:
    """A host other than host 0 (`config.node_rank` > 0): start its worker ranks and wait
    while they follow rank 0; 0 when rank 0 stopped them, 1 when one of them failed (the
    others are then stopped: rank 0's next collective fails and the engine stops too)."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    c = ModelConfig.from_dir(config.model)
    check_tensor_parallel(c, config.tensor_parallel_size)
    layout = layout_of(config)
    check_local_devices(device, layout)
    rendezvous = tp_rendezvous(layout, device)
    workers = start_workers(
        c, layout, rendezvous, device.type, dtype, prepack_rows(config, device, dtype), upcasts(device, dtype)
    )
    first = layout.local_ranks.start
    logger.info(
        "host %d of %d: tensor-parallel ranks %d-%d (pids %s), joining %s:%d",
        layout.node_rank,
        layout.nnodes,
        first,
        layout.local_ranks.stop - 1,
        ", ".join(str(w.pid) for w in workers),
        layout.address,
        layout.port,
    )
    try:
        while all(w.exitcode is None for w in workers):
            time.sleep(0.5)
        failed = next((i for i, w in enumerate(workers) if w.exitcode not in (None, 0)), None)
        if failed is not None:
            logger.error("%s: stopping this host's other ranks", first_exited([workers[failed]], first + failed))
            return 1
        for worker in workers:
            worker.join()
        logger.info("rank 0 stopped the workers")
        return 0
    finally:
        for worker in workers:
            if worker.exitcode is None:
                worker.kill()
                worker.join()


def check_local_devices(device: torch.device, layout: Layout) -> None:
    """With tensor parallelism on CUDA: `--device cuda`, and a GPU for each of this host's ranks."""
    if device.type != "cuda":
        return
    if device.index not in (None, 0):
        raise ConfigError("with --tensor-parallel-size, give --device cuda: rank i runs on GPU i", "device")
    if layout.per_node > torch.cuda.device_count():
        raise ConfigError(
            f"--tensor-parallel-size {layout.world_size} needs {layout.per_node} GPUs on this host; "
            f"{torch.cuda.device_count()} are visible",
            "tensor_parallel_size",
        )


def tp_rendezvous(layout: Layout, device: torch.device) -> Rendezvous:
    backend = "nccl" if device.type == "cuda" else "gloo"
    port = layout.port or free_port()
    return Rendezvous(layout.address, port, layout.world_size, backend, join_timeout_s=layout.join_timeout_s)


def start_workers(
    c: ModelConfig,
    layout: Layout,
    rendezvous: Rendezvous,
    device_type: str,
    dtype: torch.dtype,
    prepack_rows: frozenset[int],
    upcast: bool,
) -> list[mp.Process]:
    """Start this host's worker ranks (all of its ranks but rank 0), each building its shard
    as rank 0 builds its own (`build_shard`)."""
    context = mp.get_context("spawn")
    workers = []
    for rank in layout.local_ranks:
        if rank == 0:
            continue
        device = f"cuda:{layout.local_index(rank)}" if device_type == "cuda" else "cpu"
        build = functools.partial(build_shard, c, device, dtype, prepack_rows, upcast)
        worker = context.Process(
            target=worker_main,
            args=(rank, rendezvous, build, os.getpid(), logging.getLogger().getEffectiveLevel()),
            name=f"tp-rank-{rank}",
        )
        worker.start()
        workers.append(worker)
    return workers


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        start = time.perf_counter()
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cuda":
            # Triton launches, streams, events and graph capture all use the current device.
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_config = c = ModelConfig.from_dir(config.model)
        if config.max_model_len is not None and not 0 < config.max_model_len <= c.max_position_embeddings:
            raise ValueError(
                f"max_model_len must be in [1, {c.max_position_embeddings}] (max_position_embeddings), "
                f"got {config.max_model_len}"
            )
        self.max_model_len = config.max_model_len or c.max_position_embeddings

        # Rank 0 of `tensor_parallel_size`: the workers start (and join the group) first.
        self.tp_failure: str | None = None  # set by the workers' watchdog when one exits unasked
        self.on_tp_failure: Callable[[], None] | None = None  # the engine loop's wake-up, if any
        tp, self.driver = self._start_tensor_parallel(c)
        try:
            self._build(c, tp, start)
        except BaseException:
            self.close()  # the workers must not outlive an engine that failed to start
            raise

    def _build(self, c: ModelConfig, tp: TensorParallel, start: float) -> None:
        """Everything after the ranks have met: load, size and allocate the KV cache, warm up."""
        config = self.config
        if self.driver is not None:
            # From now on a worker's death is noticed at once (and stops the load at the next
            # tensor, `check_workers`), not at rank 0's next collective.
            watch_workers(self.driver, self._worker_died)
        self.model = CausalLM.build(c, self.device, self.dtype, tp)
        load_weights(self.model, c.path, interrupt=self.check_workers)
        self.model.driver = self.driver
        if self.device.type == "cpu" and config.cpu_weight_prepack:
            self._prepack_cpu_weights()
        if self._upcasts():
            self.model.upcast_cpu_matmuls(cpu_linear.Upcast())
            logger.info(
                "%s matmuls are slow on this CPU: those of %d+ rows (prefill, large decode batches) run in "
                "float32, on weights kept in %s",
                self.dtype,
                cpu_linear.UPCAST_MIN_ROWS,
                self.dtype,
            )
        # Known once the model is on its device: the KV sizing reserves the graphs' memory by it.
        self.graphs_off = graphs_off_reason(self.device, config.enforce_eager, self.model.backend.uses_triton)
        self.stop_ids = frozenset(c.eos_token_ids)
        self.grammar = GrammarCompiler(c.path / "tokenizer.json", c.vocab_size, sorted(self.stop_ids))
        self.masks = MaskBuilder(c.vocab_size, config.max_num_seqs)
        # Constrained requests whose grammar is still compiling, in arrival order.
        self.compiling: dict[str, tuple[Request, concurrent.futures.Future]] = {}
        generator = torch.Generator(self.device).manual_seed(config.seed)
        self.sampler = Sampler(c.vocab_size, self.stop_ids, generator)

        num_blocks = self._num_kv_blocks()
        self.kv_cache = KVCache.allocate(
            c.num_layers,
            num_blocks,
            config.block_size,
            self.model.shard.num_kv_heads,
            c.head_dim,
            self.dtype,
            self.device,
        )
        self._new_scheduler(num_blocks)
        self.runner = ModelRunner(
            self.model,
            self.kv_cache,
            self.sampler,
            config.max_num_seqs,
            self.max_model_len,
            use_cuda_graphs=self.graphs_off is None,
        )
        self.runner.warm_up()
        self.executor = IsolatingExecutor(self.runner)
        self.requests: dict[str, Request] = {}
        self._reported_next: list[
            RequestOutput
        ] = []  # ended between steps (aborts, a reset): the next step reports them
        self.counters = Counters()
        per_block = self._bytes_per_block()
        logger.info(
            "engine ready in %.1f s: %s on %s in %s; KV cache %d blocks x %d tokens = %d tokens (%.2f GB); "
            "max_model_len %d, prefix caching %s, CUDA graphs %s",
            time.perf_counter() - start,
            c.path.name,
            self.device,
            str(self.dtype).removeprefix("torch."),
            num_blocks,
            config.block_size,
            num_blocks * config.block_size,
            num_blocks * per_block / 1e9,
            self.max_model_len,
            "on" if config.enable_prefix_caching else "off",
            "on" if self.runner.graph_runner.graphs else f"off ({self.graphs_off})",
        )

    def _new_scheduler(self, num_blocks: int) -> None:
        """A fresh block pool (empty prefix cache), allocator bookkeeping and scheduler."""
        self.block_pool = BlockPool(num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.kv_manager = KVCacheManager(self.block_pool)
        self.scheduler = Scheduler(
            self.kv_manager,
            self.config.max_num_seqs,
            self.config.max_num_batched_tokens,
            stop_ids=self.stop_ids,
            max_model_len=self.max_model_len,
        )

    def _upcasts(self) -> bool:
        return upcasts(self.device, self.dtype)

    def _prepack_rows(self) -> frozenset[int]:
        return prepack_rows(self.config, self.device, self.dtype)

    def _prepack_cpu_weights(self) -> None:
        extra = self.model.matmul_weight_bytes()
        problem = cpu_linear.check_prepack(self.dtype)
        rows = self._prepack_rows()
        if problem is None and not rows:
            problem = (
                f"max_num_seqs={self.config.max_num_seqs} gives no decode batch of {cpu_linear.MIN_PACKED_ROWS}+ rows"
            )
        if problem is None and not cpu_linear.enough_memory_for(extra):
            problem = f"not enough free memory for a {extra / 1e9:.2f} GB copy"
        if problem is not None:
            logger.warning("matmul weights not prepacked for oneDNN (%s); batched CPU decode is slower", problem)
            return
        start = time.perf_counter()
        self.model.prepack_cpu_weights(rows)
        logger.info(
            "matmul weights also prepacked for oneDNN in %.1f s (+%.2f GB; for decode batches of %s rows; "
            "cpu_weight_prepack=False turns this off)",
            time.perf_counter() - start,
            extra / 1e9,
            ", ".join(map(str, sorted(rows))),
        )

    def _start_tensor_parallel(self, c: ModelConfig) -> tuple[TensorParallel, Driver | None]:
        """Rank 0's place and, with workers, the driver that keeps them in step. Refuses a split
        the model or the machine does not allow before anything loads."""
        size = self.config.tensor_parallel_size
        check_tensor_parallel(c, size)
        layout = layout_of(self.config)
        if size == 1:
            return SINGLE, None
        check_local_devices(self.device, layout)
        rendezvous = tp_rendezvous(layout, self.device)
        workers = start_workers(
            c, layout, rendezvous, self.device.type, self.dtype, self._prepack_rows(), self._upcasts()
        )
        elsewhere = ""
        if layout.nnodes > 1:
            elsewhere = f"; ranks {layout.per_node}-{size - 1} join from {layout.nnodes - 1} other host(s)"
        logger.info(
            "tensor parallelism: %d ranks over %s; worker pids %s%s",
            size,
            rendezvous.backend,
            ", ".join(str(w.pid) for w in workers) or "none here",
            elsewhere,
        )
        try:
            model_group, cpu_group = rendezvous.init(0, lambda: first_exited(workers))
        except BaseException:
            for worker in workers:
                worker.kill()
            raise
        return TensorParallel(0, size, model_group), Driver(StepChannel(cpu_group), workers)

    def _worker_died(self, why: str) -> None:
        logger.error("%s: the engine stops", why)
        self.tp_failure = why
        if self.on_tp_failure is not None:
            self.on_tp_failure()

    def check_workers(self) -> None:
        """Raise EngineDeadError if a tensor-parallel worker has died (the watchdog said so)."""
        if self.tp_failure is not None:
            raise EngineDeadError(self.tp_failure)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (the engine process does on its way out)."""
        if self.driver is not None:
            self.driver.stop()

    def _bytes_per_block(self) -> int:
        c = self.model_config
        kv_heads = self.model.shard.num_kv_heads  # this rank's, with tensor parallelism
        return KVCache.bytes_per_block(c.num_layers, self.config.block_size, kv_heads, c.head_dim, self.dtype)

    def _num_kv_blocks(self) -> int:
        per_block = self._bytes_per_block()
        if self.config.num_kv_blocks is not None:
            blocks = self.config.num_kv_blocks
        elif self.device.type == "cuda":
            blocks = blocks_from_budget(self._cuda_kv_budget(), per_block)
        else:
            blocks = blocks_from_budget(self.config.kv_cache_gb * 1e9, per_block)
        if blocks <= 0:
            raise ValueError(
                f"no memory left for the KV cache ({per_block} bytes per block); lower max_num_batched_tokens, "
                "raise gpu_memory_utilization or kv_cache_gb, or set num_kv_blocks"
            )
        return blocks

    def _cuda_kv_budget(self) -> float:
        """Bytes for the KV cache on this device; with tensor parallelism, on the rank with the
        least (every rank allocates the same number of blocks, each of its own KV heads). The
        graphs' reserve is rank 0's measure for all: every rank captures the same shapes."""
        utilization = self.config.gpu_memory_utilization
        check_utilization(utilization)
        reserve = self._graph_memory_reserve() if self.graphs_off is None else 0
        if self.driver is not None:
            self.driver.memory_begin()
        budget = cuda_kv_budget(self.device, utilization, self._profile_forward, reserve)
        return budget if self.driver is None else self.driver.smallest_budget(budget, utilization, reserve)

    @torch.inference_mode()
    def _profile_forward(self) -> None:
        """The largest activations a step can need: a full token budget of prefill, then logits
        for max_num_seqs rows, one slice of prompt scoring, and the sampler's temporaries with
        every sampling feature on."""
        tokens = min(self.config.max_num_batched_tokens, self.max_model_len * self.config.max_num_seqs)
        seqs = min(self.config.max_num_seqs, tokens)
        lengths = [tokens // seqs] * seqs
        lengths[-1] += tokens - sum(lengths)
        batch = ForwardBatch.for_prefill(lengths, self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        ids = torch.zeros(tokens, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, positions, batch)
        del ids, positions
        rows = torch.arange(self.config.max_num_seqs, device=self.device) % hidden.shape[0]
        logits = self.model.compute_logits(hidden, rows)
        self._profile_scoring(hidden)
        del hidden
        self._profile_sampler(logits)

    def _profile_scoring(self, hidden: torch.Tensor) -> None:
        """One slice of prompt scoring at its largest (all 20 alternatives), which a step with
        prompt logprobs adds to the forward's peak."""
        rows = min(hidden.shape[0], prompt_logprobs.slice_rows(self.model_config.vocab_size))
        plan = ScoringPlan()
        plan.add("profile", range(rows), [0] * rows, MAX_LOGPROBS)
        prompt_logprobs.score(self.model, hidden, plan)

    def _profile_sampler(self, logits: torch.Tensor) -> None:
        """Sample `logits` as the most demanding requests would (top-k, top-p, min-p, penalties,
        logit bias, min_tokens, top logprobs), leaving the default generator as it was."""
        params = SamplingParams(
            temperature=0.8,
            top_k=50,
            top_p=0.9,
            min_p=0.05,
            repetition_penalty=1.1,
            frequency_penalty=0.5,
            presence_penalty=0.5,
            logit_bias={0: 1.0},
            min_tokens=2,
            logprobs=MAX_LOGPROBS,
        )
        prompt = list(range(min(64, self.model_config.vocab_size)))
        seqs = [Request(f"profile-{i}", prompt, params) for i in range(logits.shape[0])]
        state = self.sampler.default_generator.get_state()
        try:
            self.sampler(logits, seqs)
        finally:
            self.sampler.default_generator.set_state(state)

    @torch.inference_mode()
    def _graph_memory_reserve(self) -> int:
        """Device bytes the decode CUDA graphs will take after the KV cache is allocated: their
        private memory pool (the activations of the largest bucket's forward, measured here on a
        forward of that many one-token sequences), the split-K attention workspace, and a fixed
        allowance for the capture stream's cuBLAS workspace and the static input buffers."""
        c = self.model_config
        max_bs = decode_buckets(self.config.max_num_seqs)[-1]
        batch = ForwardBatch.for_prefill([1] * max_bs, self.device)
        ids = torch.zeros(max_bs, dtype=torch.int64, device=self.device)
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.model(ids, ids, batch)
        torch.cuda.synchronize(self.device)
        activations = torch.cuda.max_memory_allocated(self.device) - base
        workspace = 4 * kernels.decode_workspace_numel(max_bs, self.model.shard.num_heads, c.head_dim)
        return activations + workspace + GRAPH_FIXED_RESERVE

    # The step API -------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raises RequestError if it is invalid or could never fit."""
        request_id = str(request_id)
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use", field="request_id")
        self.validate_request(prompt_token_ids, params)
        generator = torch.Generator(self.device).manual_seed(params.seed) if params.seed is not None else None
        seq = Request(request_id, list(prompt_token_ids), params, generator)
        self.requests[seq.request_id] = seq
        if params.constraint is None:
            self.scheduler.add(seq)
        else:  # queued once its grammar is compiled (`_admit_compiled`)
            self.compiling[seq.request_id] = (seq, self.grammar.compile(params.constraint))

    def validate_request(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise RequestError (naming the field) for a request this engine would refuse."""
        vocab = self.model_config.vocab_size
        if not prompt:
            raise RequestError("the prompt is empty", field="prompt")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise RequestError(f"the prompt has a token id outside [0, {vocab})", field="prompt")
        if params.max_token_id() >= vocab:
            raise RequestError(
                f"a token id in logit_bias or stop_token_ids is outside [0, {vocab})",
                field="logit_bias" if any(t >= vocab for t in params.logit_bias) else "stop_token_ids",
            )
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens; with max_tokens={params.max_tokens} that exceeds "
                f"max_model_len={self.max_model_len}",
                field="max_tokens" if len(prompt) < self.max_model_len else "prompt",
            )
        if self.kv_manager.blocks_for(total) > self.block_pool.num_blocks:
            raise RequestError(
                f"the request needs {self.kv_manager.blocks_for(total)} KV blocks at full length; the cache has "
                f"{self.block_pool.num_blocks}",
                field="max_tokens",
            )

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks now; the next step reports it
        with finish reason "abort". False if the id is unknown or already finished."""
        seq = self.requests.get(request_id)
        if seq is None or seq.finished:
            return False
        if self.compiling.pop(request_id, None) is not None:  # not in the scheduler yet
            self._end_unscheduled(seq, "abort")
            self._reported_next.append(_output(seq, ()))
            return True
        try:
            self.scheduler.abort(seq)
        except Exception as exc:  # the scheduler's state is broken: as when a step finds it so
            self._reported_next += self._reset_after(exc)
            return True
        del self.requests[request_id]
        self._reported_next.append(_output(seq, ()))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._reported_next) or bool(self.compiling)

    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, sample; returns one output per request that produced a
        token, finished, failed, or was aborted since the last step. Raises `EngineDeadError`
        only when the device cannot compute even a forward with no request in it."""
        outputs, self._reported_next = self._reported_next, []
        try:
            self._step(outputs)
        except EngineDeadError:
            raise
        except Exception as exc:  # the scheduler or the block pool itself failed
            outputs += self._reset_after(exc)
        return outputs

    def _step(self, outputs: list[RequestOutput]) -> None:
        """One step, appending to `outputs` as it goes: if the bookkeeping fails halfway, what
        was already reported stays reported."""
        outputs += self._admit_compiled()
        plan = self.scheduler.schedule()
        self.counters.num_preemptions += len(plan.preempted)
        if not plan.scheduled:
            self._wait_for_compiles()
            return
        # The constrained rows' masks are computed on a thread while the forward runs.
        masks = self.masks.start(
            {item.seq.request_id: item.seq.matcher for item in plan.scheduled if item.samples and item.seq.matcher}
        )
        try:
            result = self.executor.execute(plan.scheduled, masks)  # forward and sampling; failures pinned on requests
        finally:
            if masks is not None:  # no matcher may advance while its mask is being computed
                concurrent.futures.wait([masks.done])
        outputs += [self._fail(item.seq, exc) for item, exc in result.failures]
        failed = {item.seq.request_id for item, _ in result.failures}
        for item in plan.scheduled:
            if item.seq.request_id not in failed:
                outputs += self._update(item, result.results.get(item.seq.request_id, _NOTHING))

    def _admit_compiled(self) -> list[RequestOutput]:
        """Queue every request whose grammar finished compiling, each with its own copy of the
        compiled matcher; a grammar that failed to compile ends its request with the reason."""
        outputs = []
        for request_id, (seq, future) in list(self.compiling.items()):
            if not future.done():
                continue
            del self.compiling[request_id]
            try:
                seq.matcher = future.result().deep_copy()
            except Exception as exc:
                logger.warning("request %s: its constraint did not compile: %s", request_id, exc)
                self._end_unscheduled(seq, "error")
                del self.requests[request_id]
                message = str(exc) if isinstance(exc, GrammarError) else _failure_message(exc)
                outputs.append(_output(seq, (), error=message))
                continue
            self.scheduler.add(seq)
        return outputs

    def _wait_for_compiles(self, timeout_s: float = 0.01) -> None:
        """With nothing to compute but grammars compiling, wait a moment for one rather than spin."""
        if self.compiling:
            futures = [future for _, future in self.compiling.values()]
            concurrent.futures.wait(futures, timeout=timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)

    @staticmethod
    def _end_unscheduled(seq: Request, reason: str) -> None:
        """End a request that never reached the scheduler (its grammar was compiling)."""
        seq.status, seq.finish_reason = RequestStatus.FINISHED, reason

    def _update(self, item: ScheduledSeq, result: ItemResult) -> list[RequestOutput]:
        """The scheduler's bookkeeping for one request the step computed, counted, and its
        output if it sampled a token, scored prompt tokens or finished; a request whose
        bookkeeping raises fails alone."""
        seq = item.seq
        try:
            reason = self.scheduler.update(item, result.token)
        except Exception as exc:
            logger.error("request %s: updating it after its forward failed", seq.request_id, exc_info=exc)
            return [self._fail(seq, exc)]
        self.counters.count(item)
        if reason is not None:
            del self.requests[seq.request_id]
        if result.token is None and reason is None and not result.prompt_logprobs:
            return []
        tokens = () if result.token is None else (result.token,)
        logprobs = (result.logprobs,) if result.logprobs else None
        return [_output(seq, tokens, logprobs, prompt_logprobs=result.prompt_logprobs or None)]

    def _fail(self, seq: Request, exc: Exception) -> RequestOutput:
        """End one request with finish reason "error" and free its blocks. (If even that
        raises, the scheduler's state is broken, and `step` resets everything.)"""
        logger.error("request %s failed and was ended: %s: %s", seq.request_id, type(exc).__name__, exc)
        self.scheduler.abort(seq, reason="error")
        self.requests.pop(seq.request_id, None)
        return _output(seq, (), error=_failure_message(exc))

    def _reset_after(self, exc: Exception) -> list[RequestOutput]:
        """The scheduler or the block pool failed, so neither can be trusted: fail every request
        and start both afresh (the prefix cache is dropped; the KV cache memory stays)."""
        logger.error(
            "the scheduler or the KV block pool failed; ending all %d request(s) and rebuilding both",
            len(self.requests),
            exc_info=exc,
        )
        outputs = []
        for seq in self.requests.values():
            # Ended by hand, not through Scheduler.abort: the scheduler's state is what failed.
            seq.status, seq.finish_reason = RequestStatus.FINISHED, "error"
            seq.block_table, seq.block_keys = [], []
            outputs.append(_output(seq, (), error=_failure_message(exc)))
        self.requests.clear()
        self.compiling.clear()
        self._new_scheduler(self.block_pool.num_blocks)
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats(
            waiting=len(self.scheduler.waiting) + len(self.compiling),
            running=len(self.scheduler.running),
            kv=self.block_pool.stats(),
            num_preemptions=self.counters.num_preemptions,
            computed_tokens=self.counters.computed_tokens,
            prompt_tokens=self.counters.prompt_tokens,
            generated_tokens=self.counters.generated_tokens,
        )


_NOTHING = ItemResult()  # a request the step computed without sampling or scoring (a prefill chunk)


def _output(
    seq: Request,
    new_token_ids: tuple[int, ...],
    logprobs: tuple[TokenLogprobs, ...] | None = None,
    error: str | None = None,
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None,
) -> RequestOutput:
    """What a step produced for one request: its new tokens, why it ended if it did, its
    prompt tokens' logprobs if it scored some, and its token counts so far; a request the
    engine failed on ends with finish reason "error"."""
    return RequestOutput(
        seq.request_id,
        new_token_ids,
        seq.finish_reason,
        logprobs,
        seq.num_prompt_tokens,
        seq.num_output_tokens,
        seq.num_cached_tokens,
        error,
        prompt_logprobs,
    )


def _failure_message(exc: Exception) -> str:
    # The exception's type only: its text may hold paths or internals; the engine's log has it all.
    return (
        f"the engine failed while computing this request ({type(exc).__name__}); it was ended and its "
        "memory freed, other requests were not affected; the engine's log has the details"
    )
