"""The engine: checkpoint loading, the Llama model, paged KV cache, continuous batching, sampling.

Offline entry points: `LLM` and `SamplingParams`. The step API the engine process
drives: `EngineCore` with `EngineConfig`.
"""

import os

# Before torch loads OpenMP: torch's CPU threads otherwise spin while they wait for each
# other, and when another process (an HTTP server beside the engine) takes a core, a step
# stalls on a descheduled sibling. Measured on 2 cores with a server and a busy neighbour:
# 17 tokens/s with the default policy, 548 with PASSIVE (scripts/bench_serving.py, tiny
# model). Setting OMP_WAIT_POLICY yourself overrides this default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from splitinfer.engine.config import EngineConfig
from splitinfer.engine.engine_core import EngineCore, EngineStats
from splitinfer.engine.errors import CheckpointError, ConfigError, EngineDeadError, RequestError
from splitinfer.engine.llm import LLM, Generation
from splitinfer.engine.model_config import ModelConfig  # noqa: E402
from splitinfer.protocol.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CheckpointError",
    "ConfigError",
    "EngineConfig",
    "EngineCore",
    "EngineDeadError",
    "EngineStats",
    "ModelConfig",
    "RequestError",
    "Generation",
    "SamplingParams",
]
