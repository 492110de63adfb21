"""Validated configuration, loaded from YAML.

Every section is a frozen pydantic model that rejects unknown keys, so a typo fails at start-up
with the key's path (``edge.window_events``) and the accepted range instead of being ignored.
Durations carry a ``_s`` or ``_ms`` suffix and sizes a ``_bytes`` suffix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fanomad_stream.errors import ConfigError
from fanomad_stream.federate.strategy_settings import BufferedAsyncSettings, StrategySettings

MiB = 1024 * 1024


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    """Connection and security settings shared by every Kafka client."""

    bootstrap_servers: str = "127.0.0.1:19092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    # TLS (security_protocol SSL or SASL_SSL): the CA that signed the broker certificates
    # (system CAs when unset), and an optional client certificate and key for mutual TLS.
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: str | None = None
    topic_prefix: str = Field(default="", pattern=r"^[A-Za-z0-9._-]*$")
    # Model updates are single records; producer, topic and consumer limits all follow this.
    max_message_bytes: int = Field(default=16 * MiB, ge=1 * MiB, le=64 * MiB)
    request_timeout_ms: int = Field(default=30_000, ge=1_000, le=600_000)

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            msg = (
                f"security_protocol {self.security_protocol} needs sasl_mechanism, sasl_username "
                "and sasl_password"
            )
            raise ValueError(msg)
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            msg = "ssl_keyfile is set without ssl_certfile; set both for mutual TLS, or neither"
            raise ValueError(msg)
        return self


class ReplaySettings(_Section):
    """Recorded data to produce into the topics, and the replay speed."""

    dataset: Literal["smd"] = "smd"
    data_dir: Path | None = None
    machines: list[str] = Field(default_factory=lambda: ["machine-1-2"], min_length=1)
    train_rows: int | None = Field(default=None, ge=1)
    test_rows: int | None = Field(default=None, ge=1)
    speed: float = Field(default=0.0, ge=0.0)  # 0 = as fast as possible; else cadence × speed
    interval_s: float = Field(default=60.0, gt=0)  # SMD samples once a minute


ModelKind = Literal["mlp_autoencoder", "lstm_autoencoder", "transformer_autoencoder"]


class ModelSettings(_Section):
    """The autoencoder each edge client trains and the federation averages.

    For the sequence kinds, ``hidden[0]`` is the LSTM hidden size or the Transformer width
    (even and divisible by ``n_heads``), ``hidden[-1]`` the latent size, and ``window`` the
    number of time steps per window.
    """

    kind: ModelKind = "mlp_autoencoder"
    n_features: int = Field(default=38, ge=1, le=100_000)
    hidden: list[int] = Field(default_factory=lambda: [16, 8], min_length=1)
    window: int = Field(default=16, ge=1, le=4096)
    n_heads: int = Field(default=4, ge=1, le=64)
    learning_rate: float = Field(default=1e-3, gt=0, le=1.0)
    local_epochs: int = Field(default=2, ge=1, le=100)
    batch_size: int = Field(default=64, ge=1, le=65_536)
    proximal_mu: float = Field(default=0.0, ge=0.0)
    # Sequence kinds: also train on each stream's first rows[:k], k < window, so a stream's
    # first events score like later ones. Streams shorter than the window (HDFS block
    # sessions) need it; alerts then start at a stream's first event.
    train_prefixes: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _prefixes_need_a_sequence(self) -> ModelSettings:
        if self.train_prefixes and self.kind == "mlp_autoencoder":
            msg = (
                "train_prefixes applies to lstm_autoencoder and transformer_autoencoder, which "
                "score windows of rows; mlp_autoencoder scores single rows, so remove "
                "train_prefixes or choose a sequence kind"
            )
            raise ValueError(msg)
        return self


class ThresholdSettings(_Section):
    """Per-source alert threshold, fitted on past scores only.

    ``quantile``: the ``quantile`` of the last ``history`` scores, so about 1 - quantile of
    the scores alert whatever their size. ``spot``: a generalized Pareto tail fitted on the
    scores above their 98th percentile (SPOT), so a score alerts when its tail probability
    is below ``spot_risk``; it needs ``warmup_events`` >= 500 to calibrate.
    """

    kind: Literal["quantile", "spot"] = "quantile"
    quantile: float = Field(default=0.99, gt=0.5, lt=1.0)
    warmup_events: int = Field(default=200, ge=10)
    history: int = Field(default=5_000, ge=100)
    spot_risk: float = Field(default=1e-3, gt=0.0, lt=1.0)
    # Upper bound on the SPOT threshold as a multiple of the median calibration score.
    spot_median_cap: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _spot_has_peaks(self) -> ThresholdSettings:
        if self.kind == "spot" and self.warmup_events < 500:
            msg = (
                f"threshold kind spot calibrates on warmup_events scores and needs >= 500, "
                f"got {self.warmup_events}; raise warmup_events or use kind quantile"
            )
            raise ValueError(msg)
        return self


class ContextScoringSettings(_Section):
    """The tuned scoring of ``edge.scoring: context``; see ``detect.pipeline.PipelineConfig``.

    The scale floor is ``edge.scale_floor``; the autoencoder's layers and training come from
    the ``model`` section.
    """

    # Rows of each source the level and difference scalers learn before they freeze. No alert
    # is raised before; the SPOT threshold calibrates on the end of this warm-up.
    warmup_rows: int = Field(default=20_000, ge=10)
    # Largest absolute standardized feature passed to the autoencoder.
    clip: float = Field(default=20.0, gt=0.0, allow_inf_nan=False)
    # Weight of the newest score in the moving average, in (0, 1]; 1 turns smoothing off.
    ema_alpha: float = Field(default=0.1, gt=0.0, le=1.0)
    # Probability that a normal score exceeds the SPOT threshold, in (0, 1).
    spot_risk: float = Field(default=1e-3, gt=0.0, lt=1.0)
    # Upper bound on the SPOT threshold as a multiple of the median calibration score. Null
    # leaves it uncapped.
    spot_median_cap: float | None = Field(default=13.0, gt=0.0, allow_inf_nan=False)
    # Scores the SPOT threshold calibrates on before it decides; its initial level is their
    # 98th percentile, and the fit needs at least 10 scores above it.
    spot_warmup: int = Field(default=2_000, ge=500)
    # Divide each feature's reconstruction error by its mean on recent rows.
    normalize_errors: bool = False
    # Weight of a level feature's error in the score against 1 for a first difference. With
    # 0, only the reconstructed differences are scored.
    level_weight: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)


class EdgeSettings(_Section):
    """One edge client: consume, score, alert, train in windows, publish updates."""

    group_prefix: str = "edge"
    max_batch_records: int = Field(default=500, ge=1, le=100_000)
    # Folder of each site's local state (<state_dir>/<site>/): edge.json records the last round
    # the site sent an update for, checkpoint.bin the scoring state and the offsets it covers.
    # The logs and traces clients keep their checkpoint in <state_dir>/<site>/<modality>/.
    # It must be writable by the service user only, because the checkpoint is a pickle.
    # None keeps no state, so a restarted client warms up again.
    state_dir: Path | None = None
    # Seconds between two checkpoints of the scoring state. One is written after a successful
    # commit once this much time has passed, and one on a clean stop.
    checkpoint_interval_s: float = Field(default=60.0, gt=0.0, le=86_400.0, allow_inf_nan=False)
    # Seconds stop() waits for the batch in progress, and then for each Kafka client to close.
    # Past it the batch is abandoned (its records are read again after a restart) and the
    # client is closed without waiting, for example while the broker is down.
    stop_timeout_s: float = Field(default=15.0, gt=0.0, le=600.0, allow_inf_nan=False)
    # Largest array a metric record may carry; bigger records are dead-lettered unparsed.
    max_metric_values: int = Field(default=4096, ge=1, le=1_000_000)
    poll_timeout_ms: int = Field(default=500, ge=10, le=60_000)
    window_events: int = Field(default=2_000, ge=10)
    hst_trees: int = Field(default=25, ge=1, le=500)
    hst_height: int = Field(default=12, ge=2, le=30)
    hst_window: int = Field(default=250, ge=10)
    score_weight_ae: float = Field(default=1.0, ge=0.0)
    scale_floor: float = Field(default=0.01, gt=0.0)
    # Leading rows of each source that only fit its streaming scaler: they get score 0 and no
    # alert, and train neither the threshold, HalfSpaceTrees nor the autoencoder. Without
    # them a new source's first rows pass in raw units (the scale is 1 before two rows).
    # Context scoring has its own warm-up (``context.warmup_rows``) for the autoencoder score.
    scaler_warmup_rows: int = Field(default=10, ge=0)
    threshold: ThresholdSettings = ThresholdSettings()
    # "baseline": standardized row → autoencoder error → rolling quantile threshold.
    # "context": level and first-difference features, difference errors, EMA and capped SPOT
    # (``detect.pipeline.ContextPipeline``), settings in ``context``.
    scoring: Literal["baseline", "context"] = "context"
    context: ContextScoringSettings = ContextScoringSettings()


class AggregatorSettings(_Section):
    """The round coordinator that folds updates into the global model."""

    quorum: int = Field(default=1, ge=1)
    # Client ids allowed to send updates; an update from any other id is rejected.
    clients: list[str] | None = None
    round_deadline_s: float = Field(default=60.0, gt=0)
    max_rounds: int | None = Field(default=None, ge=1)
    model_name: str = "smd-ae"
    # How the round's updates are combined; FedAvg by default.
    strategy: StrategySettings = StrategySettings()
    # FedBuff-style asynchronous rounds instead of synchronous ones; None keeps rounds synchronous.
    buffered_async: BufferedAsyncSettings | None = None


class ClientDPSettings(_Section):
    """Client-level differential privacy (DP-FedAvg): clip each client's delta, noise the sum.

    The guarantee is per client and per model: adding or removing one client's whole data
    changes the released global model by at most ``clipping_norm`` before noise.
    """

    enabled: bool = False
    # Largest flat L2 norm of one client's delta, in parameter units, > 0. Smaller bounds each
    # client's influence more tightly and biases large updates more.
    clipping_norm: float = Field(default=0.1, gt=0.0, allow_inf_nan=False)
    # Noise std on the sum of the deltas divided by clipping_norm, >= 0; larger is more private.
    noise_multiplier: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    # δ of the reported (ε, δ), in (0, 1); keep it well below 1 / population.
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    # Largest ε the global model may spend over the run, None for no limit.
    epsilon_budget: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    # Smallest number of clients a noised round accepts; with secure aggregation each client's
    # noise share is sized for it. None: the secure aggregation threshold, or the quorum.
    min_cohort: int | None = Field(default=None, ge=1)
    # Number of clients that could be sampled; None: the aggregator's client list.
    population: int | None = Field(default=None, ge=1)


class DpSgdSettings(_Section):
    """Sample-level DP-SGD for local training: per-record clipping and Gaussian noise."""

    enabled: bool = False
    # Largest L2 norm of one record's gradient, in gradient units, > 0.
    clipping_norm: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    # Noise std on the summed batch gradient divided by clipping_norm, >= 0.
    noise_multiplier: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    # δ of each client's (ε, δ) guarantee, in (0, 1); keep it well below 1 / records.
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    # Largest ε one client's records may spend; the client stops training beyond it.
    epsilon_budget: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)


class SecureAggregationSettings(_Section):
    """Double-masking secure aggregation over ``fl.control``: the aggregator sees only the sum."""

    enabled: bool = False
    # Shamir threshold t: the fewest clients that must survive every stage, > half the cohort.
    threshold: int = Field(default=2, ge=2)
    # Seconds the aggregator waits for one protocol stage before closing it with the clients
    # that replied.
    stage_timeout_s: float = Field(default=30.0, gt=0.0, allow_inf_nan=False)
    # Fixed-point precision: the rounding step is 2^-scale_bits parameter units.
    scale_bits: int = Field(default=16, ge=0, le=40)
    # Largest ring width the deployment accepts, in bits.
    max_bits: int = Field(default=32, ge=8, le=62)
    # Largest absolute coordinate of an encoded update, in parameter units; values beyond it
    # are clipped and counted. None: clipping_norm plus 8 noise-share stds with DP on, else 1.
    clip_range: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)


class PrivacySettings(_Section):
    """Client-level DP, sample-level DP-SGD and secure aggregation, each off by default."""

    client_dp: ClientDPSettings = ClientDPSettings()
    dp_sgd: DpSgdSettings = DpSgdSettings()
    secure_aggregation: SecureAggregationSettings = SecureAggregationSettings()


class LogsSettings(_Section):
    """The logs modality: drain3 mining, windows and the model of the logs federation.

    With ``model.kind`` mlp_autoencoder the model scores per-source window count vectors.
    With a sequence kind it scores every line by its template-bucket row, in the window of
    the source's last lines. ``model.n_features`` is derived from ``n_buckets``.
    """

    model: ModelSettings = ModelSettings(kind="lstm_autoencoder", hidden=[32, 8])
    n_buckets: int = Field(default=64, ge=1, le=65_536)
    window_s: float = Field(default=60.0, gt=0)
    max_lines: int = Field(default=10_000, ge=1)
    # Sources a site keeps state for: a sequence model's recent lines of each source, or the
    # MLP's open window, scaler, threshold and window count of each. Past this, the least
    # recently seen source is dropped and counted, and the MLP scores its open window early.
    # A dropped source that writes again starts afresh, so more active sources than this
    # never warm up.
    max_sources: int = Field(default=10_000, ge=1)
    # A line with this event id (LogRecord.event) closes its source's window, so a window
    # holds one session, such as an HDFS block. The MLP then scores each session's count
    # vector, standardized by one scaler of the site, against one threshold of the site.
    session_end_event: str | None = Field(default=None, min_length=1)
    # Each logs site keeps its drain3 state in <state_dir>/<site>/drain3.json. A traces site
    # keeps its open traces in <state_dir>/<site>/traces.msgpack unless edge.state_dir is set,
    # because the checkpoint there contains them.
    state_dir: Path = Path("state")

    @model_validator(mode="after")
    def _session_windows_need_the_mlp(self) -> LogsSettings:
        if self.session_end_event is not None and self.model.kind != "mlp_autoencoder":
            msg = (
                f"logs.session_end_event closes the windows that mlp_autoencoder scores, but "
                f"logs.model.kind {self.model.kind!r} scores every line and has no windows; "
                "remove logs.session_end_event or set logs.model.kind to mlp_autoencoder"
            )
            raise ValueError(msg)
        return self


class TracesSettings(_Section):
    """The traces modality: assembly limits and the model of the traces federation.

    With ``model.kind`` mlp_autoencoder the model scores per-trace feature vectors; with a
    sequence kind it scores the trace's span rows in start order. ``model.n_features`` is
    derived from the bucket counts.
    """

    model: ModelSettings = ModelSettings(hidden=[16, 8])
    timeout_s: float = Field(default=30.0, gt=0)
    root_grace_s: float = Field(default=2.0, ge=0)
    max_open_traces: int = Field(default=10_000, ge=1)
    max_spans_per_trace: int = Field(default=2_000, ge=1)
    n_edge_buckets: int = Field(default=32, ge=1, le=65_536)
    n_service_buckets: int = Field(default=16, ge=1, le=65_536)


ModalityName = Literal["metrics", "logs", "traces"]
ALL_MODALITIES: tuple[ModalityName, ...] = ("metrics", "logs", "traces")


class NezhaSettings(_Section):
    """The multimodal demo's Nezha replay: which modalities and data, and how much of it."""

    # The modalities the demo replays, scores and evaluates, each its own federation.
    modalities: list[ModalityName] = Field(default_factory=lambda: [*ALL_MODALITIES], min_length=1)
    data_dir: Path | None = None  # default: the copy beside the checkout
    metric_margin_s: float = Field(default=600.0, ge=0)
    log_limit: int | None = Field(default=None, ge=1)
    span_limit: int | None = Field(default=None, ge=1)
    timeout_s: float = Field(default=600.0, gt=0)

    @field_validator("modalities")
    @classmethod
    def _modalities_unique(cls, modalities: list[ModalityName]) -> list[ModalityName]:
        if len(set(modalities)) != len(modalities):
            msg = "must not repeat a modality; list each of metrics, logs, traces at most once"
            raise ValueError(msg)
        return modalities


