"""`python -m splitinfer.engine` (console script `splitinfer-engine`): load a checkpoint once and
serve it to any number of HTTP servers over a ZeroMQ ROUTER socket until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import sys

from splitinfer.engine.engine_core import DTYPES, EngineConfig
from splitinfer.engine.errors import EngineDeadError
from splitinfer.engine.service import DEFAULT_LEASE_S, EngineService
from splitinfer.protocol import DEFAULT_LIMITS, default_engine_address

logger = logging.getLogger("splitinfer.engine")


def build_parser() -> argparse.ArgumentParser:
    defaults = EngineConfig(model="")
    p = argparse.ArgumentParser(
        prog="splitinfer-engine",
        description="The splitinfer engine process: owns the GPU and the model, batches every "
        "client's requests continuously, and answers msgpack messages on a ZeroMQ ROUTER socket.",
    )
    p.add_argument("--model", required=True, help="Hugging Face Llama checkpoint directory (safetensors, sharded or not).")
    p.add_argument("--served-model-name", default=None,
                   help="Model name reported to clients (default: the checkpoint directory's name).")
    p.add_argument("--address", default=default_engine_address(),
                   help="Socket to bind: ipc:///path (file mode 0600) or tcp://host:port. (default: %(default)s)")
    p.add_argument("--lease", type=float, default=DEFAULT_LEASE_S, dest="lease_s",
                   help="Seconds a client may stay silent before its requests are aborted and its KV blocks freed. (default: %(default)s)")
    p.add_argument("--max-frame-bytes", type=int, default=DEFAULT_LIMITS.max_frame_bytes,
                   help="Largest message accepted from a client; bigger ones get an error reply. (default: %(default)s)")

    model = p.add_argument_group("model and memory")
    model.add_argument("--device", default=defaults.device, help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N'. (default: %(default)s)")
    model.add_argument("--dtype", default=defaults.dtype, choices=["auto", *DTYPES],
                       help="Weights and KV cache dtype; 'auto' is bfloat16 on CUDA, float32 on CPU. (default: %(default)s)")
    model.add_argument("--max-model-len", type=int, default=None,
                       help="Longest prompt plus output (default: the checkpoint's max_position_embeddings).")
    model.add_argument("--block-size", type=int, default=defaults.block_size, help="Tokens per KV-cache block. (default: %(default)s)")
    model.add_argument("--num-kv-blocks", type=int, default=None,
                       help="KV pool size in blocks; overrides --gpu-memory-utilization and --kv-cache-gb.")
    model.add_argument("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization,
                       help="CUDA: share of the GPU's memory for weights, activations and the KV cache. (default: %(default)s)")
    model.add_argument("--kv-cache-gb", type=float, default=defaults.kv_cache_gb, help="CPU: size of the KV pool in GB. (default: %(default)s)")
    model.add_argument("--no-cpu-weight-prepack", action="store_false", dest="cpu_weight_prepack",
                       help="CPU: do not keep a oneDNN-prepacked copy of the matmul weights (it doubles their "
                       "memory and speeds up batched decode 1.3-1.7x).")

    batching = p.add_argument_group("batching")
    batching.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs,
                          help="Most requests running at once (also the largest CUDA-graph batch). (default: %(default)s)")
    batching.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens,
                          help="Tokens per engine step: decodes plus chunks of prompts. (default: %(default)s)")
    batching.add_argument("--no-prefix-caching", action="store_false", dest="enable_prefix_caching",
                          help="Do not reuse the KV blocks of cached prompt prefixes.")
    batching.add_argument("--enforce-eager", action="store_true", help="Do not capture CUDA graphs for decode.")
    batching.add_argument("--seed", type=int, default=defaults.seed, help="Seed of the sampling stream of unseeded requests. (default: %(default)s)")

    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="Logging verbosity. (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, kv_cache_gb=args.kv_cache_gb,
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=args.enable_prefix_caching,
        enforce_eager=args.enforce_eager, cpu_weight_prepack=args.cpu_weight_prepack, seed=args.seed,
    )
    try:
        service = EngineService.start(config, args.address, lease_s=args.lease_s,
                                      served_model_name=args.served_model_name, max_frame_bytes=args.max_frame_bytes)
    except (ValueError, OSError) as exc:  # bad checkpoint or flags, address in use: one clear line
        logger.error("cannot start: %s", exc)
        return 2
    try:
        service.run_until_signalled()
    except EngineDeadError:
        return 1  # logged, and every client told, on the way out
    return 0


if __name__ == "__main__":
    sys.exit(main())
