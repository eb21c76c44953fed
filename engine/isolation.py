"""Running a step's forward so that a failure is pinned on the requests that cause it.

A step batches many clients' requests into one forward, so one request whose values trip
a bug (in the sampler, say) would otherwise fail every request in the batch, or, as
happened once, end the engine process. `IsolatingExecutor.execute` runs the whole batch
first; only when that raises does it bisect: each half runs on its own, and a half that
fails is split again, down to single requests. A batch with k failing requests among n
costs about 2k log2(n) extra forwards, paid only when something failed. Before bisecting,
a probe forward with no request in it checks the device: if that fails too, no request is
to blame and `EngineDeadError` is raised instead.

Re-running is safe because nothing a failed attempt did is kept: a forward writes K/V only
into the slots of the tokens it computes, which stay uncommitted (and out of the prefix
cache) until the step succeeds, so the next attempt simply overwrites them. The one other
state a forward advances is a seeded request's random generator; it is saved before the
first attempt and restored before each retry, so a request that survives a neighbour's
failure samples exactly what it would have sampled in a clean run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from splitinfer.engine.errors import EngineDeadError
from splitinfer.engine.grammar import StepMasks
from splitinfer.engine.model_runner import ModelRunner
from splitinfer.engine.scheduler import ScheduledSeq, SchedulerOutput
from splitinfer.protocol import TokenLogprobs

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ItemResult:
    """What a step gave one request: the token it sampled (None if it did not sample) with its
    logprobs, and the prompt logprobs it computed (empty if none)."""

    token: int | None = None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()


@dataclass(slots=True)
class ExecutionResult:
    """What one step's forward gave: a result per request id that sampled or scored prompt
    tokens and succeeded, and each request whose forward failed on its own, with the
    exception it raised."""

    results: dict[str, ItemResult]
    failures: list[tuple[ScheduledSeq, Exception]]


class IsolatingExecutor:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._masks: StepMasks | None = None  # the step being executed's

    def execute(self, items: list[ScheduledSeq], masks: StepMasks | None = None) -> ExecutionResult:
        """Run `items`' forward and sampling (constrained rows under their masks in `masks`, which
        stay valid for every retry: grammars advance only once the step is committed)."""
        self._masks = masks
        saved = _generator_states(items)
        outcome = self._attempt(items, saved, first=True)
        if not isinstance(outcome, Exception):
            return ExecutionResult(outcome, [])
        self._check_device()
        result = ExecutionResult({}, [])
        if len(items) == 1:
            result.failures.append((items[0], outcome))
        else:
            self._bisect(items, saved, result)
        return result

    def _attempt(
        self, items: list[ScheduledSeq], saved: dict[str, torch.Tensor], first: bool = False
    ) -> dict[str, ItemResult] | Exception:
        """Run `items`: their results, or the exception they raised, with their generators
        restored. The exception comes back without its traceback, whose frames hold the failed
        forward's activations: on a GPU that memory must be free for the probe and the retries
        (an out-of-memory error is the likeliest failure there). The first is logged with it."""
        try:
            return self._run(items)
        except EngineDeadError:
            raise  # tensor-parallel ranks out of step: no probe or retry can run, the engine stops
        except Exception as exc:
            failure = exc
        if first:
            logger.error(
                "a step of %d request(s) failed; running them apart to find which fail", len(items), exc_info=failure
            )
        _restore(saved, items)
        return failure.with_traceback(None)

    def _check_device(self) -> None:
        try:
            self.runner.probe()
        except Exception as exc:
            raise EngineDeadError(
                f"a forward with no request in it fails too ({type(exc).__name__}: {exc}); "
                "the device or the model is broken"
            ) from exc

    def _run(self, items: list[ScheduledSeq]) -> dict[str, ItemResult]:
        out = self.runner.execute(SchedulerOutput(items, []), self._masks)
        results = {rid: ItemResult(prompt_logprobs=scored) for rid, scored in out.prompt_logprobs.items()}
        sampling = [item.seq.request_id for item in items if item.samples]
        for rid, token, logprobs in zip(sampling, out.sampled.token_ids, out.sampled.logprobs):
            result = results.setdefault(rid, ItemResult())
            result.token, result.logprobs = token, logprobs
        return results

    def _bisect(self, items: list[ScheduledSeq], saved: dict[str, torch.Tensor], result: ExecutionResult) -> None:
        """`items` failed together: run each half apart, splitting the failing ones further."""
        middle = len(items) // 2
        for part in (items[:middle], items[middle:]):
            outcome = self._attempt(part, saved)
            if not isinstance(outcome, Exception):
                result.results.update(outcome)
            elif len(part) > 1:
                self._bisect(part, saved, result)
            else:
                self._check_device()  # a device that died mid-bisection is no request's fault
                result.failures.append((part[0], outcome))


def _generator_states(items: list[ScheduledSeq]) -> dict[str, torch.Tensor]:
    """The state of every seeded generator that this step may advance."""
    return {
        item.seq.request_id: item.seq.generator.get_state()
        for item in items
        if item.samples and item.seq.generator is not None
    }


def _restore(saved: dict[str, torch.Tensor], items: list[ScheduledSeq]) -> None:
    for item in items:
        state = saved.get(item.seq.request_id)
        if state is not None:
            item.seq.generator.set_state(state)