class SessionReplaySettings(_Section):
    """The DeepLog HDFS block sessions that the log demo replays, and how they overlap.

    The first ``warmup_sessions`` normal sessions are scored and trained on but not
    evaluated. The evaluated part follows: the next ``normal_sessions`` normal sessions and
    ``anomalous_sessions`` anomalous ones drawn at random, in a seeded random order.
    """

    warmup_sessions: int = Field(default=1_500, ge=1)
    normal_sessions: int = Field(default=1_500, ge=1)
    anomalous_sessions: int = Field(default=100, ge=1)
    # Block sessions open at the same time; their lines interleave in the stream.
    concurrency: int = Field(default=20, ge=1, le=100_000)
    seed: int = 0


class LogDemoSettings(_Section):
    """The live log demo: a labelled log replayed through the logs edge clients of ``sites``."""

    # BGL and Thunderbird carry a per-line label as the first token of each line;
    # hdfs_sessions are DeepLog's HDFS block sessions, labelled per block.
    dataset: Literal["bgl", "thunderbird", "hdfs_sessions"] = "bgl"
    data_dir: Path | None = None  # the LogHub folder; default: the copy beside the checkout
    limit: int | None = Field(default=None, ge=1)  # first lines to replay; None: all
    events_per_s: float = Field(default=0.0, ge=0.0)  # 0 sends as fast as possible
    # Key every line by the data set's name, so the site scores one stream. The 2k LogHub
    # samples draw lines from months of logs of about 1,800 nodes, so a per-node stream is
    # one or two lines long and a sequence model never fills its window or alerts.
    single_stream: bool = True
    # Consecutive lines of the replay per evaluation window (BGL, Thunderbird).
    lines_per_window: int = Field(default=20, ge=1)
    # Edge clients, each scoring the sources (nodes, blocks) dealt to it in turn.
    sites: int = Field(default=1, ge=1, le=64)
    sessions: SessionReplaySettings = SessionReplaySettings()
    timeout_s: float = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _sessions_keep_their_blocks(self) -> LogDemoSettings:
        if self.dataset == "hdfs_sessions" and self.single_stream:
            msg = (
                "log_demo.single_stream must be false for hdfs_sessions: each block session "
                "is its own source"
            )
            raise ValueError(msg)
        if self.dataset == "hdfs_sessions" and self.limit is not None:
            msg = (
                "log_demo.limit would cut the hdfs_sessions replay inside the warm-up sessions "
                "and in the middle of blocks; remove it and size the replay with "
                "log_demo.sessions (warmup_sessions, normal_sessions, anomalous_sessions)"
            )
            raise ValueError(msg)
        return self


