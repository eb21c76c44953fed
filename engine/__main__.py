"""`python -m splitinfer.engine` (console script `splitinfer-engine`): load a checkpoint once and
serve it to any number of HTTP servers over a ZeroMQ ROUTER socket until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import sys

from splitinfer.engine import tp_ranks
from splitinfer.engine.cli_args import add_engine_arguments, engine_config
from splitinfer.engine.engine_core import run_worker_host
from splitinfer.engine.errors import ConfigError, EngineDeadError
from splitinfer.engine.service import DEFAULT_LEASE_S, EngineService
from splitinfer.protocol import DEFAULT_LIMITS, default_engine_address, parse_address
from splitinfer.protocol.curve import EngineKeys, require_keys_for

logger = logging.getLogger("splitinfer.engine")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="splitinfer-engine",
        description="The splitinfer engine process: owns the GPU and the model, batches every "
        "client's requests continuously, and answers msgpack messages on a ZeroMQ ROUTER socket.",
    )
    add_engine_arguments(p)  # --model and every EngineConfig setting, with their help and defaults
    service = p.add_argument_group("serving")
    service.add_argument(
        "--served-model-name",
        default=None,
        help="Model name reported to clients (default: the checkpoint directory's name).",
    )
    service.add_argument(
        "--address",
        default=default_engine_address(),
        help="Socket to bind: ipc:///path (file mode 0600) or tcp://host:port. (default: %(default)s)",
    )
    service.add_argument(
        "--lease",
        type=float,
        default=DEFAULT_LEASE_S,
        dest="lease_s",
        help="Seconds a client may stay silent before its requests are aborted and its KV blocks "
        "freed. (default: %(default)s)",
    )
    service.add_argument(
        "--max-frame-bytes",
        type=int,
        default=DEFAULT_LIMITS.max_frame_bytes,
        help="Largest message accepted from a client; bigger ones get an error reply. (default: %(default)s)",
    )
    security = p.add_argument_group(
        "security",
        "CURVE keys authenticate and encrypt the engine's socket across hosts (make them with splitinfer-keys). "
        "A tcp:// address other than loopback needs them, or --insecure.",
    )
    security.add_argument(
        "--curve-secret-key",
        default=None,
        metavar="FILE",
        help="The engine's key pair: the NAME.key_secret file splitinfer-keys wrote.",
    )
    security.add_argument(
        "--curve-allowed-keys",
        default=None,
        metavar="DIR",
        help="Directory of the public keys (NAME.key files) of the servers allowed to connect; read again at each "
        "handshake, so adding or removing a server needs no restart.",
    )
    security.add_argument(
        "--insecure",
        action="store_true",
        help="Bind a tcp:// address reachable from other hosts without keys: anyone who reaches it can use the engine.",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="Logging verbosity. (default: %(default)s)",
    )
    return p


def engine_keys(args: argparse.Namespace) -> EngineKeys | None:
    """The CURVE settings the flags give; ValueError for half of them, for unreadable keys, and
    for an address others can reach without keys (unless --insecure)."""
    if (args.curve_secret_key is None) != (args.curve_allowed_keys is None):
        raise ValueError("--curve-secret-key and --curve-allowed-keys go together")
    keys = None
    if args.curve_secret_key is not None:
        keys = EngineKeys.load(args.curve_secret_key, args.curve_allowed_keys)
    parse_address(args.address)  # a bad address is reported as such first
    require_keys_for(args.address, keys is not None, args.insecure)
    return keys


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = engine_config(args)
    except ConfigError as exc:
        build_parser().error(str(exc))
    try:
        keys = engine_keys(args)
    except ValueError as exc:  # before the model loads: a refusal should not take minutes
        logger.error("cannot start: %s", exc)
        return 2
    if config.node_rank > 0:  # another host of a multi-host tensor-parallel engine: workers only
        try:
            return run_worker_host(config)
        except (ValueError, OSError, EngineDeadError) as exc:
            logger.error("cannot start: %s", exc)
            return 2
    # This process may end itself: a tensor-parallel rank 0 left blocked in a collective with a
    # dead worker (which a replayed CUDA graph's all-reduce never leaves) exits 1 after this
    # long, and the start script or the operator starts it again.
    tp_ranks.STUCK_EXIT_S = 15.0
    try:
        service = EngineService.start(
            config,
            args.address,
            lease_s=args.lease_s,
            served_model_name=args.served_model_name,
            max_frame_bytes=args.max_frame_bytes,
            keys=keys,
        )
    except (ValueError, OSError) as exc:  # bad checkpoint or flags, address in use: one clear line
        logger.error("cannot start: %s", exc)
        return 2
    except EngineDeadError as exc:  # a tensor-parallel rank failed while the engine started
        logger.error("cannot start: %s", exc)
        return 1
    try:
        service.run_until_signalled()
    except EngineDeadError:
        return 1  # logged, and every client told, on the way out
    return 0


if __name__ == "__main__":
    sys.exit(main())
