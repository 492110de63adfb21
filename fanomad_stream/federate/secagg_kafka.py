"""Secure aggregation rounds carried over Kafka: ``control`` records on ``fl.control``.

Every protocol message ``{round, stage, sender, recipient, body}`` travels as the body of one
``control`` record keyed by its recipient (the aggregator is ``"server"``). The aggregator's
``SecAggCoordinator`` announces each attempt with a ``round_open`` message to every invited
client, runs ``SecAggServer`` and closes a stage when every client replied or its timeout
passed. An edge client's ``SecAggParticipant`` joins the newest announced attempt for the
global version it holds, with the update of its next training window.

Attempt ids (the protocol's ``round``) are milliseconds since the epoch, increasing across
aggregator restarts, so a redelivered message of an older attempt never matches the open one.
Within an attempt the state machines are idempotent by (round, stage, sender): the server
ignores a second copy and a client answers it from cache, so Kafka redelivery is harmless. An
attempt that cannot reach the threshold aborts before any share is requested; the global
model stays as it was and the coordinator announces a new attempt for the same version.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from fanomad_stream.config import AppConfig
from fanomad_stream.errors import DecodeError
from fanomad_stream.federate.aggregate import Weights
from fanomad_stream.privacy.secagg import (
    ProtocolError,
    RoundAbortedError,
    SecAggClient,
    SecAggServer,
    ShareDecryptionError,
)
from fanomad_stream.privacy.secagg.encoding import Layout, flatten_update, unflatten_update
from fanomad_stream.privacy.secagg.messages import SERVER_ID, UNMASK, Message, make_message
from fanomad_stream.privacy.settings import secure_aggregation_codec
from fanomad_stream.transport import codec
from fanomad_stream.transport.kafka import make_consumer, topic_name, topic_partitions

log = structlog.get_logger(__name__)

ROUND_OPEN = "round_open"
CONTROL_KINDS = frozenset({"control"})


def session_name(config: AppConfig) -> str:
    """Return the name bound into every key and ciphertext of this deployment's rounds."""
    return f"{config.kafka.topic_prefix}{config.aggregator.model_name}"


async def send_control(producer: AIOKafkaProducer, config: AppConfig, message: Message) -> None:
    """Write ``message`` to ``fl.control`` keyed by its recipient and wait for the broker."""
    value = codec.encode("control", message, src=str(message["sender"]), ts=time.time())
    await producer.send_and_wait(
        topic_name(config.kafka, "fl.control"),
        value=value,
        key=str(message["recipient"]).encode(),
    )


async def open_control_consumer(config: AppConfig, *, from_start: bool) -> AIOKafkaConsumer:
    """Return a started, group-less consumer of every ``fl.control`` partition.

    ``from_start`` reads the retained history (an edge client must see an announcement made
    before it started); otherwise reading starts at the current end.
    """
    topic = topic_name(config.kafka, "fl.control")
    partitions = [TopicPartition(topic, p) for p in await topic_partitions(config.kafka, topic)]
    consumer = make_consumer(config.kafka, group_id=None)
    await consumer.start()
    consumer.assign(partitions)
    if from_start:
        await consumer.seek_to_beginning(*partitions)
    else:
        await consumer.seek_to_end(*partitions)
    for partition in partitions:
        await consumer.position(partition)  # resolve now, before anything is announced
    return consumer


async def poll_control(
    consumer: AIOKafkaConsumer, recipient: str, *, timeout_ms: int = 0
) -> list[Message]:
    """Return the decoded messages addressed to ``recipient`` from one poll.

    Records for other recipients are skipped; malformed ones are logged and skipped, since
    the state machines treat a missing message like a dropped peer.
    """
    batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=500)
    messages: list[Message] = []
    key = recipient.encode()
    for records in batches.values():
        for record in records:
            if record.key != key:
                continue
            try:
                body = codec.decode(record.value, expected_kinds=CONTROL_KINDS).body
            except DecodeError as err:
                log.warning("control_record_skipped", offset=record.offset, error=str(err))
                continue
            if body.get("recipient") == recipient:
                messages.append(body)
    return messages


@dataclass(frozen=True)
class SecAggOutcome:
    """Result of one attempt: the decoded sum of the survivors, or the reason it aborted."""

    round: int
    version: int
    total: Weights | None = None
    clients: list[str] = field(default_factory=list)
    dropped_after_sharing: list[str] = field(default_factory=list)
    total_weight: float = 0.0
    clipped_values: int = 0
    aborted: str | None = None


