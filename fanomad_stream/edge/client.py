"""The edge client service: consume a site's metrics, score, alert, train and send updates.

Delivery is at-least-once: offsets are committed only after every score and alert of the
batch is acknowledged by the broker, so a crash replays the batch instead of losing it.

With ``edge.state_dir`` set, the client checkpoints its scoring state together with the next
offset of every partition that state has read (``edge.checkpoint``). A restarted client
restores the state and resumes each of those partitions at the checkpoint's offset, so every
record is folded into the state once and the records after the checkpoint are scored again.
The same offsets are sought after a rebalance. Partitions the state has not read start from
the group's committed offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError

from fanomad_stream.config import AppConfig
from fanomad_stream.edge.checkpoint import EdgeCheckpoint, state_fingerprint
from fanomad_stream.edge.checkpoint_manager import CheckpointManager, offsets_for_log
from fanomad_stream.edge.pipeline import BatchResult, EdgePipeline
from fanomad_stream.edge.site_state import SiteRounds, SiteState
from fanomad_stream.edge.updates import UpdateSender
from fanomad_stream.errors import DecodeError
from fanomad_stream.federate.global_model import GlobalModelReader
from fanomad_stream.service.metrics import EdgeMetrics
from fanomad_stream.service.runner import SteppedService
from fanomad_stream.transport import codec
from fanomad_stream.transport.kafka import DeadLetters, make_consumer, make_producer, topic_name

log = structlog.get_logger(__name__)

METRIC_KINDS = frozenset({"metric"})


@dataclass
class EdgeCounters:
    consumed: int = 0
    scored: int = 0
    alerts: int = 0
    dead_letters: int = 0
    skipped: int = 0
    updates_sent: int = 0
    per_source: dict[str, int] = field(default_factory=lambda: defaultdict(int))


@dataclass
class _Row:
    index: int
    ts: float
    partition: int
    offset: int
    values: np.ndarray


class EdgeClient(SteppedService):
    """One site's edge client.

    Parameters
    ----------
    config
        The validated application config.
    site
        Client id of this site; also names its consumer group (``<group_prefix>-<site>``), so
        more processes of one site share the partitions.
    sources
        Keys (machine names) this site scores; records of other sources are skipped, counted,
        and left to the sites they belong to.
    """

    def __init__(self, config: AppConfig, *, site: str, sources: list[str]) -> None:
        super().__init__(config.edge.stop_timeout_s, log.bind(client_id=site))
        if not sources:
            msg = f"edge client {site!r} needs at least one source to score"
            raise ValueError(msg)
        self.config = config
        self.site = site
        self.sources = {s.encode(): s for s in sources}
        self.pipeline = EdgePipeline(config.model.n_features, config.edge, config.model)
        self.counters = EdgeCounters()
        self.metrics = EdgeMetrics(site)
        self.global_version = -1
        self.last_update_round = -1
        self._kafka = config.kafka
        self._metrics_topic = topic_name(self._kafka, "metrics.raw")
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._global = GlobalModelReader(self._kafka, config.aggregator.model_name)
        self._dead: DeadLetters | None = None
        self._log = log.bind(client_id=site)
        self.updates = UpdateSender(config, site, self.metrics, self._log)
        self.rounds = SiteRounds(
            self._site_folder(),
            kafka=self._kafka,
            site=site,
            model_name=config.aggregator.model_name,
            logger=self._log,
        )
        self.checkpoints = CheckpointManager(
            folder=self._site_folder(),
            site=site,
            fingerprint=state_fingerprint(config),
            topic=self._metrics_topic,
            edge=config.edge,
            logger=self._log,
        )

    async def start(self) -> None:
        assert self._producer is None, "EdgeClient.start() called twice"
        self._producer = make_producer(self._kafka)
        await self._producer.start()
        self._dead = DeadLetters(self._producer, self._kafka, src=self.site)
        await self._global.start()
        await self.updates.start(self._producer)
        await self._load_state()
        # The state and ``positions`` are in place before the first assignment seeks to them.
        group = f"{self.config.edge.group_prefix}-{self.site}"
        self._consumer = make_consumer(self._kafka, group_id=group)
        await self._consumer.start()
        self.checkpoints.consumer = self._consumer
        self._consumer.subscribe([self._metrics_topic], listener=self.checkpoints.listener())
        self._log.info(
            "edge_started",
            group=group,
            sources=sorted(self.sources.values()),
            last_update_round=self.last_update_round,
            global_version=self.global_version,
            checkpoint_restored=self.checkpoints.restored is not None,
        )

    async def stop(self) -> None:
        """Checkpoint, stop consuming and close every client; safe to call more than once.

        The wait for the state lock and the close of each Kafka client take at most
        ``edge.stop_timeout_s`` each, so a broker that is down cannot block the stop. A client
        that times out is left to the process exit.
        """
        self._stopping.set()
        await self.checkpoints.write_on_stop(self._write_checkpoint)
        if self._consumer is not None:
            await self._close("consumer", self._consumer.stop())
            self._consumer = None
            self.checkpoints.consumer = None
        await self._close("secagg", self.updates.stop())
        await self._close("global_model_reader", self._global.stop())
        if self._producer is not None:
            await self._close("producer", self._producer.stop())
            self._producer = None
            self._log.info(
                "edge_stopped", scored=self.counters.scored, updates=self.counters.updates_sent
            )
        self.checkpoints.release()

    async def step(self) -> int:
        """Handle one poll: returns the number of records consumed."""
        assert self._consumer is not None
        async with self.checkpoints.state_lock:
            await self._refresh_global()
        batches = await self._consumer.getmany(
            timeout_ms=self.config.edge.poll_timeout_ms,
            max_records=self.config.edge.max_batch_records,
        )
        consumed = sum(len(records) for records in batches.values())
        async with self.checkpoints.state_lock:
            committed = consumed > 0 and await self._handle_batch(batches)
            if committed and self.checkpoints.due():
                await self._write_checkpoint()
            await self.updates.poll()
            if self.pipeline.window_ready() and self._may_train():
                await self._train_and_send()

        self.counters.consumed += consumed
        self.metrics.record_consumed(consumed)
        with contextlib.suppress(IllegalStateError):  # a partition revoked since the poll
            await self.metrics.record_lag(self._consumer)
        return consumed

    async def _handle_batch(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> bool:
        """Score and publish a batch, then commit its offsets; return True if the commit worked."""
        with self.checkpoints.changing():
            rows = await self._decode(batches)
            deliveries = await self._score_and_publish(rows)
            await asyncio.gather(*deliveries)

            # At-least-once: offsets move only after every score, alert and dead letter is acked.
            self.checkpoints.advance(batches)
        return await self.checkpoints.commit(batches)

    def _may_train(self) -> bool:
        if not self.updates.may_train(self.global_version, self.last_update_round):
            return False
        if self.updates.secagg is not None:
            return True
        # Another process of the site may have sent this round's update since the last look.
        self.last_update_round = max(self.last_update_round, self.rounds.read().last_update_round)
        return self.global_version > self.last_update_round

    async def _refresh_global(self) -> None:
        # A restored checkpoint already contains the versions up to its own, possibly trained
        # further, so only a newer version replaces the weights.
        newer = await self._global.poll_newer_than(self.global_version)
        if newer is None:
            return
        self.pipeline.detector.load_weights(newer.weights)
        self.global_version = newer.version
        self.checkpoints.changed = True
        self._log.info(
            "global_model_loaded",
            version=newer.version,
            round=newer.round,
            model_epsilon=self.updates.privacy.model_epsilon(newer.version),
        )

    async def _decode(self, batches: dict[Any, list[ConsumerRecord]]) -> dict[str, list[_Row]]:
        assert self._dead is not None
        rows: dict[str, list[_Row]] = defaultdict(list)
        for tp, records in batches.items():
            for record in records:
                source = self.sources.get(record.key or b"")
                if source is None:
                    self.counters.skipped += 1
                    continue
                try:
                    envelope = codec.decode(
                        record.value,
                        expected_kinds=METRIC_KINDS,
                        max_array_elements=self.config.edge.max_metric_values,
                    )
                    values = envelope.body["values"].astype(np.float32)
                    if values.shape[0] != self.pipeline.n_features:
                        msg = f"metric has {values.shape[0]} values, the model expects {self.pipeline.n_features}"
                        raise DecodeError(msg)
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
                index = envelope.body.get("index", record.offset)
                rows[source].append(_Row(index, envelope.ts, tp.partition, record.offset, values))
        return rows

    async def _score_and_publish(self, rows: dict[str, list[_Row]]) -> list[asyncio.Future[Any]]:
        deliveries: list[asyncio.Future[Any]] = []
        for source, source_rows in rows.items():
            values = np.stack([row.values for row in source_rows])
            # Scoring runs in a worker thread so the consumer's heartbeats keep flowing.
            started = time.perf_counter()
            result = await asyncio.to_thread(self.pipeline.process, source, values)
            self.metrics.record_scored(
                source,
                events=len(source_rows),
                alerts=int(result.alert.sum()),
                seconds=time.perf_counter() - started,
            )
            deliveries += await self._publish(source, source_rows, result)
            self.counters.scored += len(source_rows)
            self.counters.per_source[source] += len(source_rows)
        return deliveries

    async def _publish(
        self, source: str, rows: list[_Row], result: BatchResult
    ) -> list[asyncio.Future[Any]]:
        """Queue a score per row and an alert per anomaly, and return their delivery futures.

        ``send`` only appends to the producer's batch, so awaiting it in order keeps the
        records in arrival order. The returned futures resolve when the broker acknowledges.
        """
        assert self._producer is not None
        key = source.encode()
        scores_topic = topic_name(self._kafka, "scores")
        alerts_topic = topic_name(self._kafka, "alerts")
        deliveries = []
        for i, row in enumerate(rows):
            body = {
                "index": row.index,
                "score": float(result.score[i]),
                "threshold": _finite_or_max(result.threshold[i]),
                "alert": bool(result.alert[i]),
                "model_version": self.global_version,
                "modality": "metrics",
                "detail": {"hst": float(result.hst[i]), "l2": float(result.l2[i])},
            }
            value = codec.encode("score", body, src=self.site, ts=row.ts)
            deliveries.append(await self._producer.send(scores_topic, value=value, key=key))
            if result.alert[i]:
                body["ref"] = {
                    "topic": self._metrics_topic,
                    "partition": row.partition,
                    "offset": row.offset,
                }
                body["top_features"] = result.top_features[i].tolist()
                value = codec.encode("alert", body, src=self.site, ts=row.ts)
                deliveries.append(await self._producer.send(alerts_topic, value=value, key=key))
                self.counters.alerts += 1
        return deliveries

    async def _train_and_send(self) -> None:
        assert self._producer is not None
        latest = self._global.latest
        if latest is not None:
            self.pipeline.detector.load_weights(latest.weights)
        round_id = self.global_version
        # Training runs in a worker thread that a cancelled step does not stop, so the state
        # counts as out of sync until the thread has returned here.
        with self.checkpoints.changing():
            trained = await self.updates.train(self.pipeline, round_id=round_id)
        if trained is None:
            return
        if self.updates.secagg is None:
            self.rounds.write(SiteState(self.last_update_round, sending_round=round_id))
        loss = self.pipeline.detector.last_loss
        await self.updates.send(
            trained, round_id=round_id, base_version=self.global_version, train_loss=loss
        )
        self.last_update_round = round_id
        self.rounds.write(SiteState(round_id))
        self.counters.updates_sent += 1
        self._log.info(
            "update_sent",
            round=round_id,
            n_samples=trained.n_samples,
            train_loss=round(loss, 6),
            privacy=trained.privacy,
        )

    def _site_folder(self) -> Path | None:
        state_dir = self.config.edge.state_dir
        return None if state_dir is None else state_dir / self.site

    async def _load_state(self) -> None:
        """Restore the last update round and, when this process may, the scoring checkpoint."""
        checkpoint, self.last_update_round = await self.checkpoints.read_for_restart(
            self.rounds, self._global
        )
        if checkpoint is not None and not self._restore(checkpoint):
            checkpoint = None
        if checkpoint is None:
            self._log.info("edge_warmup_started", **self._warmup_description())

    def _restore(self, checkpoint: EdgeCheckpoint) -> bool:
        """Load the checkpoint; return False, with the pipeline unchanged, when it does not fit."""
        if not self.checkpoints.restore(checkpoint, self.pipeline.restore):
            return False
        self.global_version = checkpoint.global_version
        self._log.info(
            "edge_checkpoint_restored",
            age_s=round(time.time() - checkpoint.written_at, 3),
            global_version=checkpoint.global_version,
            last_update_round=self.last_update_round,
            rows_seen={name: state.seen for name, state in self.pipeline.sources.items()},
            offsets=offsets_for_log(checkpoint.offsets),
        )
        return True

    def _warmup_description(self) -> dict[str, Any]:
        """Return how many rows each source scores before its first possible alert."""
        edge = self.config.edge
        if edge.scoring == "context":
            rows_before_alerts = edge.context.warmup_rows
        else:
            rows_before_alerts = edge.threshold.warmup_events
        return {
            "scoring": edge.scoring,
            "rows_before_alerts": rows_before_alerts,
            "hst_rows_before_scores": edge.hst_window,
            "rows_before_first_update": edge.window_events,
        }

    async def _write_checkpoint(self) -> None:
        """Write the checkpoint; the caller holds the state lock, so nothing changes meanwhile."""
        await self.checkpoints.write(
            global_version=self.global_version,
            last_update_round=self.last_update_round,
            state=self.pipeline.snapshot(),
        )


def _finite_or_max(value: float) -> float:
    """Thresholds are +inf during warm-up; msgpack floats carry inf but the schema wants finite."""
    return float(value) if np.isfinite(value) else float(np.finfo(np.float64).max)
