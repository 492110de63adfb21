"""Service metrics recorded into their own registries, read back without HTTP."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from fanomad_stream.service.metrics import AggregatorMetrics, EdgeMetrics, serve_metrics


class TestAggregatorMetrics:
    def test_round_counts_duration_and_clients(self) -> None:
        """Each closed round adds one to the counter, one observation and the client count."""
        metrics = AggregatorMetrics()
        metrics.record_round(seconds=2.0, clients=3)
        metrics.record_round(seconds=4.0, clients=2)
        get = metrics.registry.get_sample_value
        labels = {"service": "aggregator"}

        assert get("fanomad_rounds_completed_total", labels) == 2
        assert get("fanomad_round_duration_seconds_count", labels) == 2
        assert get("fanomad_round_duration_seconds_sum", labels) == 6.0
        assert get("fanomad_round_clients", labels) == 2

    def test_rejections_counted_per_reason(self) -> None:
        """Rejected updates are counted under their reason code."""
        metrics = AggregatorMetrics()
        for reason in ("stale_round", "stale_round", "shape"):
            metrics.record_rejected(reason)
        get = metrics.registry.get_sample_value

        assert (
            get(
                "fanomad_updates_rejected_total", {"service": "aggregator", "reason": "stale_round"}
            )
            == 2
        )
        assert (
            get("fanomad_updates_rejected_total", {"service": "aggregator", "reason": "shape"}) == 1
        )

    @pytest.mark.parametrize(
        ("privacy", "expected"),
        [
            ({"mechanism": "gaussian", "epsilon": 1.5}, 1.5),
            ({"mechanism": "none"}, None),
            ({"epsilon": "1.5"}, None),
            (None, None),
        ],
        ids=["numeric", "no-epsilon", "text", "missing"],
    )
    def test_epsilon_only_when_reported(
        self, privacy: dict[str, object] | None, expected: float | None
    ) -> None:
        """The epsilon gauge of a client is set only from a numeric reported epsilon."""
        metrics = AggregatorMetrics()
        metrics.record_privacy("site-a", privacy)

        value = metrics.registry.get_sample_value(
            "fanomad_epsilon_spent", {"service": "aggregator", "client_id": "site-a"}
        )
        assert value == expected


def test_edge_scored_batches() -> None:
    """Scored batches add to the per-source counters and the latency histogram."""
    metrics = EdgeMetrics("site-a")
    metrics.record_scored("m1", events=10, alerts=1, seconds=0.003)
    metrics.record_scored("m1", events=5, alerts=0, seconds=0.2)
    get = metrics.registry.get_sample_value
    service = {"service": "edge:site-a"}

    assert get("fanomad_events_scored_total", {**service, "source": "m1"}) == 15
    assert get("fanomad_alerts_total", {**service, "source": "m1"}) == 1
    assert get("fanomad_scoring_latency_seconds_count", service) == 2
    assert get("fanomad_scoring_latency_seconds_bucket", {**service, "le": "0.005"}) == 1


def test_two_services_one_process() -> None:
    """Two services in one process keep separate registries and do not clash."""
    first, second = EdgeMetrics("a"), EdgeMetrics("b")
    first.record_consumed(3)

    assert (
        first.registry.get_sample_value("fanomad_events_consumed_total", {"service": "edge:a"}) == 3
    )
    assert (
        second.registry.get_sample_value("fanomad_events_consumed_total", {"service": "edge:b"})
        == 0
    )


def test_metrics_port_out_of_range() -> None:
    """A port outside 0..65535 is rejected with the value."""
    with pytest.raises(ValueError, match="70000"):
        serve_metrics(AggregatorMetrics().registry, port=70_000)


def test_metrics_endpoint_closes_its_port() -> None:
    """After close() the port accepts a new server, so a restarted service can bind it."""
    first = serve_metrics(CollectorRegistry(), port=0)
    port = first.port
    first.close()
    second = serve_metrics(CollectorRegistry(), port=port)
    second.close()
    assert second.port == port
