"""Reading and writing the global model on the compacted ``fl.global`` topic."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from fanomad_stream.config import KafkaSettings
from fanomad_stream.detect.autoencoder import Weights
from fanomad_stream.errors import DecodeError
from fanomad_stream.transport import codec
from fanomad_stream.transport.kafka import make_consumer, topic_name, topic_partitions

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class GlobalModel:
    """One published version of the global model."""

    version: int
    round: int
    weights: Weights
    clients: list[str]
    # The aggregator's fold state after this release (``RoundEngine.state_dict``); edge
    # clients ignore it.
    state: dict[str, Any] | None = None


async def publish_global(
    producer: AIOKafkaProducer,
    settings: KafkaSettings,
    model_name: str,
    model: GlobalModel,
    *,
    ts: float,
) -> None:
    """Write a version to ``fl.global`` keyed by the model name and wait for the broker."""
    body: dict[str, Any] = {
        "round": model.round,
        "version": model.version,
        "weights": model.weights,
        "clients": model.clients,
    }
    if model.state is not None:
        body["aggregator_state"] = model.state
    value = codec.encode("global", body, src=model_name, ts=ts)
    await producer.send_and_wait(
        topic_name(settings, "fl.global"), value=value, key=model_name.encode()
    )


class GlobalModelReader:
    """Follows ``fl.global`` from the beginning and keeps the newest version of one model.

    It uses no consumer group: every reader sees every version. Records that fail to decode
    are logged and skipped here; the aggregator is the only writer of this topic.
    """

    def __init__(self, settings: KafkaSettings, model_name: str) -> None:
        self._settings = settings
        self._model_name = model_name
        self._consumer: AIOKafkaConsumer | None = None
        self.latest: GlobalModel | None = None
        self.versions_seen = 0

    async def start(self) -> None:
        assert self._consumer is None, "GlobalModelReader.start() called twice"
        consumer = make_consumer(self._settings, group_id=None)
        await consumer.start()
        topic = topic_name(self._settings, "fl.global")
        partitions = await topic_partitions(self._settings, topic)
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        await consumer.seek_to_beginning()
        self._consumer = consumer

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def poll(self, timeout_ms: int = 0) -> GlobalModel | None:
        """Read what has arrived; return the newest model if it is newer than before."""
        assert self._consumer is not None, "GlobalModelReader.start() was not called"
        before = self.latest.version if self.latest else -1
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=64)
        for records in batches.values():
            for record in records:
                if record.key != self._model_name.encode():
                    continue
                self._take(record.value, record.offset)
        if self.latest is not None and self.latest.version > before:
            return self.latest
        return None

    async def poll_newer_than(self, version: int) -> GlobalModel | None:
        """Read what has arrived; return the newest model when its version is above ``version``.

        Unlike ``poll``, this also returns a model that an earlier ``catch_up`` has read.
        """
        await self.poll(timeout_ms=0)
        if self.latest is not None and self.latest.version > version:
            return self.latest
        return None

    async def catch_up(self, timeout_s: float = 30.0) -> GlobalModel | None:
        """Read up to the end offsets as of this call; return the newest model, if any."""
        assert self._consumer is not None, "GlobalModelReader.start() was not called"
        assignment = list(self._consumer.assignment())
        ends = await self._consumer.end_offsets(assignment)
        deadline = asyncio.get_running_loop().time() + timeout_s
        for tp in assignment:
            while await self._consumer.position(tp) < ends[tp]:
                if asyncio.get_running_loop().time() > deadline:
                    msg = (
                        f"reading {tp.topic} up to offset {ends[tp]} timed out after {timeout_s} s"
                    )
                    raise TimeoutError(msg)
                await self.poll(timeout_ms=200)
        return self.latest

    async def wait_for(self, version: int, timeout_ms: int = 1000) -> GlobalModel | None:
        """Poll once and return the newest model when its version is at least ``version``."""
        await self.poll(timeout_ms)
        if self.latest is not None and self.latest.version >= version:
            return self.latest
        return None

    def _take(self, raw: bytes | None, offset: int) -> None:
        try:
            envelope = codec.decode(
                raw,
                expected_kinds=frozenset({"global"}),
                max_record_bytes=self._settings.max_message_bytes,
            )
        except DecodeError as err:
            log.error("global_model_decode_failed", offset=offset, error=str(err))
            return
        body = envelope.body
        self.versions_seen += 1
        if self.latest is None or body["version"] > self.latest.version:
            self.latest = GlobalModel(
                version=body["version"],
                round=body["round"],
                weights={name: array.copy() for name, array in body["weights"].items()},
                clients=list(body["clients"]),
                state=body.get("aggregator_state"),
            )
