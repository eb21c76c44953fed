"""The engine: checkpoint loading, the Llama model, KV cache, batching and sampling.

The offline entry points are `LLM` and `SamplingParams`.
"""

from splitinfer.engine.config import ModelConfig
from splitinfer.engine.errors import CheckpointError
from splitinfer.engine.llm import LLM, RequestOutput
from splitinfer.engine.sampling_params import SamplingParams

__all__ = ["LLM", "CheckpointError", "ModelConfig", "RequestOutput", "SamplingParams"]
