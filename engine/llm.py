"""The offline API: load a checkpoint once, then generate for many prompts.

    from splitinfer.engine import LLM, SamplingParams
    llm = LLM("path/to/checkpoint", device="cpu", dtype="float32")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0.0))
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from pathlib import Path

import torch

from splitinfer.engine.config import ModelConfig
from splitinfer.engine.kv_cache import KVCache
from splitinfer.engine.loader import load_weights
from splitinfer.engine.model import LlamaForCausalLM
from splitinfer.engine.model_runner import ModelRunner
from splitinfer.engine.sampling_params import SamplingParams
from splitinfer.engine.sequence import Sequence
from splitinfer.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """The result of one prompt: generated token ids (a final stop or eos token included),
    their text (special tokens skipped), and why generation ended ("stop" or "length")."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA and float32 on CPU (where bf16 matmuls are slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class LLM:
    """A loaded model with its KV cache, generating for batches of prompts.

    Args:
        model: a Hugging Face Llama checkpoint directory (safetensors).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        dtype: "auto", "float32", "float16" or "bfloat16".
        max_model_len: the longest prompt + output; defaults to the checkpoint's
            max_position_embeddings and may not exceed it.
        block_size: tokens per KV-cache block.
        kv_cache_gb: KV-cache size in GB, unless `num_kv_blocks` is given.
        num_kv_blocks: KV-cache size in blocks.
        max_num_seqs: the most sequences decoded together.
        max_num_batched_tokens: the most prompt tokens prefilled in one forward.
        seed: seeds the random stream of requests that bring no seed of their own.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        max_model_len: int | None = None,
        block_size: int = 16,
        kv_cache_gb: float = 1.0,
        num_kv_blocks: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        seed: int = 0,
    ) -> None:
        start = time.perf_counter()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.config = ModelConfig.from_dir(model)
        limit = self.config.max_position_embeddings
        if max_model_len is not None and not 0 < max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [1, {limit}] (max_position_embeddings), got {max_model_len}")
        self.max_model_len = max_model_len or limit
        if block_size <= 0 or max_num_seqs <= 0 or max_num_batched_tokens <= 0:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens

        self.model = LlamaForCausalLM.build(self.config, self.device, self.dtype)
        load_weights(self.model, self.config.path)
        self.tokenizer = Tokenizer.from_dir(model) if (Path(model) / "tokenizer.json").is_file() else None

        c = self.config
        per_block = KVCache.bytes_per_block(c.num_layers, block_size, c.num_kv_heads, c.head_dim, self.dtype)
        blocks = num_kv_blocks if num_kv_blocks is not None else int(kv_cache_gb * 1e9) // per_block
        if blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block ({per_block} bytes); got {blocks}")
        kv_cache = KVCache.allocate(c.num_layers, blocks, block_size, c.num_kv_heads, c.head_dim, self.dtype, self.device)
        generator = torch.Generator(self.device).manual_seed(seed)
        self.runner = ModelRunner(self.model, kv_cache, generator)
        self.stop_ids = frozenset(c.eos_token_ids)
        logger.info(
            "LLM ready in %.1f s: %s on %s in %s, KV cache %d blocks x %d tokens = %d tokens (%.2f GB)",
            time.perf_counter() - start, c.path.name, self.device, str(self.dtype).removeprefix("torch."),
            blocks, block_size, blocks * block_size, blocks * per_block / 1e9,
        )

    def generate(
        self,
        prompts: SequenceOf[str] | SequenceOf[SequenceOf[int]],
        sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings, or lists of token ids); outputs keep the prompts' order."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings or of token-id lists, not one string")
        params = self._params_per_prompt(len(prompts), sampling_params)
        seqs = [self._new_sequence(i, prompt, p) for i, (prompt, p) in enumerate(zip(prompts, params))]
        pending = list(seqs)
        while pending:
            wave = self._take_wave(pending)
            self._run_wave(wave)
        return [self._output(seq) for seq in seqs]

    def _params_per_prompt(
        self, count: int, sampling_params: SamplingParams | SequenceOf[SamplingParams] | None
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        if len(sampling_params) != count:
            raise ValueError(f"got {len(sampling_params)} sampling params for {count} prompts")
        return list(sampling_params)

    def _new_sequence(self, index: int, prompt: str | SequenceOf[int], params: SamplingParams) -> Sequence:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json; pass prompts as token-id lists")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
        if not token_ids:
            raise ValueError(f"prompt {index} is empty")
        vocab = self.config.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt {index} has a token id outside [0, {vocab})")
        if len(token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt {index} has {len(token_ids)} tokens; with max_tokens={params.max_tokens} that exceeds "
                f"max_model_len={self.max_model_len}"
            )
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        return Sequence(index, token_ids, params, generator)

    def _blocks_needed(self, seq: Sequence) -> int:
        return -(-(len(seq.prompt_token_ids) + seq.params.max_tokens) // self.runner.block_size)

    def _take_wave(self, pending: list[Sequence]) -> list[Sequence]:
        """Remove from `pending` the longest prefix that fits in the KV cache together, and give it blocks.

        This is the simple batching of the offline API; the engine's scheduler replaces it.
        """
        total = self.runner.kv_cache.num_blocks
        wave: list[Sequence] = []
        next_block = 0
        while pending and len(wave) < self.max_num_seqs:
            need = self._blocks_needed(pending[0])
            if need > total:
                raise ValueError(f"prompt {pending[0].request_id} needs {need} KV blocks; the cache has {total}")
            if next_block + need > total:
                break
            seq = pending.pop(0)
            seq.block_table = list(range(next_block, next_block + need))
            next_block += need
            wave.append(seq)
        return wave

    def _run_wave(self, wave: list[Sequence]) -> None:
        for group in self._prefill_groups(wave):
            for seq, token in zip(group, self.runner.step(group, prefill=True)):
                seq.append(token, self._stop_ids(seq), self.max_model_len)
        running = [seq for seq in wave if not seq.finished]
        while running:
            for seq, token in zip(running, self.runner.step(running, prefill=False)):
                seq.append(token, self._stop_ids(seq), self.max_model_len)
            running = [seq for seq in running if not seq.finished]

    def _prefill_groups(self, wave: list[Sequence]) -> list[list[Sequence]]:
        """Split the wave's prompts into forwards of at most max_num_batched_tokens (one long prompt may exceed it)."""
        groups: list[list[Sequence]] = [[]]
        tokens = 0
        for seq in wave:
            n = len(seq.prompt_token_ids)
            if groups[-1] and tokens + n > self.max_num_batched_tokens:
                groups.append([])
                tokens = 0
            groups[-1].append(seq)
            tokens += n
        return groups

    def _stop_ids(self, seq: Sequence) -> frozenset[int]:
        return frozenset() if seq.params.ignore_eos else self.stop_ids

    def _output(self, seq: Sequence) -> RequestOutput:
        text = self.tokenizer.decode(seq.output_token_ids) if self.tokenizer is not None else ""
        return RequestOutput(seq.prompt_token_ids, seq.output_token_ids, text, seq.finish_reason or "length")
