"""Round history rebuilt from the federation topics, as the report plots it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fanomad_stream.config import KafkaSettings
from fanomad_stream.evaluate.series import collect_rounds
from fanomad_stream.federate.global_model import GlobalModel, publish_global
from fanomad_stream.transport import codec
from fanomad_stream.transport.kafka import make_producer, topic_name

pytestmark = pytest.mark.broker

MODEL = "smd-ae"


async def test_rounds_collected_from_topics(topics: KafkaSettings) -> None:
    """Each published version gives one round with its clients, mean loss and epsilon."""
    weights = {"w": np.zeros(2, dtype=np.float32)}
    producer = make_producer(topics)
    await producer.start()
    try:
        await publish_global(producer, topics, MODEL, GlobalModel(0, -1, weights, []), ts=0.0)
        losses = {(0, "a"): 0.5, (0, "b"): 0.3, (1, "a"): 0.2, (1, "c"): 9.0}
        for (round_id, client), loss in losses.items():
            body = {
                "round": round_id,
                "client_id": client,
                "n_samples": 10,
                "base_version": round_id,
                "delta": weights,
                "train_loss": loss,
                "privacy": {"mechanism": "gaussian", "epsilon": 0.5 * (round_id + 1)},
            }
            await producer.send_and_wait(
                topic_name(topics, "fl.updates"),
                codec.encode("update", body, src=client, ts=1.0),
                key=client.encode(),
            )
        # Round 1 folded only client a; the update of c was rejected and must not count.
        await publish_global(
            producer, topics, MODEL, GlobalModel(1, 0, weights, ["a", "b"]), ts=2.0
        )
        await publish_global(producer, topics, MODEL, GlobalModel(2, 1, weights, ["a"]), ts=3.0)
        await publish_global(
            producer, topics, "other-model", GlobalModel(5, 4, weights, ["z"]), ts=4.0
        )
    finally:
        await producer.stop()

    rounds = await collect_rounds(topics, MODEL)

    assert [(r.round, r.version) for r in rounds] == [(0, 1), (1, 2)]
    assert rounds[0].clients == ["a", "b"]
    assert math.isclose(rounds[0].train_loss, 0.4)
    assert math.isclose(rounds[1].train_loss, 0.2)
    assert rounds[0].epsilon == 0.5
    assert rounds[1].epsilon == 1.0
