"""Buffered asynchronous rounds with client-level DP, through ``fl.updates`` on the broker."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from fanomad_stream.config import KafkaSettings
from fanomad_stream.federate.aggregate import Weights
from fanomad_stream.federate.aggregator import Aggregator
from fanomad_stream.privacy.accountant import compute_epsilon
from fanomad_stream.privacy.dp import SecureGaussian, clip_update
from fanomad_stream.transport import codec
from fanomad_stream.transport.kafka import make_producer, topic_name
from fanomad_stream.transport.reader import read_topic
from tests.conftest import make_config, wait_until

pytestmark = pytest.mark.broker


def _delta(template: Weights, seed: int) -> Weights:
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal(np.shape(array)) * 0.4).astype(np.float32)
        for name, array in template.items()
    }


async def test_buffered_dp_round_adds_seeded_noise(
    topics: KafkaSettings,
) -> None:
    config = make_config(
        topics,
        model={"n_features": 6, "hidden": [4], "seed": 3},
        aggregator={
            "clients": ["a", "b"],
            "buffered_async": {
                "buffer_size": 2,
                "staleness": "constant",
                "weight_by_samples": False,
            },
        },
        privacy={"client_dp": {"enabled": True, "clipping_norm": 0.5, "noise_multiplier": 1.3}},
    )
    aggregator = Aggregator(config, noise=SecureGaussian(test_seed=21))
    await aggregator.start()
    task = asyncio.create_task(aggregator.run())
    producer = make_producer(config.kafka)
    await producer.start()
    try:
        assert aggregator.model is not None
        start = aggregator.model.weights
        deltas = {"a": _delta(start, 1), "b": _delta(start, 2)}
        # The same update twice: the buffer must fold it once.
        for client in ["a", "a", "b"]:
            body = {
                "round": 0,
                "client_id": client,
                "n_samples": 500,
                "base_version": 0,
                "delta": deltas[client],
                "privacy": {"mechanism": "dp-fedavg"},
            }
            value = codec.encode("update", body, src=client, ts=0.0)
            await producer.send_and_wait(
                topic_name(config.kafka, "fl.updates"), value=value, key=client.encode()
            )
        await wait_until(lambda: aggregator.rounds_completed >= 1, timeout_s=30)
    finally:
        await producer.stop()
        aggregator.request_stop()
        await asyncio.wait_for(task, timeout=10)
        await aggregator.stop()

    assert aggregator.model.version == 1
    assert aggregator.rejected == {"duplicate": 1}
    noise = SecureGaussian(test_seed=21).normal_like(start, 1.3 * 0.5)
    for name in start:
        total = sum(
            clip_update(d, clipping_norm=0.5).update[name].astype(np.float64)
            for d in deltas.values()
        )
        expected = start[name] + ((total + noise[name]).astype(np.float32) / 2)
        np.testing.assert_allclose(aggregator.model.weights[name], expected, rtol=0, atol=1e-6)

    ledger = await read_topic(config.kafka, "privacy.ledger", frozenset({"ledger"}))
    assert len(ledger) == 1
    body = ledger[0].envelope.body
    expected_epsilon = compute_epsilon(noise_multiplier=1.3, sampling_rate=1.0, steps=1, delta=1e-5)
    assert body["epsilon"] == pytest.approx(expected_epsilon, rel=1e-9)
    assert body["params"]["noise_added_by"] == "server"

    # A restarted aggregator rebuilds the ledger from the topic instead of starting at ε = 0.
    restarted = Aggregator(config)
    await restarted.start()
    try:
        assert restarted.model is not None and restarted.model.version == 1
        assert restarted.engine is not None and restarted.engine.ledger is not None
        assert restarted.engine.ledger.rounds == 1
        assert restarted.engine.ledger.spent_epsilon() == pytest.approx(expected_epsilon)
    finally:
        await restarted.stop()
