"""The end-to-end slice on the real broker: replay → edge → aggregator → global model."""

from __future__ import annotations

import asyncio
import contextlib

import msgpack
import numpy as np
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from fanomad_stream.broker.local import LocalBroker
from fanomad_stream.config import KafkaSettings
from fanomad_stream.edge.client import EdgeClient
from fanomad_stream.federate.aggregator import Aggregator
from fanomad_stream.replay.smd import replay_smd
from fanomad_stream.transport import codec
from fanomad_stream.transport.kafka import client_options, make_producer, topic_name
from fanomad_stream.transport.reader import read_topic
from fanomad_stream.transport.topics import apply_catalog, load_catalog
from tests.conftest import SMD_DIR, make_config, wait_until

pytestmark = pytest.mark.broker

MACHINES = ["machine-1-3", "machine-1-6"]


def _config(kafka: KafkaSettings, **overrides: object) -> object:
    sections: dict[str, object] = {
        "replay": {
            "machines": MACHINES,
            "train_rows": 500,
            "test_rows": 700,
            "data_dir": str(SMD_DIR),
        },
        "edge": {
            "window_events": 300,
            "max_batch_records": 100,
            "threshold": {"warmup_events": 100},
        },
        "model": {"local_epochs": 1, "seed": 1},
        "aggregator": {"quorum": 2, "round_deadline_s": 30, "clients": MACHINES},
    }
    sections.update(overrides)
    return make_config(kafka, **sections)


@contextlib.asynccontextmanager
async def _running(*services: EdgeClient | Aggregator):  # type: ignore[no-untyped-def]
    for service in services:
        await service.start()
    tasks = [asyncio.create_task(service.run()) for service in services]
    try:
        yield
    finally:
        for service in services:
            service.request_stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for service in services:
            await service.stop()


def test_broker_answers_and_reports_status(kafka_broker: LocalBroker) -> None:
    """The session broker is up: a pid file exists and a metadata request succeeds."""
    assert kafka_broker.pid() is not None
    assert kafka_broker.is_ready()


async def test_topics_apply_idempotent_and_reports_drift(kafka_settings: KafkaSettings) -> None:
    """Applying twice creates nothing the second time; a topic with other settings is drift."""
    admin = AIOKafkaAdminClient(**client_options(kafka_settings))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic_name(kafka_settings, "alerts"), 3, 1)])
    finally:
        await admin.close()
    catalog = load_catalog()
    first = await apply_catalog(kafka_settings, catalog)
    second = await apply_catalog(kafka_settings, catalog)
    assert len(first.created) == len(catalog.topics) - 1
    assert second.created == []
    assert any("alerts: partitions 3, catalog says 1" in line for line in second.drift)
    assert len(second.unchanged) == len(catalog.topics) - 1


async def test_end_to_end_exact_counts(topics: KafkaSettings) -> None:
    """Every replayed point gets exactly one score, and rounds publish global versions."""
    config = _config(topics)
    edges = [EdgeClient(config, site=m, sources=[m]) for m in MACHINES]  # type: ignore[arg-type]
    aggregator = Aggregator(config)  # type: ignore[arg-type]
    async with _running(aggregator, *edges):
        report = await replay_smd(topics, config.replay, progress=False)  # type: ignore[attr-defined]
        await wait_until(
            lambda: sum(e.counters.scored for e in edges) >= report.total_points, timeout_s=180
        )
        await wait_until(lambda: aggregator.rounds_completed >= 3, timeout_s=120)
        # Each site also reads (and skips) the other site's records, possibly later.
        await wait_until(lambda: all(e.counters.skipped >= 1200 for e in edges), timeout_s=120)

    assert report.points == {m: 1200 for m in MACHINES}
    assert report.labels == {m: 700 for m in MACHINES}
    for edge, machine in zip(edges, MACHINES, strict=True):
        assert edge.counters.per_source[machine] == 1200
        assert edge.counters.dead_letters == 0
        assert edge.counters.skipped == 1200  # the other machine's records
    scores = await read_topic(topics, "scores", frozenset({"score"}))
    assert len(scores) == report.total_points
    per_key = {m: sorted(s.envelope.body["index"] for s in scores if s.key == m) for m in MACHINES}
    assert per_key == {m: list(range(1200)) for m in MACHINES}
    globals_ = await read_topic(topics, "fl.global", frozenset({"global"}))
    versions = [g.envelope.body["version"] for g in globals_]
    assert versions[:4] == [0, 1, 2, 3]
    assert sorted(globals_[1].envelope.body["clients"]) == MACHINES
    assert aggregator.rejected == {}
    # Scores after the first round carry the global version they were computed with.
    assert max(s.envelope.body["model_version"] for s in scores) >= 1


