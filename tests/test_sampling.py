"""The batched sampler, one setting at a time, on synthetic logits: what each setting allows,
forbids or changes, per row, whatever its batch-mates ask for."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

from splitinfer.engine.request import Request
from splitinfer.engine.sampler import Sampler, needs_sort
from splitinfer.protocol import SamplingParams

VOCAB = 50
EOS = 49


def seq(
    params: SamplingParams, prompt: list[int] = (1, 2), outputs: list[int] = (), seed: int | None = None
) -> Request:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    s = Request("r", list(prompt), params, generator)
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
    out = sampler()(
        rows,
        [
            seq(SamplingParams(temperature=0)),
            seq(SamplingParams(temperature=1.5)),
            seq(SamplingParams(temperature=0, ignore_eos=True)),
        ],
    )
    assert out.token_ids[0] == 49 and out.token_ids[2] == 49


def test_temperature_sampling_follows_the_softmax() -> None:
    row = [0.0] * VOCAB
    row[3], row[7] = 2.0, 1.0  # p(3) : p(7) = e : 1 at T=1, e^2 : 1 at T=0.5
    for temperature, ratio in ((1.0, math.e), (0.5, math.e**2)):
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
    assert sampler()(
        logits_of(row), [seq(SamplingParams(frequency_penalty=0.6, **greedy), outputs=[5, 5])]
    ).token_ids == [6]
    assert sampler()(
        logits_of(row), [seq(SamplingParams(frequency_penalty=0.4, **greedy), outputs=[5, 5])]
    ).token_ids == [5]
    assert sampler()(
        logits_of(row), [seq(SamplingParams(presence_penalty=1.1, **greedy), outputs=[5, 5])]
    ).token_ids == [6]
    assert sampler()(
        logits_of(row), [seq(SamplingParams(presence_penalty=0.9, **greedy), outputs=[5, 5])]
    ).token_ids == [5]
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
    assert sampler()(logits_of(row), [seq(ignoring, outputs=[1])]).token_ids == [49], (
        "with ignore_eos, eos is an ordinary token: nothing to suppress"
    )


def test_logprobs_come_from_the_raw_distribution() -> None:
    row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3))
    params = [
        SamplingParams(temperature=0, logprobs=5, logit_bias={0: 50.0}),
        SamplingParams(logprobs=0),
        SamplingParams(),
    ]
    out = sampler()(torch.stack([row, row, row]), [seq(p) for p in params])
    reference = row.log_softmax(-1)
    first, second, third = out.logprobs
    assert first.token_id == 0 and first.logprob == pytest.approx(reference[0].item(), abs=1e-6), (
        "the chosen token's logprob ignores the bias that chose it"
    )
    top = reference.topk(5)
    assert [t for t, _ in first.top] == top.indices.tolist()
    assert [lp for _, lp in first.top] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert second.top == () and second.logprob == pytest.approx(reference[second.token_id].item(), abs=1e-6)
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


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {1: 150}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"logprobs": 21}, "logprobs"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"top_k": 1.5}, "top_k"),
    ],
)
def test_invalid_sampling_settings_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


# Hostile values: refused when built, or sampled without overflow -------------------------

FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
INT_FIELDS = ("max_tokens", "min_tokens", "top_k", "seed", "logprobs")
HOSTILE_NUMBERS = (2**63, -(2**63) - 1, 2**64, 10**400, -(10**400), math.inf, -math.inf, math.nan, 1e308, -1e308)


@pytest.mark.parametrize("field", FLOAT_FIELDS + INT_FIELDS)
@pytest.mark.parametrize(
    "value", HOSTILE_NUMBERS, ids=lambda v: f"{v:.3g}" if isinstance(v, float) else f"int{v.bit_length()}b"
)
def test_every_numeric_field_refuses_what_the_engine_cannot_represent(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be") as refused:
        SamplingParams(max_tokens=2**62, **{field: value}) if field != "max_tokens" else SamplingParams(
            max_tokens=value
        )
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
        SamplingParams(
            temperature=100,
            top_k=2**63 - 1,
            repetition_penalty=100,
            presence_penalty=2,
            frequency_penalty=-2,
            logit_bias={0: 100.0, 1: -100.0},
            seed=2**63 - 1,
            logprobs=20,
        ),
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


# One upload, one read-back, and a sort only for the rows that truncate -----------------


class CallLog(TorchFunctionMode):
    """Every torch function and tensor method called under it, with its arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple, dict]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.calls.append((getattr(func, "__name__", str(func)), args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def holds_a_list(index: object) -> bool:
    return isinstance(index, list) or (isinstance(index, tuple) and any(isinstance(i, list) for i in index))


def test_a_step_builds_two_host_tensors_and_reads_back_only_its_tokens() -> None:
    """The CPU stand-in for the CUDA sync budget: on CUDA each tensor built from Python data (by
    torch.tensor, or a Python list used as an index) is an upload, and these calls wait for the device."""
    batch = [
        SamplingParams(temperature=0, logit_bias={5: 9.0}),
        SamplingParams(temperature=0.8),
        SamplingParams(top_p=0.9, seed=1),
        SamplingParams(top_k=20),
        SamplingParams(min_tokens=5, seed=2),
        SamplingParams(temperature=0.7, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.3),
        SamplingParams(min_p=0.1, seed=3, logit_bias={9: -3.0}, stop_token_ids=(7,), min_tokens=9),
    ]
    seqs = [seq(p, outputs=[11, 12, 11], seed=p.seed) for p in batch]
    logits = logits_of(*[ramp()] * len(batch))
    with CallLog() as log:
        sampler()(logits, seqs)
    names = [name for name, _, _ in log.calls]
    assert sum(name in ("tensor", "as_tensor") for name in names) <= 2, "more than one float32 and one int64 tensor"
    list_indexed = [
        args[1] for name, args, _ in log.calls if name in ("__getitem__", "__setitem__") and holds_a_list(args[1])
    ]
    assert not list_indexed, "a Python list as an index is an upload that waits on CUDA"
    assert not {"item", "nonzero", "masked_select", "__bool__", "__int__", "__float__", "__index__"} & set(names)
    assert names.count("tolist") == 1
    assert not [kwargs for name, _, kwargs in log.calls if name == "index_put_" and kwargs.get("accumulate")], (
        "older torch reads the index range back for index_put_(accumulate=True)"
    )


def test_logprobs_add_one_read_back_whatever_how_many_rows_ask() -> None:
    """The chosen token's logprob and the top k of every row come back in one read, not three."""
    seqs = [
        seq(SamplingParams(temperature=0, logprobs=3)),
        seq(SamplingParams(temperature=0.8, logprobs=0)),
        seq(SamplingParams(top_p=0.9, seed=1)),
        seq(SamplingParams(temperature=0, logprobs=20)),
    ]
    with CallLog() as log:
        out = sampler()(logits_of(*[ramp()] * len(seqs)), seqs)
    assert [name for name, _, _ in log.calls].count("tolist") == 2
    assert [len(lp.top) if lp else None for lp in out.logprobs] == [3, 0, None, 20]
    assert all(isinstance(token, int) for lp in out.logprobs if lp for token, _ in lp.top)


@pytest.mark.parametrize(
    ("kwargs", "needed"),
    [
        ({}, False),
        ({"top_k": -1}, False),
        ({"top_k": VOCAB}, False),
        ({"top_k": 10**6, "top_p": 1.0, "min_p": 0.0}, False),
        ({"temperature": 0, "top_k": 3, "top_p": 0.5, "min_p": 0.2}, False),
        ({"top_k": VOCAB - 1}, True),
        ({"top_p": 0.99}, True),
        ({"min_p": 1e-6}, True),
    ],
)
def test_only_rows_with_top_k_top_p_or_min_p_need_the_sort(kwargs: dict, needed: bool) -> None:
    assert needs_sort(SamplingParams(**kwargs), VOCAB) is needed


def test_a_batch_sorts_only_the_rows_that_need_it(monkeypatch: pytest.MonkeyPatch) -> None:
    sorted_rows = []
    original = torch.Tensor.sort

    def spy(self: torch.Tensor, *args: object, **kwargs: object) -> object:
        sorted_rows.append(self.shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sort", spy)
    untruncated = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8),
        SamplingParams(top_k=VOCAB),
        SamplingParams(top_k=-1, top_p=1.0, min_p=0.0, seed=5),
    ]
    out = sampler()(logits_of(*[ramp()] * 4), [seq(p, seed=p.seed) for p in untruncated])
    assert sorted_rows == [], "no row truncates, yet the logits were sorted"
    assert out.token_ids[0] == 49
    batch = [seq(p, seed=p.seed) for p in [*untruncated, SamplingParams(top_p=0.5)]]
    out = sampler()(logits_of(*[ramp()] * 5), batch)
    assert sorted_rows == [1], "only the top-p row is sorted"
    assert out.token_ids[0] == 49 and out.token_ids[4] in (45, 46, 47, 48, 49)


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, min_p=1e-9)], ids=["unsorted", "sorted"]
)
def test_both_races_draw_from_the_softmax_of_logits_over_temperature(params: SamplingParams) -> None:
    row = [-30.0] * VOCAB  # tokens 5..9 carry all the mass; min_p=1e-9 drops only the rest
    for token, logit in zip(range(5, 10), (0.0, 0.4, 0.8, 1.2, 1.6)):
        row[token] = logit
    expected = (torch.tensor(row) / 0.7).softmax(-1)
    picks = torch.tensor(draws(params, row, count=4000))
    assert set(picks.tolist()) <= set(range(5, 10))
    for token in range(5, 10):
        p = expected[token].item()
        share = (picks == token).float().mean().item()
        assert share == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / len(picks))), f"token {token}"


