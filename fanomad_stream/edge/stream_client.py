"""The edge client of the logs and traces modalities: consume, score, alert, train, update.

It follows ``EdgeClient`` step for step (poll, decode and score, publish, commit, then train
when a window is full and a newer global model exists) on ``logs.raw`` or ``traces.raw``,
with a ``LogsPipeline`` or ``TracesPipeline``. Delivery is at-least-once for scores: offsets
are committed only after the batch's scores and alerts are acknowledged.

State on disk follows one rule: ``edge.state_dir`` turns checkpoints on, for every modality.

- With ``edge.state_dir`` set, the client checkpoints its whole scoring state, with the next
  offset of every partition it has read, to ``<edge.state_dir>/<site>/<modality>/`` as the
  metrics client does (``CheckpointManager``). A restart restores the state and resumes each
  of those partitions at the checkpoint's offset. The checkpoint contains the drain3
  templates and the open traces too.
- drain3 keeps its own file, ``<logs.state_dir>/<site>/drain3.json``, in both cases. A
  restored checkpoint rewrites it with the checkpoint's templates, so the two agree.
- Without ``edge.state_dir`` only the templates and the open traces survive a restart:
  ``stop`` saves the open traces to ``<logs.state_dir>/<site>/traces.msgpack`` and ``start``
  loads them. With ``edge.state_dir`` set, that file is read only when no checkpoint is
  restored, and it is deleted once a checkpoint contains its traces.
- ``edge.json`` beside the checkpoint keeps the last round this site sent and a send in
  progress, so a restart never sends one round's update twice (see ``SiteRounds``).

Updates leave the site through ``EdgePrivacy`` as the metrics client's do: DP-SGD with the
client's ledger on ``privacy.ledger``, clipping and noise shares under client-level DP, and
the masked sum of secure aggregation when that is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError

from fanomad_stream.config import AppConfig, ModalityName
from fanomad_stream.edge.checkpoint import EdgeCheckpoint, state_fingerprint
from fanomad_stream.edge.checkpoint_manager import CheckpointManager, offsets_for_log
from fanomad_stream.edge.modalities import (
    Incoming,
    LogsPipeline,
    ModalityPipeline,
    Scored,
    TracesPipeline,
)
from fanomad_stream.edge.site_state import SiteRounds, SiteState
from fanomad_stream.edge.updates import UpdateSender
from fanomad_stream.errors import DecodeError
from fanomad_stream.featurize.trace_assembly import Span
from fanomad_stream.federate.global_model import GlobalModelReader
from fanomad_stream.replay.logs import LogRecord
from fanomad_stream.service.metrics import EdgeMetrics
from fanomad_stream.service.runner import SteppedService
from fanomad_stream.transport import codec
from fanomad_stream.transport.kafka import DeadLetters, make_consumer, make_producer, topic_name

log = structlog.get_logger(__name__)

SESSION_TIMEOUT_MS = 45_000
# Errors that reading a damaged or foreign traces.msgpack raises: msgpack's own errors
# (ValueError subclasses and UnpackException) and values of the wrong shape.
_TRACE_STATE_ERRORS = (
    OSError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    IndexError,
    msgpack.UnpackException,
)
TOPICS = {"logs": ("logs.raw", frozenset({"log"})), "traces": ("traces.raw", frozenset({"span"}))}


@dataclass
class StreamCounters:
    consumed: int = 0
    scored: int = 0
    alerts: int = 0
    dead_letters: int = 0
    skipped: int = 0
    updates_sent: int = 0


class ModalityEdgeClient(SteppedService):
    """One site's edge client for ``logs`` or ``traces``.

    Parameters
    ----------
    config
        The config as ``modalities.modality_config(config, modality)`` returns it, so
        ``config.model`` is this modality's model.
    site
        Client id of this site; names its consumer group and its state folders.
    modality
        ``logs`` or ``traces``.
    sources
        For logs, the sources (record keys) this site scores; None scores every source.
        Records of other sources are skipped and counted. Traces take every trace.
    """

    def __init__(
        self, config: AppConfig, *, site: str, modality: str, sources: list[str] | None = None
    ) -> None:
        super().__init__(config.edge.stop_timeout_s, log.bind(client_id=site, modality=modality))
        if modality not in TOPICS:
            msg = f"modality {modality!r} has no stream client; expected logs or traces"
            raise ValueError(msg)
        self.config = config
        self.site = site
        self.modality = modality
        self.sources = None if sources is None else set(sources)
        # drain3 templates and, without edge.state_dir, the open traces.
        self.logs_state_dir = config.logs.state_dir / site
        self.pipeline: ModalityPipeline = (
            LogsPipeline(config, self.logs_state_dir / "drain3.json")
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
        state_dir = config.edge.state_dir
        name: ModalityName = "logs" if modality == "logs" else "traces"
        folder = None if state_dir is None else state_dir / site / modality
        self.rounds = SiteRounds(
            folder,
            kafka=self._kafka,
            site=site,
            model_name=config.aggregator.model_name,
            logger=self._log,
        )
        self.checkpoints = CheckpointManager(
            folder=folder,
            site=site,
            fingerprint=state_fingerprint(config, name),
            topic=topic_name(self._kafka, self._topic),
            edge=config.edge,
            logger=self._log,
        )

    @property
    def _traces_state(self) -> Path:
        return self.logs_state_dir / "traces.msgpack"

    async def start(self) -> None:
        assert self._producer is None, "ModalityEdgeClient.start() called twice"
        self._producer = make_producer(self._kafka)
        await self._producer.start()
        self._dead = DeadLetters(self._producer, self._kafka, src=self.site)
        await self._global.start()
        await self.updates.start(self._producer)
        await self._load_state()
        # The state and its offsets are in place before the first assignment seeks to them.
        group = f"{self.config.edge.group_prefix}-{self.modality}-{self.site}"
        # A longer session than aiokafka's 10 s default: scoring and training share the
        # process with the heartbeat task, and a missed session forces a rebalance.
        self._consumer = make_consumer(
            self._kafka, group_id=group, session_timeout_ms=SESSION_TIMEOUT_MS
        )
        await self._consumer.start()
        self.checkpoints.consumer = self._consumer
        self._consumer.subscribe(
            [topic_name(self._kafka, self._topic)], listener=self.checkpoints.listener()
        )
        self._log.info(
            "edge_started",
            group=group,
            topic=self._topic,
            global_version=self.global_version,
            checkpoint_restored=self.checkpoints.restored is not None,
        )

    async def stop(self) -> None:
        """Checkpoint or save the open traces, then close every client; idempotent.

        Each Kafka client gets at most ``edge.stop_timeout_s`` to close, so a broker that is
        down cannot block the stop.
        """
        self._stopping.set()
        await self.checkpoints.write_on_stop(self._write_checkpoint)
        if self._consumer is not None:
            await self._close("consumer", self._consumer.stop())
            self._consumer = None
            self.checkpoints.consumer = None
            if self.checkpoints.folder is None:
                self._save_state()
        self.checkpoints.release()
        await self._close("global_model_reader", self._global.stop())
        await self._close("secagg", self.updates.stop())
        if self._producer is not None:
            await self._close("producer", self._producer.stop())
            self._producer = None
            self._log.info(
                "edge_stopped", scored=self.counters.scored, updates=self.counters.updates_sent
            )

    async def step(self) -> int:
        """Handle one poll; return the number of records consumed."""
        assert self._consumer is not None
        async with self.checkpoints.state_lock:
            await self._refresh_global()
        batches = await self._consumer.getmany(
            timeout_ms=self.config.edge.poll_timeout_ms,
            max_records=self.config.edge.max_batch_records,
        )
        consumed = sum(len(records) for records in batches.values())
        async with self.checkpoints.state_lock:
            committed = await self._handle_batch(batches, consumed)
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

    async def _handle_batch(
        self, batches: dict[TopicPartition, list[ConsumerRecord]], consumed: int
    ) -> bool:
        """Score and publish a poll's records, then commit; return True if the commit worked.

        A poll without records still moves the trace clock, which closes idle traces.
        """
        if not consumed and not isinstance(self.pipeline, TracesPipeline):
            return False
        with self.checkpoints.changing():
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
            self.checkpoints.advance(batches)
        return consumed > 0 and await self.checkpoints.commit(batches)

    def _may_train(self) -> bool:
        if not self.updates.may_train(self.global_version, self.last_update_round):
            return False
        if self.updates.secagg is not None:
            return True
        # Another process of the site may have sent this round's update since the last look.
        self.last_update_round = max(self.last_update_round, self.rounds.read().last_update_round)
        return self.global_version > self.last_update_round

    async def flush(self) -> int:
        """Score what is still open (windows, traces) and publish it; return the count."""
        async with self.checkpoints.state_lock:
            with self.checkpoints.changing():
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
        # A restored checkpoint already contains the versions up to its own, possibly trained
        # further, so only a newer version replaces the weights.
        newer = await self._global.poll_newer_than(self.global_version)
        if newer is None:
            return
        self.pipeline.detector.load_weights(newer.weights)
        self.global_version = newer.version
        self.checkpoints.changed = True
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
            train_loss=loss,
            privacy=trained.privacy,
        )

    async def _load_state(self) -> None:
        """Restore the checkpoint when this process may; otherwise load the open traces."""
        checkpoint, self.last_update_round = await self.checkpoints.read_for_restart(
            self.rounds, self._global
        )
        if checkpoint is not None and self._restore(checkpoint):
            return
        self._load_traces_state()
        edge = self.config.edge
        self._log.info(
            "edge_warmup_started",
            threshold_warmup_events=edge.threshold.warmup_events,
            hst_window=edge.hst_window,
            window_events=edge.window_events,
        )

    def _restore(self, checkpoint: EdgeCheckpoint) -> bool:
        """Load the checkpoint; return False, with the pipeline unchanged, when it does not fit."""
        if not self.checkpoints.restore(checkpoint, self.pipeline.restore):
            return False
        self.global_version = checkpoint.global_version
        self.last_update_round = max(self.last_update_round, checkpoint.last_update_round)
        if isinstance(self.pipeline, LogsPipeline):
            self._save_templates()
            restored = {"templates": self.pipeline.featurizer.miner.template_count}
        else:
            restored = {"open_traces": self.pipeline.open_traces}
        self._log.info(
            "edge_checkpoint_restored",
            age_s=round(time.time() - checkpoint.written_at, 3),
            global_version=checkpoint.global_version,
            last_update_round=self.last_update_round,
            offsets=offsets_for_log(checkpoint.offsets),
            **restored,
        )
        return True

    async def _write_checkpoint(self) -> None:
        """Write the checkpoint; the caller holds the state lock, so nothing changes meanwhile.

        The template files are saved whenever a template or event id is added, so they run
        ahead of the last checkpoint between two of them. Saving them here makes them agree.
        """
        written = await self.checkpoints.write(
            global_version=self.global_version,
            last_update_round=self.last_update_round,
            state=self.pipeline.snapshot(),
        )
        if not written:
            return
        if isinstance(self.pipeline, LogsPipeline):
            self._save_templates()
        elif self._traces_state.exists():
            # The checkpoint contains the open traces the file was loaded with, or newer ones.
            try:
                self._traces_state.unlink()
            except OSError as err:
                self._log.error(
                    "trace_state_file_remove_failed", path=str(self._traces_state), error=str(err)
                )
                return
            self._log.info("trace_state_file_removed", path=str(self._traces_state))

    def _save_templates(self) -> None:
        assert isinstance(self.pipeline, LogsPipeline)
        try:
            self.pipeline.featurizer.miner.save()
        except OSError as err:
            self._log.error(
                "drain3_state_write_failed", path=str(self.logs_state_dir), error=str(err)
            )

    def _save_state(self) -> None:
        """Save the templates, or the open traces, of a client that keeps no checkpoint."""
        if isinstance(self.pipeline, LogsPipeline):
            self.pipeline.featurizer.miner.save()
            return
        state = self.pipeline.open_traces_state()
        self._traces_state.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._traces_state.with_name(self._traces_state.name + ".tmp")
        temporary.write_bytes(msgpack.packb(state, use_bin_type=True))
        temporary.replace(self._traces_state)

    def _load_traces_state(self) -> None:
        """Load traces.msgpack; move a file that fails to load aside and start without it."""
        path = self._traces_state
        if not isinstance(self.pipeline, TracesPipeline) or not path.is_file():
            return
        try:
            state = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
            self.pipeline.load_open_traces_state(state)
        except _TRACE_STATE_ERRORS as err:
            # The load may have stopped half-way, so the pipeline starts over empty.
            self.pipeline = TracesPipeline(self.config)
            rejected = path.with_name(path.name + ".rejected")
            try:
                path.replace(rejected)
            except OSError as move_error:
                self._log.error(
                    "trace_state_file_remove_failed", path=str(path), error=str(move_error)
                )
            self._log.warning(
                "trace_state_rejected",
                path=str(path),
                moved_to=str(rejected),
                error=f"{type(err).__name__}: {err}",
                detail="starting without the open traces of the last run",
            )
            return
        self._log.info(
            "trace_state_loaded",
            path=str(self._traces_state),
            open_traces=self.pipeline.open_traces,
        )


def _finite_or_max(value: float) -> float:
    """Thresholds are +inf during warm-up; the score schema wants a finite number."""
    return value if math.isfinite(value) else sys.float_info.max
