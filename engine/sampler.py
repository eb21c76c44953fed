"""Batched next-token sampling, every setting per request.

Order of operations on the fp32 logits [B, V]: logit bias, suppression of stop tokens
before `min_tokens`, repetition/presence/frequency penalties, the grammar's token mask for
constrained rows (`grammar.py`), then greedy argmax or
temperature, top-k, top-p and min-p, and the exponential race (argmax of p / E with
E ~ Exp(1), which draws token i with probability p_i like multinomial, without a host
sync). A request with a seed draws its noise from its own generator, so its tokens do
not depend on its batch-mates. Log-probabilities come from the raw logits (before bias,
penalties and masks), as vLLM's do by default.

A constrained row whose other settings leave it nothing the grammar allows (a stop token
suppressed by `min_tokens` where the grammar allows only that token) samples from the raw
logits under the grammar's mask: the grammar wins, since a token it refuses ends the request.

A step waits for the device once, when it reads the sampled tokens back (and once more for
log-probabilities, when asked). Everything it needs from the host (per-row settings, the
rows and token ids of logit biases, suppressed stop tokens and penalties) is packed into
one float32 and one int64 tensor and sent in copies that do not wait for the device; every
selection and scatter after that uses those device tensors, never a Python list.

Only rows with top-k, top-p or min-p (`needs_sort`) sort their logits, which at 256 rows
x 128k tokens costs as much as a 1B model's forward. Such a row races over its sorted,
truncated probabilities with its noise matched to sorted position (as it always has);
any other row races over softmax(logits / T) in token order, noise matched to token id.
Which rule a row follows depends on its own settings only, so a seeded row draws the same
tokens whatever its batch-mates.

Per-row settings become float32 or int64 tensors. `SamplingParams` bounds every value so
that this cannot overflow; a nonzero temperature below MIN_TEMPERATURE is raised to it
(as vLLM does), since dividing by a temperature that rounds to 0 in float32 would turn
the logits into inf and the probabilities into NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from splitinfer.engine.grammar import StepMasks, allowed_tokens
from splitinfer.engine.request import Request
from splitinfer.protocol import SamplingParams, TokenLogprobs

MIN_TEMPERATURE = 1e-2
# How a row picks its token.
_GREEDY, _FULL_SOFTMAX, _TRUNCATED = 0, 1, 2


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def needs_sort(params: SamplingParams, vocab: int) -> bool:
    """Whether a row samples from a truncated distribution (top-k, top-p or min-p), which is
    found on its sorted logits. Greedy rows never need it."""
    return not params.greedy and (0 < params.top_k < vocab or params.top_p < 1 or params.min_p > 0)


def _row_kind(params: SamplingParams, vocab: int) -> int:
    if params.greedy:
        return _GREEDY
    return _TRUNCATED if needs_sort(params, vocab) else _FULL_SOFTMAX


class _StepInputs:
    """One step's host values, packed into one float32 and one int64 tensor, each sent to the
    device in one copy that does not wait for it, then read there as named views.

    `kinds` (host ints, one per row) says how each row samples, for the branches that must
    be decided without reading the device."""

    def __init__(self, kinds: list[int]) -> None:
        self.kinds = kinds
        self._values: dict[torch.dtype, list[float | int]] = {torch.float32: [], torch.int64: []}
        self._fields: dict[str, tuple[torch.dtype, int, tuple[int, ...]]] = {}
        self._host: list[torch.Tensor] = []
        self._device: dict[str, torch.Tensor] = {}

    def add(self, name: str, dtype: torch.dtype, values: list, shape: tuple[int, ...]) -> None:
        """`values`, flattened row-major, to be read on the device as the `shape` tensor `name`."""
        packed = self._values[dtype]
        self._fields[name] = (dtype, len(packed), shape)
        packed.extend(values)

    def upload(self, device: torch.device) -> _StepInputs:
        # From pinned memory the copy runs asynchronously; from pageable memory the driver would
        # stage it and wait. The pinned tensor must outlive its copy: `_host` keeps it as long as
        # this object, which the sampler holds until after the `.tolist()` that waits for the
        # stream (the caching host allocator also keeps the block until the copy's event has
        # passed). pin_memory needs CUDA; on the CPU `.to` returns the tensor itself, no copy.
        pinned = device.type == "cuda"
        packed = {}
        for dtype, values in self._values.items():
            if values:
                host = torch.tensor(values, dtype=dtype, pin_memory=pinned)
                self._host.append(host)
                packed[dtype] = host.to(device, non_blocking=True)
        for name, (dtype, start, shape) in self._fields.items():
            self._device[name] = packed[dtype][start : start + math.prod(shape)].view(shape)
        return self

    def __contains__(self, name: str) -> bool:
        return name in self._fields

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._device[name]


class Sampler:
    def __init__(self, vocab_size: int, stop_ids: frozenset[int], default_generator: torch.Generator) -> None:
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids
        self.default_generator = default_generator

    def __call__(self, logits: torch.Tensor, seqs: list[Request], masks: StepMasks | None = None) -> SamplerOutput:
        """Sample one token per row of `logits` [len(seqs), V]; `masks` holds the grammar masks
        of the constrained rows (by request id), computed while the forward ran."""
        params = [seq.params for seq in seqs]
        raw = logits
        masked = [] if masks is None else [(row, masks.rows[s.request_id]) for row, s in enumerate(seqs) if s.matcher]
        changes = masked or any(p.logit_bias or p.min_tokens or p.has_penalties for p in params)
        logits = logits.clone() if changes else logits
        inputs = self._inputs(seqs, logits)
        self._apply_logit_bias(logits, seqs, inputs)
        self._suppress_stop_tokens(logits, seqs, inputs)
        self._apply_penalties(logits, seqs, inputs)
        if masked:
            self._apply_grammar(logits, raw, masked, masks)
        tokens = self._sample(logits, seqs, inputs)
        token_list = tokens.tolist()  # the step's one wait for the device
        return SamplerOutput(token_list, self._logprobs(raw, seqs, tokens, token_list))

    def _inputs(self, seqs: list[Request], logits: torch.Tensor) -> _StepInputs:
        """Everything the step needs from the host, on the logits' device. The `_apply_*` steps
        build their own when called alone, as tests do."""
        vocab = logits.shape[-1]
        params = [seq.params for seq in seqs]
        inputs = _StepInputs([_row_kind(p, vocab) for p in params])
        bias = [(row, token, value) for row, p in enumerate(params) for token, value in p.logit_bias.items()]
        if bias:
            rows, tokens, values = zip(*bias)
            inputs.add("bias_index", torch.int64, [*rows, *tokens], (2, len(bias)))
            inputs.add("bias", torch.float32, list(values), (len(bias),))
        stops = [(row, token) for row, seq in enumerate(seqs) for token in self._suppressed_tokens(seq)]
        if stops:
            inputs.add(
                "stop_index", torch.int64, [row for row, _ in stops] + [token for _, token in stops], (2, len(stops))
            )
        self._add_penalties(inputs, seqs)
        if any(kind != _GREEDY for kind in inputs.kinds):
            self._add_sampling(inputs, seqs, vocab)
        return inputs.upload(logits.device)

    def _suppressed_tokens(self, seq: Request) -> set[int]:
        """The tokens a sequence may not sample yet: its stop tokens, eos unless ignored, before min_tokens."""
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            return set()
        return set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.stop_ids))

    def _add_penalties(self, inputs: _StepInputs, seqs: list[Request]) -> None:
        rows = [row for row, seq in enumerate(seqs) if seq.params.has_penalties]
        if not rows:
            return
        params = [seqs[row].params for row in rows]
        inputs.add("penalty_rows", torch.int64, rows, (len(rows),))
        inputs.add(
            "penalties",
            torch.float32,
            [x for p in params for x in (p.repetition_penalty, p.frequency_penalty, p.presence_penalty)],
            (len(rows), 3),
        )
        self._add_token_lists(inputs, "output_tokens", [seqs[row].output_token_ids for row in rows])
        if any(p.repetition_penalty != 1 for p in params):
            self._add_token_lists(inputs, "prompt_tokens", [seqs[row].prompt_token_ids for row in rows])

    def _add_token_lists(self, inputs: _StepInputs, name: str, token_lists: list[list[int]]) -> None:
        """Token-id lists padded with `vocab_size`, a spare column that `_scatter_counts` drops."""
        width = max(1, max(len(tokens) for tokens in token_lists))
        padded = [t for tokens in token_lists for t in (*tokens, *[self.vocab_size] * (width - len(tokens)))]
        inputs.add(name, torch.int64, padded, (len(token_lists), width))

    @staticmethod
    def _add_sampling(inputs: _StepInputs, seqs: list[Request], vocab: int) -> None:
        params = [seq.params for seq in seqs]
        inputs.add("kind", torch.int64, inputs.kinds, (len(seqs),))
        inputs.add(
            "temperature",
            torch.float32,
            [max(p.temperature, MIN_TEMPERATURE) if not p.greedy else 1.0 for p in params],
            (len(seqs),),
        )
        truncated = [row for row, kind in enumerate(inputs.kinds) if kind == _TRUNCATED]
        if truncated:
            inputs.add("truncated_rows", torch.int64, truncated, (len(truncated),))
            inputs.add(
                "top_k",
                torch.int64,
                [min(params[row].top_k, vocab) if params[row].top_k > 0 else vocab for row in truncated],
                (len(truncated),),
            )
            inputs.add(
                "top_p_min_p",
                torch.float32,
                [x for row in truncated for x in (params[row].top_p, params[row].min_p)],
                (len(truncated), 2),
            )
        unseeded = [row for row, seq in enumerate(seqs) if seq.generator is None]
        if 0 < len(unseeded) < len(seqs):
            # For each row, its row in the block of unseeded noise (seeded rows draw their own).
            slots = [0] * len(seqs)
            for slot, row in enumerate(unseeded):
                slots[row] = slot
            inputs.add("unseeded_slots", torch.int64, slots, (len(seqs),))

    def _apply_logit_bias(self, logits: torch.Tensor, seqs: list[Request], inputs: _StepInputs | None = None) -> None:
        inputs = self._inputs(seqs, logits) if inputs is None else inputs
        if "bias_index" in inputs:
            # One bias per (row, token), so a plain write adds each exactly once; index_put_ with
            # accumulate=True reads the index range back to the host in older torch releases.
            index = inputs["bias_index"].unbind()
            logits.index_put_(index, logits[index] + inputs["bias"])

    def _suppress_stop_tokens(
        self, logits: torch.Tensor, seqs: list[Request], inputs: _StepInputs | None = None
    ) -> None:
        inputs = self._inputs(seqs, logits) if inputs is None else inputs
        if "stop_index" in inputs:
            # A device-side -inf: a Python float would be copied from the host at the write.
            logits.index_put_(inputs["stop_index"].unbind(), logits.new_full((), float("-inf")))

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Request], inputs: _StepInputs | None = None) -> None:
        """Repetition (transformers: over prompt and output), then frequency and presence (OpenAI:
        over the output) penalties, for all penalised rows at once."""
        inputs = self._inputs(seqs, logits) if inputs is None else inputs
        if "penalty_rows" not in inputs:
            return
        index = inputs["penalty_rows"]
        penalised = logits.index_select(0, index)
        counts = self._scatter_counts(inputs["output_tokens"])
        seen = counts > 0
        repetition, frequency, presence = inputs["penalties"].split(1, dim=1)
        if "prompt_tokens" in inputs:
            in_prompt = self._scatter_counts(inputs["prompt_tokens"]) > 0
            scaled = torch.where(penalised > 0, penalised / repetition, penalised * repetition)
            penalised = torch.where(seen | in_prompt, scaled, penalised)
        penalised -= frequency * counts + presence * seen
        logits[index] = penalised

    def _apply_grammar(
        self, logits: torch.Tensor, raw: torch.Tensor, masked: list[tuple[int, int]], masks: StepMasks
    ) -> None:
        """-inf for every token the grammar refuses, in each (logits row, mask row) of `masked`."""
        bitmask = masks.wait()
        mask_rows = [mask_row for _, mask_row in masked]
        if mask_rows != list(range(len(mask_rows))):  # the usual case is a prefix: no host copy
            bitmask = bitmask.index_select(0, torch.tensor(mask_rows))
        else:
            bitmask = bitmask[: len(mask_rows)]
        refused = ~allowed_tokens(bitmask.to(logits.device, non_blocking=True), logits.shape[-1])
        index = torch.tensor([row for row, _ in masked], dtype=torch.int64).to(logits.device, non_blocking=True)
        rows = logits.index_select(0, index).masked_fill_(refused, float("-inf"))
        emptied = rows.amax(dim=-1, keepdim=True) == float("-inf")
        rows = torch.where(emptied, raw.index_select(0, index).masked_fill(refused, float("-inf")), rows)
        logits.index_copy_(0, index, rows)

    def _scatter_counts(self, padded: torch.Tensor) -> torch.Tensor:
        """[rows, vocab] float counts of each token id in each row of `padded` (see `_add_token_lists`)."""
        counts = torch.zeros(padded.shape[0], self.vocab_size + 1, device=padded.device)
        counts.scatter_add_(1, padded, torch.ones(padded.shape, device=padded.device))
        return counts[:, : self.vocab_size]

    def _sample(self, logits: torch.Tensor, seqs: list[Request], inputs: _StepInputs) -> torch.Tensor:
        greedy_tokens = logits.argmax(dim=-1)
        if all(kind == _GREEDY for kind in inputs.kinds):
            return greedy_tokens
        scaled = logits / inputs["temperature"][:, None]
        noise = self._noise(seqs, logits, inputs)
        tokens = greedy_tokens
        if _FULL_SOFTMAX in inputs.kinds:
            raced = (scaled.softmax(dim=-1) / noise).argmax(dim=-1)
            tokens = torch.where(inputs["kind"] == _FULL_SOFTMAX, raced, tokens)
        if _TRUNCATED in inputs.kinds:
            rows = inputs["truncated_rows"]
            if len(rows) < len(seqs):  # a host-side shape: no sync
                # Rebinding frees the full-batch tensors before the sort's temporaries exist.
                scaled, noise = scaled.index_select(0, rows), noise.index_select(0, rows)
            top_p, min_p = inputs["top_p_min_p"].unbind(dim=1)
            tokens = tokens.index_copy(0, rows, self._truncated_race(scaled, noise, inputs["top_k"], top_p, min_p))
        return tokens

    def _noise(self, seqs: list[Request], logits: torch.Tensor, inputs: _StepInputs) -> torch.Tensor:
        """Exp(1) noise [B, V], clamped away from 0. Unseeded rows take theirs from one
        [unseeded, V] draw of the engine's generator, then each seeded row draws its own row, in
        row order: the same draws, in the same order, whatever each row does with them."""
        unseeded = sum(seq.generator is None for seq in seqs)
        if unseeded == 0:
            noise = torch.empty_like(logits)
        else:
            noise = torch.empty(unseeded, logits.shape[-1], device=logits.device).exponential_(
                generator=self.default_generator
            )
            if unseeded < len(seqs):
                noise = noise.index_select(0, inputs["unseeded_slots"])
        for row, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[row].exponential_(generator=seq.generator)
        return noise.clamp_min_(1e-10)

    @staticmethod
    def _truncated_race(
        scaled: torch.Tensor, noise: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
    ) -> torch.Tensor:
        """Top-k, then top-p and min-p on the sorted scaled logits, then the race, each row's
        noise matched to sorted position."""
        vocab = scaled.shape[-1]
        sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
        drop = torch.arange(vocab, device=scaled.device)[None, :] >= top_k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # Keep a token while the mass before it is below top_p (the top token always stays).
        drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
        drop |= probs < min_p[:, None] * probs[:, :1]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        choice = (probs / noise).argmax(dim=-1, keepdim=True)
        return sorted_ids.gather(1, choice).squeeze(1)

    def _logprobs(
        self, raw: torch.Tensor, seqs: list[Request], tokens: torch.Tensor, token_list: list[int]
    ) -> list[TokenLogprobs | None]:
        wanted = [seq.params.logprobs for seq in seqs]
        if all(n is None for n in wanted):
            return [None] * len(seqs)
        logprobs = raw.log_softmax(dim=-1)
        k = max(n for n in wanted if n is not None)
        top_values, top_ids = logprobs.topk(k, dim=-1)
        # One read back: the chosen token's logprob, the top k logprobs and their token ids side by
        # side in float64 (which holds every fp32 value and every token id exactly).
        parts = (logprobs.gather(1, tokens[:, None]), top_values, top_ids)
        table = torch.cat([part.double() for part in parts], dim=1).tolist()
        out: list[TokenLogprobs | None] = []
        for row, n in enumerate(wanted):
            if n is None:
                out.append(None)
                continue
            values = table[row]
            top = [(int(values[1 + k + i]), values[1 + i]) for i in range(n)]
            # Refuses a NaN (a broken forward): the isolating executor pins it on this request.
            out.append(TokenLogprobs(token_list[row], values[0], top))
        return out
