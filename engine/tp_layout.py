"""Where a tensor-parallel engine's ranks run, and where they meet.

One host (`nnodes` 1, the default): the engine is rank 0 and starts ranks 1..N-1 itself;
they meet on 127.0.0.1 at a free port. Several hosts: the same engine command runs on
every host with its `node_rank`; host j runs ranks j*k .. j*k+k-1 (k = N / nnodes, rank
r on its host's GPU r - j*k); host 0's rank 0 is the engine (the scheduler, the KV block
pool, the socket servers connect to), every other host runs only workers. They meet at
MASTER_ADDR:MASTER_PORT, torch.distributed's env:// variables, naming host 0.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from splitinfer.engine.config import EngineConfig
from splitinfer.engine.errors import ConfigError

# Hosts are started by hand or by a cluster manager, one after the other: rank 0 waits this
# long for the other hosts' ranks to join (its own workers join within seconds).
REMOTE_JOIN_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class Layout:
    world_size: int
    nnodes: int
    node_rank: int
    address: str  # where the ranks meet: host 0's TCP store
    port: int  # 0 on one host: any free port, chosen when the ranks start

    @property
    def per_node(self) -> int:
        return self.world_size // self.nnodes

    @property
    def local_ranks(self) -> range:
        """The ranks this host runs (rank 0, on host 0, is the engine itself)."""
        start = self.node_rank * self.per_node
        return range(start, start + self.per_node)

    def local_index(self, rank: int) -> int:
        """Rank `rank`'s place on its host: its GPU's index on CUDA."""
        return rank - self.local_ranks.start

    @property
    def join_timeout_s(self) -> float | None:
        """How long rank 0 waits for the others to join: None for the usual collective timeout."""
        return REMOTE_JOIN_TIMEOUT_S if self.nnodes > 1 else None


def layout_of(config: EngineConfig, environ: Mapping[str, str] = os.environ) -> Layout:
    """The layout `config` asks for, checked before anything loads."""
    size, nnodes, node = config.tensor_parallel_size, config.nnodes, config.node_rank
    if size % nnodes:
        raise ConfigError(
            f"--nnodes {nnodes} does not divide --tensor-parallel-size {size}: every host runs as many ranks",
            "nnodes",
        )
    if node >= nnodes:
        raise ConfigError(f"--node-rank {node} is not below --nnodes {nnodes}", "node_rank")
    if nnodes == 1:
        return Layout(size, 1, 0, "127.0.0.1", 0)
    address, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    if not address or not port:
        raise ConfigError(
            "with --nnodes above 1, set MASTER_ADDR and MASTER_PORT (on every host) to host 0's address and a "
            "free port there",
            "nnodes",
        )
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"MASTER_PORT must be a TCP port, got {port!r}", "nnodes")
    return Layout(size, nnodes, node, address, int(port))
