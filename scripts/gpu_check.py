#!/usr/bin/env python3
"""The Python half of scripts/gpu_check.sh: the device step, and the summary of every step.

    python scripts/gpu_check.py device OUT      # nvidia-smi, versions, copy bandwidth, matmul peak -> OUT/device.json
    python scripts/gpu_check.py summary OUT     # OUT/steps.csv and each step's files -> OUT/summary.md

The shell script runs the steps, each under its own time box, and records each step's
status and seconds in OUT/steps.csv; this file turns what they wrote into one markdown page.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STEP_TITLES = {
    "install": "install what is missing",
    "checkpoint": "checkpoint",
    "device": "1. device, versions, peaks",
    "tests": "2. GPU tests",
    "kernels": "3. kernel benchmark",
    "engine": "4. engine vs transformers",
    "http": "5. engine + 2 HTTP servers",
    "tp": "6. tensor parallelism (2 GPUs)",
    "sanitizer": "compute-sanitizer",
}


def command_output(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def describe_device() -> dict[str, object]:
    """What the machine is and what it can do: versions, GPU, measured copy bandwidth and matmul peak."""
    import torch
    from bench_engine import measure_peaks

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    info: dict[str, object] = {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "host": f"{platform.node()}, {platform.processor() or platform.machine()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": command_output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") or None,
        "nvidia_smi": command_output("nvidia-smi") or "nvidia-smi: not found",
        "dtype": str(dtype).removeprefix("torch."),
    }
    for name in ("triton", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if cuda:
        props = torch.cuda.get_device_properties(device)
        info |= {"sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1)}
    bandwidth, gflops = measure_peaks(device, dtype)
    info |= {"copy_gbps": round(bandwidth, 1), "matmul_tflops": round(gflops / 1e3, 2)}
    return info


# The summary ------------------------------------------------------------------------


def read_steps(out: Path) -> list[dict[str, str]]:
    path = out / "steps.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def pytest_counts(log: Path) -> str:
    """The closing line of every pytest run in the log ("12 passed, 3 skipped in 40.1s")."""
    if not log.is_file():
        return "no log"
    finals = re.findall(
        r"^=* ?(\d+ (?:passed|failed|skipped|deselected|error).*? in [\d.]+s\b.*?) ?=*$",
        log.read_text(errors="replace"),
        re.MULTILINE,
    )
    return "; ".join(finals) or "no result line (see pytest.log)"


def kernel_table(path: Path) -> list[str]:
    if not path.is_file():
        return ["(no kernels.csv)"]
    with path.open() as f:
        rows = list(csv.DictReader(f))
    columns = [
        c
        for c in ("kernel", "shape", "correct", "ours_us", "torch_us", "speedup", "achieved", "pct_peak")
        if rows and c in rows[0]
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return lines


def engine_table(path: Path) -> list[str]:
    if not path.is_file():
        return ["(no engine.json)"]
    result = json.loads(path.read_text())
    lines = [
        f"Model {result['model']} ({result.get('weight_bytes', 0) / 1e9:.2f} GB of weights), "
        f"{result['device']}, {result['dtype']}; copy {result['copy_gbps']:.0f} GB/s.",
        "",
        "| measure | ours | transformers | ratio | % of bandwidth roofline (ours) | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        roofline = row.get("roofline_pct")
        lines.append(
            f"| {row['measure']} | {row['ours']:.1f} | {row['transformers']:.1f} | {row['ratio']:.2f}x | "
            f"{'' if roofline is None else f'{roofline:.0f}%'} | {row['notes']} |"
        )
    return lines


def http_table(path: Path) -> list[str]:
    if not path.is_file():
        return ["(no http.json)"]
    lines = [
        "| level | requests | failed | seconds | output tok/s | TTFT p50/p99 ms | ITL p50/p99 ms |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for s in json.loads(path.read_text()):
        lines.append(
            f"| {s['label']} | {s['requests']} | {s['failed']} | {s['duration_s']:.1f} | "
            f"{s['output_tokens_per_s']:.1f} | {s['ttft_ms']['p50']:.0f}/{s['ttft_ms']['p99']:.0f} | "
            f"{s['itl_ms']['p50']:.1f}/{s['itl_ms']['p99']:.1f} |"
        )
    return lines


def tp_table(path: Path) -> list[str]:
    """bench_tp.py's printed table as it is (a code block): its machine line and one row per size."""
    if not path.is_file():
        return ["(not run)"]
    lines = [line for line in path.read_text().splitlines() if line.startswith(("machine:", " TP", "  "))]
    return ["```", *lines, "```"] if lines else ["(no table: see tp.log)"]


