"""The live log demo: a labelled LogHub sample (BGL or Thunderbird) through the logs path.

Steps: read the sample from a local LogHub copy, start a local broker of its own, apply the
topic catalog, and start in this process one logs edge client and its aggregator. Replay the
lines to ``logs.raw`` (the label token cut from each line, labels to ``labels``), wait until
the client has committed the topic to the end of the replay, stop the services, and evaluate
per line and per window of consecutive lines. The table gives the detector beside three
baselines from the same run: random scores, the HalfSpaceTrees scores the edge client sent
with each line, and the offline count-vector PCA over the same windows.

LogHub is licensed for research use only, so the project ships none of its files: the demo
reads them from ``log_demo.data_dir``, by default the copy beside the checkout.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from fanomad_stream.config import AppConfig, SessionReplaySettings
from fanomad_stream.demo_multimodal import (
    only_clients,
    run_on_own_broker,
    running_services,
    wait_committed,
)
from fanomad_stream.edge.modalities import LogsPipeline
from fanomad_stream.edge.stream_client import ModalityEdgeClient
from fanomad_stream.errors import ConfigError
from fanomad_stream.evaluate.log_baselines import log_pca_scores
from fanomad_stream.evaluate.logs import (
    ScorerRow,
    SessionRow,
    count_windows,
    render_scorer_table,
    render_session_table,
    scorer_rows,
    session_scorer_rows,
)
from fanomad_stream.evaluate.modalities import join_series
from fanomad_stream.federate.aggregator import Aggregator
from fanomad_stream.modalities import is_sequence, modality_config
from fanomad_stream.replay import streams
from fanomad_stream.replay.logs import (
    END_EVENT,
    LogDataset,
    LogRecord,
    interleave_sessions,
    read_hdfs_sessions,
)
from fanomad_stream.transport.reader import read_topic
from fanomad_stream.transport.topics import apply_catalog, load_catalog

TABLE_NOTES = """\
Lines are in replay order. A window is a run of consecutive lines. It is anomalous when any
of its lines is, scores the max of its line scores and alerts when any line alerted. A burst
is a run of consecutive anomalous lines. Random: one uniform draw per line. HST: River
HalfSpaceTrees that the edge client ran online on each line's template row. PCA: the
count-vector PCA of Xu et al. (SOSP 2009), fitted offline on every window of the replay;
each line gets its window's residual. The baselines raise no alerts, so their online F1 and
burst figures are n/a."""


@dataclass(frozen=True)
class LogDemoResult:
    """Figures of one log demo run."""

    lines: int  # lines replayed, or sessions when the MLP scores one window per session
    scored: int  # distinct lines (or sessions) with a score
    rows: list[ScorerRow]
    seconds: float
    global_version: int  # -1 when no round completed
    sessions: list[SessionRow] = field(default_factory=list)  # hdfs_sessions only
    sources_dropped: int = 0  # sources whose state the clients dropped at logs.max_sources
    windows_evicted: int = 0  # windows scored early because logs.max_sources were open


def load_demo_dataset(config: AppConfig) -> LogDataset:
    """Read the configured log sample, cut to ``log_demo.limit`` lines.

    With ``log_demo.single_stream`` every record's source becomes the data set's name. For
    ``hdfs_sessions`` the records are the interleaved block sessions that
    ``log_demo.sessions`` selects (see ``session_dataset``).

    Raises ConfigError naming the folder when the LogHub copy is missing, and when
    ``logs.model`` is not a sequence model (the demo evaluates one score per line).
    """
    settings = config.log_demo
    if not is_sequence(config.logs.model) and not scores_sessions(config):
        msg = (
            f"logs.model.kind {config.logs.model.kind!r} scores windows, but the log demo "
            "evaluates one score per line; set logs.model.kind to lstm_autoencoder or "
            "transformer_autoencoder (or, for hdfs_sessions, set logs.session_end_event to "
            f"{END_EVENT!r} to score one window per session)"
        )
        raise ConfigError(msg)
    if scores_sessions(config) and settings.dataset != "hdfs_sessions":
        msg = (
            f"logs.session_end_event is set, but log_demo.dataset {settings.dataset!r} has no "
            "session end lines; unset it or use hdfs_sessions"
        )
        raise ConfigError(msg)
    folder = settings.data_dir or streams.LOGHUB_DIR
    if not folder.is_dir():
        msg = (
            f"LogHub folder {folder} not found; set log_demo.data_dir to a local LogHub copy "
            "with BGL/BGL_2k.log, Thunderbird/Thunderbird_2k.log or HDFS_sessions_deeplog/ "
            "(the project ships none)"
        )
        raise ConfigError(msg)
    if settings.dataset == "hdfs_sessions":
        dataset = session_dataset(folder / "HDFS_sessions_deeplog", settings.sessions)
    else:
        dataset = streams.load_log_dataset(settings.dataset, folder)
    records = dataset.records[: settings.limit]
    if settings.single_stream:
        records = [replace(record, source=dataset.name) for record in records]
    if scores_sessions(config):
        _check_session_windows(config, records)
    labels = None if dataset.labels is None else dataset.labels[: settings.limit]
    categories = None if dataset.categories is None else dataset.categories[: settings.limit]
    return LogDataset(dataset.name, records, labels, categories)


def _check_session_windows(config: AppConfig, records: list[LogRecord]) -> None:
    """Raise ConfigError unless only a session's end line can close its window.

    A window that closes by time or by size splits its session into several scores, and
    the evaluation expects one per session.
    """
    span_s = records[-1].ts - records[0].ts if records else 0.0
    if config.logs.window_s <= span_s:
        msg = (
            f"logs.window_s is {config.logs.window_s:g} s, but the session replay spans "
            f"{span_s:g} s (one line per second), so sessions would be cut by time; set "
            f"logs.window_s above {span_s:g}"
        )
        raise ConfigError(msg)
    longest = max(Counter(record.source for record in records).values(), default=0)
    if config.logs.max_lines < longest:
        msg = (
            f"logs.max_lines is {config.logs.max_lines}, but the longest session has {longest} "
            f"lines and would be cut; set logs.max_lines to at least {longest}"
        )
        raise ConfigError(msg)


def session_dataset(folder: Path, settings: SessionReplaySettings) -> LogDataset:
    """Interleave the warm-up, normal and anomalous HDFS block sessions into one stream.

    Block ``blk_<n>`` is the n-th session: the warm-up sessions come first, so a block is
    evaluated when ``n >= settings.warmup_sessions`` (see ``evaluated_lines``).
    """
    if not folder.is_dir():
        msg = f"HDFS session folder {folder} not found; it holds DeepLog's hdfs_train.txt"
        raise ConfigError(msg)
    normal_needed = settings.warmup_sessions + settings.normal_sessions
    sessions = read_hdfs_sessions(folder, max_normal=normal_needed)
    normal = [session for session in sessions if session.label == 0]
    anomalous = [session for session in sessions if session.label == 1]
    if len(normal) < normal_needed or len(anomalous) < settings.anomalous_sessions:
        msg = (
            f"log_demo.sessions asks for {normal_needed} normal and "
            f"{settings.anomalous_sessions} anomalous sessions, but {folder} holds "
            f"{len(normal)} and {len(anomalous)}; lower warmup_sessions + normal_sessions to "
            f"at most {len(normal)} and anomalous_sessions to at most {len(anomalous)}"
        )
        raise ConfigError(msg)
    rng = np.random.default_rng(settings.seed)
    drawn = rng.choice(len(anomalous), settings.anomalous_sessions, replace=False)
    evaluated = normal[settings.warmup_sessions :] + [anomalous[i] for i in sorted(drawn)]
    evaluated = [evaluated[i] for i in rng.permutation(len(evaluated))]
    return interleave_sessions(
        normal[: settings.warmup_sessions] + evaluated,
        concurrency=settings.concurrency,
        seed=settings.seed,
    )


def scores_sessions(config: AppConfig) -> bool:
    """True when the logs MLP scores one window per session instead of a score per line."""
    return not is_sequence(config.logs.model) and config.logs.session_end_event == END_EVENT


def evaluated_lines(dataset: LogDataset, config: AppConfig) -> np.ndarray:
    """Return a mask of the lines the evaluation counts: all but the warm-up sessions'."""
    if config.log_demo.dataset != "hdfs_sessions":
        return np.ones(len(dataset.records), dtype=bool)
    return session_numbers(dataset) >= config.log_demo.sessions.warmup_sessions


