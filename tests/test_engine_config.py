"""EngineConfig is the one definition of the engine's settings: it checks its own bounds
(with the field's name), and the engine's flags, `LLM(...)` and the start script's help are
all generated from it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import msgspec
import pytest
from procs import PYTHON, REPO

from splitinfer.engine import LLM, ConfigError, EngineConfig
from splitinfer.engine.__main__ import build_parser
from splitinfer.engine.cli_args import engine_config

FLAGS = {  # field -> flag: the flags scripts and users already pass
    "model": "--model",
    "device": "--device",
    "dtype": "--dtype",
    "max_model_len": "--max-model-len",
    "block_size": "--block-size",
    "num_kv_blocks": "--num-kv-blocks",
    "kv_cache_gb": "--kv-cache-gb",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "max_num_seqs": "--max-num-seqs",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "enable_prefix_caching": "--no-prefix-caching",
    "tensor_parallel_size": "--tensor-parallel-size",
    "nnodes": "--nnodes",
    "node_rank": "--node-rank",
    "enforce_eager": "--enforce-eager",
    "cpu_weight_prepack": "--no-cpu-weight-prepack",
    "seed": "--seed",
    "chat_template": "--chat-template",
}


def help_of(field: msgspec.inspect.Field) -> str:
    return field.type.extra_json_schema["description"]


def test_every_field_is_a_flag_with_its_help_and_default() -> None:
    fields = msgspec.inspect.type_info(EngineConfig).fields
    assert {f.name for f in fields} == set(FLAGS), "a new EngineConfig field needs its flag listed here"
    parser = build_parser()
    actions = {flag: action for action in parser._actions for flag in action.option_strings}
    for field in fields:
        action = actions[FLAGS[field.name]]
        assert action.dest == field.name
        assert action.help.replace("%%", "%").startswith(help_of(field)), field.name  # argparse escapes %
        if not field.required:
            assert action.default == field.default, field.name


def test_parsed_flags_build_the_same_config_as_keywords() -> None:
    args = build_parser().parse_args(
        [
            "--model",
            "/m",
            "--dtype",
            "float16",
            "--max-num-seqs",
            "7",
            "--no-prefix-caching",
            "--enforce-eager",
            "--kv-cache-gb",
            "0.5",
        ]
    )
    assert engine_config(args) == EngineConfig(
        model="/m", dtype="float16", max_num_seqs=7, enable_prefix_caching=False, enforce_eager=True, kv_cache_gb=0.5
    )
    assert engine_config(build_parser().parse_args(["--model", "/m"])) == EngineConfig(model="/m")


@pytest.mark.parametrize(
    "settings, field, says",
    [
        ({"max_num_seqs": 0}, "max_num_seqs", "must be in [1, "),
        ({"block_size": -16}, "block_size", "must be in [1, "),
        ({"dtype": "float64"}, "dtype", "must be one of 'auto', 'bfloat16', 'float16', 'float32'"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization", "must be in (0, 1]"),
        ({"kv_cache_gb": 0}, "kv_cache_gb", "must be in (0, "),
        ({"num_kv_blocks": 0}, "num_kv_blocks", "must be in [1, "),
        ({"max_model_len": "long"}, "max_model_len", "must be an integer or nil"),
        ({"enforce_eager": "yes"}, "enforce_eager", "must be a boolean"),
        ({"seed": 2**63}, "seed", "must be in [-9223372036854775808, 9223372036854775807]"),
        ({"model": ""}, "model", "must be a string of length >= 1"),
    ],
)
def test_a_setting_out_of_bounds_is_refused_naming_it(settings: dict, field: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        EngineConfig(**({"model": "/m"} | settings))
    assert refused.value.field == field
    assert str(refused.value).startswith(f"{field} {says}")


def test_llm_refuses_unknown_and_out_of_bounds_settings(tiny_checkpoint: Path) -> None:
    with pytest.raises(TypeError, match="unknown LLM argument"):
        LLM(tiny_checkpoint, device="cpu", max_batch=4)
    with pytest.raises(ConfigError, match="max_num_seqs"):
        LLM(tiny_checkpoint, device="cpu", max_num_seqs=0)


def test_the_engine_cli_refuses_a_bad_setting_before_loading_anything() -> None:
    done = subprocess.run(
        [PYTHON, "-m", "splitinfer.engine", "--model", "/nonexistent", "--max-num-seqs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "max_num_seqs must be in [1, " in done.stderr and "Traceback" not in done.stderr


def test_the_start_scripts_help_lists_every_engine_setting_from_the_engine() -> None:
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "start_distributed.sh"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    for name, flag in FLAGS.items():
        if name != "model":  # the script's own --model is documented above the engine's list
            assert flag in out, flag
    assert help_of(msgspec.inspect.type_info(EngineConfig).fields[-1])[:30] in out
