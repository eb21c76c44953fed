"""The batched sampler, one setting at a time, on synthetic logits: what each setting allows,
forbids or changes, per row, whatever its batch-mates ask for."""

from __future__ import annotations

import math

import pytest
import torch

from splitinfer.engine.sampler import Sampler
from splitinfer.engine.sequence import Sequence
from splitinfer.protocol import SamplingParams

VOCAB = 50
EOS = 49


def seq(params: SamplingParams, prompt: list[int] = (1, 2), outputs: list[int] = (), seed: int | None = None) -> Sequence:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    s = Sequence("r", list(prompt), params, generator)
    s.token_ids += list(outputs)
    return s


def sampler(seed: int = 0) -> Sampler:
    return Sampler(VOCAB, frozenset({EOS}), torch.Generator().manual_seed(seed))


def logits_of(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def ramp() -> list[float]:
    """Token i has logit i / 10: a known order, token 49 most likely."""
    return [i / 10 for i in range(VOCAB)]


def draws(params: SamplingParams, row: list[float], count: int = 400) -> list[int]:
    s, batch = sampler(1), [seq(params) for _ in range(count)]
    return s(torch.tensor([row] * count), batch).token_ids


def test_greedy_rows_take_the_argmax_beside_sampled_rows() -> None:
    rows = logits_of(ramp(), ramp()[::-1], ramp())
    out = sampler()(rows, [seq(SamplingParams(temperature=0)), seq(SamplingParams(temperature=1.5)),
                           seq(SamplingParams(temperature=0, ignore_eos=True))])
    assert out.token_ids[0] == 49 and out.token_ids[2] == 49


def test_temperature_sampling_follows_the_softmax() -> None:
    row = [0.0] * VOCAB
    row[3], row[7] = 2.0, 1.0  # p(3) : p(7) = e : 1 at T=1, e^2 : 1 at T=0.5
    for temperature, ratio in ((1.0, math.e), (0.5, math.e ** 2)):
        picks = draws(SamplingParams(temperature=temperature, top_k=2), row, count=3000)
        assert set(picks) <= {3, 7}
        assert picks.count(3) / picks.count(7) == pytest.approx(ratio, rel=0.15)


def test_top_k_keeps_only_the_k_most_likely() -> None:
    assert set(draws(SamplingParams(temperature=2.0, top_k=3), ramp())) <= {47, 48, 49}
    assert set(draws(SamplingParams(temperature=5.0, top_k=1), ramp())) == {49}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    row = [-30.0] * VOCAB
    for token, logit in ((10, math.log(0.5)), (11, math.log(0.3)), (12, math.log(0.2))):
        row[token] = logit
    assert set(draws(SamplingParams(top_p=0.75), row)) == {10, 11}  # 0.5 < 0.75 <= 0.8
    assert set(draws(SamplingParams(top_p=0.5), row)) == {10}
    assert set(draws(SamplingParams(top_p=0.85), row)) == {10, 11, 12}


def test_min_p_drops_tokens_below_a_share_of_the_top_probability() -> None:
    row = [-30.0] * VOCAB
    for token, logit in ((10, math.log(0.5)), (11, math.log(0.3)), (12, math.log(0.2))):
        row[token] = logit
    assert set(draws(SamplingParams(min_p=0.5), row)) == {10, 11}  # 0.2 < 0.5 * 0.5


def test_presence_and_frequency_penalties_subtract_as_openai_defines() -> None:
    row = [0.0] * VOCAB
    row[5], row[6] = 3.0, 2.0
    greedy = dict(temperature=0)
    # token 5 already generated twice: frequency 0.6 * 2 = 1.2 takes it below token 6
    assert sampler()(logits_of(row), [seq(SamplingParams(frequency_penalty=0.6, **greedy), outputs=[5, 5])]).token_ids == [6]
    assert sampler()(logits_of(row), [seq(SamplingParams(frequency_penalty=0.4, **greedy), outputs=[5, 5])]).token_ids == [5]
    assert sampler()(logits_of(row), [seq(SamplingParams(presence_penalty=1.1, **greedy), outputs=[5, 5])]).token_ids == [6]
    assert sampler()(logits_of(row), [seq(SamplingParams(presence_penalty=0.9, **greedy), outputs=[5, 5])]).token_ids == [5]
    # the prompt does not count for presence or frequency
    assert sampler()(logits_of(row), [seq(SamplingParams(presence_penalty=2, **greedy), prompt=[5])]).token_ids == [5]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens() -> None:
    row = [-5.0] * VOCAB
    row[5], row[6], row[7] = 3.0, 2.0, -1.0
    greedy = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sampler()(logits_of(row), [seq(greedy, prompt=[5])]).token_ids == [6], "3 / 2 < 2: seen in the prompt"
    row[6] = -0.5
    # all of 5 (3 -> 1.5) and 6 (-0.5 -> -1) seen; 7 unseen stays -1: 5 still wins
    assert sampler()(logits_of(row), [seq(greedy, prompt=[5], outputs=[6])]).token_ids == [5]
    probe = logits_of(row)
    sampler()._apply_penalties(probe, [seq(greedy, prompt=[5], outputs=[6])])
    assert probe[0, 5].item() == 1.5 and probe[0, 6].item() == -1.0 and probe[0, 7].item() == -1.0


def test_logit_bias_adds_to_the_logits() -> None:
    out = sampler()(logits_of(ramp()), [seq(SamplingParams(temperature=0, logit_bias={3: 100.0}))])
    assert out.token_ids == [3]
    out = sampler()(logits_of(ramp()), [seq(SamplingParams(temperature=0, logit_bias={49: -100.0}))])
    assert out.token_ids == [48]


def test_min_tokens_suppresses_eos_and_stop_tokens_until_reached() -> None:
    row = ramp()  # eos (49) is the argmax
    early = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=(48,))
    assert sampler()(logits_of(row), [seq(early, outputs=[1])]).token_ids == [47]
    assert sampler()(logits_of(row), [seq(early, outputs=[1, 2, 3])]).token_ids == [49]
    ignoring = SamplingParams(temperature=0, min_tokens=3, ignore_eos=True)
    assert sampler()(logits_of(row), [seq(ignoring, outputs=[1])]).token_ids == [49], \
        "with ignore_eos, eos is an ordinary token: nothing to suppress"