async def test_context_scoring_end_to_end(topics: KafkaSettings) -> None:
    """With ``edge.scoring: context`` the federation averages the wider model, and no row of
    the warm-up alerts."""
    edge_settings = {
        "window_events": 300,
        "max_batch_records": 100,
        "scoring": "context",
        "context": {"warmup_rows": 500, "spot_warmup": 500},
    }
    config = _config(topics, edge=edge_settings)
    edges = [EdgeClient(config, site=m, sources=[m]) for m in MACHINES]  # type: ignore[arg-type]
    aggregator = Aggregator(config)  # type: ignore[arg-type]
    async with _running(aggregator, *edges):
        report = await replay_smd(topics, config.replay, progress=False)  # type: ignore[attr-defined]
        await wait_until(
            lambda: sum(e.counters.scored for e in edges) >= report.total_points, timeout_s=180
        )
        await wait_until(lambda: aggregator.rounds_completed >= 3, timeout_s=120)

    assert aggregator.rejected == {}
    globals_ = await read_topic(topics, "fl.global", frozenset({"global"}))
    first_layer = next(iter(globals_[-1].envelope.body["weights"].values()))
    assert 2 * 38 in first_layer.shape
    scores = await read_topic(topics, "scores", frozenset({"score"}))
    assert len(scores) == report.total_points
    max_float = float(np.finfo(np.float64).max)
    for machine in MACHINES:
        bodies = sorted(
            (s.envelope.body for s in scores if s.key == machine), key=lambda b: b["index"]
        )
        warmup = [b for b in bodies if b["index"] < 500]
        # A batch holds at most 100 rows, so the batch after the warm-up starts before row 600.
        later = [b for b in bodies if b["index"] >= 600]
        assert all(b["threshold"] == max_float for b in warmup)
        assert not any(b["alert"] for b in warmup)
        assert all(b["threshold"] < max_float for b in later)


async def test_malformed_records_dead_lettered(topics: KafkaSettings) -> None:
    """Each malformed record lands in the dlq with a reason; good records after them are scored."""
    config = _config(topics, replay={"machines": ["m1"]}, model={"n_features": 4})
    producer = make_producer(topics)
    await producer.start()
    good = codec.encode("metric", {"index": 0, "values": np.ones(4, np.float32)}, src="m1", ts=1.0)
    bad = {
        "truncated": good[:-3],
        "unknown-version": msgpack.packb(
            {"v": 7, "kind": "metric", "src": "m1", "ts": 1.0, "body": {}}
        ),
        "object-dtype": msgpack.packb(
            {
                "v": 1,
                "kind": "metric",
                "src": "m1",
                "ts": 1.0,
                "body": {
                    "values": msgpack.ExtType(
                        codec.NDARRAY_EXT, msgpack.packb(["|O", [1], b"\x00" * 8])
                    )
                },
            },
        ),
        "oversized-array": codec.encode(
            "metric", {"values": np.ones(2_000_000, np.float32)}, src="m1", ts=1.0
        ),
        "nan": codec.encode(
            "metric", {"values": np.array([1, np.nan, 1, 1], np.float32)}, src="m1", ts=1.0
        ),
        "wrong-width": codec.encode("metric", {"values": np.ones(5, np.float32)}, src="m1", ts=1.0),
    }
    try:
        for raw in bad.values():
            await producer.send_and_wait(
                topic_name(topics, "metrics.raw"), raw, key=b"m1", partition=0
            )
        for i in range(3):
            record = codec.encode(
                "metric", {"index": i, "values": np.ones(4, np.float32)}, src="m1", ts=1.0
            )
            await producer.send_and_wait(
                topic_name(topics, "metrics.raw"), record, key=b"m1", partition=0
            )
    finally:
        await producer.stop()

    edge = EdgeClient(config, site="m1", sources=["m1"])  # type: ignore[arg-type]
    async with _running(edge):
        await wait_until(lambda: edge.counters.consumed >= len(bad) + 3, timeout_s=60)

    assert edge.counters.scored == 3
    assert edge.counters.dead_letters == len(bad)
    dead = await read_topic(topics, "dlq", frozenset({"dead_letter"}))
    errors = [d.envelope.body["error"] for d in dead]
    assert len(errors) == len(bad)
    assert "malformed msgpack" in errors[0]
    assert "unknown schema version 7" in errors[1]
    assert "dtype '|O' is not allowed" in errors[2]
    assert "above the limit" in errors[3]
    assert "NaN" in errors[4]
    assert "the model expects 4" in errors[5]
    assert [d.envelope.body["offset"] for d in dead] == list(range(len(bad)))
    assert all(d.envelope.body["topic"] == topic_name(topics, "metrics.raw") for d in dead)


