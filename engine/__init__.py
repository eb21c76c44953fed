"""The engine: checkpoint loading, the Llama model, paged KV cache, continuous batching, sampling.

Offline entry points: `LLM` and `SamplingParams`. The step API the engine process
drives: `EngineCore` with `EngineConfig`.
"""

from splitinfer.engine.config import ModelConfig
from splitinfer.engine.engine_core import EngineConfig, EngineCore, EngineStats, StepOutput
from splitinfer.engine.errors import CheckpointError, RequestError
from splitinfer.engine.llm import LLM, RequestOutput
from splitinfer.protocol.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CheckpointError",
    "EngineConfig",
    "EngineCore",
    "EngineStats",
    "ModelConfig",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "StepOutput",
]
