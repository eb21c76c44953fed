"""The offline API: load a checkpoint once, then generate for many prompts.

    from splitinfer.engine import LLM, SamplingParams
    llm = LLM("path/to/checkpoint", device="cpu", dtype="float32")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0.0))

All prompts of one call are batched continuously by the engine core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from splitinfer.engine.config import EngineConfig
from splitinfer.engine.engine_core import EngineCore
from splitinfer.protocol import SamplingParams, TokenLogprobs
from splitinfer.protocol.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class Generation:
    """The result of one prompt: generated token ids (a final stop or eos token included),
    their text (special tokens skipped), why generation ended ("stop" or "length"; "error"
    when the engine failed while computing this prompt, then `error` says so and the other
    prompts are unaffected), per-token log-probabilities when asked for, and the prompt's
    when asked for (`prompt_logprobs`: None for the first prompt token, then one entry per
    prompt token)."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None
    error: str | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class LLM:
    """A loaded model with its KV cache, generating for batches of prompts.

    Takes the checkpoint directory and any `EngineConfig` field as a keyword (device, dtype,
    max_model_len, kv_cache_gb, max_num_seqs, ...: each is documented on `EngineConfig`, and
    `splitinfer-engine --help` shows them as flags with their defaults). A value out of its
    bounds raises `ConfigError` naming the field.
    """

    def __init__(self, model: str | Path, **engine_args: object) -> None:
        known = set(EngineConfig.__struct_fields__) - {"model"}
        unknown = sorted(set(engine_args) - known)
        if unknown:
            raise TypeError(f"unknown LLM argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        self.engine = EngineCore(EngineConfig(model=str(model), **engine_args))
        self.config = self.engine.model_config
        path = Path(model)
        self.tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
        self._next_id = 0

    def close(self) -> None:
        """Stop the tensor-parallel worker processes, if any (they also exit with this process)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Generation]:
        """Generate for every prompt (strings, or lists of token ids); outputs keep the prompts' order.

        An invalid prompt raises before any is queued.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings or of token-id lists, not one string")
        params = self._params_per_prompt(len(prompts), sampling_params)
        token_lists = [self._tokens(i, prompt) for i, prompt in enumerate(prompts)]
        ids = [f"offline-{self._next_id + i}" for i in range(len(prompts))]
        self._next_id += len(prompts)
        for i, (tokens, p) in enumerate(zip(token_lists, params)):
            try:
                self.engine.validate_request(tokens, p)
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from exc
        for rid, tokens, p in zip(ids, token_lists, params):
            self.engine.add_request(rid, tokens, p)
        generated: dict[str, list[int]] = {rid: [] for rid in ids}
        logprobs: dict[str, list[TokenLogprobs]] = {rid: [] for rid in ids}
        scored: dict[str, list[TokenLogprobs | None]] = {rid: [None] for rid in ids}
        reasons: dict[str, str] = {}
        errors: dict[str, str] = {}
        while len(reasons) < len(ids):
            for out in self.engine.step():
                if out.request_id not in generated:
                    continue  # another caller's request
                generated[out.request_id] += out.new_token_ids
                logprobs[out.request_id] += out.logprobs or []
                scored[out.request_id] += out.prompt_logprobs or []
                if out.finish_reason is not None:
                    reasons[out.request_id] = out.finish_reason
                if out.error is not None:
                    errors[out.request_id] = out.error
        return [
            Generation(
                tokens,
                generated[rid],
                self._detokenize(generated[rid]),
                reasons[rid],
                logprobs[rid] if p.logprobs is not None else None,
                errors.get(rid),
                scored[rid] if p.prompt_logprobs is not None else None,
            )
            for rid, tokens, p in zip(ids, token_lists, params)
        ]

    def _params_per_prompt(
        self, count: int, sampling_params: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        if len(sampling_params) != count:
            raise ValueError(f"got {len(sampling_params)} sampling params for {count} prompts")
        return list(sampling_params)

    def _tokens(self, index: int, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json; pass prompts as token-id lists")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""