def test_greedy_rows_take_the_argmax_beside_every_other_kind_of_row() -> None:
    kinds = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.5),
        SamplingParams(temperature=1.5, top_k=3),
        SamplingParams(temperature=0, top_p=0.1),
        SamplingParams(temperature=2.0, min_p=0.5, seed=3),
        SamplingParams(temperature=1.0, seed=4),
    ]
    rows = [ramp()[::-1] if i % 2 else ramp() for i in range(len(kinds))]
    for step in range(10):
        out = sampler(seed=step)(logits_of(*rows), [seq(p, seed=p.seed) for p in kinds])
        assert out.token_ids[0] == 49 and out.token_ids[3] == 0
        assert out.token_ids[2] in (47, 48, 49)


def test_unseeded_rows_draw_the_same_whatever_seeded_rows_sit_between_them() -> None:
    """The engine's generator draws one block for the unseeded rows, in row order, so seeded
    rows beside them change nothing."""
    row = torch.zeros(VOCAB)
    unseeded = [SamplingParams(temperature=1.0), SamplingParams(top_p=0.9), SamplingParams(temperature=0.5)]
    seeded = [SamplingParams(temperature=1.0, seed=8), SamplingParams(top_k=5, seed=9)]
    alone = sampler(seed=3)(row.expand(3, VOCAB).clone(), [seq(p) for p in unseeded]).token_ids
    mixed = [unseeded[0], seeded[0], unseeded[1], seeded[1], unseeded[2]]
    out = sampler(seed=3)(row.expand(5, VOCAB).clone(), [seq(p, seed=p.seed) for p in mixed]).token_ids
    assert [out[0], out[2], out[4]] == alone


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.9, top_k=20)],
    ids=["untruncated", "truncated"],
)
def test_a_seeded_row_draws_the_same_tokens_whatever_its_batch_mates_ask_for(params: SamplingParams) -> None:
    row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))

    def run(mates: list[SamplingParams]) -> list[int]:
        target = seq(params, seed=2024)
        s = sampler(seed=len(mates))
        batch = [seq(p, seed=p.seed) for p in mates[:1]] + [target] + [seq(p, seed=p.seed) for p in mates[1:]]
        return [s(row.expand(len(batch), VOCAB).clone(), batch).token_ids[1] for _ in range(20)]

    alone = run([SamplingParams(temperature=0)])
    assert len(set(alone)) > 1
    assert run([SamplingParams(top_p=0.8), SamplingParams(min_p=0.1, seed=1)]) == alone, "beside truncated rows"
    assert run([SamplingParams(temperature=1.2), SamplingParams(temperature=0, seed=6)]) == alone, (
        "beside untruncated and greedy rows"
    )


