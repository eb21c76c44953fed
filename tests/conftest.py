"""Shared fixtures: tiny checkpoints built once per session with scripts/make_tiny_model.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# The repository's top-level folders install as splitinfer.* (pyproject.toml), but
# `python -m pytest` also puts the repository root on sys.path, where our `kernels/` folder
# shadows PyPI's `kernels` package, which transformers (5.25 and later) imports when it finds
# one. Nothing imports the folders by their bare names, so the root comes off the path.
_REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _REPO_ROOT]

# Before torch loads OpenMP (see splitinfer/engine/__init__.py): the tests run engines and
# servers as processes beside this one on few cores, where spinning OpenMP threads stall.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# Without a GPU the Triton kernels run under the interpreter. It must be chosen before
# anything imports triton (transformers' Llama does), hence here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = _REPO_ROOT
MAKE_TINY_MODEL = REPO / "scripts" / "make_tiny_model.py"

# Named checkpoint variants the tests share; each covers a different loader/model path.
VARIANTS: dict[str, tuple[str, ...]] = {
    # GQA 4:1, Llama-3.1 rope scaling, tied embeddings, one file.
    "gqa4-llama3-tied": ("--kv-heads", "1", "--rope-scaling", "llama3"),
    # Multi-head attention, untied lm_head, three shards with an index.
    "mha-untied-sharded": ("--kv-heads", "4", "--no-tie", "--shards", "3", "--seed", "1"),
    # GQA 2:1, linear rope scaling, q/k/v/o biases, two shards.
    "gqa2-linear-bias": (
        "--kv-heads",
        "2",
        "--rope-scaling",
        "linear",
        "--attention-bias",
        "--shards",
        "2",
        "--seed",
        "2",
    ),
}


# One tiny checkpoint per model family (scripts/make_tiny_model.py --family), each with its
# own tokenizer conventions and chat template. Windows are shorter than the tests' prompts.
FAMILIES: dict[str, tuple[str, ...]] = {
    "llama": ("--family", "llama"),
    # q/k/v biases, ChatML, no BOS, two eos ids, a config vocabulary beyond the tokenizer's.
    "qwen2": ("--family", "qwen2", "--seed", "3"),
    # Qwen2 with use_sliding_window: layer 0 attends to everything, layer 1 through a window of 24.
    "qwen2-sliding": ("--family", "qwen2", "--sliding-window", "24", "--seed", "4"),
    # q/k norms, head_dim 48 (not hidden / heads), MHA, template in chat_template.jinja.
    "qwen3": ("--family", "qwen3", "--kv-heads", "4", "--seed", "5"),
    # A sliding window of 40 on every layer (not a multiple of the block size), GQA 4:1.
    "mistral": ("--family", "mistral", "--kv-heads", "1", "--seed", "6"),
}


def build_checkpoint(out: Path, *args: str) -> Path:
    subprocess.run([sys.executable, str(MAKE_TINY_MODEL), str(out), *args], check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build (once per distinct argument list) a tiny checkpoint and return its directory."""
    cache: dict[tuple[str, ...], Path] = {}

    def make(*args: str) -> Path:
        if args not in cache:
            cache[args] = build_checkpoint(tmp_path_factory.mktemp("ckpt"), *args)
        return cache[args]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint: Callable[..., Path]) -> Path:
    """The default variant: GQA 4:1, llama3 rope scaling, tied embeddings, one file."""
    return make_checkpoint(*VARIANTS["gqa4-llama3-tied"])


@pytest.fixture(scope="session", params=sorted(VARIANTS))
def variant_checkpoint(request: pytest.FixtureRequest, make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint(*VARIANTS[request.param])


@pytest.fixture(scope="session", params=list(FAMILIES))
def family_checkpoint(request: pytest.FixtureRequest, make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint(*FAMILIES[request.param])
