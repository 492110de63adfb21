"""The multimodal demo: the Nezha TrainTicket system as metrics, logs and traces at once.

Steps: start a local broker of its own, apply the topic catalog, and start in this process
one aggregator and one edge client per modality (each modality is its own federation). Then
replay the three streams side by side and wait until each edge client has committed its
topic to the end of the replay. Close the open traces, stop the services, evaluate with a
row per modality and one for the combined alerts, and stop the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
import torch
from aiokafka.admin import AIOKafkaAdminClient

from fanomad_stream.broker.local import LocalBroker, cache_dir, free_port
from fanomad_stream.config import AppConfig
from fanomad_stream.demo import with_bootstrap
from fanomad_stream.edge.client import EdgeClient
from fanomad_stream.edge.stream_client import ModalityEdgeClient
from fanomad_stream.evaluate.log_baselines import log_pca_scores
from fanomad_stream.evaluate.modalities import (
    TABLE_NOTES,
    ModalityRow,
    combined_row,
    evaluate_series,
    join_series,
    render_table,
)
from fanomad_stream.evaluate.traces import quiet_windows, split_long_windows
from fanomad_stream.federate.aggregator import Aggregator
from fanomad_stream.modalities import modality_config, require_mlp_for_metrics
from fanomad_stream.replay import streams
from fanomad_stream.replay.logs import LogDataset
from fanomad_stream.replay.traces import METRIC_INTERVAL_S, read_cases, read_window_labels
from fanomad_stream.transport.kafka import client_options
from fanomad_stream.transport.reader import end_offsets, read_topic
from fanomad_stream.transport.topics import apply_catalog, load_catalog

log = structlog.get_logger(__name__)

Service = EdgeClient | ModalityEdgeClient | Aggregator
# Smallest distance of a quiet metric window from every fault case's time span, in seconds.
# Fault durations are not recorded; the two cpu_contention faults of the data show in the
# injected pod's CPU for three to four minutes, so ten minutes leave a margin.
QUIET_GAP_S = 600.0


def run_multimodal_demo(config: AppConfig) -> int:
    """Run the demo on a fresh broker; return 0 when every replayed event has a score.

    Traces count as events: every trace id among the replayed spans must have a score.
    """
    cache_dir().mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="demo-broker-", dir=cache_dir()))
    broker = LocalBroker(run_dir=run_dir, port=free_port())
    print(f"==> starting Kafka {broker.bootstrap_servers}", file=sys.stderr)
    broker.start()
    try:
        torch.set_num_threads(1)
        # Client state (drain3 templates, open traces) lives with the broker it belongs to.
        logs = config.logs.model_copy(update={"state_dir": run_dir / "state"})
        config = config.model_copy(update={"logs": logs})
        return asyncio.run(_run(with_bootstrap(config, broker.bootstrap_servers)))
    finally:
        broker.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


async def _run(config: AppConfig) -> int:
    require_mlp_for_metrics(config)
    await apply_catalog(config.kafka, load_catalog())
    nezha = config.nezha
    metrics = streams.load_nezha_metrics(nezha.data_dir, margin_s=nezha.metric_margin_s)
    logs = streams.load_nezha_logs(nezha.data_dir, limit=nezha.log_limit)
    spans, span_labels = streams.load_nezha_spans(nezha.data_dir, limit=nezha.span_limit)
    sources = sorted(set(metrics.services))
    print(
        f"==> Nezha: {len(metrics.services)} metric rows of {len(sources)} services, "
        f"{len(logs.records)} log lines, {len(spans)} spans",
        file=sys.stderr,
    )

    metrics_client = EdgeClient(config, site="nezha-metrics", sources=sources)
    logs_client = ModalityEdgeClient(
        modality_config(config, "logs"), site="nezha-logs", modality="logs"
    )
    traces_client = ModalityEdgeClient(
        modality_config(config, "traces"), site="nezha-traces", modality="traces"
    )
    # All three aggregators read fl.updates, so each admits only its own modality's site and
    # dead-letters the other two sites' updates as unknown_client.
    aggregators = [
        Aggregator(_only_client(modality_config(config, modality), f"nezha-{modality}"))
        for modality in ("metrics", "logs", "traces")
    ]
    began = time.monotonic()
    async with _running(*aggregators, metrics_client, logs_client, traces_client) as tasks:
        await asyncio.gather(
            streams.replay_metrics(config.kafka, metrics),
            streams.replay_logs(config.kafka, logs),
            streams.replay_spans(config.kafka, spans, span_labels),
        )
        # Counters include redeliveries after a rebalance, so the demo waits until each
        # client's group has committed its topic up to the end offsets of the replay.
        prefix = config.edge.group_prefix
        groups = {
            f"{prefix}-nezha-metrics": "metrics.raw",
            f"{prefix}-logs-nezha-logs": "logs.raw",
            f"{prefix}-traces-nezha-traces": "traces.raw",
        }
        await _wait_committed(config, groups, tasks, nezha.timeout_s)
        await traces_client.flush()
    seconds = time.monotonic() - began

    rows = await _evaluate(config, logs)
    out_dir = config.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "multimodal.json").write_text(
        json.dumps([row.as_dict() for row in rows], indent=2, default=str)
    )
    (out_dir / "multimodal.md").write_text(render_table(rows) + "\n\n" + TABLE_NOTES + "\n")
    print(render_table(rows))
    print("\n" + TABLE_NOTES)
    print(
        f"\nScored {metrics_client.counters.scored} metric rows, {logs_client.counters.scored} "
        f"log lines and {traces_client.counters.scored} traces in {seconds:.1f} s; global "
        f"versions: {[a.model.version if a.model else -1 for a in aggregators]}; trace "
        f"assembly: {traces_client.pipeline.counters()}."  # type: ignore[union-attr]
    )
    print(f"Results: {out_dir / 'multimodal.md'}")
    expected = {"metrics": len(metrics.services), "logs": len(logs.records)}
    expected["traces"] = len({span.trace_id for span in spans})
    missing = {row.modality: expected[row.modality] - row.events for row in rows[:3]}
    if any(missing.values()):
        print(f"error: events without a score per modality: {missing}", file=sys.stderr)
        return 1
    return 0


def _only_client(config: AppConfig, site: str) -> AppConfig:
    aggregator = config.aggregator.model_copy(update={"clients": [site]})
    return config.model_copy(update={"aggregator": aggregator})


async def _evaluate(config: AppConfig, logs: LogDataset) -> list[ModalityRow]:
    labels_dir = (config.nezha.data_dir or streams.NEZHA_DIR) / "labels"
    windows = split_long_windows(read_window_labels(labels_dir))
    all_cases = read_cases(labels_dir)
    cases = [case for case in all_cases if case.shipped]
    scores = await read_topic(config.kafka, "scores", frozenset({"score"}))
    labels = await read_topic(config.kafka, "labels", frozenset({"label"}))
    sources = {
        "metrics": streams.METRICS_SOURCE,
        "logs": streams.LOGS_SOURCE,
        "traces": streams.SPANS_SOURCE,
    }
    intervals = {"metrics": METRIC_INTERVAL_S}
    series = {
        name: join_series(scores, labels, src, name, intervals.get(name, 0.0))
        for name, src in sources.items()
    }
    pca = log_pca_scores(
        logs.records, window_s=config.logs.window_s, n_buckets=config.logs.n_buckets
    )
    offline = {"logs": pca}
    # A trace's service is the one its detector blamed, so traces get no per-service view.
    label_cases = {"metrics": all_cases, "logs": all_cases}
    # Metric rows cover far more than the shipped windows, so minutes away from every case
    # add fault-free windows that are not the first minutes of a day.
    # NOTE: a metric window's score is the max over about 46 pods, so one noisy pod outranks a
    # single faulty one. Of the shipped cases only the two cpu_contention faults stand out.
    quiet = quiet_windows(series["metrics"].ts, all_cases, QUIET_GAP_S)
    modality_windows = {"metrics": windows + quiet}
    rows = [
        evaluate_series(
            name,
            s,
            modality_windows.get(name, windows),
            cases,
            config.evaluation.seed,
            offline.get(name),
            label_cases.get(name),
        )
        for name, s in series.items()
    ]
    return [*rows, combined_row(series, windows, cases)]


@contextlib.asynccontextmanager
async def _running(*services: Service) -> AsyncIterator[list[asyncio.Task[None]]]:
    for service in services:
        await service.start()
    tasks = [asyncio.create_task(service.run()) for service in services]
    try:
        yield tasks
    finally:
        for service in services:
            service.request_stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for service in services:
            await service.stop()


async def _wait_committed(
    config: AppConfig,
    groups: dict[str, str],
    tasks: list[asyncio.Task[None]],
    timeout_s: float,
) -> None:
    """Wait until every group has committed its topic's current end offsets.

    Raises the error of a service task that ended early, and TimeoutError after
    ``timeout_s``.
    """
    ends = {topic: await end_offsets(config.kafka, topic) for topic in set(groups.values())}
    admin = AIOKafkaAdminClient(**client_options(config.kafka))
    await admin.start()
    deadline = time.monotonic() + timeout_s
    try:
        pending = dict(groups)
        while pending:
            for task in tasks:
                if task.done():
                    task.result()  # raises the service's error
                    msg = "a service stopped before the replay was scored"
                    raise RuntimeError(msg)
            for group, topic in list(pending.items()):
                committed = await admin.list_consumer_group_offsets(group)
                done = {tp.partition: meta.offset for tp, meta in committed.items()}
                if all(done.get(p, 0) >= end for p, end in ends[topic].items()):
                    del pending[group]
            if pending and time.monotonic() > deadline:
                msg = f"groups {sorted(pending)} did not commit the replay within {timeout_s} s"
                raise TimeoutError(msg)
            await asyncio.sleep(1.0)
    finally:
        await admin.close()
