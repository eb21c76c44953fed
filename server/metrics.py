"""Prometheus metrics of one server (`GET /metrics`), in a registry of its own.

Request counts by endpoint and status, TTFT, inter-token and end-to-end latency, tokens
in and out, and per engine (labels `engine`, its address, and `model`): whether it is
connected, its waiting and running requests, KV usage and prefix-cache hit rate (from the
pool's stats, at most half a second old), and the requests this server has routed to it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from splitinfer.server.engine_pool import EnginePool
    from splitinfer.server.generation import Timing
    from splitinfer.server.responses import Usage

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "splitinfer_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            "splitinfer_time_to_first_token_seconds",
            "Time from request to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "splitinfer_inter_token_latency_seconds",
            "Time between streamed tokens",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "splitinfer_e2e_request_latency_seconds",
            "Time from request to last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("splitinfer_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("splitinfer_generation_tokens", "Generated tokens", registry=r)
        per_engine = ["engine", "model"]
        self.routed = Counter(
            "splitinfer_routed_requests", "HTTP requests this server routed to each engine", per_engine, registry=r
        )
        self.waiting = Gauge(
            "splitinfer_engine_waiting_requests", "Requests waiting in the engine", per_engine, registry=r
        )
        self.running = Gauge(
            "splitinfer_engine_running_requests", "Requests running in the engine", per_engine, registry=r
        )
        self.kv_usage = Gauge(
            "splitinfer_engine_kv_cache_usage", "Share of KV-cache blocks in use (0-1)", per_engine, registry=r
        )
        self.prefix_hit_rate = Gauge(
            "splitinfer_engine_prefix_cache_hit_rate",
            "Share of prompt tokens served from the prefix cache",
            per_engine,
            registry=r,
        )
        self.inflight = Gauge(
            "splitinfer_engine_inflight_requests",
            "Engine requests this server has routed to it and not seen end",
            per_engine,
            registry=r,
        )
        self._load_gauges = (self.waiting, self.running, self.kv_usage, self.prefix_hit_rate, self.inflight)
        self._engine_labels: dict[str, tuple[str, str]] = {}  # address -> the labels its series have now
        self.engine_up = Gauge(
            "splitinfer_engine_up", "1 while the engine is connected, else 0", ["engine"], registry=r
        )

    def observe_request(self, timing: Timing, usage: Usage) -> None:
        """A request that completed: its latencies and token counts."""
        if timing.first_token is not None:
            self.ttft.observe(timing.first_token - timing.start)
        for gap in timing.token_gaps:
            self.inter_token.observe(gap)
        self.e2e.observe(time.perf_counter() - timing.start)
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.generation_tokens.inc(usage.completion_tokens)

    def observe_engines(self, pool: EnginePool) -> None:
        """Each configured engine's state, from the pool's latest stats (at most a poll old).
        An engine's load series are dropped while it is down: stale numbers would mislead."""
        for handle in pool.handles:
            self.engine_up.labels(handle.address).set(1 if handle.live else 0)
            stats = handle.current_stats
            labels = (handle.address, pool.model_name(handle)) if stats is not None else None
            shown = self._engine_labels.get(handle.address)
            if shown is not None and shown != labels:  # down, or back with another model
                for gauge in self._load_gauges:
                    gauge.remove(*shown)
                del self._engine_labels[handle.address]
            if labels is None:
                continue
            self._engine_labels[handle.address] = labels
            self.waiting.labels(*labels).set(stats.waiting)
            self.running.labels(*labels).set(stats.running)
            self.kv_usage.labels(*labels).set(stats.kv_usage)
            self.prefix_hit_rate.labels(*labels).set(stats.prefix_hit_rate)
            self.inflight.labels(*labels).set(handle.inflight)

    def render(self) -> bytes:
        return generate_latest(self.registry)
