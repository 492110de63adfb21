"""DP and secure aggregation rounds between the aggregator and in-process clients, on the broker.

The aggregator is the real service. The three clients are ``SecAggParticipant`` objects, each
with its own producer and control consumer, so every protocol message crosses Kafka as a
``control`` record. Each client's update is clipped and noised by ``privatize_client_update``
with a seeded generator, so the test knows exactly what the sum must be.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer

from fanomad_stream.config import AppConfig, KafkaSettings
from fanomad_stream.federate import secagg_kafka
from fanomad_stream.federate.aggregate import Weights
from fanomad_stream.federate.aggregator import Aggregator
from fanomad_stream.federate.secagg_kafka import SecAggParticipant
from fanomad_stream.privacy.accountant import compute_epsilon
from fanomad_stream.privacy.dp import SecureGaussian, privatize_client_update
from fanomad_stream.privacy.secagg.encoding import flatten_update
from fanomad_stream.privacy.secagg.messages import Message
from fanomad_stream.transport.kafka import make_producer
from fanomad_stream.transport.reader import read_topic
from tests.conftest import make_config

pytestmark = pytest.mark.broker

CLIENTS = ["site-a", "site-b", "site-c"]
CLIPPING_NORM = 0.5
NOISE_MULTIPLIER = 1.0
DELTA = 1e-5
SCALE_BITS = 16


def _config(kafka: KafkaSettings, *, stage_timeout_s: float = 3.0, dp: bool = True) -> AppConfig:
    return make_config(
        kafka,
        model={"n_features": 6, "hidden": [4], "seed": 3},
        aggregator={"quorum": 3, "clients": CLIENTS, "round_deadline_s": 30},
        privacy={
            "client_dp": {
                "enabled": dp,
                "clipping_norm": CLIPPING_NORM,
                "noise_multiplier": NOISE_MULTIPLIER,
                "delta": DELTA,
            },
            "secure_aggregation": {
                "enabled": True,
                "threshold": 2,
                "stage_timeout_s": stage_timeout_s,
                "scale_bits": SCALE_BITS,
            },
        },
    )


def _private_update(template: Mapping[str, np.ndarray], seed: int) -> Weights:
    """Return a client's clipped and noised delta, as its edge privacy step makes it."""
    rng = np.random.default_rng(seed)
    delta = {
        name: (rng.standard_normal(np.shape(array)) * 0.3).astype(np.float32)
        for name, array in template.items()
    }
    private = privatize_client_update(
        delta,
        clipping_norm=CLIPPING_NORM,
        noise_multiplier=NOISE_MULTIPLIER,
        min_cohort=2,
        noise=SecureGaussian(test_seed=seed),
    )
    return private.update


@asynccontextmanager
async def _federation(
    config: AppConfig,
) -> AsyncIterator[tuple[Aggregator, list[SecAggParticipant]]]:
    """Run the aggregator service and start one participant per client."""
    aggregator = Aggregator(config)
    await aggregator.start()
    task = asyncio.create_task(aggregator.run())
    producers: list[AIOKafkaProducer] = []
    participants: list[SecAggParticipant] = []
    try:
        for site in CLIENTS:
            producer = make_producer(config.kafka)
            await producer.start()
            producers.append(producer)
            participant = SecAggParticipant(config, site, producer)
            await participant.start()
            participants.append(participant)
        yield aggregator, participants
    finally:
        aggregator.request_stop()
        await asyncio.wait_for(task, timeout=10)
        await aggregator.stop()
        for participant in participants:
            await participant.stop()
        for producer in producers:
            await producer.stop()


async def _join(
    aggregator: Aggregator, participants: list[SecAggParticipant]
) -> dict[str, Weights]:
    """Wait for the announcement, then submit every client's private update."""
    for participant in participants:
        while not participant.wants_update(0):
            await participant.poll(timeout_ms=200)
    assert aggregator.model is not None
    updates = {}
    for seed, participant in enumerate(participants, start=1):
        update = _private_update(aggregator.model.weights, seed)
        vector, _ = flatten_update(update)
        clipped = await participant.submit(vector, weight=1.0, metadata={"n_samples": 100})
        assert clipped == 0
        updates[participant.site] = update
    return updates


async def _drive(
    participants: list[SecAggParticipant],
    done: Callable[[], bool],
    *,
    active: Callable[[SecAggParticipant], bool] = lambda _: True,
    timeout_s: float = 40.0,
) -> None:
    """Poll the participants that are still ``active`` until ``done()``."""

    async def loop() -> None:
        while not done():
            for participant in participants:
                if active(participant):
                    await participant.poll(timeout_ms=50)
            await asyncio.sleep(0.02)

    await asyncio.wait_for(loop(), timeout=timeout_s)


def _expected(start: Weights, updates: list[Weights], denominator: int) -> Weights:
    return {
        name: start[name] + sum(u[name].astype(np.float64) for u in updates) / denominator
        for name in start
    }


def _assert_close(actual: Weights, expected: Weights, clients: int) -> None:
    # Each client's value is rounded to a 2^-16 step, so the mean is off by at most
    # clients * 2^-16 / 3, plus float32 rounding of the stored weights.
    tolerance = clients * 2.0**-SCALE_BITS / 3 + 1e-6
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=tolerance)