class SecAggCoordinator:
    """The aggregator's side: announce attempts, run ``SecAggServer``, time out stages.

    Call ``start`` once, ``open_round`` for every attempt, and ``poll`` in the service loop;
    ``poll`` returns an outcome when the open attempt ended.
    """

    def __init__(self, config: AppConfig, producer: AIOKafkaProducer) -> None:
        self.config = config
        self.settings = config.privacy.secure_aggregation
        self.codec = secure_aggregation_codec(config)
        self.clients = sorted(config.aggregator.clients or [])
        self._producer = producer
        self._consumer: AIOKafkaConsumer | None = None
        self.server: SecAggServer | None = None
        self.version = -1
        self._layout: Layout = []
        self._deadline: float | None = None
        self._last_round = 0

    async def start(self) -> None:
        assert self._consumer is None, "SecAggCoordinator.start() called twice"
        self._consumer = await open_control_consumer(self.config, from_start=False)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def open_round(self, version: int, template: Mapping[str, np.ndarray]) -> int:
        """Announce a new attempt for global ``version`` to every client; return its id."""
        vector, self._layout = flatten_update(template)
        round_id = max(self._last_round + 1, time.time_ns() // 1_000_000)
        self._last_round = round_id
        self.version = version
        self.server = SecAggServer(
            round_id=round_id,
            session=session_name(self.config),
            threshold=self.settings.threshold,
            clients=self.clients,
            vector_length=vector.size,
            bits=self.codec.bits,
            stage_timeout_s=self.settings.stage_timeout_s,
        )
        self._deadline = None
        body = {"version": version, "clients": self.clients, "threshold": self.settings.threshold}
        for client in self.clients:
            await self._send(make_message(round_id, ROUND_OPEN, SERVER_ID, client, body))
        log.info("secagg_round_opened", round=round_id, version=version, clients=self.clients)
        return round_id

    async def poll(self, timeout_ms: int = 0) -> SecAggOutcome | None:
        """Handle the control messages that arrived and fire a due stage timeout."""
        assert self._consumer is not None, "SecAggCoordinator.start() was not called"
        for message in await poll_control(self._consumer, SERVER_ID, timeout_ms=timeout_ms):
            outcome = await self._handle(message)
            if outcome is not None:
                return outcome
        server = self.server
        if server is None or self._deadline is None or time.monotonic() < self._deadline:
            return None
        log.info("secagg_stage_timeout", round=server.round_id, stage=server.stage)
        self._deadline = time.monotonic() + self.settings.stage_timeout_s
        await self._send_all(server.on_timeout())
        return self._outcome()

    async def _handle(self, message: Message) -> SecAggOutcome | None:
        server = self.server
        if server is None or message.get("round") != server.round_id:
            return None
        stage = server.stage
        replies = server.handle(message)
        if self._deadline is None or server.stage != stage:
            # A stage's clock starts with its first message, so a round waits for windows.
            self._deadline = time.monotonic() + self.settings.stage_timeout_s
        await self._send_all(replies)
        return self._outcome()

    def _outcome(self) -> SecAggOutcome | None:
        server = self.server
        if server is None:
            return None
        if server.aborted_reason is not None:
            self.server = None
            log.warning("secagg_round_aborted", round=server.round_id, reason=server.aborted_reason)
            return SecAggOutcome(server.round_id, self.version, aborted=server.aborted_reason)
        if server.result is None:
            return None
        self.server = None
        result = server.result
        flat = self.codec.decode_sum(result.total, count=len(result.survivors))
        total = unflatten_update(flat, self._layout)
        weights = [_metadata_weight(meta) for meta in result.metadata.values()]
        clipped = sum(int(meta.get("clipped_values", 0)) for meta in result.metadata.values())
        if clipped:
            log.warning(
                "secagg_values_clipped",
                round=server.round_id,
                clipped_values=clipped,
                note="encoded updates exceeded the range; this round has no DP guarantee",
            )
        return SecAggOutcome(
            server.round_id,
            self.version,
            total=total,
            clients=list(result.survivors),
            dropped_after_sharing=list(result.dropped_after_sharing),
            total_weight=float(sum(weights)),
            clipped_values=clipped,
        )

    async def _send_all(self, messages: list[Message]) -> None:
        for message in messages:
            await self._send(message)

    async def _send(self, message: Message) -> None:
        await send_control(self._producer, self.config, message)


def _metadata_weight(metadata: Mapping[str, Any]) -> float:
    """Return a client's declared weight, 1 when it is missing or not a number in (0, 1]."""
    weight = metadata.get("weight", 1.0)
    if isinstance(weight, float | int) and math.isfinite(weight) and 0 < weight <= 1:
        return float(weight)
    return 1.0


@dataclass(frozen=True)
class Announcement:
    """An attempt the aggregator announced: its id and the global version it aggregates."""

    round: int
    version: int


class SecAggParticipant:
    """An edge client's side: follow announcements, mask its update, reply to the server.

    NOTE: after an aborted attempt a client joins the next one only with a new training
    window, never with the update it already masked, so a site whose stream has ended cannot
    help a retried round.
    """

    def __init__(self, config: AppConfig, site: str, producer: AIOKafkaProducer) -> None:
        self.config = config
        self.site = site
        self.settings = config.privacy.secure_aggregation
        self.codec = secure_aggregation_codec(config)
        self.announced: Announcement | None = None
        self.client: SecAggClient | None = None
        self.stages_sent: list[str] = []
        self.completed: set[int] = set()  # attempts this client sent its unmask shares for
        self._joined: set[int] = set()
        self._producer = producer
        self._consumer: AIOKafkaConsumer | None = None
        self._rng = np.random.default_rng()  # stochastic rounding; seeded by the OS
        self._log = log.bind(client_id=site)

    async def start(self) -> None:
        assert self._consumer is None, "SecAggParticipant.start() called twice"
        self._consumer = await open_control_consumer(self.config, from_start=True)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    def wants_update(self, global_version: int) -> bool:
        """True when an announced attempt for ``global_version`` waits for this client."""
        announced = self.announced
        return (
            announced is not None
            and announced.version == global_version
            and announced.round not in self._joined
        )

    async def submit(self, vector: np.ndarray, *, weight: float, metadata: dict[str, Any]) -> int:
        """Encode ``weight * vector`` and join the announced attempt; return clipped values.

        ``vector`` is the flat update in ``flatten_update`` order. ``metadata`` travels in clear
        with the masked input.
        """
        announced = self.announced
        assert announced is not None, "submit() without an announced round"
        encoded = self.codec.encode(vector, weight=weight, rng=self._rng)
        self.client = SecAggClient(
            client_id=self.site,
            round_id=announced.round,
            session=session_name(self.config),
            threshold=self.settings.threshold,
            encoded=encoded.values,
            bits=self.codec.bits,
            metadata={**metadata, "weight": weight, "clipped_values": encoded.clipped_values},
        )
        self._joined.add(announced.round)
        self.stages_sent = []
        await self._send_all(self.client.start())
        self._log.info("secagg_joined", round=announced.round, version=announced.version)
        return encoded.clipped_values

    async def poll(self, timeout_ms: int = 0) -> None:
        """Handle the control messages addressed to this client."""
        assert self._consumer is not None, "SecAggParticipant.start() was not called"
        for message in await poll_control(self._consumer, self.site, timeout_ms=timeout_ms):
            await self.handle(message)

    async def handle(self, message: Message) -> None:
        if message.get("stage") == ROUND_OPEN:
            self._on_announcement(message)
            return
        client = self.client
        if client is None or message.get("round") != client.round_id:
            return
        try:
            replies = client.handle(message)
        except RoundAbortedError as err:
            self._log.warning("secagg_round_aborted", round=client.round_id, reason=str(err))
            self.client = None
            return
        except (ProtocolError, ShareDecryptionError, ValueError) as err:
            # The server treats a client that stops replying as dropped, so the round goes on.
            self._log.error("secagg_protocol_error", round=client.round_id, error=str(err))
            self.client = None
            return
        await self._send_all(replies)
        if any(reply["stage"] == UNMASK for reply in replies):
            self.completed.add(client.round_id)

    def _on_announcement(self, message: Message) -> None:
        body = message.get("body") or {}
        if self.site not in body.get("clients", ()):
            return
        round_id, version = int(message["round"]), int(body["version"])
        if self.announced is not None and round_id <= self.announced.round:
            return
        self.announced = Announcement(round_id, version)
        if self.client is not None and self.client.round_id != round_id:
            self.client = None  # the older attempt is over for the aggregator
        self._log.info("secagg_round_announced", round=round_id, version=version)

    async def _send_all(self, messages: list[Message]) -> None:
        for message in messages:
            await send_control(self._producer, self.config, message)
            self.stages_sent.append(str(message["stage"]))
