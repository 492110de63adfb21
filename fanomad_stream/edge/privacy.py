"""What an edge client does for privacy before an update leaves the site.

- Sample-level DP-SGD (``privacy.dp_sgd``): the window is trained with ``train_dp_sgd``
  instead of plain Adam, and every window is recorded in the client's own ``PrivacyLedger``.
  When the next window would exceed the client's ε budget, the client stops training and
  keeps scoring.
- Client-level DP (``privacy.client_dp``): the delta is clipped to C. With secure aggregation
  on, the client also adds its share of the noise, sized so that the sum over the smallest
  accepted cohort carries std z·C; without it, the aggregator adds the noise.

The update's ``privacy`` field records which of these happened, with the norms and ε involved.
The same steps apply to every modality: the metrics ``EdgePipeline`` and the logs and traces
pipelines of ``edge.modalities`` (their DP-SGD records come from ``training_records``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from fanomad_stream.config import AppConfig
from fanomad_stream.detect.autoencoder import Weights
from fanomad_stream.edge.modalities import ModalityPipeline
from fanomad_stream.edge.pipeline import EdgePipeline
from fanomad_stream.privacy import settings as privacy_settings
from fanomad_stream.privacy.accountant import PrivacyLedger, compute_epsilon
from fanomad_stream.privacy.dp import SecureGaussian, clip_update, privatize_client_update
from fanomad_stream.privacy.dpsgd import train_dp_sgd
from fanomad_stream.privacy.ledger_records import restore_ledger

log = structlog.get_logger(__name__)

TrainablePipeline = EdgePipeline | ModalityPipeline


@dataclass(frozen=True)
class TrainedUpdate:
    """One window's update as it may leave the site, with its privacy description."""

    delta: Weights
    n_samples: int
    privacy: dict[str, Any]
    ledger: dict[str, Any] | None  # the client's sample-level ledger record, if DP-SGD is on


