"""Load a Hugging Face safetensors checkpoint (one file or sharded) into a built model.

Files are memory-mapped with `safe_open`; every tensor's presence and shape is checked
from the headers before any data moves, then tensors are copied one at a time into the
model's (fused) parameters on the target device, so host memory peaks at one tensor. A
tensor-parallel rank reads only its slice of each tensor (`WeightSource.part`) from the
mapping, so its host memory stays near its shard, never the whole model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from splitinfer.engine.errors import CheckpointError
from splitinfer.engine.model import CausalLM, WeightSource

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that the model recomputes; not worth a warning.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Checkpoints above this size log a line per shard so a long load shows progress.
PROGRESS_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a load did, for logs and for the engine's start-up line."""

    num_tensors: int
    num_bytes: int
    num_shards: int
    seconds: float


@dataclass(frozen=True, slots=True)
class WeightFiles:
    """Where a checkpoint's tensors are: `source` is the index or the single file."""

    source: Path
    tensor_files: dict[str, Path]


@dataclass(frozen=True, slots=True)
class _Copy:
    source: WeightSource
    nbytes: int


def find_weight_files(path: Path) -> WeightFiles:
    """Map each tensor name to the file that holds it, from the index or the single file."""
    index = path / INDEX_FILE
    if index.is_file():
        return WeightFiles(index, _read_index(index))
    single = path / SINGLE_FILE
    if single.is_file():
        return WeightFiles(single, {name: single for name in _open(single).keys()})
    hint = (
        " (PyTorch .bin checkpoints are not supported; convert them to safetensors)" if any(path.glob("*.bin")) else ""
    )
    raise CheckpointError(path, f"no {SINGLE_FILE} or {INDEX_FILE} found{hint}")


def _read_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(index, f"is not a valid safetensors index (needs a 'weight_map' object): {exc}") from exc
    if not isinstance(weight_map, dict):
        raise CheckpointError(index, "field 'weight_map' must be an object")
    files = {name: index.parent / str(file) for name, file in weight_map.items()}
    for file in sorted(set(files.values())):
        if not file.is_file():
            raise CheckpointError(file, f"shard listed in {INDEX_FILE} is missing")
    return files


def _open(file: Path):
    """Memory-map one safetensors file, turning a bad header into an error naming the file."""
    try:
        return safe_open(file, framework="pt", device="cpu")
    except SafetensorError as exc:
        raise CheckpointError(file, f"is not a valid safetensors file (truncated or corrupt?): {exc}") from exc
    except OSError as exc:
        raise CheckpointError(file, f"cannot be read: {exc}") from exc


def load_weights(model: CausalLM, path: str | Path, interrupt: Callable[[], None] | None = None) -> LoadReport:
    """Fill every parameter of `model` from the checkpoint in `path`.

    Raises CheckpointError, before copying anything, when a tensor is missing, has the
    wrong shape, or a file is unreadable. `interrupt`, if given, is called before each
    tensor and may raise to abandon the load (a tensor-parallel rank died meanwhile).
    """
    path = Path(path)
    start = time.perf_counter()
    files = find_weight_files(path)
    handles = {file: _open(file) for file in sorted(set(files.tensor_files.values()))}
    plan = _plan(model, files, handles)
    _warn_unexpected(files.tensor_files, {w.name for w in model.weight_sources()}, model.config.tie_word_embeddings)

    total_bytes = sum(copy.nbytes for copies in plan.values() for copy in copies)
    show_progress = total_bytes >= PROGRESS_BYTES and len(plan) > 1
    copied = 0
    with torch.inference_mode():
        for i, (file, tensors) in enumerate(plan.items(), start=1):
            shard_start = time.perf_counter()
            handle = handles[file]
            shard_bytes = 0
            for copy in tensors:
                if interrupt is not None:
                    interrupt()
                try:
                    tensor = _read(handle, copy.source)
                except SafetensorError as exc:
                    raise CheckpointError(file, f"tensor '{copy.source.name}' cannot be read: {exc}") from exc
                copy.source.dest.copy_(tensor)
                shard_bytes += copy.nbytes
            copied += shard_bytes
            if show_progress:
                logger.info(
                    "loaded shard %d/%d %s: %.2f GB in %.1f s (%.0f%% of %.2f GB)",
                    i,
                    len(plan),
                    file.name,
                    shard_bytes / 1e9,
                    time.perf_counter() - shard_start,
                    100 * copied / total_bytes,
                    total_bytes / 1e9,
                )
    if model.rope_cache.is_cuda:
        torch.cuda.synchronize()
    report = LoadReport(
        num_tensors=sum(len(t) for t in plan.values()),
        num_bytes=copied,
        num_shards=len(handles),
        seconds=time.perf_counter() - start,
    )
    logger.info(
        "loaded %d tensors, %.2f GB from %d file(s) in %.2f s (%s)",
        report.num_tensors,
        report.num_bytes / 1e9,
        report.num_shards,
        report.seconds,
        path,
    )
    return report


def _plan(model: CausalLM, files: WeightFiles, handles: dict) -> dict[Path, list[_Copy]]:
    """Check every needed tensor against the headers; group the copies by file, in file order."""
    plan: dict[Path, list[_Copy]] = {file: [] for file in handles}
    # Which family's rules made the expectation, since config.json decides what a checkpoint must hold.
    why = f"a {model.config.architecture} with this config.json"
    for source in model.weight_sources():
        name = source.name
        file = files.tensor_files.get(name)
        if file is None:
            raise CheckpointError(files.source, f"missing tensor '{name}', which {why} has")
        handle = handles[file]
        if name not in handle.keys():
            raise CheckpointError(file, f"missing tensor '{name}' ({INDEX_FILE} says it is in this file)")
        sliced = handle.get_slice(name)
        shape = list(sliced.get_shape())
        if shape != source.checkpoint_shape:
            raise CheckpointError(
                file, f"tensor '{name}' has shape {shape}, expected {source.checkpoint_shape} for {why}"
            )
        plan[file].append(_Copy(source, source.dest.numel() * _DTYPE_BYTES.get(sliced.get_dtype(), 4)))
    return {file: copies for file, copies in plan.items() if copies}


def _read(handle, source: WeightSource) -> torch.Tensor:
    """The tensor, or only the rank's slice of it: sliced in the memory mapping, so nothing
    else of it is read."""
    if source.part is None:
        return handle.get_tensor(source.name)
    part, length = source.part, source.dest.shape[source.part.dim]
    sliced = handle.get_slice(source.name)
    if part.dim == 0:
        return sliced[part.start : part.start + length]
    return sliced[:, part.start : part.start + length]


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _warn_unexpected(files: dict[str, Path], expected: set[str], tied: bool) -> None:
    unexpected = sorted(
        name
        for name in files
        if name not in expected
        and not name.endswith(IGNORED_SUFFIXES)
        # Tied checkpoints sometimes store the shared matrix twice.
        and not (tied and name == "lm_head.weight")
    )
    if unexpected:
        logger.warning(
            "checkpoint has %d tensor(s) the model does not use, ignored: %s%s",
            len(unexpected),
            ", ".join(unexpected[:5]),
            " ..." if len(unexpected) > 5 else "",
        )
