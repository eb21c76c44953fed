"""Batched next-token sampling, every setting per request.

Order of operations on the fp32 logits [B, V]: logit bias, suppression of stop tokens
before `min_tokens`, repetition/presence/frequency penalties, then greedy argmax or
temperature, top-k, top-p and min-p, and the exponential race (argmax of p / E with
E ~ Exp(1), which draws token i with probability p_i like multinomial, without a host
sync). A request with a seed draws its noise from its own generator, so its tokens do
not depend on its batch-mates. Log-probabilities come from the raw logits.

Per-row settings become float32 or int64 tensors. `SamplingParams` bounds every value so
that this cannot overflow; a nonzero temperature below MIN_TEMPERATURE is raised to it
(as vLLM does), since dividing by a temperature that rounds to 0 in float32 would turn
the logits into inf and the probabilities into NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitinfer.engine.sequence import Logprobs, Sequence

MIN_TEMPERATURE = 1e-2


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprobs | None]


class Sampler:
    def __init__(self, vocab_size: int, stop_ids: frozenset[int], default_generator: torch.Generator) -> None:
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids
        self.default_generator = default_generator

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        params = [seq.params for seq in seqs]
        raw = logits
        logits = logits.clone() if any(p.logit_bias or p.min_tokens or p.has_penalties for p in params) else logits
        self._apply_logit_bias(logits, seqs)
        self._suppress_stop_tokens(logits, seqs)
        self._apply_penalties(logits, seqs)
        tokens = self._sample(logits, seqs)
        token_list = tokens.tolist()
        return SamplerOutput(token_list, self._logprobs(raw, seqs, tokens, token_list))

    def _apply_logit_bias(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows, cols, values = [], [], []
        for row, seq in enumerate(seqs):
            for token, bias in seq.params.logit_bias.items():
                rows.append(row)
                cols.append(token)
                values.append(bias)
        if rows:
            index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
            logits.index_put_(index, self._floats(values, logits.device), accumulate=True)

    def _suppress_stop_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for row, seq in enumerate(seqs):
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.stop_ids))
                if stops:
                    logits[row, list(stops)] = float("-inf")

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Repetition (transformers: over prompt and output), then frequency and presence (OpenAI:
        over the output) penalties, for all penalised rows at once."""
        rows = [row for row, seq in enumerate(seqs) if seq.params.has_penalties]
        if not rows:
            return
        device = logits.device
        params = [seqs[row].params for row in rows]
        index = torch.tensor(rows, device=device)
        penalised = logits.index_select(0, index)
        # Token-id lists padded with `vocab`, a spare column that is dropped afterwards.
        counts = self._scatter_counts([seqs[row].output_token_ids for row in rows], device)
        seen = counts > 0
        if any(p.repetition_penalty != 1 for p in params):
            in_prompt = self._scatter_counts([seqs[row].prompt_token_ids for row in rows], device) > 0
            repetition = self._floats([p.repetition_penalty for p in params], device)[:, None]
            scaled = torch.where(penalised > 0, penalised / repetition, penalised * repetition)
            penalised = torch.where(seen | in_prompt, scaled, penalised)
        frequency = self._floats([p.frequency_penalty for p in params], device)[:, None]
        presence = self._floats([p.presence_penalty for p in params], device)[:, None]
        penalised -= frequency * counts + presence * seen
        logits[index] = penalised

    @staticmethod
    def _floats(values: list[float], device: torch.device) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)

    def _scatter_counts(self, token_lists: list[list[int]], device: torch.device) -> torch.Tensor:
        """[len(token_lists), vocab] float counts of each token id in each list."""
        width = max(1, max(len(tokens) for tokens in token_lists))
        padded = torch.tensor([tokens + [self.vocab_size] * (width - len(tokens)) for tokens in token_lists],
                              dtype=torch.int64).to(device, non_blocking=True)
        counts = torch.zeros(len(token_lists), self.vocab_size + 1, device=device)
        counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
        return counts[:, : self.vocab_size]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        greedy_tokens = logits.argmax(dim=-1)
        params = [seq.params for seq in seqs]
        if all(p.greedy for p in params):
            return greedy_tokens
        device, vocab = logits.device, logits.shape[-1]
        temperature = self._floats([max(p.temperature, MIN_TEMPERATURE) if not p.greedy else 1.0 for p in params],
                                   device)
        top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=device)
        top_p = self._floats([p.top_p for p in params], device)
        min_p = self._floats([p.min_p for p in params], device)

        sorted_logits, sorted_ids = (logits / temperature[:, None]).sort(dim=-1, descending=True)
        drop = torch.arange(vocab, device=device)[None, :] >= top_k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # Keep a token while the mass before it is below top_p (the top token always stays).
        drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
        drop |= probs < min_p[:, None] * probs[:, :1]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)

        noise = torch.empty_like(probs)
        unseeded = [row for row, seq in enumerate(seqs) if seq.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), vocab, device=device).exponential_(generator=self.default_generator)
        for row, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[row].exponential_(generator=seq.generator)
        choice = (probs / noise.clamp_min(1e-10)).argmax(dim=-1, keepdim=True)
        sampled = sorted_ids.gather(1, choice).squeeze(1)
        is_greedy = torch.tensor([p.greedy for p in params], device=device)
        return torch.where(is_greedy, greedy_tokens, sampled)

    def _logprobs(
        self, raw: torch.Tensor, seqs: list[Sequence], tokens: torch.Tensor, token_list: list[int]
    ) -> list[Logprobs | None]:
        wanted = [seq.params.logprobs for seq in seqs]
        if all(n is None for n in wanted):
            return [None] * len(seqs)
        logprobs = raw.log_softmax(dim=-1)
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
        k = max(n for n in wanted if n is not None)
        top_values, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
        top_values = top_values.tolist() if k else None
        top_ids = top_ids.tolist() if k else None
        out: list[Logprobs | None] = []
        for row, n in enumerate(wanted):
            if n is None:
                out.append(None)
                continue
            top = list(zip(top_ids[row][:n], top_values[row][:n])) if n else []
            out.append(Logprobs(token_list[row], chosen[row], top))
        return out
