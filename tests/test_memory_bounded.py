"""Memory that one workload leaves behind must not grow with the next: prefill steps of
hundreds of distinct lengths through the engine's CPU matmuls leave its RSS flat. (oneDNN
keeps native state for every input shape its prepacked matmuls have seen: with prefill
going through them, RSS grew with every new length, without bound.)

Measured in a fresh process, so nothing else in the test run moves the number.
`scripts/soak_engine.py` is the long version, through a real engine process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from splitinfer.engine import cpu_linear

PROBE = r"""
import json, random, sys
from splitinfer.engine import EngineConfig, EngineCore, SamplingParams

def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

core = EngineCore(EngineConfig(model=sys.argv[1], device="cpu", dtype="float32", kv_cache_gb=0.05,
                               max_num_batched_tokens=1024, enable_prefix_caching=False))
rng = random.Random(0)
# Warm-up: every fourth length up to 600, longest first (the heap reaches the high-water
# mark of the longest activations), then 150 new lengths in that range (the allocators
# settle); measured: 150 more new lengths.
warm = list(range(600, 3, -4))
new = [n for n in range(5, 605) if n % 4]
rng.shuffle(new)
settle, measured = new[:150], new[150:300]
def prefill(n):
    core.add_request(f"r{n}", [rng.randrange(500) for _ in range(n)], SamplingParams(max_tokens=1))
    while core.has_unfinished():
        core.step()
for n in warm + settle:
    prefill(n)
before = rss_mb()
for n in measured:
    prefill(n)
print(json.dumps({"before_mb": before, "after_mb": rss_mb(), "lengths": len(measured),
                  "prepacked": core.model.packed_lm_head is not None}))
"""


@pytest.mark.skipif(
    cpu_linear.check_prepack(__import__("torch").float32) is not None or not Path("/proc/self/status").exists(),
    reason="needs oneDNN prepacking and /proc",
)
def test_hundreds_of_distinct_prefill_lengths_leave_rss_flat(tiny_checkpoint: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(tiny_checkpoint)], capture_output=True, text=True, timeout=300, check=True
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["prepacked"], "the engine must have prepacked its weights for this test to mean anything"
    growth = measured["after_mb"] - measured["before_mb"]
    # Measured: 2 to 5 MB; with prefill through the prepacked matmuls as before, 69 MB.
    assert growth < 20, f"RSS grew {growth:.0f} MB over {measured['lengths']} new distinct prefill lengths"