async def test_aggregator_dead_letters_bad_updates(topics: KafkaSettings) -> None:
    """Bad updates go to the dlq, another model's update is skipped, and the model stays."""
    config = _config(topics, aggregator={"quorum": 1, "clients": ["a"]})
    aggregator = Aggregator(config)  # type: ignore[arg-type]
    async with _running(aggregator):
        await wait_until(lambda: aggregator.model is not None)
        template = aggregator.model.weights  # type: ignore[union-attr]
        zeros = {n: np.zeros_like(w) for n, w in template.items()}
        wrong_shape = dict(zeros, **{next(iter(template)): np.zeros((1, 1), np.float32)})
        base = {"round": 0, "n_samples": 5, "base_version": 0}
        updates = [
            dict(base, client_id="mallory", delta=zeros),
            dict(base, client_id="a", delta=wrong_shape),
            dict(base, client_id="a", delta=zeros, n_samples=0),
            dict(base, client_id="a", delta=zeros, round=9),
            dict(base, client_id="a", delta=zeros, model="another-model"),
        ]
        producer = make_producer(topics)
        await producer.start()
        try:
            for body in updates:
                value = codec.encode("update", body, src="t", ts=0.0)
                await producer.send_and_wait(topic_name(topics, "fl.updates"), value, key=b"x")
        finally:
            await producer.stop()
        await wait_until(
            lambda: sum(aggregator.rejected.values()) == len(updates) - 1, timeout_s=60
        )
        await wait_until(lambda: aggregator.skipped_other_models == 1, timeout_s=60)
        assert aggregator.rounds_completed == 0
        assert aggregator.model.version == 0  # type: ignore[union-attr]

    assert aggregator.rejected == {
        "unknown_client": 1,
        "shape": 1,
        "no_samples": 1,
        "future_round": 1,
    }
    dead = await read_topic(topics, "dlq", frozenset({"dead_letter"}))
    assert [d.envelope.body["error"].split(":")[0] for d in dead] == [
        "unknown_client",
        "shape",
        "no_samples",
        "future_round",
    ]


async def test_multi_megabyte_update_travels(topics: KafkaSettings) -> None:
    """A 6 MB update goes through the broker and back byte for byte."""
    delta = {"w": np.random.default_rng(0).normal(size=1_500_000).astype(np.float32)}
    body = {"round": 0, "client_id": "a", "n_samples": 10, "base_version": 0, "delta": delta}
    producer = make_producer(topics)
    await producer.start()
    try:
        await producer.send_and_wait(
            topic_name(topics, "fl.updates"), codec.encode("update", body, src="a", ts=0), key=b"a"
        )
    finally:
        await producer.stop()
    records = await read_topic(topics, "fl.updates", frozenset({"update"}))
    assert len(records) == 1
    np.testing.assert_array_equal(records[0].envelope.body["delta"]["w"], delta["w"])
