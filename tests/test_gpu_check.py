"""scripts/gpu_check.sh, the one command that proves the GPU path on a GPU machine: its dry run
on CPU must run every step's plumbing and say that no GPU numbers were taken. The dry run is
also the end-to-end test of the kernel benchmark's CLI and of bench_engine.py, which it calls
as a user would."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
STEPS = ["install", "checkpoint", "device", "tests", "kernels", "engine", "http", "tp", "sanitizer"]


def run_check(*args: str, out: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "TRITON_CACHE_DIR": str(out / "triton")}
    return subprocess.run([str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_runs_every_step_at_toy_sizes_and_says_no_gpu_was_measured(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run_check("--dry-run", "--model", str(tiny_checkpoint), out=out)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "DRY RUN" in result.stdout and "every step passed" in result.stdout
    with (out / "steps.csv").open() as f:
        status = {row["step"]: row["status"] for row in csv.DictReader(f)}
    assert list(status) == STEPS
    # Nothing to install where the tests run, the checkpoint is given, no sanitizer on a dry run.
    assert status == {step: "skipped" if step in ("install", "checkpoint", "sanitizer") else "ok" for step in STEPS}
    summary = (out / "summary.md").read_text()
    assert "no GPU numbers were taken" in summary and "every step passed" in summary
    assert "skipped" in summary.split("## GPU tests")[1].split("##")[0]  # the gpu tests ran, and skipped
    assert (out / "pytest.log").is_file() and json.loads((out / "device.json").read_text())["copy_gbps"] > 0

    # The kernel benchmark: its interpreter sweep on CPU, rows in the CSV with the versions.
    assert "say nothing about GPU speed" in (out / "kernels.log").read_text()
    with (out / "kernels.csv").open() as f:
        kernels = list(csv.DictReader(f))
    assert [row["kernel"] for row in kernels] == ["rms_norm", "rms_norm", "paged_decode", "paged_decode"]
    assert all(row["correct"] == "ok" and row["torch"] == torch.__version__ for row in kernels)

    # The engine against transformers: every row it promises, ratios and the roofline.
    engine = json.loads((out / "engine.json").read_text())
    rows = {row["measure"]: row for row in engine["rows"]}
    assert list(rows) == [
        "batch-1 decode tok/s",
        "prefill 16 tok/s",
        "prefill 40 tok/s",
        "1 concurrent, output tok/s (HF padded batch)",
        "3 concurrent, output tok/s (HF padded batch)",
        "3 concurrent, output tok/s (HF one at a time)",
    ]
    assert all(row["ours"] > 0 and row["transformers"] > 0 and row["ratio"] > 0 for row in rows.values())
    assert "GB/s" in rows["batch-1 decode tok/s"]["notes"] and "GFLOP/s" in (out / "engine.log").read_text()
    assert rows["batch-1 decode tok/s"]["roofline_pct"] > 0 and engine["weight_bytes"] > 0

    # Load through both servers for the given time, none failed.
    http = json.loads((out / "http.json").read_text())
    assert http[0]["requests"] > 0 and http[0]["failed"] == 0 and http[0]["duration_s"] >= 2
    servers = sorted((out / "serve").glob("server-*.log"))
    assert len(servers) == 2 and all("POST /v1/completions" in log.read_text() for log in servers)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_real_run_refuses_and_points_to_the_dry_run(tmp_path: Path) -> None:
    result = run_check(out=tmp_path / "out", timeout=60)
    assert result.returncode == 2
    assert "--dry-run" in result.stderr


def test_help_names_every_step() -> None:
    result = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0
    assert all(f"\n  {step}" in result.stdout for step in STEPS)


def test_a_failing_step_fails_the_check_and_a_spent_budget_runs_no_more_steps(tmp_path: Path) -> None:
    """A step's program failing behind `| tee` must fail the step (pipefail reaches the step's
    shell), and a step that finds the --budget spent is not run, and says so."""
    out = tmp_path / "out"
    result = run_check("--dry-run", "--model", str(tmp_path / "missing"), "--only", "engine", out=out, timeout=120)
    assert result.returncode == 1 and "step engine: failed" in result.stdout
    result = run_check("--dry-run", "--only", "device", "--budget", "5", out=out, timeout=60)
    assert result.returncode == 1 and "step device: not run" in result.stdout
    summary = (out / "summary.md").read_text()
    assert "| 4. engine vs transformers | failed (exit 1) |" in summary
    assert "| 1. device, versions, peaks | not run (budget spent) |" in summary
    assert "FAILED: engine, device" in summary
