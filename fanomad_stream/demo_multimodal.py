"""The multimodal demo: the Nezha TrainTicket system as metrics, logs and traces.

Steps: start a local broker of its own, apply the topic catalog, and start in this process
one aggregator and one edge client per modality of ``nezha.modalities`` (each modality is
its own federation). Then replay those streams side by side and wait until each edge client
has committed its topic to the end of the replay. Close the open traces, stop the services,
evaluate with a row per modality (with its baselines from the same run) and, when more than
one modality ran, one for the combined alerts, and stop the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
    ModalitySeries,
    combined_row,
    evaluate_series,
    join_series,
    render_table,
)
from fanomad_stream.evaluate.traces import quiet_windows, split_long_windows
from fanomad_stream.featurize.trace_assembly import Span
from fanomad_stream.federate.aggregator import Aggregator
from fanomad_stream.modalities import Modality, modality_config, require_mlp_for_metrics
from fanomad_stream.replay import streams
from fanomad_stream.replay.logs import LogDataset
from fanomad_stream.replay.traces import METRIC_INTERVAL_S, read_cases, read_window_labels
from fanomad_stream.transport.kafka import client_options
from fanomad_stream.transport.reader import end_offsets, read_topic
from fanomad_stream.transport.topics import apply_catalog, load_catalog

log = structlog.get_logger(__name__)

Service = EdgeClient | ModalityEdgeClient | Aggregator
# Smallest distance of a quiet metric window from every fault case's time span, in seconds.
# Fault durations are not recorded. The two cpu_contention faults of the data show in the
# injected pod's CPU for three to four minutes, so ten minutes leave a margin.
QUIET_GAP_S = 600.0


def run_multimodal_demo(config: AppConfig) -> int:
    """Run the demo on a fresh broker; return 0 when every replayed event has a score.

    Only the modalities of ``nezha.modalities`` run. Traces count as events: every trace id
    among the replayed spans must have a score.
    """
    return run_on_own_broker(config, run_on_broker)


def run_on_own_broker(
    config: AppConfig, main: Callable[[AppConfig], Coroutine[Any, Any, int]]
) -> int:
    """Start a local broker on a free port, run ``main`` with it, and stop the broker.

    ``main`` receives ``config`` with the broker's bootstrap address, and with drain3 and
    open-trace state in the broker's run folder, so every run starts from empty state.
    """
    cache_dir().mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="demo-broker-", dir=cache_dir()))
    broker = LocalBroker(run_dir=run_dir, port=free_port())
    print(f"==> starting Kafka {broker.bootstrap_servers}", file=sys.stderr)
    broker.start()
    try:
        torch.set_num_threads(1)
        logs = config.logs.model_copy(update={"state_dir": run_dir / "state"})
        config = config.model_copy(update={"logs": logs})
        return asyncio.run(main(with_bootstrap(config, broker.bootstrap_servers)))
    finally:
        broker.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


@dataclass
class _NezhaData:
    metrics: streams.MetricRows | None = None
    logs: LogDataset | None = None
    spans: list[Span] = field(default_factory=list)
    span_labels: np.ndarray | None = None

    def expected(self) -> dict[str, int]:
        """Return the number of events per replayed modality that must get a score."""
        counts = {}
        if self.metrics is not None:
            counts["metrics"] = len(self.metrics.services)
        if self.logs is not None:
            counts["logs"] = len(self.logs.records)
        if self.span_labels is not None:
            counts["traces"] = len({span.trace_id for span in self.spans})
        return counts


def _load(config: AppConfig) -> _NezhaData:
    nezha = config.nezha
    data = _NezhaData()
    if "metrics" in nezha.modalities:
        data.metrics = streams.load_nezha_metrics(nezha.data_dir, margin_s=nezha.metric_margin_s)
    if "logs" in nezha.modalities:
        data.logs = streams.load_nezha_logs(nezha.data_dir, limit=nezha.log_limit)
    if "traces" in nezha.modalities:
        data.spans, data.span_labels = streams.load_nezha_spans(
            nezha.data_dir, limit=nezha.span_limit
        )
    print(f"==> Nezha {', '.join(nezha.modalities)}: {data.expected()} events", file=sys.stderr)
    return data


async def run_on_broker(config: AppConfig) -> int:
    """Replay, score and evaluate the selected modalities on the broker of ``config.kafka``."""
    selected = config.nezha.modalities
    if "metrics" in selected:
        require_mlp_for_metrics(config)
    await apply_catalog(config.kafka, load_catalog())
    data = _load(config)

    clients: dict[Modality, EdgeClient | ModalityEdgeClient] = {}
    replays: list[Awaitable[streams.StreamReplayReport]] = []
    prefix = config.edge.group_prefix
    # Consumer group and topic of each client, to wait for its commits.
    groups: dict[str, str] = {}
    if data.metrics is not None:
        sources = sorted(set(data.metrics.services))
        clients["metrics"] = EdgeClient(config, site="nezha-metrics", sources=sources)
        replays.append(streams.replay_metrics(config.kafka, data.metrics))
        groups[f"{prefix}-nezha-metrics"] = "metrics.raw"
    if data.logs is not None:
        clients["logs"] = ModalityEdgeClient(
            modality_config(config, "logs"), site="nezha-logs", modality="logs"
        )
        replays.append(streams.replay_logs(config.kafka, data.logs))
        groups[f"{prefix}-logs-nezha-logs"] = "logs.raw"
    if data.span_labels is not None:
        clients["traces"] = ModalityEdgeClient(
            modality_config(config, "traces"), site="nezha-traces", modality="traces"
        )
        replays.append(streams.replay_spans(config.kafka, data.spans, data.span_labels))
        groups[f"{prefix}-traces-nezha-traces"] = "traces.raw"
    # Every aggregator reads fl.updates, so each admits only its own modality's site and
    # dead-letters the other sites' updates as unknown_client.
    aggregators = [
        Aggregator(only_clients(modality_config(config, modality), [f"nezha-{modality}"]))
        for modality in clients
    ]
    began = time.monotonic()
    async with running_services(*aggregators, *clients.values()) as tasks:
        await asyncio.gather(*replays)
        # Counters include redeliveries after a rebalance, so the demo waits until each
        # client's group has committed its topic up to the end offsets of the replay.
        await wait_committed(config, groups, tasks, config.nezha.timeout_s)
        traces_client = clients.get("traces")
        if isinstance(traces_client, ModalityEdgeClient):
            await traces_client.flush()
    seconds = time.monotonic() - began

    rows = await _evaluate(config, data.logs)
    out_dir = config.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "multimodal.json").write_text(
        json.dumps([row.as_dict() for row in rows], indent=2, default=str)
    )
    (out_dir / "multimodal.md").write_text(render_table(rows) + "\n\n" + TABLE_NOTES + "\n")
    print(render_table(rows))
    print("\n" + TABLE_NOTES)
    scored = ", ".join(f"{client.counters.scored} {name}" for name, client in clients.items())
    versions = [a.model.version if a.model else -1 for a in aggregators]
    print(f"\nScored {scored} events in {seconds:.1f} s; global versions: {versions}.")
    if isinstance(traces_client, ModalityEdgeClient):
        print(f"Trace assembly: {traces_client.pipeline.counters()}.")  # type: ignore[union-attr]
    print(f"Results: {out_dir / 'multimodal.md'}")
    expected = data.expected()
    events = {row.modality: row.events for row in rows}
    missing = {name: count - events[name] for name, count in expected.items()}
    if any(missing.values()):
        print(f"error: events without a score per modality: {missing}", file=sys.stderr)
        return 1
    return 0


def only_clients(config: AppConfig, sites: list[str]) -> AppConfig:
    """Return ``config`` with the aggregator accepting updates from ``sites`` only."""
    aggregator = config.aggregator.model_copy(update={"clients": sites})
    return config.model_copy(update={"aggregator": aggregator})


async def _evaluate(config: AppConfig, logs: LogDataset | None) -> list[ModalityRow]:
    selected = config.nezha.modalities
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
    series: dict[str, ModalitySeries] = {
        name: join_series(scores, labels, sources[name], name, intervals.get(name, 0.0))
        for name in selected
    }
    offline = {}
    if logs is not None:
        offline["logs"] = log_pca_scores(
            logs.records, window_s=config.logs.window_s, n_buckets=config.logs.n_buckets
        )
    # A trace's service is the one its detector blamed, so traces get no per-service view.
    label_cases = {"metrics": all_cases, "logs": all_cases}
    modality_windows = {}
    if "metrics" in series:
        # Metric rows cover far more than the shipped windows, so minutes away from every
        # case add fault-free windows that are not the first minutes of a day.
        # NOTE: a metric window's score is the max over about 46 pods, so one noisy pod
        # outranks a single faulty one. Of the shipped cases only the two cpu_contention
        # faults stand out.
        quiet = quiet_windows(series["metrics"].ts, all_cases, QUIET_GAP_S)
        modality_windows["metrics"] = windows + quiet
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
    # With one modality the combined row would repeat that modality's window figures.
    if len(series) > 1:
        rows.append(combined_row(series, windows, cases))
    return rows


@contextlib.asynccontextmanager
async def running_services(*services: Service) -> AsyncIterator[list[asyncio.Task[None]]]:
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


async def wait_committed(
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
