"""The user's settings of an engine (`EngineConfig`); the model's own are `model_config.py`'s.

Validated once, where it is built, with an error that names the field; the rest of the
engine trusts it. Its fields carry their bounds and help text, from which the engine's
command-line flags are generated (`cli_args.py`), so the flags, `LLM(...)` and the config
cannot drift apart. Limits that depend on the model (`max_model_len` against the
checkpoint's context) are the engine core's to check, once the model is read.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from msgspec import Meta

from splitinfer.engine.errors import ConfigError
from splitinfer.engine.families import SUPPORTED_ARCHITECTURES
from splitinfer.protocol.errors import ProtocolError
from splitinfer.protocol.fields import Int64
from splitinfer.protocol.structs import Struct

PositiveInt = Annotated[int, Meta(ge=1, le=2**63 - 1)]


class EngineConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """Everything that shapes an engine. Sizes of the KV cache: `num_kv_blocks` if given; else on
    CUDA what `gpu_memory_utilization` leaves after a profiling forward, on CPU `kv_cache_gb`.

    Each field's `Meta` holds its bounds, its help text and (in `extra`) its flag group and,
    for a flag that turns a default-on feature off, the flag's name."""

    NAMED_IN_ERRORS: ClassVar[bool] = False  # "max_num_seqs must be ...": the flag's own words

    model: Annotated[
        str,
        Meta(
            min_length=1,
            description="Hugging Face checkpoint directory (safetensors, sharded or not) of a supported architecture: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
            + ".",
        ),
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
            description="Weights and KV cache dtype. 'auto' is bfloat16 on CUDA; on CPU it is bfloat16 only if "
            "bf16 matmuls, measured at start, run at least 1.5x as fast as float32's (native bf16 such as AMX), "
            "else float32: on an AVX2 CPU (scripts/bench_engine.py --compare-dtypes float32,bfloat16) bf16 ran "
            "batch-1 decode 1.7x as fast as float32 but a 512-token prefill at 0.8x and 32 concurrent requests "
            "at 0.7x.",
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
    tensor_parallel_size: Annotated[
        int,
        Meta(
            ge=1,
            le=64,
            description="Split the model over this many ranks (tensor parallelism, over torch.distributed): the "
            "engine is rank 0 and starts the others as worker processes; with --device cuda rank i runs on GPU "
            "i (NCCL), on CPU they share the machine (gloo). Must divide the attention heads and the MLP's "
            "intermediate size.",
            extra={"group": "model and memory"},
        ),
    ] = 1
    nnodes: Annotated[
        int,
        Meta(
            ge=1,
            le=64,
            description="Hosts the tensor-parallel ranks span, each running tensor_parallel_size / nnodes of them. "
            "Run the same engine command on every host with its --node-rank, and with MASTER_ADDR and MASTER_PORT "
            "(torch.distributed's env:// variables) set to host 0's address and a free port there.",
            extra={"group": "model and memory"},
        ),
    ] = 1
    node_rank: Annotated[
        int,
        Meta(
            ge=0,
            le=63,
            description="This host's place among --nnodes: 0 runs the engine (rank 0, the scheduler and the "
            "socket servers connect to) and its share of the workers; any other host runs only its workers.",
            extra={"group": "model and memory"},
        ),
    ] = 0
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
    chat_template: Annotated[
        Annotated[str, Meta(min_length=1)] | None,
        Meta(
            description="Jinja chat template of chat requests, instead of the checkpoint's: a file's path, or the "
            "template inline (a value that is no file and contains '{{' or '{%'); checked at start. Default: the "
            "checkpoint's (chat_template.jinja, else tokenizer_config.json's); without one, the servers use Llama "
            "3's format for a Llama 3 tokenizer and refuse chat requests otherwise.",
            extra={"group": "model and memory"},
        ),
    ] = None

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ProtocolError as exc:  # the same check as every struct's; a config error to its users
            raise ConfigError(exc.message, field=exc.field) from None
