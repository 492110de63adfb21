"""The aggregator service: validate updates, fold them, close rounds, publish the model.

Round r starts from global version r and its closing publishes version r + 1. An update is
validated before any arithmetic (kind, known client, round, n_samples > 0, parameter names and
shapes, finite values); a rejected one goes to the dead-letter topic with its reason. A round
closes when ``quorum`` distinct clients have been folded, or at the deadline once at least one
has. Offsets are committed only after the round they belong to is published, so a crash
re-reads the round's updates instead of losing them. Each published version carries the fold
state between rounds (``RoundEngine.state_dict``: server optimizer moments, buffered duplicate
keys), so a restarted aggregator resumes from the version and its state together, and an
update read again after a crash is rejected as stale or duplicate instead of folded twice.

What a fold does (strategy, buffered asynchronous rounds, client-level DP and the privacy
ledger) lives in ``rounds.RoundEngine``; secure aggregation rounds over ``fl.control`` in
``secagg_kafka.SecAggCoordinator``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from fanomad_stream.config import AppConfig
from fanomad_stream.detect.factory import initial_weights
from fanomad_stream.errors import DecodeError, RoundError, UpdateRejectedError
from fanomad_stream.federate.aggregate import Weights
from fanomad_stream.federate.global_model import GlobalModel, GlobalModelReader, publish_global
from fanomad_stream.federate.rounds import RoundClosed, RoundEngine
from fanomad_stream.federate.secagg_kafka import SecAggCoordinator, SecAggOutcome
from fanomad_stream.privacy.dp import SecureGaussian
from fanomad_stream.privacy.ledger_records import read_ledger_records
from fanomad_stream.service.failpoints import crash_point
from fanomad_stream.service.metrics import AggregatorMetrics
from fanomad_stream.service.runner import ServiceLifecycle
from fanomad_stream.transport import codec
from fanomad_stream.transport.kafka import DeadLetters, make_consumer, make_producer, topic_name

log = structlog.get_logger(__name__)


def validate_update(
    body: dict[str, Any],
    *,
    current_round: int,
    template: Weights,
    allowed: set[str] | None,
    seen: set[str],
) -> None:
    """Raise UpdateRejectedError with a reason code unless the update may be folded."""
    client = body["client_id"]
    if allowed is not None and client not in allowed:
        raise UpdateRejectedError(
            "unknown_client", f"update from unknown client {client!r}; allowed: {sorted(allowed)}"
        )
    if body["round"] != current_round:
        reason = "stale_round" if body["round"] < current_round else "future_round"
        raise UpdateRejectedError(
            reason,
            f"update of client {client!r} is for round {body['round']}, the open round is {current_round}",
        )
    if client in seen:
        raise UpdateRejectedError(
            "duplicate", f"client {client!r} already sent an update for round {current_round}"
        )
    if body["n_samples"] <= 0:
        raise UpdateRejectedError(
            "no_samples",
            f"update of client {client!r} has n_samples={body['n_samples']}; it must be > 0",
        )
    delta = body["delta"]
    if set(delta) != set(template):
        missing, extra = sorted(set(template) - set(delta)), sorted(set(delta) - set(template))
        raise UpdateRejectedError(
            "parameters",
            f"update of client {client!r} has missing parameters {missing} and unknown ones {extra}",
        )
    for name, array in template.items():
        if delta[name].shape != array.shape:
            raise UpdateRejectedError(
                "shape",
                f"parameter {name!r} of client {client!r} has shape {delta[name].shape}, the model has {array.shape}",
            )
        if not np.isfinite(delta[name]).all():
            raise UpdateRejectedError(
                "not_finite", f"parameter {name!r} of client {client!r} has NaN or infinite values"
            )


class Aggregator(ServiceLifecycle):
    """Rounds over the ``fl.updates`` topic, or over ``fl.control`` with secure aggregation.

    Parameters
    ----------
    config
        The validated application config.
    noise
        Generator of the server's DP noise; None draws a fresh key from the OS. Tests pass a
        seeded one.
    """

    def __init__(self, config: AppConfig, *, noise: SecureGaussian | None = None) -> None:
        super().__init__()
        self.config = config
        self._noise = noise
        self.settings = config.aggregator
        self._kafka = config.kafka
        self._model_name = self.settings.model_name
        self._allowed = set(self.settings.clients) if self.settings.clients else None
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._dead: DeadLetters | None = None
        self.model: GlobalModel | None = None
        self.engine: RoundEngine | None = None
        self._secagg: SecAggCoordinator | None = None
        self._round_opened_at: float | None = None
        self._stop_recorded = False
        self.rounds_completed = 0
        self.skipped_other_models = 0
        self.rejected: dict[str, int] = {}
        self.metrics = AggregatorMetrics()
        self._log = log.bind(model=self._model_name)

    async def start(self) -> None:
        assert self._producer is None, "Aggregator.start() called twice"
        self._producer = make_producer(self._kafka)
        await self._producer.start()
        self._dead = DeadLetters(self._producer, self._kafka, src=f"aggregator:{self._model_name}")
        self.model = await self._load_or_create_global()
        self.engine = RoundEngine(
            self.config, self.model.weights, self.model.version, noise=self._noise
        )
        self._restore_state(self.model)
        if self.engine.ledger is not None:
            # A ledger record is published before its version. A record above the newest
            # version belongs to a round that was never released, and that round runs again.
            bodies = await read_ledger_records(self._kafka, self._model_name)
            released = [b for b in bodies if int(b.get("version", 0)) <= self.model.version]
            self.engine.restore_ledger(released)
        if self.config.privacy.secure_aggregation.enabled:
            self._secagg = SecAggCoordinator(self.config, self._producer)
            await self._secagg.start()
        await self._open_round()
        self._consumer = make_consumer(
            self._kafka, "fl.updates", group_id=f"aggregator-{self._model_name}"
        )
        await self._consumer.start()
        self._log.info("aggregator_started", version=self.model.version)

    async def stop(self) -> None:
        self._stopping.set()
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._secagg is not None:
            await self._secagg.stop()
            self._secagg = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
            self._log.info(
                "aggregator_stopped", rounds=self.rounds_completed, rejected=self.rejected
            )

    async def run(self) -> None:
        while not self._stopping.is_set():
            await self.step()
            if (
                self.settings.max_rounds is not None
                and self.rounds_completed >= self.settings.max_rounds
            ):
                self._log.info("aggregator_max_rounds_reached", rounds=self.rounds_completed)
                break

    async def step(self) -> None:
        """Consume one batch of updates and close the round if it is due."""
        assert self._consumer is not None
        batches = await self._consumer.getmany(timeout_ms=500, max_records=100)
        for records in batches.values():
            for record in records:
                await self._handle(record)
        if self._secagg is not None:
            outcome = await self._secagg.poll()
            if outcome is not None:
                await self._finish_secure_round(outcome)
        if self._round_due():
            await self._close_round()
        elif batches and not self._folded:
            await self._consumer.commit()  # nothing open depends on these offsets

    @property
    def _folded(self) -> int:
        return 0 if self.engine is None else self.engine.folded

    async def _handle(self, record: ConsumerRecord) -> None:
        assert self._dead is not None and self.engine is not None and self.model is not None
        closed: RoundClosed | None = None
        try:
            envelope = codec.decode(record.value, expected_kinds=frozenset({"update"}))
            body = envelope.body
            if body.get("model", self._model_name) != self._model_name:
                # Aggregators of other models (one per modality) share fl.updates.
                self.skipped_other_models += 1
                return
            if self._secagg is not None:
                raise UpdateRejectedError(
                    "secure_aggregation",
                    "plain update rejected because secure aggregation is on; clients must send "
                    "their updates through fl.control",
                )
            buffered = self.engine.buffered is not None
            # Buffered rounds accept any version within the staleness bound, and the buffer
            # itself refuses a second update of one client on one version.
            validate_update(
                body,
                current_round=body["round"] if buffered else self.model.version,
                template=self.model.weights,
                allowed=self._allowed,
                seen=set() if buffered else set(self.engine.clients),
            )
            closed = self.engine.fold(
                body["client_id"], body["base_version"], body["delta"], body["n_samples"]
            )
        except (DecodeError, UpdateRejectedError) as err:
            reason = getattr(err, "reason", "decode")
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
            self.metrics.record_rejected(reason)
            await self._dead.send(
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                error=f"{reason}: {err}",
                raw=record.value,
                ts=time.time(),
            )
            return
        self.metrics.record_privacy(body["client_id"], body.get("privacy"))
        if self._round_opened_at is None:
            self._round_opened_at = time.monotonic()
        self._log.info(
            "update_folded",
            client_id=body["client_id"],
            round=body["round"],
            n_samples=body["n_samples"],
            privacy=body.get("privacy"),
        )
        crash_point("aggregator.folded")
        if closed is not None:
            # Records after this one in the poll batch go into the next buffer: commit up to
            # this record only, so a crash re-reads them.
            await self._release(closed, upto=record)

    def _round_due(self) -> bool:
        assert self.engine is not None
        if not self._folded or self.engine.buffered is not None or self._secagg is not None:
            return False
        if self._folded >= self.settings.quorum:
            return True
        assert self._round_opened_at is not None
        late = time.monotonic() - self._round_opened_at >= self.settings.round_deadline_s
        return late and self._folded >= self.engine.min_to_close

    async def _close_round(self) -> None:
        assert self.engine is not None and self._consumer is not None
        round_id = self.engine.version
        try:
            closed = self.engine.close()
        except RoundError as err:
            self._log.error("round_rejected", round=round_id, error=str(err))
            await self._open_round()
            await self._consumer.commit()
            return
        await self._release(closed)

    async def _finish_secure_round(self, outcome: SecAggOutcome) -> None:
        """Fold the unmasked sum of a finished attempt and close the round, or retry."""
        assert self.engine is not None
        if outcome.total is None:
            # Nothing was revealed; the same version gets a new attempt.
            self.rejected["secagg_aborted"] = self.rejected.get("secagg_aborted", 0) + 1
            await self._open_round()
            return
        self.engine.fold_secure_sum(
            outcome.total,
            clients=outcome.clients,
            total_weight=outcome.total_weight,
            clipped_values=outcome.clipped_values,
        )
        self._log.info(
            "secure_sum_folded",
            round=outcome.round,
            version=outcome.version,
            clients=outcome.clients,
            dropped_after_sharing=outcome.dropped_after_sharing,
            clipped_values=outcome.clipped_values,
        )
        await self._close_round()

    async def _release(self, closed: RoundClosed, *, upto: ConsumerRecord | None = None) -> None:
        """Publish a released round, its ledger record, and commit the offsets it used.

        With ``upto``, the commit ends at that record. Without it, the commit ends at the
        consumer's position, which is right when every consumed record was folded into this
        round or rejected.
        """
        assert self.engine is not None and self._consumer is not None
        started = self._round_opened_at or time.monotonic()
        self.model = GlobalModel(
            version=closed.version,
            round=closed.round,
            weights=closed.weights,
            clients=closed.clients,
            state=self.engine.state_dict(),
        )
        # The ledger record goes first: a crash before the model is out then repeats the round,
        # and the restart drops the record of the unreleased version instead of missing one.
        if closed.ledger is not None:
            await self._publish_ledger(closed.ledger)
        await self._publish(self.model)
        crash_point("aggregator.published")
        if upto is None:
            await self._consumer.commit()
        else:
            await self._consumer.commit(
                {TopicPartition(upto.topic, upto.partition): upto.offset + 1}
            )
        crash_point("aggregator.committed")
        self.rounds_completed += 1
        self.metrics.record_round(seconds=time.monotonic() - started, clients=len(closed.clients))
        self._log.info(
            "round_completed",
            round=closed.round,
            version=closed.version,
            clients=len(closed.clients),
            epsilon=None if closed.ledger is None else closed.ledger["epsilon"],
            duration_s=round(time.monotonic() - started, 3),
        )
        await self._open_round()

    async def _open_round(self) -> None:
        assert self.model is not None and self.engine is not None
        self._round_opened_at = None
        if self.engine.training_stopped is not None:
            await self._record_training_stop()
            return
        if self._secagg is not None:
            await self._secagg.open_round(self.engine.version, self.engine.weights)

    async def _record_training_stop(self) -> None:
        """Publish once why training stopped; the aggregator then only refuses updates."""
        assert self.engine is not None
        if self._stop_recorded:
            return
        self._stop_recorded = True
        self._log.warning("training_stopped", reason=self.engine.training_stopped)
        await self._publish_ledger(self.engine.ledger_record("training_stopped"))

    async def _publish_ledger(self, body: dict[str, Any]) -> None:
        assert self._producer is not None
        value = codec.encode("ledger", body, src=f"aggregator:{self._model_name}", ts=time.time())
        await self._producer.send_and_wait(
            topic_name(self._kafka, "privacy.ledger"), value=value, key=self._model_name.encode()
        )

    async def _publish(self, model: GlobalModel) -> None:
        assert self._producer is not None
        await publish_global(self._producer, self._kafka, self._model_name, model, ts=time.time())

    def _restore_state(self, model: GlobalModel) -> None:
        """Load the fold state published with ``model``, so folding goes on where it stopped."""
        assert self.engine is not None
        if model.state is None:
            if model.version > 0:
                self._log.warning(
                    "aggregator_state_missing",
                    version=model.version,
                    hint="the version was published without fold state; server optimizer "
                    "moments and buffered duplicate keys start empty",
                )
            return
        try:
            self.engine.load_state_dict(model.state)
        except ValueError as err:
            msg = (
                f"cannot resume model {self._model_name!r} from version {model.version} on "
                f"{topic_name(self._kafka, 'fl.global')}: {err}"
            )
            raise RoundError(msg) from err
        self._log.info("aggregator_state_restored", version=model.version)

    async def _load_or_create_global(self) -> GlobalModel:
        """Resume from the newest published version, or publish version 0 from the seed."""
        reader = GlobalModelReader(self._kafka, self._model_name)
        await reader.start()
        try:
            await reader.catch_up()
        finally:
            await reader.stop()
        if reader.latest is not None:
            self._log.info("global_model_resumed", version=reader.latest.version)
            return reader.latest
        # In context scoring the autoencoder reads levels and differences: twice the row width.
        model_settings = self.config.model.model_copy(
            update={"n_features": self.config.model_inputs}
        )
        weights = initial_weights(model_settings)
        initial = GlobalModel(version=0, round=-1, weights=weights, clients=[], state=None)
        await self._publish(initial)
        self._log.info(
            "global_model_initialised", version=0, parameters=sum(a.size for a in weights.values())
        )
        return initial
