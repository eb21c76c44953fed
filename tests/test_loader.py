"""Checkpoint loading: sharded equals single-file, and each kind of bad checkpoint gets one clear error."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from splitinfer.engine import CheckpointError, ModelConfig
from splitinfer.engine.loader import load_weights
from splitinfer.engine.model import CausalLM


def load(path: Path, dtype: torch.dtype = torch.float32) -> CausalLM:
    model = CausalLM.build(ModelConfig.from_dir(path), torch.device("cpu"), dtype)
    load_weights(model, path)
    return model


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def test_sharded_and_single_file_checkpoints_load_the_same_weights(make_checkpoint) -> None:
    single = load(make_checkpoint("--seed", "5", "--no-tie"))
    sharded_path = make_checkpoint("--seed", "5", "--no-tie", "--shards", "3")
    assert len(list(sharded_path.glob("model-*.safetensors"))) == 3
    sharded = load(sharded_path)
    for (name, a), (_, b) in zip(single.named_parameters(), sharded.named_parameters()):
        assert torch.equal(a, b), name


def test_fused_parameters_hold_the_checkpoint_tensors(tiny_checkpoint: Path) -> None:
    model = load(tiny_checkpoint)
    tensors = load_file(tiny_checkpoint / "model.safetensors")
    layer = model.model.layers[1]
    q, k, v = (tensors[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(layer.self_attn.qkv_proj.weight, torch.cat([q, k, v]))
    gate, up = (tensors[f"model.layers.1.mlp.{n}_proj.weight"] for n in ("gate", "up"))
    assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat([gate, up]))
    assert model.lm_head is None and model.lm_head_weight is model.model.embed_tokens.weight


def test_weights_are_cast_to_the_requested_dtype(tiny_checkpoint: Path) -> None:
    model = load(tiny_checkpoint, torch.bfloat16)
    tensors = load_file(tiny_checkpoint / "model.safetensors")
    assert torch.equal(model.model.norm.weight, tensors["model.norm.weight"].to(torch.bfloat16))


def test_loading_logs_bytes_files_and_seconds(tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="splitinfer.engine.loader"):
        load(tiny_checkpoint)
    line = caplog.records[-1].getMessage()
    assert "GB from 1 file(s) in" in line and "tensors" in line


def test_large_sharded_checkpoints_log_progress_per_shard(
    make_checkpoint, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("splitinfer.engine.loader.PROGRESS_BYTES", 1)  # the tiny model counts as large
    with caplog.at_level(logging.INFO, logger="splitinfer.engine.loader"):
        load(make_checkpoint("--seed", "5", "--no-tie", "--shards", "3"))
    shard_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded shard")]
    assert [line.split()[2] for line in shard_lines] == ["1/3", "2/3", "3/3"]


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope: checkpoint directory does not exist"):
        ModelConfig.from_dir(tmp_path / "nope")


def test_missing_config_file(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: file is missing"):
        ModelConfig.from_dir(path)


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"])
def test_config_missing_a_field_names_it(tmp_path: Path, tiny_checkpoint: Path, field: str) -> None:
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    edit_config(path, **{field: None})
    with pytest.raises(CheckpointError, match=f"config.json: missing required field '{field}'"):
        ModelConfig.from_dir(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": "128"}, "field 'hidden_size' must be a positive integer"),
        (
            {"num_key_value_heads": 3},
            "'num_attention_heads' \\(4\\) is not a multiple of 'num_key_value_heads' \\(3\\)",
        ),
        ({"tie_word_embeddings": "yes"}, "field 'tie_word_embeddings' must be true or false"),
        ({"eos_token_id": "x"}, "field 'eos_token_id' must be a token id"),
        ({"hidden_act": "gelu"}, "field 'hidden_act' is 'gelu'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn', which splitinfer does not support"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            "'rope_scaling' \\(llama3\\) is missing 'low_freq_factor'",
        ),
    ],
)
def test_invalid_config_fields_are_named(tmp_path: Path, tiny_checkpoint: Path, changes: dict, message: str) -> None:
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    edit_config(path, **changes)
    with pytest.raises(CheckpointError, match=message):
        ModelConfig.from_dir(path)


def test_unsupported_architecture(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    edit_config(path, architectures=["GemmaForCausalLM"], model_type="gemma")
    with pytest.raises(CheckpointError, match="config.json: unsupported architecture \\['GemmaForCausalLM'\\]"):
        ModelConfig.from_dir(path)


def test_config_variants_of_real_checkpoints_parse(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Llama 2 style (one eos int, no head_dim, rope_theta absent) and transformers-5 style rope_parameters."""
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    (path / "generation_config.json").unlink()
    edit_config(path, eos_token_id=2, head_dim=None, rope_theta=None, rope_scaling=None)
    config = ModelConfig.from_dir(path)
    assert (config.eos_token_ids, config.head_dim, config.rope_theta, config.rope_scaling) == ((2,), 32, 10000.0, None)
    edit_config(path, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6})
    config = ModelConfig.from_dir(path)
    assert config.rope_theta == 1e6 and config.rope_scaling.kind == "linear"


def test_missing_tensor_names_tensor_and_file(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load(path)


def test_missing_tensor_in_sharded_checkpoint_names_the_index(tmp_path: Path, make_checkpoint) -> None:
    path = copy_checkpoint(make_checkpoint("--shards", "2"), tmp_path / "ckpt")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: missing tensor 'model.norm.weight'"):
        load(path)


def test_missing_shard_file(tmp_path: Path, make_checkpoint) -> None:
    path = copy_checkpoint(make_checkpoint("--shards", "2"), tmp_path / "ckpt")
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: shard listed in .* is missing"):
        load(path)


def test_untied_checkpoint_without_lm_head(tmp_path: Path, make_checkpoint) -> None:
    path = copy_checkpoint(make_checkpoint("--no-tie"), tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 'lm_head.weight'"):
        load(path)


def test_wrong_shape_names_tensor_shapes_and_file(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' "
        r"has shape \[64, 128\], expected \[32, 128\]",
    ):
        load(path)


def test_truncated_safetensors_file(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: is not a valid safetensors file"):
        load(path)


def test_corrupt_safetensors_header(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:24] = b"\xff" * 16  # the JSON header starts after the 8-byte length
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: is not a valid safetensors file"):
        load(path)


def test_no_weights_at_all(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json found .*.bin"):
        load(path)


def test_unused_tensors_are_logged_and_ignored(
    tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(16)
    tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, path / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="splitinfer.engine.loader"):
        load(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["checkpoint has 1 tensor(s) the model does not use, ignored: model.extra.weight"]
