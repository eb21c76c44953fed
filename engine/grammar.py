"""Grammar-constrained sampling: compiling constraints, and each step's token masks.

Built on llguidance (`protocol/constraint.py` says why and what a constraint is):

- `GrammarCompiler` turns a `Constraint` into an `LLMatcher` on worker threads, never on
  the engine loop: the checkpoint's tokenizer is built there once (it takes a second for a
  128k vocabulary), and compiled matchers are cached by constraint (LRU), so a repeated
  schema costs a `deep_copy` (microseconds). `EngineCore` keeps a request out of the
  scheduler until its compile is done, so a slow grammar never holds up the batch.
- `MaskBuilder.start` computes the token masks of a step's constrained rows on a thread of
  its own while the forward runs (llguidance releases the GIL and spreads the rows over its
  own Rust threads); the sampler waits for them only when it needs them (`StepMasks`).

A request's matcher advances only when its sampled token is committed (`Request.append_token`),
after the step succeeded; a failed step's retries (`isolation.py`) and a preemption's
recompute therefore see the same matcher state and the same masks. Requests without a
constraint cost nothing: no mask is computed or applied for them.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

import llguidance
import torch

from splitinfer.protocol.constraint import Constraint, describe_grammar_error

logger = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled constraints kept (each a few KB to a few MB)
COMPILE_THREADS = 2


class GrammarError(RuntimeError):
    """A constraint the tokenizer cannot serve, or a token its grammar refused."""


class GrammarCompiler:
    """Compiles constraints into matchers for one checkpoint's tokenizer, off the engine loop."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self._pool = concurrent.futures.ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="grammar")
        self._lock = threading.Lock()
        self._cache: OrderedDict[Constraint, concurrent.futures.Future[llguidance.LLMatcher]] = OrderedDict()
        # Started now, so that the first constrained request does not wait for it.
        self._tokenizer = self._pool.submit(_build_tokenizer, tokenizer_json, vocab_size, eos_token_ids)
        self.compiled = 0  # grammars compiled (cache misses), for the stats and the tests

    def compile(self, constraint: Constraint) -> concurrent.futures.Future[llguidance.LLMatcher]:
        """A future of the constraint's compiled matcher: the cached one, or one compiled now
        on a worker. Callers take `deep_copy()`s of it; it is never advanced itself."""
        with self._lock:
            future = self._cache.get(constraint)
            if future is not None:
                self._cache.move_to_end(constraint)
                return future
            future = self._pool.submit(self._compile, constraint)
            self._cache[constraint] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return future

    def _compile(self, constraint: Constraint) -> llguidance.LLMatcher:
        start = time.perf_counter()
        tokenizer = self._tokenizer.result()
        matcher = llguidance.LLMatcher(tokenizer, constraint.grammar(), log_level=0)
        if matcher.is_error():
            with self._lock:  # not cached: the error is the request's, and the next may differ
                self._cache.pop(constraint, None)
            raise GrammarError(describe_grammar_error(constraint.kind, matcher.get_error()))
        self.compiled += 1
        logger.debug("compiled a %s constraint in %.1f ms", constraint.kind.value, 1e3 * (time.perf_counter() - start))
        return matcher

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _build_tokenizer(tokenizer_json: Path, vocab_size: int, eos_token_ids: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of the checkpoint's tokenizer: masks as wide as the model's vocabulary
    (which may exceed the tokenizer's), and every eos id allowed where the grammar may end."""
    start = time.perf_counter()
    if not tokenizer_json.is_file():
        raise GrammarError(
            f"constrained decoding needs the checkpoint's tokenizer.json, and {tokenizer_json} is missing"
        )
    tokenizer = llguidance.LLTokenizer(
        tokenizer_json.read_text(encoding="utf-8"), n_vocab=vocab_size, eos_token=list(eos_token_ids)
    )
    logger.info("grammar tokenizer ready in %.2f s (%d tokens)", time.perf_counter() - start, tokenizer.vocab_size)
    return tokenizer


class StepMasks:
    """The token masks of one step's constrained rows, being computed on a thread: `rows` maps a
    request id to its row in `bitmask` (int32 [rows, ceil(vocab / 32)], bit j of word i allows
    token 32 i + j)."""

    def __init__(self, rows: dict[str, int], bitmask: torch.Tensor, done: concurrent.futures.Future[None]) -> None:
        self.rows = rows
        self._bitmask = bitmask
        self.done = done

    def wait(self) -> torch.Tensor:
        self.done.result()
        return self._bitmask


class MaskBuilder:
    """Fills the step's masks on one thread while the forward runs (module docstring)."""

    def __init__(self, vocab_size: int, max_rows: int) -> None:
        self.vocab_size = vocab_size
        self._executor: llguidance.LLExecutor | None = None  # its thread pool, made at first use
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        # Pinned when CUDA is there, so the sampler's upload does not wait; one buffer serves
        # every step, since a step has read its masks before the next one starts.
        # (llguidance.torch has helpers for this, but importing it imports torch.compile's
        # machinery: 4 s more at every engine start.)
        words = -(-vocab_size // 32)
        self._bitmask = torch.full((max_rows, words), -1, dtype=torch.int32, pin_memory=torch.cuda.is_available())
        self.mask_seconds = 0.0  # time spent filling masks, for the benchmark
        self.masks_filled = 0

    def start(self, matchers: dict[str, llguidance.LLMatcher]) -> StepMasks | None:
        """Start computing the masks of `matchers` (request id -> matcher); None when there are none."""
        if not matchers:
            return None
        rows = {request_id: row for row, request_id in enumerate(matchers)}
        bitmask = self._bitmask[: len(rows)]
        pairs = [(matcher, row) for row, matcher in enumerate(matchers.values())]
        return StepMasks(rows, bitmask, self._thread.submit(self._fill, pairs, bitmask))

    def _fill(self, pairs: list[tuple[llguidance.LLMatcher, int]], bitmask: torch.Tensor) -> None:
        start = time.perf_counter()
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        # Each matcher writes its row, `row * bytes_per_row` past the start (the buffer is contiguous).
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])
        self.mask_seconds += time.perf_counter() - start
        self.masks_filled += len(pairs)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Bool [rows, vocab_size] of the tokens a packed int32 bitmask allows, on its device. Read
    as bytes (little-endian: byte k of word i holds tokens 32 i + 8 k ...), so the unpacking
    never holds more than a byte per token."""
    as_bytes = bitmask.contiguous().view(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = (as_bytes.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()
