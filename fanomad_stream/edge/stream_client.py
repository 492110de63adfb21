"""The edge client of the logs and traces modalities: consume, score, alert, train, update.

It follows ``EdgeClient`` step for step (poll, decode and score, publish, commit, then train
when a window is full and a newer global model exists) on ``logs.raw`` or ``traces.raw``,
with a ``LogsPipeline`` or ``TracesPipeline``. Delivery is at-least-once for scores: offsets
are committed only after the batch's scores and alerts are acknowledged. Spans of traces
that are still open when offsets are committed live in memory, and ``stop`` saves the
assembler's state to the site's state folder, from where ``start`` loads it.

Updates leave the site through ``EdgePrivacy`` as the metrics client's do: DP-SGD with the
client's ledger on ``privacy.ledger``, clipping and noise shares under client-level DP, and
the masked sum of secure aggregation when that is on.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import CommitFailedError

from fanomad_stream.config import AppConfig
from fanomad_stream.edge.modalities import (
    Incoming,
    LogsPipeline,
    ModalityPipeline,
    Scored,
    TracesPipeline,
)
from fanomad_stream.edge.updates import UpdateSender
from fanomad_stream.errors import DecodeError
from fanomad_stream.featurize.trace_assembly import Span
from fanomad_stream.federate.global_model import GlobalModelReader
from fanomad_stream.replay.logs import LogRecord
from fanomad_stream.service.metrics import EdgeMetrics
from fanomad_stream.service.runner import ServiceLifecycle
from fanomad_stream.transport import codec
from fanomad_stream.transport.kafka import DeadLetters, make_consumer, make_producer, topic_name

log = structlog.get_logger(__name__)

SESSION_TIMEOUT_MS = 45_000
TOPICS = {"logs": ("logs.raw", frozenset({"log"})), "traces": ("traces.raw", frozenset({"span"}))}


@dataclass
class StreamCounters:
    consumed: int = 0
    scored: int = 0
    alerts: int = 0
    dead_letters: int = 0
    skipped: int = 0
    updates_sent: int = 0
    commit_failures: int = 0


class ModalityEdgeClient(ServiceLifecycle):
    """One site's edge client for ``logs`` or ``traces``.

    Parameters
    ----------
    config
        The config as ``modalities.modality_config(config, modality)`` returns it, so
        ``config.model`` is this modality's model.
    site
        Client id of this site; names its consumer group and its state folder.
    modality
        ``logs`` or ``traces``.
    sources
        For logs, the sources (record keys) this site scores; None scores every source.
        Records of other sources are skipped and counted. Traces take every trace.
    """

    def __init__(
        self, config: AppConfig, *, site: str, modality: str, sources: list[str] | None = None
    ) -> None:
        super().__init__()
        if modality not in TOPICS:
            msg = f"modality {modality!r} has no stream client; expected logs or traces"
            raise ValueError(msg)
        self.config = config
        self.site = site
        self.modality = modality
        self.sources = None if sources is None else set(sources)
        self.state_dir = config.logs.state_dir / site
        self.pipeline: ModalityPipeline = (
            LogsPipeline(config, self.state_dir / "drain3.json")
            if modality == "logs"
            else TracesPipeline(config)
        )
        self.counters = StreamCounters()
        self.metrics = EdgeMetrics(f"{modality}:{site}")
        self.global_version = -1
        self.last_update_round = -1
        self._kafka = config.kafka
        self._topic, self._kinds = TOPICS[modality]
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._dead: DeadLetters | None = None
        self._global = GlobalModelReader(self._kafka, config.aggregator.model_name)
        self._idle_since: float | None = None
        self._log = log.bind(client_id=site, modality=modality)
        self.updates = UpdateSender(config, site, self.metrics, self._log)

    @property
    def _traces_state(self) -> Path:
        return self.state_dir / "traces.msgpack"

    async def start(self) -> None:
        assert self._producer is None, "ModalityEdgeClient.start() called twice"
        self._load_traces_state()
        self._producer = make_producer(self._kafka)
        await self._producer.start()
        self._dead = DeadLetters(self._producer, self._kafka, src=self.site)
        group = f"{self.config.edge.group_prefix}-{self.modality}-{self.site}"
        # A longer session than aiokafka's 10 s default: scoring and training share the
        # process with the heartbeat task, and a missed session forces a rebalance.
        self._consumer = make_consumer(
            self._kafka, self._topic, group_id=group, session_timeout_ms=SESSION_TIMEOUT_MS
        )
        await self._consumer.start()
        await self._global.start()
        await self.updates.start(self._producer)
        self._log.info("edge_started", group=group, topic=self._topic)

    async def stop(self) -> None:
        """Stop consuming, save the pipeline state and close every client; idempotent."""
        self._stopping.set()
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
            self._save_state()
        await self._global.stop()
        await self.updates.stop()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
            self._log.info(
                "edge_stopped", scored=self.counters.scored, updates=self.counters.updates_sent
            )

    async def run(self) -> None:
        assert self._consumer is not None, "ModalityEdgeClient.start() was not called"
        while not self._stopping.is_set():
            await self.step()

    async def step(self) -> int:
        """Handle one poll; return the number of records consumed."""
        assert self._consumer is not None
        await self._refresh_global()
        batches = await self._consumer.getmany(
            timeout_ms=self.config.edge.poll_timeout_ms,
            max_records=self.config.edge.max_batch_records,
        )
        consumed = sum(len(records) for records in batches.values())

        incoming = await self._decode(batches)
        started = time.perf_counter()
        scored = await asyncio.to_thread(self.pipeline.process, incoming)
        scored += self._advance_when_idle(consumed)
        self.metrics.record_scored(
            self.modality,
            events=len(scored),
            alerts=sum(item.alert for item in scored),
            seconds=time.perf_counter() - started,
        )
        await asyncio.gather(*await self._publish(scored))

        # At-least-once: offsets move only after every score, alert and dead letter is acked.
        if consumed:
            await self._commit()
            self.counters.consumed += consumed
        self.metrics.record_consumed(consumed)
        await self.metrics.record_lag(self._consumer)

        await self.updates.poll()
        if self.pipeline.window_ready() and self._may_train():
            await self._train_and_send()
        return consumed

    def _may_train(self) -> bool:
        return self.updates.may_train(self.global_version, self.last_update_round)

    async def _commit(self) -> None:
        """Commit the polled offsets; after a rebalance, log and let the batch be redelivered.

        A consumer that missed its heartbeats (a busy event loop) is dropped from its group,
        and its next commit fails. The batch is then consumed and scored again, which is the
        at-least-once contract, so the client keeps running instead of dying.
        """
        assert self._consumer is not None
        try:
            await self._consumer.commit()
        except CommitFailedError as err:
            self.counters.commit_failures += 1
            self._log.warning(
                "commit_failed", error=str(err), commit_failures=self.counters.commit_failures
            )

    async def flush(self) -> int:
        """Score what is still open (windows, traces) and publish it; return the count."""
        scored = await asyncio.to_thread(self.pipeline.flush)
        await asyncio.gather(*await self._publish(scored))
        return len(scored)

    def _advance_when_idle(self, consumed: int) -> list[Scored]:
        """Without spans, move the trace clock by the idle wall time so open traces time out.

        Event time stops when the stream stops, so without this the last traces of a replay
        would stay open until the next span arrives.
        """
        if not isinstance(self.pipeline, TracesPipeline) or consumed:
            self._idle_since = None
            return []
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
            return []
        idle_us = int((now - self._idle_since) * 1e6)
        self._idle_since = now
        return self.pipeline.advance(idle_us)

    async def _refresh_global(self) -> None:
        newer = await self._global.poll(timeout_ms=0)
        if newer is None:
            return
        self.pipeline.detector.load_weights(newer.weights)
        self.global_version = newer.version
        self._log.info("global_model_loaded", version=newer.version, round=newer.round)

    async def _decode(self, batches: dict[Any, list[ConsumerRecord]]) -> list[Incoming]:
        assert self._dead is not None
        incoming = []
        for tp, records in batches.items():
            for record in records:
                key = (record.key or b"").decode(errors="replace")
                if self.sources is not None and key not in self.sources:
                    self.counters.skipped += 1
                    continue
                try:
                    envelope = codec.decode(record.value, expected_kinds=self._kinds)
                except DecodeError as err:
                    await self._dead.send(
                        topic=tp.topic,
                        partition=tp.partition,
                        offset=record.offset,
                        error=str(err),
                        raw=record.value,
                        ts=time.time(),
                    )
                    self.counters.dead_letters += 1
                    continue
                body = envelope.body
                item = (
                    LogRecord.from_body(body, envelope.ts)
                    if self.modality == "logs"
                    else Span.from_body(body)
                )
                index = int(body.get("index", record.offset))
                incoming.append(Incoming(item, index, tp.partition, record.offset))
        return incoming

    async def _publish(self, scored: list[Scored]) -> list[asyncio.Future[Any]]:
        """Queue a score per item and an alert per anomaly; return the delivery futures."""
        assert self._producer is not None
        scores_topic = topic_name(self._kafka, "scores")
        alerts_topic = topic_name(self._kafka, "alerts")
        deliveries = []
        for item in scored:
            key = item.key.encode()
            body: dict[str, Any] = {
                "index": item.index,
                "score": item.score,
                "threshold": _finite_or_max(item.threshold),
                "alert": item.alert,
                "model_version": self.global_version,
                "modality": self.modality,
                "detail": item.detail,
            }
            if item.service:
                body["service"] = item.service
            value = codec.encode("score", body, src=self.site, ts=item.ts)
            deliveries.append(await self._producer.send(scores_topic, value=value, key=key))
            if item.alert:
                ref = {"topic": self._topic, "partition": item.partition, "offset": item.offset}
                value = codec.encode("alert", {**body, "ref": ref}, src=self.site, ts=item.ts)
                deliveries.append(await self._producer.send(alerts_topic, value=value, key=key))
                self.counters.alerts += 1
        self.counters.scored += len(scored)
        return deliveries

    async def _train_and_send(self) -> None:
        assert self._producer is not None
        latest = self._global.latest
        if latest is not None:
            self.pipeline.detector.load_weights(latest.weights)
        round_id = self.global_version
        trained = await self.updates.train(self.pipeline, round_id=round_id)
        if trained is None:
            return
        loss = self.pipeline.detector.last_loss
        await self.updates.send(
            trained, round_id=round_id, base_version=self.global_version, train_loss=loss
        )
        self.last_update_round = round_id
        self.counters.updates_sent += 1
        self._log.info(
            "update_sent",
            round=round_id,
            n_samples=trained.n_samples,
            train_loss=loss,
            privacy=trained.privacy,
        )

    def _save_state(self) -> None:
        if isinstance(self.pipeline, LogsPipeline):
            self.pipeline.featurizer.miner.save()
            return
        state = {
            "assemblers": {p: a.state() for p, a in self.pipeline.assemblers.items()},
            "baseline": self.pipeline.featurizer.baseline.state(),
        }
        self._traces_state.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._traces_state.with_name(self._traces_state.name + ".tmp")
        temporary.write_bytes(msgpack.packb(state, use_bin_type=True))
        temporary.replace(self._traces_state)

    def _load_traces_state(self) -> None:
        if not isinstance(self.pipeline, TracesPipeline) or not self._traces_state.is_file():
            return
        state = msgpack.unpackb(self._traces_state.read_bytes(), raw=False, strict_map_key=False)
        for partition, assembler_state in state["assemblers"].items():
            self.pipeline.assembler(int(partition)).load_state(assembler_state)
        self.pipeline.featurizer.baseline.load_state(state["baseline"])
        self._log.info("trace_state_loaded", open_traces=self.pipeline.open_traces)


def _finite_or_max(value: float) -> float:
    """Thresholds are +inf during warm-up; the score schema wants a finite number."""
    return value if math.isfinite(value) else sys.float_info.max
