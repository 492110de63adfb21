"""Read a whole topic, as it is at the time of the call, without a consumer group."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog
from aiokafka import TopicPartition

from fanomad_stream.config import KafkaSettings
from fanomad_stream.errors import DecodeError
from fanomad_stream.transport import codec
from fanomad_stream.transport.kafka import make_consumer, topic_name, topic_partitions

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Keyed:
    key: str
    envelope: codec.Envelope
    partition: int
    offset: int


async def end_offsets(kafka: KafkaSettings, name: str) -> dict[int, int]:
    """Return the end offset of each partition of a catalog topic."""
    consumer = make_consumer(kafka, group_id=None)
    await consumer.start()
    try:
        topic = topic_name(kafka, name)
        partitions = [
            TopicPartition(topic, p) for p in sorted(await topic_partitions(kafka, topic))
        ]
        ends = await consumer.end_offsets(partitions)
        return {tp.partition: int(offset) for tp, offset in ends.items()}
    finally:
        await consumer.stop()


async def read_topic(
    kafka: KafkaSettings, name: str, kinds: frozenset[str], timeout_s: float = 120.0
) -> list[Keyed]:
    """Decode every record of a catalog topic up to its current end offsets.

    Records that fail to decode are counted and logged, not returned.
    """
    consumer = make_consumer(
        kafka, group_id=None, max_partition_fetch_bytes=kafka.max_message_bytes + 1024 * 1024
    )
    await consumer.start()
    out: list[Keyed] = []
    failed = 0
    try:
        topic = topic_name(kafka, name)
        partitions = [
            TopicPartition(topic, p) for p in sorted(await topic_partitions(kafka, topic))
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        deadline = asyncio.get_running_loop().time() + timeout_s
        remaining = {tp for tp in partitions if ends[tp] > 0}
        while remaining:
            if asyncio.get_running_loop().time() > deadline:
                msg = f"reading topic {topic} to its end timed out after {timeout_s} s"
                raise TimeoutError(msg)
            batches = await consumer.getmany(*remaining, timeout_ms=500, max_records=5000)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        continue
                    try:
                        envelope = codec.decode(record.value, expected_kinds=kinds)
                    except DecodeError:
                        failed += 1
                        continue
                    out.append(
                        Keyed((record.key or b"").decode(), envelope, tp.partition, record.offset)
                    )
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    if failed:
        log.warning("topic_records_undecodable", topic=name, count=failed)
    return out
