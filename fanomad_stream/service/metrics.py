"""Prometheus metrics of the edge clients and the aggregator, served on ``/metrics``.

Each service object owns one ``CollectorRegistry``, so several services in one process (tests,
the demo) never share or double-count a series. Counters are cumulative since the process
started, and per-second rates come from PromQL ``rate()`` over them. Every metric name starts
with ``fanomad_`` and carries a ``service`` label (``edge:<site>`` or ``aggregator``).

The HTTP endpoint is off unless a port is given, and binds 127.0.0.1 unless another address is
given, so a service never listens on an outside interface by accident.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = structlog.get_logger(__name__)

DEFAULT_METRICS_HOST = "127.0.0.1"

# One observation is one source's share of a poll batch (1 to max_batch_records rows). The
# buckets span 1 ms to 2.5 s on a roughly logarithmic scale.
SCORING_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# A round lasts from its first folded update until it closes: up to round_deadline_s (60 s by
# default) when the quorum is not reached, longer when clients train slowly.
ROUND_DURATION_BUCKETS_S = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class EdgeMetrics:
    """Counters, gauges and the scoring latency histogram of one edge client.

    Parameters
    ----------
    site
        Client id of the edge client. The ``service`` label is ``edge:<site>``.
    registry
        Registry to register in; a new one by default.
    """

    def __init__(self, site: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.service = f"edge:{site}"
        self._consumed = Counter(
            "fanomad_events_consumed",
            "Records read from metrics.raw, including skipped and dead-lettered ones.",
            ["service"],
            registry=self.registry,
        )
        self._scored = Counter(
            "fanomad_events_scored",
            "Records scored, per source.",
            ["service", "source"],
            registry=self.registry,
        )
        self._alerts = Counter(
            "fanomad_alerts",
            "Alerts published, per source.",
            ["service", "source"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "fanomad_scoring_latency_seconds",
            "Wall time to score one batch of one source (scaler, HST, autoencoder, threshold).",
            ["service"],
            buckets=SCORING_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self._lag = Gauge(
            "fanomad_consumer_lag",
            "Records between the consumer position and the high watermark, per partition.",
            ["service", "topic", "partition"],
            registry=self.registry,
        )
        self._epsilon = Gauge(
            "fanomad_epsilon_spent",
            "Privacy budget epsilon spent so far, as the client's accountant reports it.",
            ["service"],
            registry=self.registry,
        )
        # Series without per-source labels exist from the start, so a dashboard shows 0
        # instead of "no data" before the first record.
        self._consumed.labels(self.service)
        self._latency.labels(self.service)

    def record_consumed(self, events: int) -> None:
        self._consumed.labels(self.service).inc(events)

    def record_scored(self, source: str, *, events: int, alerts: int, seconds: float) -> None:
        """Count one scored batch of ``source`` and observe how long scoring it took."""
        self._scored.labels(self.service, source).inc(events)
        self._alerts.labels(self.service, source).inc(alerts)
        self._latency.labels(self.service).observe(seconds)

    async def record_lag(self, consumer: AIOKafkaConsumer) -> None:
        """Set the lag gauge of every partition assigned to ``consumer``.

        The high watermark is the one the last fetch response carried, so the gauge is as
        fresh as the last poll. Partitions not fetched yet have no high watermark and keep
        their previous value.
        """
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            position = await consumer.position(tp)
            lag = max(int(highwater) - int(position), 0)
            self._lag.labels(self.service, tp.topic, str(tp.partition)).set(lag)

    def record_epsilon(self, epsilon: float) -> None:
        self._epsilon.labels(self.service).set(epsilon)


class AggregatorMetrics:
    """Round counters, the round duration histogram and rejection counts of the aggregator."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.service = "aggregator"
        self._rounds = Counter(
            "fanomad_rounds_completed",
            "Rounds closed and published as a new global model version.",
            ["service"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "fanomad_round_duration_seconds",
            "Time from the first folded update of a round until the round closed.",
            ["service"],
            buckets=ROUND_DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self._clients = Gauge(
            "fanomad_round_clients",
            "Clients whose updates were folded into the last closed round.",
            ["service"],
            registry=self.registry,
        )
        self._rejected = Counter(
            "fanomad_updates_rejected",
            "Updates rejected before aggregation, per reason (stale_round, shape, ...).",
            ["service", "reason"],
            registry=self.registry,
        )
        self._epsilon = Gauge(
            "fanomad_epsilon_spent",
            "Privacy budget epsilon spent so far, per client, as reported with its updates.",
            ["service", "client_id"],
            registry=self.registry,
        )
        self._rounds.labels(self.service)
        self._duration.labels(self.service)

    def record_round(self, *, seconds: float, clients: int) -> None:
        self._rounds.labels(self.service).inc()
        self._duration.labels(self.service).observe(seconds)
        self._clients.labels(self.service).set(clients)

    def record_rejected(self, reason: str) -> None:
        self._rejected.labels(self.service, reason).inc()

    def record_privacy(self, client_id: str, privacy: Mapping[str, Any] | None) -> None:
        """Set the epsilon gauge of ``client_id`` when its update reports an ``epsilon``."""
        if not privacy:
            return
        epsilon = privacy.get("epsilon")
        if isinstance(epsilon, int | float):
            self._epsilon.labels(self.service, client_id).set(float(epsilon))


@dataclass
class MetricsServer:
    """A running ``/metrics`` HTTP endpoint; ``close()`` stops it."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port; safe to call more than once."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5.0)
            log.info("metrics_endpoint_stopped", host=self.host, port=self.port)


def serve_metrics(
    registry: CollectorRegistry, *, port: int, host: str = DEFAULT_METRICS_HOST
) -> MetricsServer:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread.

    Raises OSError when the port is taken. Port 0 picks a free port; ``MetricsServer.port``
    then holds the real one.
    """
    if not 0 <= port <= 65_535:
        msg = f"metrics port must be in 0..65535, got {port!r}"
        raise ValueError(msg)
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound_port = int(server.server_address[1])
    log.info("metrics_endpoint_started", host=host, port=bound_port)
    return MetricsServer(host=host, port=bound_port, _server=server, _thread=thread)
