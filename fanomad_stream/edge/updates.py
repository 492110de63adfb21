"""The update path of every edge client: train a window, protect it, and send it.

``UpdateSender`` trains through ``EdgePrivacy``: DP-SGD, or clipping and noise shares under
client-level DP. It publishes the site's ledger record before the update that the record
accounts for. The delta goes to ``fl.updates`` as a plain update, or over ``fl.control`` as a
masked input under secure aggregation. When the site's budget is spent, the sender records
the stop once, and scoring goes on without training.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer

from fanomad_stream.config import AppConfig
from fanomad_stream.edge.privacy import EdgePrivacy, TrainablePipeline, TrainedUpdate
from fanomad_stream.federate.secagg_kafka import SecAggParticipant
from fanomad_stream.privacy.ledger_records import read_ledger_records
from fanomad_stream.privacy.secagg.encoding import flatten_update
from fanomad_stream.service.metrics import EdgeMetrics
from fanomad_stream.transport import codec
from fanomad_stream.transport.kafka import topic_name


class UpdateSender:
    """Trains a site's window and sends its update; see the module docstring.

    Parameters
    ----------
    config
        The validated config of the client's model (its ``aggregator.model_name`` names the
        federation).
    site
        Client id of the site.
    metrics
        The client's Prometheus metrics; the ε of each ledger record is recorded there.
    logger
        The client's bound logger.
    """

    def __init__(
        self,
        config: AppConfig,
        site: str,
        metrics: EdgeMetrics,
        logger: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.config = config
        self.site = site
        self.privacy = EdgePrivacy(config, site)
        self.secagg: SecAggParticipant | None = None
        self._metrics = metrics
        self._log = logger
        self._producer: AIOKafkaProducer | None = None
        self._stop_recorded = False

    async def start(self, producer: AIOKafkaProducer) -> None:
        """Join secure aggregation when it is on and restore the site's spent ε."""
        self._producer = producer
        if self.config.privacy.secure_aggregation.enabled:
            self.secagg = SecAggParticipant(self.config, self.site, producer)
            await self.secagg.start()
        if self.privacy.ledger is not None:
            records = await read_ledger_records(self.config.kafka, self.site)
            self.privacy.restore_ledger(records)

    async def stop(self) -> None:
        if self.secagg is not None:
            secagg, self.secagg = self.secagg, None
            await secagg.stop()

    async def poll(self) -> None:
        """Handle the secure aggregation messages that arrived since the last poll."""
        if self.secagg is not None:
            await self.secagg.poll()

    def may_train(self, global_version: int, last_update_round: int) -> bool:
        """Return True when the site may send an update trained on ``global_version``."""
        if self.privacy.training_stopped is not None:
            return False
        if self.secagg is not None:
            return self.secagg.wants_update(global_version)
        return global_version > last_update_round

    async def train(self, pipeline: TrainablePipeline, *, round_id: int) -> TrainedUpdate | None:
        """Train the pipeline's window in a worker thread; None when the budget stops training.

        The ledger record of a private window is published here, before the update is sent.
        """
        trained = await asyncio.to_thread(self.privacy.train, pipeline, round_id=round_id)
        if trained is None:
            await self._record_training_stop()
            return None
        if trained.ledger is not None:
            await self._publish_ledger(trained.ledger)
        return trained

    async def send(
        self, trained: TrainedUpdate, *, round_id: int, base_version: int, train_loss: float
    ) -> None:
        """Send a trained update: masked under secure aggregation, plain otherwise."""
        assert self._producer is not None, "UpdateSender.start() was not called"
        if self.secagg is not None:
            vector, _ = flatten_update(trained.delta)
            metadata = {"n_samples": trained.n_samples, "privacy": trained.privacy}
            weight = self.privacy.secure_weight(trained.n_samples)
            await self.secagg.submit(vector, weight=weight, metadata=metadata)
            return
        body = {
            "round": round_id,
            "client_id": self.site,
            "model": self.config.aggregator.model_name,
            "n_samples": trained.n_samples,
            "base_version": base_version,
            "delta": trained.delta,
            "privacy": trained.privacy,
            "train_loss": train_loss,
        }
        value = codec.encode("update", body, src=self.site, ts=time.time())
        await self._producer.send_and_wait(
            topic_name(self.config.kafka, "fl.updates"), value=value, key=self.site.encode()
        )

    async def _record_training_stop(self) -> None:
        if self._stop_recorded or self.privacy.ledger is None:
            return
        self._stop_recorded = True
        self._log.warning("training_stopped", reason=self.privacy.training_stopped)
        body = self.privacy.ledger.ledger_body()
        body.update(status="training_stopped", reason=self.privacy.training_stopped)
        await self._publish_ledger(body)

    async def _publish_ledger(self, body: dict[str, Any]) -> None:
        assert self._producer is not None
        value = codec.encode("ledger", body, src=self.site, ts=time.time())
        await self._producer.send_and_wait(
            topic_name(self.config.kafka, "privacy.ledger"), value=value, key=self.site.encode()
        )
        if isinstance(body.get("epsilon"), float | int):
            self._metrics.record_epsilon(float(body["epsilon"]))
