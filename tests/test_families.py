"""Every supported family against transformers, in float32 on CPU, on a tiny checkpoint of each
(conftest.FAMILIES): what the config is read as, the forward's logits over a prompt longer than
the sliding windows, and greedy generation of 16 prompts batched with chunked prefill and a
shared cached prefix, equal to transformers one prompt at a time; then the Triton kernels (under
the interpreter) on the same models. The HTTP path per family: test_families_http.py."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES
from hf_oracle import hf_greedy, hf_logits, max_relative_error

from splitinfer.engine import LLM, CheckpointError, SamplingParams
from splitinfer.engine.forward_batch import ForwardBatch
from splitinfer.engine.loader import load_weights
from splitinfer.engine.model import CausalLM
from splitinfer.engine.model_config import ModelConfig

TOLERANCE = 1e-4
NEW_TOKENS = 8
# Token budget per step: the longer prompts prefill in two or three chunks, and the chunk
# boundaries fall inside and beyond the windows (24 and 40 tokens).
CHUNK = 48


def test_each_family_reads_as_its_declaration(make_checkpoint) -> None:
    configs = {name: ModelConfig.from_dir(make_checkpoint(*args)) for name, args in FAMILIES.items()}
    llama, qwen2, sliding, qwen3, mistral = (
        configs[n] for n in ("llama", "qwen2", "qwen2-sliding", "qwen3", "mistral")
    )
    assert (llama.architecture, llama.qkv_bias, llama.o_bias, llama.qk_norm) == (
        "LlamaForCausalLM",
        False,
        False,
        False,
    )
    assert llama.layer_windows == (None, None)
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm, qwen2.layer_windows) == (True, False, False, (None, None))
    assert qwen2.bos_token_id is not None and len(qwen2.eos_token_ids) == 2  # config.json's and generation_config's
    assert sliding.layer_windows == (None, 24)  # use_sliding_window, max_window_layers 1
    assert (qwen3.qk_norm, qwen3.qkv_bias, qwen3.head_dim, qwen3.hidden_size // qwen3.num_heads) == (
        True,
        False,
        48,
        32,
    )
    assert (mistral.layer_windows, mistral.num_kv_heads) == ((40, 40), 1)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """16 prompts of 1 to 110 tokens; ten share a 37-token prefix (more than two KV blocks)."""
    rng = random.Random(7)
    prefix = [rng.randrange(3, 400) for _ in range(37)]
    lengths = [1, 5, 23, 40, 41, 64, 73, 110, 0, 3, 12, 20, 33, 47, 60, 71]
    out = [[rng.randrange(3, 400) for _ in range(n)] for n in lengths[:6]]
    out += [prefix + [rng.randrange(3, 400) for _ in range(n)] for n in lengths[6:]]
    return out


def test_logits_equal_transformers_over_a_prompt_longer_than_the_window(family_checkpoint: Path) -> None:
    model = CausalLM.build(ModelConfig.from_dir(family_checkpoint), torch.device("cpu"), torch.float32)
    load_weights(model, family_checkpoint)
    prompt = [random.Random(1).randrange(3, 400) for _ in range(90)]
    batch = ForwardBatch.for_prefill([len(prompt)], "cpu", all_logits=True)
    with torch.inference_mode():
        ours = model.compute_logits(model(torch.tensor(prompt), torch.arange(len(prompt)), batch))
    assert max_relative_error(ours, hf_logits(family_checkpoint, prompt)) <= TOLERANCE


def test_16_prompts_batched_with_chunked_prefill_and_a_cached_prefix_equal_transformers_one_at_a_time(
    family_checkpoint: Path, prompts: list[list[int]]
) -> None:
    llm = LLM(
        family_checkpoint,
        device="cpu",
        dtype="float32",
        max_num_batched_tokens=CHUNK,
        max_num_seqs=16,
        num_kv_blocks=128,
    )
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    llm.generate([prompts[6]], params)  # caches the shared prefix
    outs = llm.generate(prompts, params)
    assert llm.engine.stats().kv.prefix_hit_tokens >= 9 * 32, "the shared prefix must come from the cache"
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(family_checkpoint, prompt, NEW_TOKENS), f"prompt of {len(prompt)} tokens"
    assert len({tuple(o.token_ids) for o in outs}) > 8, "a degenerate model would make this test meaningless"


@pytest.mark.parametrize("family", ["qwen3", "mistral", "qwen2-sliding"])
def test_the_triton_kernels_run_each_family_as_the_torch_path_does(
    family: str, make_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows (prefill, chunked prefill over a cached prefix, split-K decode past the window),
    per-head q/k norms and a head_dim that is not a power of two, under the Triton interpreter."""
    path = make_checkpoint(*FAMILIES[family])
    prompts = [list(range(3, 48)), list(range(100, 103))]  # 45 tokens: past both windows
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)

    def tokens(backend: str) -> list[list[int]]:
        monkeypatch.setenv("SPLITINFER_KERNELS", backend)
        llm = LLM(
            path,
            device="cpu",
            dtype="float32",
            num_kv_blocks=32,
            max_num_batched_tokens=32,
            max_num_seqs=4,
            enforce_eager=True,
        )
        assert llm.engine.model.backend.name == backend
        return [o.token_ids for o in llm.generate(prompts, params)]

    assert tokens("triton") == tokens("torch")


def test_an_unsupported_architecture_names_the_field_and_every_supported_one(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["GemmaForCausalLM"], "model_type": "gemma"}')
    with pytest.raises(CheckpointError) as info:
        ModelConfig.from_dir(tmp_path)
    message = str(info.value)
    assert "config.json" in message and "'architectures'" in message and "GemmaForCausalLM" in message
    for architecture in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"):
        assert architecture in message


def test_a_missing_family_tensor_names_the_tensor_and_the_architecture(make_checkpoint, tmp_path: Path) -> None:
    """A Qwen3 checkpoint without one q_norm weight: the loader names the file, the tensor and
    the architecture whose rules expect it, before copying anything."""
    from safetensors.torch import load_file, save_file

    source = make_checkpoint(*FAMILIES["qwen3"])
    for file in source.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.q_norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    model = CausalLM.build(ModelConfig.from_dir(tmp_path), torch.device("cpu"), torch.float32)
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: missing tensor 'model\.layers\.1\.self_attn\.q_norm"
    ):
        load_weights(model, tmp_path)
    with pytest.raises(CheckpointError, match="Qwen3ForCausalLM"):
        load_weights(model, tmp_path)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"use_sliding_window": True, "sliding_window": 0}, "'sliding_window' must be a positive integer"),
        (
            {"use_sliding_window": True, "sliding_window": 16, "layer_types": ["full_attention"]},
            "'layer_types' must list one of",
        ),
        ({"use_sliding_window": "yes"}, "'use_sliding_window' must be true or false"),
        ({"head_dim": 33}, "'head_dim' must be even"),
    ],
)
def test_bad_family_fields_are_named(make_checkpoint, tmp_path: Path, fields: dict, message: str) -> None:
    import json

    source = make_checkpoint(*FAMILIES["qwen2"])
    config = json.loads((source / "config.json").read_text()) | fields
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        ModelConfig.from_dir(tmp_path)
