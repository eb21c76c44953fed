"""Prometheus metrics of one server (`GET /metrics`), in a registry of its own.

Request counts by endpoint and status, TTFT, inter-token and end-to-end latency, tokens
in and out, and the engine's waiting and running requests and KV usage (asked of the
engine at each scrape, so they are fresh and cost nothing in between).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from splitinfer.protocol import StatsReply

if TYPE_CHECKING:
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
        self.waiting = Gauge("splitinfer_engine_waiting_requests", "Requests waiting in the engine", registry=r)
        self.running = Gauge("splitinfer_engine_running_requests", "Requests running in the engine", registry=r)
        self.kv_usage = Gauge("splitinfer_engine_kv_cache_usage", "Share of KV-cache blocks in use (0-1)", registry=r)
        self.engine_up = Gauge("splitinfer_engine_up", "1 while the engine answers, else 0", registry=r)

    def observe_request(self, timing: Timing, usage: Usage) -> None:
        """A request that completed: its latencies and token counts."""
        if timing.first_token is not None:
            self.ttft.observe(timing.first_token - timing.start)
        for gap in timing.token_gaps:
            self.inter_token.observe(gap)
        self.e2e.observe(time.perf_counter() - timing.start)
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.generation_tokens.inc(usage.completion_tokens)

    def observe_engine(self, stats: StatsReply | None) -> None:
        self.engine_up.set(0 if stats is None else 1)
        if stats is not None:
            self.waiting.set(stats.waiting)
            self.running.set(stats.running)
            self.kv_usage.set(stats.kv_usage)

    def render(self) -> bytes:
        return generate_latest(self.registry)