async def test_dp_secure_round_equals_the_plain_sum(
    topics: KafkaSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every control record is delivered twice; the round still sums each client once."""
    original = secagg_kafka.send_control

    async def send_twice(producer: AIOKafkaProducer, config: AppConfig, message: Message) -> None:
        await original(producer, config, message)
        await original(producer, config, message)

    monkeypatch.setattr(secagg_kafka, "send_control", send_twice)
    config = _config(topics)
    async with _federation(config) as (aggregator, participants):
        assert aggregator.model is not None
        start = aggregator.model.weights
        updates = await _join(aggregator, participants)
        await _drive(participants, lambda: aggregator.rounds_completed >= 1)

        assert aggregator.model.version == 1
        assert aggregator.model.clients == CLIENTS
        _assert_close(aggregator.model.weights, _expected(start, list(updates.values()), 3), 3)
        assert not np.allclose(aggregator.model.weights["encoder.0.bias"], start["encoder.0.bias"])
        assert all(len(p.completed) == 1 for p in participants)

    ledger = await read_topic(config.kafka, "privacy.ledger", frozenset({"ledger"}))
    bodies = [record.envelope.body for record in ledger]
    assert [b["status"] for b in bodies] == ["round"]
    expected_epsilon = compute_epsilon(
        noise_multiplier=NOISE_MULTIPLIER, sampling_rate=1.0, steps=1, delta=DELTA
    )
    assert bodies[0]["epsilon"] == pytest.approx(expected_epsilon, rel=1e-9)
    assert bodies[0]["params"]["noise_added_by"] == "clients"
    assert bodies[0]["params"]["encoding_clipped_values"] == 0
    assert ledger[0].key == config.aggregator.model_name


async def test_client_dropping_after_sharing_still_yields_a_round(topics: KafkaSettings) -> None:
    config = _config(topics)
    dropper = CLIENTS[2]

    def still_running(participant: SecAggParticipant) -> bool:
        # The third client vanishes right after it sent its encrypted shares.
        return participant.site != dropper or "share_keys" not in participant.stages_sent

    async with _federation(config) as (aggregator, participants):
        assert aggregator.model is not None
        start = aggregator.model.weights
        updates = await _join(aggregator, participants)
        await _drive(participants, lambda: aggregator.rounds_completed >= 1, active=still_running)

        assert aggregator.model.clients == CLIENTS[:2]
        survivors = [updates[site] for site in CLIENTS[:2]]
        # The fixed denominator stays the expected cohort of 3.
        _assert_close(aggregator.model.weights, _expected(start, survivors, 3), 2)


async def test_round_below_threshold_aborts_and_keeps_the_model(topics: KafkaSettings) -> None:
    config = _config(topics, stage_timeout_s=2.0)
    async with _federation(config) as (aggregator, participants):
        assert aggregator.model is not None
        start = aggregator.model.weights
        lonely = participants[0]
        while not lonely.wants_update(0):
            await lonely.poll(timeout_ms=200)
        first_round = lonely.announced.round if lonely.announced else -1
        vector, _ = flatten_update(_private_update(start, 1))
        await lonely.submit(vector, weight=1.0, metadata={})

        await _drive(
            [lonely], lambda: lonely.announced is not None and lonely.announced.round != first_round
        )

        assert aggregator.rejected.get("secagg_aborted") == 1
        assert aggregator.model.version == 0
        assert lonely.client is None  # the abort made it drop its secrets
        assert lonely.wants_update(0)  # and it may join the new attempt
    ledger = await read_topic(config.kafka, "privacy.ledger", frozenset({"ledger"}))
    assert ledger == []


async def test_secure_round_without_dp_is_sample_weighted_fedavg(topics: KafkaSettings) -> None:
    config = _config(topics, dp=False)
    window = config.edge.window_events
    samples = {"site-a": 500, "site-b": 1000, "site-c": 1500}
    async with _federation(config) as (aggregator, participants):
        assert aggregator.model is not None
        start = aggregator.model.weights
        for participant in participants:
            while not participant.wants_update(0):
                await participant.poll(timeout_ms=200)
        deltas = {}
        for seed, participant in enumerate(participants, start=1):
            rng = np.random.default_rng(seed)
            delta = {
                name: (rng.standard_normal(np.shape(array)) * 0.2).astype(np.float32)
                for name, array in start.items()
            }
            deltas[participant.site] = delta
            vector, _ = flatten_update(delta)
            weight = samples[participant.site] / window
            await participant.submit(vector, weight=weight, metadata={})
        await _drive(participants, lambda: aggregator.rounds_completed >= 1)

        total = sum(samples.values())
        expected = {
            name: start[name]
            + sum(n * deltas[site][name].astype(np.float64) for site, n in samples.items()) / total
            for name in start
        }
        # Three rounding steps of 2^-16 on the weighted sum, divided by the total weight 1.5.
        tolerance = 3 * 2.0**-SCALE_BITS / 1.5 + 1e-6
        for name in start:
            np.testing.assert_allclose(
                aggregator.model.weights[name], expected[name], rtol=0, atol=tolerance
            )
    assert await read_topic(config.kafka, "privacy.ledger", frozenset({"ledger"})) == []
