"""aiokafka producers and consumers built from one KafkaSettings, plus the dead-letter writer.

All clients share the security settings and the message size limit, so a producer never sends
a record that the topic or a consumer would refuse.
"""

from __future__ import annotations

import ssl
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.helpers import create_ssl_context

from fanomad_stream.config import KafkaSettings
from fanomad_stream.transport import codec

log = structlog.get_logger(__name__)

DEAD_LETTER_RAW_BYTES = 1024


def topic_name(settings: KafkaSettings, name: str) -> str:
    """Return the full topic name for a catalog name (``metrics.raw``) under the prefix."""
    return f"{settings.topic_prefix}{name}"


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Return the connection and security keyword arguments every aiokafka client takes."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.security_protocol,
        "request_timeout_ms": settings.request_timeout_ms,
    }
    if settings.sasl_mechanism is not None:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = settings.sasl_password
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = _ssl_context(settings)
    return options


def _ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    # aiokafka's context always verifies the broker certificate and its host name.
    return create_ssl_context(  # type: ignore[no-any-return]
        cafile=settings.ssl_cafile,
        certfile=settings.ssl_certfile,
        keyfile=settings.ssl_keyfile,
        password=settings.ssl_key_password,
    )


def make_producer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """Create (not start) a producer that waits for the leader and may send large records."""
    options = client_options(settings)
    options.update(
        acks="all",
        enable_idempotence=True,
        max_request_size=settings.max_message_bytes,
        linger_ms=5,
        compression_type=None,
    )
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(
    settings: KafkaSettings, *topics: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    """Create (not start) a consumer that commits only on an explicit commit() call.

    Values are left as bytes: decoding happens per record in our code, so a bad record becomes
    a dead letter instead of an exception inside the fetcher.
    """
    options = client_options(settings)
    options.update(
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=settings.max_message_bytes + 1024 * 1024,
        fetch_max_bytes=max(52_428_800, settings.max_message_bytes * 2),
    )
    options.update(overrides)
    return AIOKafkaConsumer(*[topic_name(settings, t) for t in topics], **options)


async def topic_partitions(settings: KafkaSettings, topic: str) -> list[int]:
    """Return the partition ids of ``topic``; raise LookupError when it does not exist."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [
        p["partition"] for d in described if d["error_code"] == 0 for p in d["partitions"]
    ]
    if not partitions:
        msg = f"topic {topic!r} does not exist; run `fanomad-stream topics apply` first"
        raise LookupError(msg)
    return sorted(partitions)


class DeadLetters:
    """Writes records that failed to decode or validate to the ``dlq`` topic.

    Each dead letter names the original topic, partition and offset, the error, and keeps the
    first 1024 bytes of the value, so an operator can find and replay the record.
    """

    def __init__(self, producer: AIOKafkaProducer, settings: KafkaSettings, *, src: str) -> None:
        self._producer = producer
        self._topic = topic_name(settings, "dlq")
        self._src = src
        self.count = 0

    async def send(
        self, *, topic: str, partition: int, offset: int, error: str, raw: bytes | None, ts: float
    ) -> None:
        body = {
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "error": error,
            "raw": (raw or b"")[:DEAD_LETTER_RAW_BYTES],
            "raw_bytes": len(raw or b""),
        }
        value = codec.encode("dead_letter", body, src=self._src, ts=ts)
        await self._producer.send(self._topic, value=value, key=topic.encode())
        self.count += 1
        if self.count > 10 and self.count % 1000:
            return  # the first ten and then every thousandth are logged; all are counted
        log.warning(
            "record_dead_lettered",
            topic=topic,
            partition=partition,
            offset=offset,
            error=error,
            dead_letters=self.count,
        )
