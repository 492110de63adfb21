"""The /metrics endpoint of real services on the session broker, scraped over HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fanomad_stream.broker.local import free_port
from fanomad_stream.config import KafkaSettings
from fanomad_stream.edge.client import EdgeClient
from fanomad_stream.service.metrics import serve_metrics
from fanomad_stream.transport import codec
from fanomad_stream.transport.kafka import make_producer, topic_name
from tests.conftest import make_config, wait_until

pytestmark = pytest.mark.broker

EVENTS = 300


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Fetch a Prometheus text page and return {(sample name, labels): value}."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples[(name, frozenset(labels.items()))]


async def produce_metrics(kafka: KafkaSettings, source: str, count: int, n_features: int) -> None:
    rng = np.random.default_rng(3)
    producer = make_producer(kafka)
    await producer.start()
    try:
        for index in range(count):
            body = {"index": index, "values": rng.normal(size=n_features).astype(np.float32)}
            value_bytes = codec.encode("metric", body, src=source, ts=float(index))
            await producer.send(
                topic_name(kafka, "metrics.raw"), value=value_bytes, key=source.encode()
            )
        await producer.flush()
    finally:
        await producer.stop()


async def test_edge_metrics_count_scored_events(topics: KafkaSettings) -> None:
    """An edge client's endpoint reports every scored record, the latency and zero lag."""
    config = make_config(topics, edge={"window_events": 100_000})
    await produce_metrics(topics, "site-a", EVENTS, config.model.n_features)

    async with EdgeClient(config, site="site-a", sources=["site-a"]) as client:
        endpoint = serve_metrics(client.metrics.registry, port=0)
        try:
            deadline = time.monotonic() + 60
            while client.counters.scored < EVENTS and time.monotonic() < deadline:
                await client.step()
            samples = await asyncio.to_thread(scrape, endpoint.url)
        finally:
            endpoint.close()

    service = "edge:site-a"
    assert endpoint.host == "127.0.0.1"
    assert value(samples, "fanomad_events_consumed_total", service=service) == EVENTS
    assert value(samples, "fanomad_events_scored_total", service=service, source="site-a") == EVENTS
    assert (
        value(samples, "fanomad_alerts_total", service=service, source="site-a")
        == client.counters.alerts
    )
    assert value(samples, "fanomad_scoring_latency_seconds_count", service=service) >= 1
    assert value(samples, "fanomad_scoring_latency_seconds_sum", service=service) > 0
    lags = [v for (name, _), v in samples.items() if name == "fanomad_consumer_lag"]
    assert lags, "no consumer lag series after consuming every record"
    assert all(lag == 0 for lag in lags)


async def test_aggregator_cli_serves_rejections(topics: KafkaSettings, tmp_path: Path) -> None:
    """``fanomad-stream aggregator --metrics-port`` counts a rejected update by its reason."""
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({"kafka": topics.model_dump(mode="json")}))
    port = free_port()
    command = [sys.executable, "-m", "fanomad_stream.cli", "--config", str(config_path)]
    command += ["aggregator", "--metrics-port", str(port)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # The service logs to a file: a pipe nobody reads could fill up and block it.
    log_path = tmp_path / "aggregator.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        await wait_until(lambda: _answers(url) or process.poll() is not None, timeout_s=60)
        assert process.poll() is None, "the aggregator exited before serving metrics"

        # A delta whose parameter names do not match the model is rejected before any arithmetic.
        update = {
            "round": 0,
            "client_id": "site-a",
            "n_samples": 10,
            "base_version": 0,
            "delta": {"not_a_parameter": np.zeros(3, dtype=np.float32)},
        }
        producer = make_producer(topics)
        await producer.start()
        try:
            await producer.send_and_wait(
                topic_name(topics, "fl.updates"),
                value=codec.encode("update", update, src="site-a", ts=0.0),
                key=b"site-a",
            )
        finally:
            await producer.stop()

        def rejected() -> float:
            samples = scrape(url)
            key = (
                "fanomad_updates_rejected_total",
                frozenset({"service": "aggregator", "reason": "parameters"}.items()),
            )
            return samples.get(key, 0.0)

        await wait_until(lambda: rejected() == 1.0, timeout_s=60)
        samples = await asyncio.to_thread(scrape, url)
        assert value(samples, "fanomad_rounds_completed_total", service="aggregator") == 0
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert process.returncode == 0, log_path.read_text()[-2000:]


def _answers(url: str) -> bool:
    try:
        scrape(url)
    except OSError:
        return False
    return True