class EdgePrivacy:
    """One site's privacy steps: DP-SGD training, clipping, noise shares and its ledger.

    Parameters
    ----------
    config
        The validated application config.
    site
        The client id, the subject of the sample-level ledger.
    noise
        The generator of every noise draw; None draws a fresh key from the OS.
    """

    def __init__(
        self, config: AppConfig, site: str, *, noise: SecureGaussian | None = None
    ) -> None:
        self.config = config
        self.site = site
        self.noise = noise or SecureGaussian()
        self.training_stopped: str | None = None
        dp_sgd = config.privacy.dp_sgd
        self.ledger: PrivacyLedger | None = None
        if dp_sgd.enabled:
            self.ledger = PrivacyLedger(
                delta=dp_sgd.delta,
                epsilon_budget=dp_sgd.epsilon_budget,
                subject=f"client:{site}",
                level="sample",
            )

    def restore_ledger(self, bodies: list[dict[str, Any]]) -> None:
        """Rebuild the sample-level ledger from this client's ``privacy.ledger`` records."""
        if self.ledger is None:
            return
        restored = restore_ledger(self.ledger, bodies)
        log.info(
            "privacy_ledger_restored",
            client_id=self.site,
            rounds=restored,
            epsilon=self.ledger.spent_epsilon(),
        )

    def train(self, pipeline: TrainablePipeline, *, round_id: int) -> TrainedUpdate | None:
        """Train on the pipeline's window and protect the delta; None when the budget stops it."""
        if self.ledger is None:
            delta, n_samples = pipeline.train_window()
            sample_level: dict[str, Any] = {}
        else:
            trained = self._train_dp_sgd(pipeline, round_id=round_id)
            if trained is None:
                return None
            delta, n_samples, sample_level = trained
        protected, info = self.protect(delta)
        if sample_level:
            info["dp_sgd"] = sample_level
        ledger = None
        if self.ledger is not None:
            ledger = self.ledger.ledger_body()
            ledger["status"] = "round"
        return TrainedUpdate(protected, n_samples, info, ledger)

    def _train_dp_sgd(
        self, pipeline: TrainablePipeline, *, round_id: int
    ) -> tuple[Weights, int, dict[str, Any]] | None:
        assert self.ledger is not None
        settings = self.config.privacy.dp_sgd
        model = self.config.model
        if isinstance(pipeline, EdgePipeline):
            data = np.stack(list(pipeline.window))
        else:
            data = pipeline.training_records()
        pipeline.events_since_training = 0
        records = data.shape[0]
        expected_batch = min(float(model.batch_size), float(records))
        sampling_rate = expected_batch / records
        steps = model.local_epochs * math.ceil(records / expected_batch)
        check = self.ledger.check_next_round(
            noise_multiplier=settings.noise_multiplier, sampling_rate=sampling_rate, steps=steps
        )
        if not check.allowed:
            self.training_stopped = check.reason
            return None
        result = train_dp_sgd(
            pipeline.detector.model,
            data,
            clipping_norm=settings.clipping_norm,
            noise_multiplier=settings.noise_multiplier,
            noise=self.noise,
            learning_rate=model.learning_rate,
            local_epochs=model.local_epochs,
            batch_size=model.batch_size,
        )
        pipeline.detector.last_loss = result.mean_loss
        self.ledger.record_round(
            round_id=round_id,
            noise_multiplier=result.noise_multiplier,
            sampling_rate=result.sampling_rate,
            steps=result.steps,
        )
        info = {
            # The projection of the budget check composed exactly the history recorded now.
            "epsilon": check.projected_epsilon,
            "delta": settings.delta,
            "steps": result.steps,
            "sampling_rate": result.sampling_rate,
            "noise_multiplier": result.noise_multiplier,
            "clipped_fraction": result.clipped_fraction,
        }
        return result.delta, records, info

    def protect(self, delta: Weights) -> tuple[Weights, dict[str, Any]]:
        """Clip ``delta`` (and add the noise share under secure aggregation) when DP is on."""
        dp = self.config.privacy.client_dp
        if not dp.enabled:
            return delta, {"mechanism": "none"}
        if self.config.privacy.secure_aggregation.enabled:
            private = privatize_client_update(
                delta,
                clipping_norm=dp.clipping_norm,
                noise_multiplier=dp.noise_multiplier,
                min_cohort=privacy_settings.min_cohort(self.config),
                noise=self.noise,
            )
            update, norm, clipped, std = (
                private.update,
                private.norm,
                private.clipped,
                private.noise_std,
            )
            noise_by = "client_shares"
        else:
            clipped_update = clip_update(delta, clipping_norm=dp.clipping_norm)
            update, norm, clipped = (
                clipped_update.update,
                clipped_update.norm,
                clipped_update.clipped,
            )
            std, noise_by = 0.0, "server"
        info = {
            "mechanism": "dp-fedavg",
            "clipping_norm": dp.clipping_norm,
            "norm": norm,
            "clipped": clipped,
            "noise_multiplier": dp.noise_multiplier,
            "noise_share_std": std,
            "noise_added_by": noise_by,
        }
        return update, info

    def secure_weight(self, n_samples: int) -> float:
        """Return the weight in [0, 1] this client's update carries under secure aggregation.

        With DP every client weighs 1; otherwise the weight is n_samples / window_events, so
        the unmasked weighted sum gives the same FedAvg mean as sample-count weights.
        """
        if self.config.privacy.client_dp.enabled:
            return 1.0
        return min(1.0, n_samples / self.config.edge.window_events)

    def model_epsilon(self, version: int) -> float | None:
        """Return the client-level ε of global ``version`` when every version was a DP release.

        The figure follows from the configuration: ``version`` rounds of a Gaussian mechanism
        with multiplier z at sampling rate q. The aggregator's ledger records are authoritative.
        """
        dp = self.config.privacy.client_dp
        if not dp.enabled or version < 1:
            return None
        return compute_epsilon(
            noise_multiplier=dp.noise_multiplier,
            sampling_rate=privacy_settings.client_sampling_rate(self.config),
            steps=version,
            delta=dp.delta,
        )
