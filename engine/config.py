"""What shapes an engine: the user's settings (`EngineConfig`) and the model read from a
Hugging Face Llama checkpoint's `config.json` (`ModelConfig`).

Each is validated once, where it is built, with an error that names the field; the rest of
the engine trusts them. `EngineConfig`'s fields carry their bounds and help text, from which
the engine's command-line flags are generated (`cli_args.py`), so the flags, `LLM(...)` and
the config cannot drift apart. Limits that depend on the model (`max_model_len` against the
checkpoint's context) are the engine core's to check, once the model is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from msgspec import Meta

from splitinfer.engine.errors import CheckpointError, ConfigError
from splitinfer.kernels import RopeScaling
from splitinfer.protocol.errors import ProtocolError
from splitinfer.protocol.fields import Int64
from splitinfer.protocol.structs import Struct

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("linear", "llama3")


PositiveInt = Annotated[int, Meta(ge=1, le=2**63 - 1)]


class EngineConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """Everything that shapes an engine. Sizes of the KV cache: `num_kv_blocks` if given; else on
    CUDA what `gpu_memory_utilization` leaves after a profiling forward, on CPU `kv_cache_gb`.

    Each field's `Meta` holds its bounds, its help text and (in `extra`) its flag group and,
    for a flag that turns a default-on feature off, the flag's name."""

    NAMED_IN_ERRORS: ClassVar[bool] = False  # "max_num_seqs must be ...": the flag's own words

    model: Annotated[
        str, Meta(min_length=1, description="Hugging Face Llama checkpoint directory (safetensors, sharded or not).")
    ]
    device: Annotated[
        str,
        Meta(
            min_length=1,
            description="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N'.",
            extra={"group": "model and memory"},
        ),
    ] = "auto"
    dtype: Annotated[
        Literal["auto", "float32", "float16", "bfloat16"],
        Meta(
            description="Weights and KV cache dtype; 'auto' is bfloat16 on CUDA, float32 on CPU.",
            extra={"group": "model and memory"},
        ),
    ] = "auto"
    max_model_len: Annotated[
        PositiveInt | None,
        Meta(
            description="Longest prompt plus output (default: the checkpoint's max_position_embeddings).",
            extra={"group": "model and memory"},
        ),
    ] = None
    block_size: Annotated[
        PositiveInt, Meta(description="Tokens per KV-cache block.", extra={"group": "model and memory"})
    ] = 16
    num_kv_blocks: Annotated[
        PositiveInt | None,
        Meta(
            description="KV pool size in blocks; overrides --gpu-memory-utilization and --kv-cache-gb.",
            extra={"group": "model and memory"},
        ),
    ] = None
    kv_cache_gb: Annotated[
        float,
        Meta(gt=0.0, le=2.0**40, description="CPU: size of the KV pool in GB.", extra={"group": "model and memory"}),
    ] = 1.0
    gpu_memory_utilization: Annotated[
        float,
        Meta(
            gt=0.0,
            le=1.0,
            description="CUDA: share of the GPU's memory for weights, activations and the KV cache.",
            extra={"group": "model and memory"},
        ),
    ] = 0.90
    max_num_seqs: Annotated[
        PositiveInt,
        Meta(
            description="Most requests running at once (also the largest CUDA-graph batch).",
            extra={"group": "batching"},
        ),
    ] = 256
    max_num_batched_tokens: Annotated[
        PositiveInt,
        Meta(description="Tokens per engine step: decodes plus chunks of prompts.", extra={"group": "batching"}),
    ] = 8192
    enable_prefix_caching: Annotated[
        bool,
        Meta(
            description="Do not reuse the KV blocks of cached prompt prefixes.",
            extra={"group": "batching", "flag": "--no-prefix-caching"},
        ),
    ] = True
    enforce_eager: Annotated[
        bool, Meta(description="Do not capture CUDA graphs for decode.", extra={"group": "batching"})
    ] = False
    cpu_weight_prepack: Annotated[
        bool,
        Meta(
            description="CPU: do not keep a oneDNN-prepacked copy of the matmul weights (it doubles their memory "
            "and speeds up batched decode 1.3-1.7x).",
            extra={"group": "model and memory", "flag": "--no-cpu-weight-prepack"},
        ),
    ] = True
    seed: Annotated[
        Int64, Meta(description="Seed of the sampling stream of unseeded requests.", extra={"group": "batching"})
    ] = 0

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ProtocolError as exc:  # the same check as every struct's; a config error to its users
            raise ConfigError(exc.message, field=exc.field) from None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The shape and numerics of a Llama model (Llama 2, 3, 3.1 and 3.2 all fit)."""

    path: Path
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read and validate `config.json` (and the eos ids of `generation_config.json`) in `path`."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(path, "checkpoint directory does not exist")
        config_file = path / "config.json"
        raw = _read_json(config_file)
        fields = _ConfigFields(config_file, raw)
        _check_architecture(config_file, raw)
        if raw.get("hidden_act", "silu") != "silu":
            raise CheckpointError(config_file, f"field 'hidden_act' is {raw['hidden_act']!r}; Llama uses 'silu'")

        hidden_size = fields.positive_int("hidden_size")
        num_heads = fields.positive_int("num_attention_heads")
        num_kv_heads = fields.positive_int("num_key_value_heads", default=num_heads)
        if num_heads % num_kv_heads:
            raise CheckpointError(
                config_file,
                f"field 'num_attention_heads' ({num_heads}) is not a multiple of "
                f"'num_key_value_heads' ({num_kv_heads})",
            )
        if raw.get("head_dim") is not None:
            head_dim = fields.positive_int("head_dim")
        elif hidden_size % num_heads:
            raise CheckpointError(
                config_file, f"field 'hidden_size' ({hidden_size}) is not a multiple of 'num_attention_heads'"
            )
        else:
            head_dim = hidden_size // num_heads
        rope_theta, rope_scaling = _rope(config_file, raw)
        eos = fields.token_ids("eos_token_id") + _generation_eos_ids(path)
        return cls(
            path=path,
            hidden_size=hidden_size,
            intermediate_size=fields.positive_int("intermediate_size"),
            num_layers=fields.positive_int("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            vocab_size=fields.positive_int("vocab_size"),
            max_position_embeddings=fields.positive_int("max_position_embeddings", default=2048),
            rms_norm_eps=fields.positive_float("rms_norm_eps", default=1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=fields.boolean("tie_word_embeddings", default=False),
            attention_bias=fields.boolean("attention_bias", default=False),
            mlp_bias=fields.boolean("mlp_bias", default=False),
            bos_token_id=fields.optional_int("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos)),
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(path, "file is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(path, "must hold a JSON object")
    return data


_MISSING = object()


class _ConfigFields:
    """Typed reads of config fields; each failure names the file and the field."""

    def __init__(self, file: Path, raw: dict[str, Any]) -> None:
        self.file = file
        self.raw = raw

    def _get(self, name: str, default: Any) -> Any:
        value = self.raw.get(name, _MISSING)
        if value is _MISSING or value is None:
            if default is _MISSING:
                raise CheckpointError(self.file, f"missing required field '{name}'")
            return default
        return value

    def positive_int(self, name: str, default: Any = _MISSING) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(self.file, f"field '{name}' must be a positive integer, got {value!r}")
        return value

    def positive_float(self, name: str, default: Any = _MISSING) -> float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(self.file, f"field '{name}' must be a positive number, got {value!r}")
        return float(value)

    def boolean(self, name: str, default: Any = _MISSING) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise CheckpointError(self.file, f"field '{name}' must be true or false, got {value!r}")
        return value

    def optional_int(self, name: str) -> int | None:
        value = self._get(name, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise CheckpointError(self.file, f"field '{name}' must be an integer, got {value!r}")
        return value

    def token_ids(self, name: str) -> list[int]:
        """A token id field that may be one int or a list of ints (Llama 3.1 lists several eos ids)."""
        value = self._get(name, [])
        ids = value if isinstance(value, list) else [value]
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise CheckpointError(self.file, f"field '{name}' must be a token id or a list of them, got {value!r}")
        return ids


def _check_architecture(file: Path, raw: dict[str, Any]) -> None:
    architectures = raw.get("architectures")
    if architectures is None:
        if raw.get("model_type") == "llama":
            return
        raise CheckpointError(file, "missing required field 'architectures' (and 'model_type' is not 'llama')")
    if not isinstance(architectures, list) or not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise CheckpointError(
            file,
            f"unsupported architecture {architectures!r} in field 'architectures'; "
            f"splitinfer runs {', '.join(SUPPORTED_ARCHITECTURES)}",
        )


def _rope(file: Path, raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling, from the classic `rope_theta`/`rope_scaling` fields or the
    `rope_parameters` dict that transformers >= 5 writes."""
    params = raw.get("rope_parameters")
    field = "rope_parameters"
    if params is None:
        params = raw.get("rope_scaling")
        field = "rope_scaling"
    if params is not None and not isinstance(params, dict):
        raise CheckpointError(file, f"field '{field}' must be an object or null, got {params!r}")
    params = params or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise CheckpointError(file, f"field 'rope_theta' must be a positive number, got {theta!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            file,
            f"field '{field}' has rope type {kind!r}, which splitinfer does not support "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})",
        )
    try:
        factor = params["factor"]
        if kind == "linear":
            return float(theta), RopeScaling("linear", float(factor))
        return float(theta), RopeScaling(
            "llama3",
            float(factor),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise CheckpointError(file, f"field '{field}' ({kind}) is missing {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        raise CheckpointError(file, f"field '{field}' is invalid: {exc}") from exc


def _generation_eos_ids(path: Path) -> list[int]:
    """The eos ids of `generation_config.json`, which chat checkpoints often extend (e.g. <|eot_id|>)."""
    file = path / "generation_config.json"
    if not file.is_file():
        return []
    return _ConfigFields(file, _read_json(file)).token_ids("eos_token_id")
