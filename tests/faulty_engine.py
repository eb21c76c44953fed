"""The real engine process with one injected fault, for the containment tests:

    python tests/faulty_engine.py MODE ENGINE-ARGS...

Everything is the real engine (`python -m splitinfer.engine`) except the model runner:
- `poison`: its forward raises whenever a request whose prompt starts with POISON is in
  the batch: a bug that one request's input trips;
- `dead`: once such a request has arrived, every forward raises, one with no request in
  it too: a device that died.
"""

from __future__ import annotations

import sys

from splitinfer.engine.__main__ import main
from splitinfer.engine.cuda_graph import DecodeGraphRunner
from splitinfer.engine.model_runner import ModelRunner

POISON = 7


class InjectedFault(RuntimeError):
    pass


def inject(mode: str) -> None:
    real_compute_logits = ModelRunner.compute_logits
    real_decode = DecodeGraphRunner.run
    state = {"dead": False}

    def compute_logits(self: ModelRunner, step):
        if any(item.seq.prompt_token_ids[0] == POISON for item in step.scheduled):
            state["dead"] = mode == "dead"
            raise InjectedFault("injected fault: a poisoned request is in the batch")
        if state["dead"]:
            raise InjectedFault("injected fault: the device is gone")
        return real_compute_logits(self, step)

    def decode(self: DecodeGraphRunner, *args, **kwargs):
        if state["dead"]:
            raise InjectedFault("injected fault: the device is gone")
        return real_decode(self, *args, **kwargs)

    ModelRunner.compute_logits = compute_logits
    DecodeGraphRunner.run = decode


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("poison", "dead"):
        sys.exit(__doc__)
    inject(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