def test_bias_stop_suppression_and_penalties_stay_in_their_own_rows() -> None:
    row = ramp()  # eos (49) is the argmax, then 48
    batch = [
        seq(SamplingParams(temperature=0, logit_bias={3: 100.0, 7: 1.0})),
        seq(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(48,)), outputs=[1]),
        seq(SamplingParams(temperature=0, frequency_penalty=2.0, repetition_penalty=2.0), outputs=[49, 49]),
        seq(SamplingParams(temperature=0)),
        seq(SamplingParams(temperature=0, logit_bias={48: 0.5}, presence_penalty=1.0), outputs=[49]),
    ]
    assert sampler()(logits_of(*[row] * 5), batch).token_ids == [3, 47, 48, 49, 48]


# On CUDA: one wait for the device per step ------------------------------------------------

CUDA_VOCAB = 4096
CUDA_BATCHES = {
    "mixed": [
        SamplingParams(temperature=0, logit_bias={5: 100.0}),
        SamplingParams(temperature=0.8),
        SamplingParams(top_p=0.9, seed=1),
        SamplingParams(top_k=20),
        SamplingParams(min_tokens=5, stop_token_ids=(7,), seed=2),
        SamplingParams(temperature=0.7, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.3),
        SamplingParams(min_p=0.1, seed=3, logit_bias={9: -3.0}),
    ],
    "untruncated": [
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=1.0, frequency_penalty=1.0),
        SamplingParams(temperature=0, logit_bias={5: 100.0}),
        SamplingParams(min_tokens=4),
    ],
    "truncated-and-seeded": [
        SamplingParams(top_k=50, seed=4),
        SamplingParams(top_p=0.5, min_p=0.05, seed=5),
        SamplingParams(temperature=0, logit_bias={5: 100.0}, seed=6),
    ],
    "greedy": [
        SamplingParams(temperature=0, logit_bias={5: 100.0}),
        SamplingParams(temperature=0, min_tokens=4, stop_token_ids=(7,)),
    ],
}


