"""The edge client service: consume a site's metrics, score, alert, train and send updates.

Delivery is at-least-once: offsets are committed only after every score and alert of the
batch is acknowledged by the broker, so a crash replays the batch instead of losing it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord

from fanomad_stream.config import AppConfig
from fanomad_stream.edge.pipeline import BatchResult, EdgePipeline
from fanomad_stream.edge.privacy import EdgePrivacy, TrainedUpdate
from fanomad_stream.errors import DecodeError
from fanomad_stream.federate.global_model import GlobalModelReader
from fanomad_stream.federate.secagg_kafka import SecAggParticipant
from fanomad_stream.privacy.ledger_records import read_ledger_records
from fanomad_stream.privacy.secagg.encoding import flatten_update
from fanomad_stream.service.metrics import EdgeMetrics
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


class EdgeClient:
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
        self._stopping = asyncio.Event()
        self._log = log.bind(client_id=site)
        self.privacy = EdgePrivacy(config, site)
        self.secagg: SecAggParticipant | None = None
        self._stop_recorded = False

    async def start(self) -> None:
        assert self._producer is None, "EdgeClient.start() called twice"
        self._producer = make_producer(self._kafka)
        await self._producer.start()
        self._dead = DeadLetters(self._producer, self._kafka, src=self.site)
        group = f"{self.config.edge.group_prefix}-{self.site}"
        self._consumer = make_consumer(self._kafka, "metrics.raw", group_id=group)
        await self._consumer.start()
        await self._global.start()
        if self.config.privacy.secure_aggregation.enabled:
            self.secagg = SecAggParticipant(self.config, self.site, self._producer)
            await self.secagg.start()
        if self.privacy.ledger is not None:
            self.privacy.restore_ledger(await read_ledger_records(self._kafka, self.site))
        self.last_update_round = self._load_last_update_round()
        if self.last_update_round >= 0:
            latest = await self._global.catch_up()
            # Versions only grow within one model lineage, so an update round above the newest
            # version means the state file belongs to another cluster or an earlier lineage.
            if latest is None or latest.version < self.last_update_round:
                self._log.warning(
                    "edge_state_ignored",
                    last_update_round=self.last_update_round,
                    newest_version=None if latest is None else latest.version,
                )
                self.last_update_round = -1
        self._log.info(
            "edge_started",
            group=group,
            sources=sorted(self.sources.values()),
            last_update_round=self.last_update_round,
        )

    async def stop(self) -> None:
        """Stop consuming and close every client; safe to call more than once."""
        self._stopping.set()
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self.secagg is not None:
            await self.secagg.stop()
            self.secagg = None
        await self._global.stop()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
            self._log.info(
                "edge_stopped", scored=self.counters.scored, updates=self.counters.updates_sent
            )

    async def __aenter__(self) -> EdgeClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Score until ``request_stop`` is called."""
        assert self._consumer is not None, "EdgeClient.start() was not called"
        while not self._stopping.is_set():
            await self.step()

    async def step(self) -> int:
        """Handle one poll: returns the number of records consumed."""
        assert self._consumer is not None
        await self._refresh_global()
        batches = await self._consumer.getmany(
            timeout_ms=self.config.edge.poll_timeout_ms,
            max_records=self.config.edge.max_batch_records,
        )
        consumed = sum(len(records) for records in batches.values())

        rows = await self._decode(batches)
        deliveries = await self._score_and_publish(rows)
        await asyncio.gather(*deliveries)

        # At-least-once: offsets move only after every score, alert and dead letter is acked.
        if consumed:
            await self._consumer.commit()
            self.counters.consumed += consumed

        self.metrics.record_consumed(consumed)
        await self.metrics.record_lag(self._consumer)

        if self.secagg is not None:
            await self.secagg.poll()
        if self.pipeline.window_ready() and self._may_train():
            await self._train_and_send()
        return consumed

    def _may_train(self) -> bool:
        if self.privacy.training_stopped is not None:
            return False
        if self.secagg is not None:
            return self.secagg.wants_update(self.global_version)
        return self.global_version > self.last_update_round

    async def _refresh_global(self) -> None:
        newer = await self._global.poll(timeout_ms=0)
        latest = self._global.latest
        if newer is None and latest is not None and latest.version > self.global_version:
            newer = latest  # read ahead by catch_up() at start and not loaded yet
        if newer is None:
            return
        self.pipeline.detector.load_weights(newer.weights)
        self.global_version = newer.version
        self._log.info(
            "global_model_loaded",
            version=newer.version,
            round=newer.round,
            model_epsilon=self.privacy.model_epsilon(newer.version),
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
        trained = await asyncio.to_thread(self.privacy.train, self.pipeline, round_id=round_id)
        if trained is None:
            await self._record_training_stop()
            return
        if trained.ledger is not None:
            await self._publish_ledger(trained.ledger)
        if self.secagg is not None:
            await self._submit_secure(trained)
        else:
            body = {
                "round": round_id,
                "client_id": self.site,
                "model": self.config.aggregator.model_name,
                "n_samples": trained.n_samples,
                "base_version": self.global_version,
                "delta": trained.delta,
                "privacy": trained.privacy,
                "train_loss": self.pipeline.detector.last_loss,
            }
            value = codec.encode("update", body, src=self.site, ts=time.time())
            await self._producer.send_and_wait(
                topic_name(self._kafka, "fl.updates"), value=value, key=self.site.encode()
            )
        self.last_update_round = round_id
        self._save_last_update_round()
        self.counters.updates_sent += 1
        self._log.info(
            "update_sent",
            round=round_id,
            n_samples=trained.n_samples,
            train_loss=round(self.pipeline.detector.last_loss, 6),
            privacy=trained.privacy,
        )

    async def _submit_secure(self, trained: TrainedUpdate) -> None:
        assert self.secagg is not None
        vector, _ = flatten_update(trained.delta)
        metadata = {"n_samples": trained.n_samples, "privacy": trained.privacy}
        weight = self.privacy.secure_weight(trained.n_samples)
        await self.secagg.submit(vector, weight=weight, metadata=metadata)

    async def _record_training_stop(self) -> None:
        if self._stop_recorded or self.privacy.ledger is None:
            return
        self._stop_recorded = True
        self._log.warning("training_stopped", reason=self.privacy.training_stopped)
        body = self.privacy.ledger.ledger_body()
        body.update(status="training_stopped", reason=self.privacy.training_stopped)
        await self._publish_ledger(body)

    def _state_file(self) -> Path | None:
        state_dir = self.config.edge.state_dir
        return None if state_dir is None else state_dir / self.site / "edge.json"

    def _load_last_update_round(self) -> int:
        """Return the last round this site sent an update for, so a restart sends no second one."""
        path = self._state_file()
        if path is None or not path.exists():
            return -1
        try:
            return int(json.loads(path.read_text())["last_update_round"])
        except (ValueError, KeyError, TypeError) as err:
            self._log.error("edge_state_unreadable", path=str(path), error=str(err))
            return -1

    def _save_last_update_round(self) -> None:
        # NOTE: a crash between the send and this write can still repeat one update; the
        # aggregator then rejects it as a duplicate for that round.
        path = self._state_file()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps({"last_update_round": self.last_update_round}))
        os.replace(partial, path)

    async def _publish_ledger(self, body: dict[str, Any]) -> None:
        assert self._producer is not None
        value = codec.encode("ledger", body, src=self.site, ts=time.time())
        await self._producer.send_and_wait(
            topic_name(self._kafka, "privacy.ledger"), value=value, key=self.site.encode()
        )
        if isinstance(body.get("epsilon"), float | int):
            self.metrics.record_epsilon(float(body["epsilon"]))


def _finite_or_max(value: float) -> float:
    """Thresholds are +inf during warm-up; msgpack floats carry inf but the schema wants finite."""
    return float(value) if np.isfinite(value) else float(np.finfo(np.float64).max)