def summarize(out: Path, dry_run: bool, command: str) -> str:
    device = json.loads((out / "device.json").read_text()) if (out / "device.json").is_file() else {}
    steps = read_steps(out)
    lines = ["# splitinfer GPU check", ""]
    if dry_run:
        lines += [
            "**DRY RUN on CPU at toy sizes: every step's plumbing ran, but no GPU numbers were taken. "
            "Nothing below measures a GPU.**",
            "",
        ]
    lines += [f"`{command}`", ""]
    if device:
        lines += [
            f"- device: {device.get('gpu') or 'no GPU (' + str(device.get('host')) + ')'}"
            + (
                f", {device['sms']} SMs, {device['memory_gib']} GiB, driver {device['driver']}"
                if device.get("gpu")
                else ""
            ),
            f"- python {device['python']}, torch {device['torch']} (CUDA {device['cuda']}), "
            f"triton {device['triton']}, transformers {device['transformers']}",
            f"- measured: copy {device['copy_gbps']} GB/s (read + write), {device['dtype']} matmul "
            f"{device['matmul_tflops']} TFLOP/s",
            "",
        ]
    lines += ["## Steps", "", "| step | status | seconds | box (s) |", "|---|---|---:|---:|"]
    lines += [
        f"| {STEP_TITLES.get(s['step'], s['step'])} | {s['status']} | {s['seconds']} | {s['box']} |" for s in steps
    ]
    lines += [
        "",
        "## GPU tests",
        "",
        pytest_counts(out / "pytest.log"),
        "",
        "## Kernels (`python -m splitinfer.kernels.bench --quick`)",
        "",
        *kernel_table(out / "kernels.csv"),
        "",
        "## Engine (`scripts/bench_engine.py`)",
        "",
        *engine_table(out / "engine.json"),
        "",
        "## Engine + 2 servers, 32 concurrent streams (`scripts/bench_serving.py --duration`)",
        "",
        *http_table(out / "http.json"),
        "",
        "## Tensor parallelism (`scripts/bench_tp.py`)",
        "",
        *tp_table(out / "tp.log"),
        "",
    ]
    failed = [s["step"] for s in steps if s["status"] not in ("ok", "skipped")]
    lines += [f"**Result: {'FAILED: ' + ', '.join(failed) if failed else 'every step passed'}.**", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["device", "summary"])
    p.add_argument("out", type=Path, help="The check's output folder.")
    p.add_argument("--dry-run", action="store_true", help="Say in the summary that no GPU numbers were taken.")
    p.add_argument("--command", default="scripts/gpu_check.sh", help="The command line shown in the summary.")
    args = p.parse_args()
    if args.what == "device":
        info = describe_device()
        (args.out / "device.json").write_text(json.dumps(info, indent=2))
        print(info["nvidia_smi"])
        print(
            f"torch {info['torch']} (CUDA {info['cuda']}), triton {info['triton']}, "
            f"transformers {info['transformers']}; copy {info['copy_gbps']} GB/s, {info['dtype']} matmul "
            f"{info['matmul_tflops']} TFLOP/s"
        )
        return 0
    summary = summarize(args.out, args.dry_run, args.command)
    (args.out / "summary.md").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