def cuda_seqs(batch: list[SamplingParams]) -> list[Request]:
    seqs = []
    for i, params in enumerate(batch):
        generator = torch.Generator("cuda").manual_seed(params.seed) if params.seed is not None else None
        s = Request(f"r{i}", list(range(1, 9)), params, generator)
        s.token_ids += [11, 12, 11]  # three outputs: a min_tokens above 3 still suppresses stop tokens
        seqs.append(s)
    return seqs


def synchronizing_calls(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CUDA_BATCHES))
def test_a_cuda_step_waits_for_the_device_only_to_read_its_tokens_back(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    batch = CUDA_BATCHES[name]
    s = Sampler(CUDA_VOCAB, frozenset({CUDA_VOCAB - 1}), torch.Generator("cuda").manual_seed(0))
    logits = torch.randn(len(batch), CUDA_VOCAB, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    s(logits, cuda_seqs(batch))  # lazy initialisation and the first pinned blocks, outside the count
    seqs = cuda_seqs(batch)
    torch.cuda.synchronize()

    uploads = []  # torch's debug mode misses a non_blocking copy from pageable memory: check those here
    original_to = torch.Tensor.to

    def recording_to(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        out = original_to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type == "cuda":
            uploads.append((self, kwargs.get("non_blocking", False)))
        return out

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = s(logits, seqs)
        with warnings.catch_warnings(record=True) as control:
            warnings.simplefilter("always")
            torch.zeros(1, device="cuda").item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()

    assert len(synchronizing_calls(control)) == 1, "the debug mode's warning is not recognised: the count means nothing"
    assert len(synchronizing_calls(caught)) <= 1, synchronizing_calls(caught)
    assert len(uploads) <= 2, "more than one float32 and one int64 upload"
    assert all(host.is_pinned() and non_blocking for host, non_blocking in uploads)
    assert all(0 <= t < CUDA_VOCAB for t in out.token_ids)
    for params, token in zip(batch, out.token_ids):
        if params.logit_bias.get(5) == 100.0:
            assert token == 5
        if params.min_tokens > 3:
            assert token not in (*params.stop_token_ids, CUDA_VOCAB - 1)