class EvaluationSettings(_Section):
    precision_at_k: list[int] = Field(default_factory=lambda: [100, 500])
    seed: int = 0


class AppConfig(_Section):
    """The whole system's configuration, as the demo and every service read it."""

    kafka: KafkaSettings = KafkaSettings()
    replay: ReplaySettings = ReplaySettings()
    model: ModelSettings = ModelSettings()
    edge: EdgeSettings = EdgeSettings()
    aggregator: AggregatorSettings = AggregatorSettings()
    logs: LogsSettings = LogsSettings()
    traces: TracesSettings = TracesSettings()
    nezha: NezhaSettings = NezhaSettings()
    log_demo: LogDemoSettings = LogDemoSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    privacy: PrivacySettings = PrivacySettings()
    output_dir: Path = Path("runs/demo")
    min_global_versions: int = Field(default=3, ge=1)

    @property
    def model_inputs(self) -> int:
        """Width of the autoencoder's input: the raw row, or twice it for context features."""
        if self.edge.scoring == "context":
            return 2 * self.model.n_features
        return self.model.n_features

    @model_validator(mode="after")
    def _privacy_fits_the_federation(self) -> AppConfig:
        from fanomad_stream.privacy.settings import check_privacy_settings

        check_privacy_settings(self)
        return self


def load_config(path: Path | str | None) -> AppConfig:
    """Read a YAML file into an AppConfig; None gives the defaults.

    Raises ConfigError listing every invalid key with its path and the reason.
    """
    if path is None:
        return AppConfig()
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"config file {str(path)!r} not found") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, object], source: str = "<dict>") -> AppConfig:
    """Validate a mapping into an AppConfig, raising ConfigError with key paths."""
    try:
        return AppConfig.model_validate(raw)
    except ValidationError as err:
        lines = []
        for problem in err.errors():
            if not problem["loc"] and problem["type"] == "value_error":
                # Cross-section checks start their message with the key path to change.
                lines.append(f"  {problem['ctx']['error']}")
                continue
            where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
            lines.append(f"  {where}: {problem['msg']} (got {problem.get('input')!r})")
        msg = f"invalid configuration in {source}:\n" + "\n".join(lines)
        raise ConfigError(msg) from None