def session_numbers(dataset: LogDataset) -> np.ndarray:
    """Return each line's session number ``n`` from its source ``blk_<n>``."""
    return np.array([int(record.source.removeprefix("blk_")) for record in dataset.records])


def site_sources(dataset: LogDataset, sites: int) -> list[list[str]]:
    """Deal the sources to ``sites`` sites in turn, in order of their first line.

    Raises ConfigError when there are fewer sources than sites.
    """
    sources = list(dict.fromkeys(record.source for record in dataset.records))
    if len(sources) < sites:
        msg = (
            f"log_demo.sites is {sites}, but the replay has {len(sources)} source(s); lower "
            "log_demo.sites or set log_demo.single_stream to false"
        )
        raise ConfigError(msg)
    return [sources[i::sites] for i in range(sites)]


def run_log_demo(config: AppConfig) -> int:
    """Run the demo on a fresh broker; return 0 when every replayed line has a score."""
    dataset = load_demo_dataset(config)

    async def main(config: AppConfig) -> int:
        result = await replay_and_evaluate(config, dataset)
        return _report(config, dataset, result)

    return run_on_own_broker(config, main)


async def replay_and_evaluate(
    config: AppConfig, dataset: LogDataset, *, progress: bool = True
) -> LogDemoResult:
    """Replay ``dataset`` through the logs edge clients and their aggregator, then evaluate.

    ``config.kafka`` must reach a running broker. Raises TimeoutError when a client has not
    committed the replay within ``log_demo.timeout_s``.
    """
    if dataset.labels is None:
        msg = f"log data set {dataset.name!r} has no labels to evaluate against"
        raise ConfigError(msg)
    await apply_catalog(config.kafka, load_catalog())
    settings = config.log_demo
    dealt = site_sources(dataset, settings.sites)
    names = [
        f"{dataset.name}-logs" if settings.sites == 1 else f"{dataset.name}-logs-{i}"
        for i in range(settings.sites)
    ]
    logs_config = modality_config(config, "logs")
    clients = [
        ModalityEdgeClient(
            logs_config,
            site=name,
            modality="logs",
            sources=None if settings.sites == 1 else sources,
        )
        for name, sources in zip(names, dealt, strict=True)
    ]
    aggregator = Aggregator(only_clients(logs_config, names))
    groups = {f"{config.edge.group_prefix}-logs-{name}": "logs.raw" for name in names}

    began = time.monotonic()
    async with running_services(aggregator, *clients) as tasks:
        await streams.replay_logs(
            config.kafka, dataset, events_per_s=settings.events_per_s, progress=progress
        )
        await wait_committed(config, groups, tasks, settings.timeout_s)
    seconds = time.monotonic() - began

    scores = await read_topic(config.kafka, "scores", frozenset({"score"}))
    labels = await read_topic(config.kafka, "labels", frozenset({"label"}))
    series = join_series(scores, labels, dataset.name, "logs")
    order = np.argsort(series.indices, kind="stable")
    indices = series.indices[order]
    if series.hst is None:
        msg = "the logs edge client sent scores without a HalfSpaceTrees score in detail.hst"
        raise RuntimeError(msg)

    sessions = settings.dataset == "hdfs_sessions"
    window_ids = (
        session_numbers(dataset)
        if sessions
        else count_windows(len(dataset.records), settings.lines_per_window)
    )
    pca = log_pca_scores(dataset.records, n_buckets=config.logs.n_buckets, window_ids=window_ids)
    rng = np.random.default_rng(config.evaluation.seed)
    scorers: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
        f"{config.logs.model.kind} (online, federated)": (
            series.scores[order],
            series.alerts[order],
        ),
        "random": (np.asarray(rng.random(indices.shape[0])), None),
        "River HalfSpaceTrees (online)": (series.hst[order], None),
        "count-vector PCA (offline)": (pca[indices], None),
    }
    counted = evaluated_lines(dataset, config)[indices]
    counted_scorers = {
        name: (values[counted], None if alerts is None else alerts[counted])
        for name, (values, alerts) in scorers.items()
    }
    labels_counted = series.labels[order][counted]
    groups_counted = window_ids[indices][counted]
    rows = scorer_rows(labels_counted, groups_counted, counted_scorers)
    session_table = (
        session_scorer_rows(labels_counted, groups_counted, counted_scorers) if sessions else []
    )
    pipelines = [c.pipeline for c in clients if isinstance(c.pipeline, LogsPipeline)]
    # The session MLP scores once per session, at the session's end line.
    expected = (
        int(np.unique(window_ids).shape[0]) if scores_sessions(config) else len(dataset.records)
    )
    return LogDemoResult(
        lines=expected,
        scored=int(np.unique(indices).shape[0]),
        rows=rows,
        seconds=seconds,
        global_version=aggregator.model.version if aggregator.model else -1,
        sessions=session_table,
        sources_dropped=sum(pipeline.sources_dropped for pipeline in pipelines),
        windows_evicted=sum(pipeline.windows_evicted for pipeline in pipelines),
    )