def test_logprobs_come_from_the_raw_distribution() -> None:
    row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0, logprobs=5, logit_bias={0: 50.0}), SamplingParams(logprobs=0),
              SamplingParams()]
    out = sampler()(torch.stack([row, row, row]), [seq(p) for p in params])
    reference = row.log_softmax(-1)
    first, second, third = out.logprobs
    assert first.token_id == 0 and first.logprob == pytest.approx(reference[0].item(), abs=1e-6), \
        "the chosen token's logprob ignores the bias that chose it"
    top = reference.topk(5)
    assert [t for t, _ in first.top] == top.indices.tolist()
    assert [lp for _, lp in first.top] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert second.top == [] and second.logprob == pytest.approx(reference[second.token_id].item(), abs=1e-6)
    assert third is None


def test_a_seeded_row_draws_the_same_tokens_whatever_its_batch_and_position() -> None:
    params = SamplingParams(temperature=1.0)
    row = torch.zeros(VOCAB)

    def run(batch_size: int, position: int) -> list[int]:
        target = seq(params, seed=1234)
        others = [seq(SamplingParams(temperature=0.7), seed=None if i % 2 else i) for i in range(batch_size - 1)]
        batch = others[:position] + [target] + others[position:]
        s = sampler(seed=batch_size)
        return [s(row.expand(batch_size, VOCAB).clone(), batch).token_ids[position] for _ in range(20)]

    alone = run(1, 0)
    assert run(4, 2) == alone and run(7, 6) == alone
    assert len(set(alone)) > 1
    other = seq(params, seed=99)
    assert [sampler()(row[None].clone(), [other]).token_ids[0] for _ in range(20)] != alone


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logit_bias": {1: 150}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"logprobs": 21}, "logprobs"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"top_k": 1.5}, "top_k"),
])
def test_invalid_sampling_settings_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


# Hostile values: refused when built, or sampled without overflow -------------------------

FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
INT_FIELDS = ("max_tokens", "min_tokens", "top_k", "seed", "logprobs")
HOSTILE_NUMBERS = (2**63, -(2**63) - 1, 2**64, 10**400, -(10**400), math.inf, -math.inf, math.nan, 1e308, -1e308)


@pytest.mark.parametrize("field", FLOAT_FIELDS + INT_FIELDS)
@pytest.mark.parametrize("value", HOSTILE_NUMBERS, ids=lambda v: f"{v:.3g}" if isinstance(v, float) else
                         f"int{v.bit_length()}b")
def test_every_numeric_field_refuses_what_the_engine_cannot_represent(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be") as refused:
        SamplingParams(max_tokens=2**62, **{field: value}) if field != "max_tokens" else SamplingParams(max_tokens=value)
    assert len(str(refused.value)) < 200, "the message describes a huge number instead of printing it"


@pytest.mark.parametrize("field", ["logit_bias", "stop_token_ids"])
@pytest.mark.parametrize("token", [2**32, 2**63, 10**400, -1])
def test_token_ids_must_fit_the_wires_uint32(field: str, token: int) -> None:
    value = {token: 1.0} if field == "logit_bias" else [token]
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("bias", [math.nan, math.inf, 10**400, 2**63])
def test_logit_bias_values_are_finite_and_in_range(bias: object) -> None:
    with pytest.raises(ValueError, match="^logit_bias"):
        SamplingParams(logit_bias={3: bias})


def test_ints_given_for_floats_are_stored_as_floats() -> None:
    params = SamplingParams(temperature=1, top_p=1, repetition_penalty=2, presence_penalty=-2, logit_bias={3: 5})
    assert all(type(getattr(params, name)) is float for name in FLOAT_FIELDS)
    assert type(params.logit_bias[3]) is float


def test_the_widest_accepted_values_sample_without_error_or_nan() -> None:
    extremes = [
        SamplingParams(temperature=100, top_k=2**63 - 1, repetition_penalty=100, presence_penalty=2,
                       frequency_penalty=-2, logit_bias={0: 100.0, 1: -100.0}, seed=2**63 - 1, logprobs=20),
        SamplingParams(temperature=1e-300, seed=-(2**63), min_p=1.0, top_p=1e-300),
        SamplingParams(temperature=5e-324, top_k=-1),
        SamplingParams(temperature=1e-30, repetition_penalty=0.01),
    ]
    batch = [seq(p, outputs=[3, 3, 4], seed=p.seed) for p in extremes]
    out = sampler()(logits_of(ramp(), ramp(), ramp(), ramp()), batch)
    assert all(0 <= t < VOCAB for t in out.token_ids)
    assert out.token_ids[1] == 49 and out.token_ids[2] == 49, "a vanishing temperature is (nearly) greedy"
    assert out.token_ids[3] == 4, "the smallest repetition penalty lifts the best seen token (0.4 / 0.01) above all"
    assert not any(math.isnan(lp) for _, lp in out.logprobs[0].top)
