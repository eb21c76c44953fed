"""The benchmark scripts run end to end, at toy sizes on the tiny checkpoint: every table row
and JSON field they promise is there. (Their numbers are measured by hand, README
"Performance"; here only that the scripts work as a user would run them.) bench_engine.py's
comparison with transformers runs in tests/test_gpu_check.py, in the GPU check's dry run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from procs import PYTHON, REPO, free_port, start_engine, start_server, stop

SCRIPTS = REPO / "scripts"


def run_script(name: str, *args: str, timeout_s: float = 240) -> str:
    done = subprocess.run(
        [PYTHON, str(SCRIPTS / name), *args], capture_output=True, text=True, cwd=REPO, timeout=timeout_s
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_bench_http_compares_the_http_path_with_the_in_process_engine(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "http.json"
    text = run_script("bench_http.py", "--model", str(tiny_checkpoint), "--concurrency", "3", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["in_process_tok_s"] > 0 and result["http_tok_s"] > 0
    assert result["ratio"] == result["http_tok_s"] / result["in_process_tok_s"]
    assert "of in-process" in text and "TTFT" in text


def test_bench_serving_loads_a_running_server(tiny_checkpoint: Path, tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/engine.sock"
    engine = start_engine(tiny_checkpoint, address, tmp_path / "engine.log")
    port = free_port()
    server = start_server(address, port, tmp_path / "server.log")
    try:
        out = tmp_path / "serving.json"
        text = run_script(
            "bench_serving.py",
            "--base-url",
            f"http://127.0.0.1:{port}/v1",
            "--concurrency",
            "1,2",
            "--num-requests",
            "3",
            "--prompt-tokens",
            "4-9",
            "--output-tokens",
            "5",
            "--warmup",
            "1",
            "--json",
            str(out),
        )
        for mode in ("--prompt-mode", "text"), ("--request-rate", "20"):
            run_script(
                "bench_serving.py",
                "--base-url",
                f"http://127.0.0.1:{port}/v1",
                "--num-requests",
                "2",
                "--output-tokens",
                "3",
                "--prompt-tokens",
                "6",
                *mode,
            )
    finally:
        stop(server)
        stop(engine)
    levels = json.loads(out.read_text())
    assert [level["label"] for level in levels] == ["concurrency 1", "concurrency 2"]
    for level in levels:
        assert level["requests"] == 3 and level["failed"] == 0
        assert level["output_tokens_per_s"] > 0 and level["ttft_ms"]["p50"] > 0 and level["e2e_ms"]["p99"] > 0
    assert "TTFT ms p50/p90/p99" in text


def test_bench_ipc_and_bench_restart_report_their_round_trips() -> None:
    results = json.loads(run_script("bench_ipc.py", "--pings", "50", "--generates", "5", "--json"))
    assert set(results) == {
        "floor: bare DEALER to a bare ROUTER echo",
        "ping (bare DEALER)",
        "generate to first output (bare DEALER)",
        "ping (EngineClient)",
        "generate to first output (EngineClient)",
    }
    assert all(r["p50_us"] > 0 and r["n"] > 0 for r in results.values())
    text = run_script("bench_restart.py", "--restarts", "1")
    assert "engine pid unchanged: True; model loads in the engine log: 1" in text


def test_bench_codec_times_each_protocol_operation() -> None:
    results = json.loads(
        run_script("bench_codec.py", "--requests", "4", "--prompt-tokens", "8", "--repeats", "1", "--json")
    )
    kinds = ("build", "encode", "decode")
    assert {f"Outputs x4: {kind}" for kind in kinds} | {f"Generate (8 tokens): {kind}" for kind in kinds} <= set(
        results
    )
    assert all(us > 0 for us in results.values())


def test_bench_engine_compares_the_cpu_prepacking_policies(tiny_checkpoint: Path) -> None:
    text = run_script(
        "bench_engine.py", "--model", str(tiny_checkpoint), "--cpu-prepack-ab", "--concurrency", "3", "--repeats", "1"
    )
    header, row = [line.split() for line in text.splitlines() if line.startswith(("workload", "3 concurrent"))]
    assert header[1:] == ["decode", "every", "off"]
    assert len(row) == 7 and all(float(rate) > 0 for rate in row[-3:])


def test_bench_structured_compares_constrained_with_unconstrained(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "structured.json"
    args = ("--concurrency", "3", "--max-tokens", "8", "--repeats", "1", "--json", str(out))
    text = run_script("bench_structured.py", "--model", str(tiny_checkpoint), *args)
    result = json.loads(out.read_text())
    assert result["unconstrained_tok_s"] > 0 and result["constrained_tok_s"] > 0 and result["ratio"] > 0
    assert result["compile_cold_ms"] > 0 and result["compile_cached_ms"] >= 0 and result["mask_fill_ms_per_step"] > 0
    assert "one JSON schema" in text and "schema compile cold" in text


def test_bench_scoring_compares_prompt_logprobs_with_a_transformers_forward(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scoring.json"
    args = (
        "--questions",
        "3",
        "--choices",
        "2",
        "--context-tokens",
        "20",
        "--ending-tokens",
        "5",
        "--hf-batch",
        "4",
        "--repeats",
        "1",
    )
    text = run_script("bench_scoring.py", "--model", str(tiny_checkpoint), *args, "--json", str(out))
    result = json.loads(out.read_text())
    assert result["prompts"] == 6 and result["engine_tokens_per_s"] > 0 and result["transformers_tokens_per_s"] > 0
    assert result["max_loglikelihood_difference"] < 1e-3 and result["same_best_ending"] == 1.0
    assert "prompt_logprobs" in text


def test_soak_engine_reports_memory_per_round_and_a_verdict(tiny_checkpoint: Path) -> None:
    text = run_script(
        "soak_engine.py",
        "--model",
        str(tiny_checkpoint),
        "--rounds",
        "2",
        "--requests-per-round",
        "12",
        "--warmup-rounds",
        "1",
        "--concurrency",
        "4",
        "--tolerance",
        "10",
    )
    rounds = [line.split() for line in text.splitlines() if line.split() and line.split()[0] in ("1", "2")]
    assert [r[:2] for r in rounds] == [["1", "12"], ["2", "24"]]
    assert all(float(r[5]) > 0 and float(r[6]) > 0 and r[4] == "0" for r in rounds), "RSS measured, nothing refused"
    assert "engine: " in text and "server: " in text and "within 1000%" in text


def test_bench_decode_inputs_times_the_host_side_of_a_decode_step() -> None:
    text = run_script("bench_decode_inputs.py", "--sizes", "2x3,4x5", "--steps", "5")
    rows = [line.split() for line in text.splitlines() if line.split()[:2] in (["2", "3"], ["4", "5"])]
    assert len(rows) == 2 and all(float(row[2]) > 0 for row in rows)


def test_bench_routing_times_the_decision_and_one_engine_against_two_replicas(tiny_checkpoint: Path) -> None:
    args = ("--requests", "6", "--concurrency", "3", "--output-tokens", "3", "--repeats", "1")
    text = run_script(
        "bench_routing.py",
        "--model",
        str(tiny_checkpoint),
        *args,
        "--index-entries",
        "2000",
        "--choose-prompt-tokens",
        "256",
    )
    assert "2 replicas: p50" in text and "8 replicas: p50" in text
    assert "1 engine " in text and "2 replicas " in text and "throughput, 2 replicas / 1 engine" in text
    assert "cores; each engine runs 1 torch thread(s)" in text
