"""The kernel benchmark CLI: on CPU it runs its correctness sweep under the interpreter."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the suite times kernels; too slow for a test")
def test_bench_cli_checks_kernels_and_writes_csv(tmp_path: Path) -> None:
    out = tmp_path / "bench.csv"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "splitinfer.kernels.bench", "--kernel", "rms_norm", "--kernel", "paged_decode",
         "--csv", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "say nothing about GPU speed" in result.stderr
    rows = list(csv.DictReader(out.open()))
    assert [row["kernel"] for row in rows] == ["rms_norm", "rms_norm", "paged_decode", "paged_decode"]
    assert all(row["correct"] == "ok" and row["torch"] == torch.__version__ for row in rows)
    assert "| paged_decode" in result.stdout