SESSION_NOTES = """\
DeepLog's HDFS block sessions, interleaved as concurrent blocks; each block ends with an
end-of-session line. The warm-up sessions are scored and trained on but not counted. A
session is anomalous by its label, scores the max (or mean) of its line scores and alerts
when any of its lines alerted. Random: one uniform draw per line. HST: River HalfSpaceTrees
that the edge clients ran online on each line's row. PCA: the count-vector PCA of Xu et al.
(SOSP 2009), fitted offline on every session's template counts. The baselines raise no
alerts, so their F1, precision and recall at the operating threshold are n/a."""

SESSION_WINDOW_NOTES = """\
DeepLog's HDFS block sessions, interleaved as concurrent blocks; each block ends with an
end-of-session line. The warm-up sessions are scored and trained on but not counted. The MLP
scores each session once, at its end line, by the session's template count vector, so the
line and session figures agree. A session is anomalous by its label. Random: one uniform draw
per session. HST: River HalfSpaceTrees that the edge clients ran online on the same
standardized count vector. PCA: the count-vector PCA of Xu et al. (SOSP 2009), fitted
offline on every session's template counts. The baselines raise no alerts, so their F1,
precision and recall at the operating threshold are n/a."""


def _report(config: AppConfig, dataset: LogDataset, result: LogDemoResult) -> int:
    out_dir = config.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    counted = "sessions" if scores_sessions(config) else "lines"
    if result.sessions:
        notes = SESSION_WINDOW_NOTES if scores_sessions(config) else SESSION_NOTES
        table = render_session_table(result.sessions)
        figures = [asdict(row) for row in result.sessions]
        unit = f"{config.log_demo.sessions.warmup_sessions} warm-up sessions not counted"
    else:
        table, notes = render_scorer_table(result.rows), TABLE_NOTES
        figures = [asdict(row) for row in result.rows]
        unit = f"windows of {config.log_demo.lines_per_window} lines"
    (out_dir / f"{dataset.name}.json").write_text(json.dumps(figures, indent=2))
    (out_dir / f"{dataset.name}.md").write_text(table + "\n\n" + notes + "\n")
    print(table)
    print("\n" + notes)
    print(
        f"\nScored {result.scored} of {result.lines} {dataset.name} {counted} in "
        f"{result.seconds:.1f} s on {config.log_demo.sites} site(s); {unit}; "
        f"global model version: {result.global_version}; at logs.max_sources, sources "
        f"dropped: {result.sources_dropped}, windows scored early: {result.windows_evicted}."
    )
    print(f"Results: {out_dir / (dataset.name + '.md')}")
    if result.scored != result.lines:
        missing = result.lines - result.scored
        print(f"error: {missing} {counted} have no score", file=sys.stderr)
        return 1
    return 0
