"""The model a checkpoint holds (`ModelConfig`), read from its `config.json` through its family.

Read and validated once, when the engine starts, with errors that name the file and the
field; the rest of the engine trusts it. Which family a checkpoint belongs to, and what that
changes, is `families.py`'s to say.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitinfer.engine.errors import CheckpointError
from splitinfer.engine.families import SUPPORTED_ARCHITECTURES, Family, family_of
from splitinfer.kernels import RopeScaling

SUPPORTED_ROPE_TYPES = ("linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The shape and numerics of a model of one of the supported families.

    `layer_windows[i]` is layer i's sliding window (the keys a query sees, itself included;
    None: its whole context)."""

    path: Path
    architecture: str
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
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    layer_windows: tuple[int | None, ...]
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
        family = _family(config_file, raw)
        fields = ConfigFields(config_file, raw, family.defaults)
        if raw.get("hidden_act", "silu") != "silu":
            raise CheckpointError(
                config_file, f"field 'hidden_act' is {raw['hidden_act']!r}; {family.architecture} uses 'silu'"
            )

        hidden_size = fields.positive_int("hidden_size")
        num_heads = fields.positive_int("num_attention_heads")
        num_kv_heads = fields.positive_int("num_key_value_heads", default=num_heads)
        if num_heads % num_kv_heads:
            raise CheckpointError(
                config_file,
                f"field 'num_attention_heads' ({num_heads}) is not a multiple of "
                f"'num_key_value_heads' ({num_kv_heads})",
            )
        head_dim = fields.optional_positive_int("head_dim")
        if head_dim is None:
            if hidden_size % num_heads:
                raise CheckpointError(
                    config_file, f"field 'hidden_size' ({hidden_size}) is not a multiple of 'num_attention_heads'"
                )
            head_dim = hidden_size // num_heads
        if head_dim % 2:
            raise CheckpointError(config_file, f"field 'head_dim' must be even (RoPE rotates pairs), got {head_dim}")
        num_layers = fields.positive_int("num_hidden_layers")
        rope_theta, rope_scaling = _rope(config_file, raw)
        eos = fields.token_ids("eos_token_id") + _generation_eos_ids(path)
        return cls(
            path=path,
            architecture=family.architecture,
            hidden_size=hidden_size,
            intermediate_size=fields.positive_int("intermediate_size"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            vocab_size=fields.positive_int("vocab_size"),
            max_position_embeddings=fields.positive_int("max_position_embeddings", default=2048),
            rms_norm_eps=fields.positive_float("rms_norm_eps", default=1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=fields.boolean("tie_word_embeddings", default=False),
            qkv_bias=fields.flag(family.qkv_bias),
            o_bias=fields.flag(family.o_bias),
            mlp_bias=fields.flag(family.mlp_bias),
            qk_norm=family.qk_norm,
            layer_windows=family.windows(fields, num_layers),
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


def _family(file: Path, raw: dict[str, Any]) -> Family:
    architectures, model_type = raw.get("architectures"), raw.get("model_type")
    family = family_of(architectures, model_type)
    if family is not None:
        return family
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if architectures is None:
        raise CheckpointError(
            file,
            f"missing field 'architectures', and field 'model_type' ({model_type!r}) names no supported "
            f"family; splitinfer runs {supported}",
        )
    raise CheckpointError(
        file, f"unsupported architecture {architectures!r} in field 'architectures'; splitinfer runs {supported}"
    )


_MISSING = object()


class ConfigFields:
    """Typed reads of config fields; each failure names the file and the field. A field that is
    absent or null takes the family's default (`defaults`), else the one the read gives."""

    def __init__(self, file: Path, raw: dict[str, Any], defaults: Any = None) -> None:
        self.file = file
        self.raw = raw
        self.defaults = defaults or {}

    def _get(self, name: str, default: Any) -> Any:
        value = self.raw.get(name, _MISSING)
        if value is _MISSING or value is None:
            default = self.defaults.get(name, default)
            if default is _MISSING:
                raise CheckpointError(self.file, f"missing required field '{name}'")
            return default
        return value

    def positive_int(self, name: str, default: Any = _MISSING) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(self.file, f"field '{name}' must be a positive integer, got {value!r}")
        return value

    def optional_positive_int(self, name: str) -> int | None:
        """A positive integer, or None when the field is absent or null (and has no family default)."""
        return None if self._get(name, None) is None else self.positive_int(name)

    def non_negative_int(self, name: str, default: Any = _MISSING) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(self.file, f"field '{name}' must be a non-negative integer, got {value!r}")
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

    def flag(self, rule: bool | str) -> bool:
        """A family's bias rule: fixed, or the boolean field it names (absent: False)."""
        return rule if isinstance(rule, bool) else self.boolean(rule, default=False)

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

    def layer_types(self, num_layers: int) -> list[str] | None:
        """`layer_types`: one of LAYER_TYPES per layer, or None when absent."""
        value = self._get("layer_types", None)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != num_layers or any(t not in LAYER_TYPES for t in value):
            raise CheckpointError(
                self.file,
                f"field 'layer_types' must list one of {', '.join(map(repr, LAYER_TYPES))} for each of the "
                f"{num_layers} layers, got {value!r}",
            )
        return value


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
    return ConfigFields(file, _read_json(file)).token_ids("eos_token_id")
