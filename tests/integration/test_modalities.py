"""Logs and traces on the real broker: replay → modality edge client → scores, and a round."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from fanomad_stream.config import AppConfig, KafkaSettings
from fanomad_stream.demo_multimodal import running_services
from fanomad_stream.edge.checkpoint import CHECKPOINT_FILE
from fanomad_stream.edge.modalities import Incoming, LogsPipeline, Scored, TracesPipeline
from fanomad_stream.edge.stream_client import ModalityEdgeClient
from fanomad_stream.featurize.logs import LogTemplateMiner
from fanomad_stream.federate.aggregator import Aggregator
from fanomad_stream.federate.global_model import GlobalModelReader
from fanomad_stream.modalities import modality_config
from fanomad_stream.privacy.dp import update_norm
from fanomad_stream.replay.logs import END_EVENT, LogDataset, Session, interleave_sessions
from fanomad_stream.replay.streams import (
    LOGHUB_DIR,
    NEZHA_DIR,
    load_log_dataset,
    load_nezha_spans,
    replay_logs,
    replay_spans,
)
from fanomad_stream.transport import codec
from fanomad_stream.transport.kafka import make_producer, topic_name
from fanomad_stream.transport.reader import end_offsets, read_topic
from tests.conftest import make_config, wait_until

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(
        not (LOGHUB_DIR / "BGL").is_dir() or not NEZHA_DIR.is_dir(),
        reason="LogHub or Nezha data not found beside the checkout",
    ),
]

NEZHA_WINDOW = "fault/2023-01-29/trace/08_44_trace.csv.gz"


def _logs_config(
    kafka: KafkaSettings,
    state_dir: Path,
    privacy: dict[str, object] | None = None,
    *,
    checkpoints_dir: Path | None = None,
    **edge: object,
) -> AppConfig:
    """Return the logs view of a config; ``checkpoints_dir`` becomes ``edge.state_dir``."""
    if checkpoints_dir is not None:
        edge["state_dir"] = str(checkpoints_dir)
    config = make_config(
        kafka,
        edge={"max_batch_records": 500, "poll_timeout_ms": 200, **edge},
        logs={
            "state_dir": str(state_dir),
            "model": {"kind": "lstm_autoencoder", "hidden": [16, 4], "window": 8, "seed": 3},
        },
        aggregator={"quorum": 1, "round_deadline_s": 20, "clients": ["bgl-site"]},
        privacy=privacy or {},
    )
    return modality_config(config, "logs")


@pytest.mark.timeout(120)
async def test_bgl_lines_scored_once(topics: KafkaSettings, tmp_path: Path) -> None:
    """Every BGL line is scored exactly once, labels travel apart, templates persist."""
    dataset = load_log_dataset("bgl")
    expected_anomalous = sum(tag != "-" for tag in dataset.categories or [])
    config = _logs_config(topics, tmp_path, window_events=100_000)

    report = await replay_logs(topics, dataset, progress=False)
    assert report.total_records == 2000
    assert report.labels == 2000
    assert report.anomalous == expected_anomalous

    client = ModalityEdgeClient(config, site="bgl-site", modality="logs")
    async with running_services(client):
        await wait_until(lambda: client.counters.scored >= 2000, timeout_s=60)
    assert client.counters.dead_letters == 0

    scores = await read_topic(topics, "scores", frozenset({"score"}))
    indices = sorted(s.envelope.body["index"] for s in scores)
    assert indices == list(range(2000))
    assert {s.envelope.body["modality"] for s in scores} == {"logs"}

    labels = await read_topic(topics, "labels", frozenset({"label"}))
    assert len(labels) == 2000
    assert sum(item.envelope.body["label"] for item in labels) == expected_anomalous

    raw = await read_topic(topics, "logs.raw", frozenset({"log"}))
    assert len(raw) == 2000
    tags = {tag for tag in dataset.categories or [] if tag != "-"}
    for item in raw:
        assert set(item.envelope.body) == {"source", "line", "level", "index"}
        assert not tags & set(item.envelope.body["line"].split())

    state = tmp_path / "bgl-site" / "drain3.json"
    assert state.is_file()
    first = next(s for s in scores if s.envelope.body["index"] == 0)
    restarted = LogTemplateMiner(state, n_buckets=config.logs.n_buckets)
    assert (
        restarted.mine(dataset.records[0]).cluster_id == first.envelope.body["detail"]["template"]
    )


@pytest.mark.timeout(120)
async def test_nezha_traces_assembled_and_scored(topics: KafkaSettings, tmp_path: Path) -> None:
    """Nezha spans become traces, each scored once with its service; evictions are counted."""
    spans, labels = load_nezha_spans(pattern=NEZHA_WINDOW, limit=1500)
    trace_ids = {span.trace_id for span in spans}
    config = modality_config(
        make_config(
            topics,
            edge={"max_batch_records": 300, "poll_timeout_ms": 200},
            logs={"state_dir": str(tmp_path)},
            traces={"timeout_s": 1.0, "max_open_traces": 1},
        ),
        "traces",
    )

    report = await replay_spans(topics, spans, labels, progress=False)
    assert report.total_records == 1500
    assert report.anomalous == int(labels.sum())
    assert report.anomalous > 0

    client = ModalityEdgeClient(config, site="nezha-site", modality="traces")
    async with running_services(client):
        await wait_until(lambda: client.counters.scored >= len(trace_ids), timeout_s=60)
    assert isinstance(client.pipeline, TracesPipeline)
    counters = client.pipeline.counters()

    scores = await read_topic(topics, "scores", frozenset({"score"}))
    assert sorted(s.key for s in scores) == sorted(trace_ids)
    assert all(s.envelope.body["modality"] == "traces" for s in scores)
    assert all(s.envelope.body["service"].startswith("ts-") for s in scores)
    assert counters.evicted_traces > 0
    kept = sum(s.envelope.body["detail"]["spans"] for s in scores)
    lost = counters.late_spans + counters.dropped_spans + counters.duplicate_spans
    assert kept + lost == 1500
    assert (tmp_path / "nezha-site" / "traces.msgpack").is_file()


@pytest.mark.timeout(120)
async def test_lstm_round_publishes_version_one(topics: KafkaSettings, tmp_path: Path) -> None:
    """A logs client with the LSTM autoencoder sends an update; the aggregator folds it."""
    config = _logs_config(topics, tmp_path, window_events=300)
    await replay_logs(topics, load_log_dataset("bgl"), progress=False)

    aggregator = Aggregator(config)
    client = ModalityEdgeClient(config, site="bgl-site", modality="logs")
    async with running_services(aggregator, client):
        await wait_until(lambda: aggregator.rounds_completed >= 1, timeout_s=60)
    assert client.counters.updates_sent >= 1
    assert aggregator.rejected == {}

    reader = GlobalModelReader(topics, config.aggregator.model_name)
    await reader.start()
    try:
        latest = await reader.catch_up()
    finally:
        await reader.stop()
    assert latest is not None
    assert latest.version >= 1
    assert "encoder.weight_ih_l0" in latest.weights
    assert latest.weights["encoder.weight_ih_l0"].shape[1] == config.logs.n_buckets + 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kept_in", ["traces_file", "checkpoint"])
async def test_traces_restart_keeps_open_traces(
    topics: KafkaSettings, tmp_path: Path, kept_in: str
) -> None:
    """Traces open at a stop are restored by the next client, each scored once with its index.

    Without ``edge.state_dir`` the open traces go to traces.msgpack. With it they go into
    the checkpoint, and no traces.msgpack is written.
    """
    spans, labels = load_nezha_spans(pattern=NEZHA_WINDOW, limit=1500)
    trace_ids = {span.trace_id for span in spans}
    edge: dict[str, object] = {"max_batch_records": 300, "poll_timeout_ms": 200}
    if kept_in == "checkpoint":
        edge["state_dir"] = str(tmp_path / "edge")
    config = modality_config(
        make_config(
            topics, edge=edge, logs={"state_dir": str(tmp_path)}, traces={"timeout_s": 600.0}
        ),
        "traces",
    )

    await replay_spans(topics, spans[:700], labels[:700], progress=False)
    first = ModalityEdgeClient(config, site="nezha-site", modality="traces")
    async with running_services(first):
        await wait_until(lambda: first.counters.consumed >= 700, timeout_s=60)
    assert isinstance(first.pipeline, TracesPipeline)
    open_at_stop = first.pipeline.open_traces
    assert open_at_stop > 0

    await replay_spans(topics, spans[700:], labels[700:], first_index=700, progress=False)
    traces_file = tmp_path / "nezha-site" / "traces.msgpack"
    checkpoint = tmp_path / "edge" / "nezha-site" / "traces" / CHECKPOINT_FILE
    assert traces_file.is_file() == (kept_in == "traces_file")
    assert checkpoint.is_file() == (kept_in == "checkpoint")
    second = ModalityEdgeClient(config, site="nezha-site", modality="traces")
    await second.start()
    assert isinstance(second.pipeline, TracesPipeline)
    assert second.pipeline.open_traces == open_at_stop
    assert (second.checkpoints.restored is not None) == (kept_in == "checkpoint")
    second.request_stop()
    await second.stop()
    second = ModalityEdgeClient(config, site="nezha-site", modality="traces")
    async with running_services(second):
        await wait_until(lambda: second.counters.consumed >= 800, timeout_s=60)
        await second.flush()
    assert isinstance(second.pipeline, TracesPipeline)
    counters = second.pipeline.counters()

    scores = await read_topic(topics, "scores", frozenset({"score"}))
    assert sorted(s.key for s in scores) == sorted(trace_ids)
    assert counters.late_spans == 0
    assert counters.duplicate_spans == 0
    assert sum(s.envelope.body["detail"]["spans"] for s in scores) == 1500
    # The first span of each trace open at the stop was restored too, so every score has
    # the index of its trace's first span.
    first_index: dict[str, int] = {}
    for index, span in enumerate(spans):
        first_index.setdefault(span.trace_id, index)
    assert {s.key: s.envelope.body["index"] for s in scores} == first_index


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
async def test_logs_updates_leave_private(topics: KafkaSettings, tmp_path: Path) -> None:
    """A logs site trains with DP-SGD and clips its delta; the ledger and the round follow."""
    clipping_norm = 0.05
    privacy = {
        "dp_sgd": {"enabled": True, "noise_multiplier": 1.1},
        "client_dp": {"enabled": True, "clipping_norm": clipping_norm, "noise_multiplier": 0.5},
    }
    config = _logs_config(topics, tmp_path, privacy, window_events=300)
    await replay_logs(topics, load_log_dataset("bgl"), progress=False)

    aggregator = Aggregator(config)
    client = ModalityEdgeClient(config, site="bgl-site", modality="logs")
    async with running_services(aggregator, client):
        await wait_until(lambda: aggregator.rounds_completed >= 1, timeout_s=120)
    assert aggregator.rejected == {}

    updates = await read_topic(topics, "fl.updates", frozenset({"update"}))
    assert updates
    for update in updates:
        body = update.envelope.body
        assert body["privacy"]["mechanism"] == "dp-fedavg"
        assert body["privacy"]["noise_added_by"] == "server"
        assert body["privacy"]["dp_sgd"]["epsilon"] > 0
        assert update_norm(body["delta"]) <= clipping_norm * (1 + 1e-5)

    ledger = await read_topic(topics, "privacy.ledger", frozenset({"ledger"}))
    site_records = [item.envelope.body for item in ledger if item.envelope.src == "bgl-site"]
    assert len(site_records) == len(updates)
    assert site_records[-1]["epsilon"] > 0
    assert client.updates.privacy.ledger is not None
    assert client.updates.privacy.ledger.spent_epsilon() == pytest.approx(
        site_records[-1]["epsilon"]
    )


@pytest.mark.timeout(180)
async def test_logs_restart_keeps_template_ids(topics: KafkaSettings, tmp_path: Path) -> None:
    """A restarted site continues the drain3 ids of its first run, as one run would assign."""
    # One source keeps every line in one partition, so the client mines in file order.
    records = [replace(r, source="bgl") for r in load_log_dataset("bgl").records]
    config = _logs_config(topics, tmp_path, window_events=100_000)
    halves = [LogDataset("bgl", records[:1000]), LogDataset("bgl", records[1000:])]
    uninterrupted = LogTemplateMiner(None, n_buckets=config.logs.n_buckets)
    expected = [[uninterrupted.mine(r).cluster_id for r in half.records] for half in halves]

    await replay_logs(topics, halves[0], progress=False)
    first = ModalityEdgeClient(config, site="bgl-site", modality="logs")
    async with running_services(first):
        await wait_until(lambda: first.counters.scored >= 1000, timeout_s=60)
    assert isinstance(first.pipeline, LogsPipeline)
    templates_at_stop = first.pipeline.featurizer.miner.template_count
    first_run_end = await end_offsets(topics, "scores")

    await replay_logs(topics, halves[1], progress=False)
    second = ModalityEdgeClient(config, site="bgl-site", modality="logs")
    assert isinstance(second.pipeline, LogsPipeline)
    assert second.pipeline.featurizer.miner.template_count == templates_at_stop
    async with running_services(second):
        await wait_until(lambda: second.counters.scored >= 1000, timeout_s=60)
    assert first.counters.scored == 1000

    # Each half's replay numbers its lines from 0; the score offsets tell the runs apart.
    scores = await read_topic(topics, "scores", frozenset({"score"}))
    assert len(scores) == 2000
    observed: list[dict[int, int]] = [{}, {}]
    for score in scores:
        run = 0 if score.offset < first_run_end[score.partition] else 1
        body = score.envelope.body
        observed[run][body["index"]] = body["detail"]["template"]
    for run in (0, 1):
        assert [observed[run][i] for i in range(1000)] == expected[run]
    assert set(expected[1]) & set(expected[0])  # the second half reuses first-half ids


async def _run_until_killed(client: ModalityEdgeClient, scored: int) -> None:
    """Run ``client`` until it has scored ``scored`` lines, then stop it as a kill would.

    A killed process writes no checkpoint at its stop, so the lock is released first.
    """
    await client.start()
    run = asyncio.create_task(client.run())
    try:
        await wait_until(lambda: client.counters.scored >= scored, timeout_s=60)
    finally:
        client.request_stop()
        await run
        client.checkpoints.release()
        await client.stop()


@pytest.mark.timeout(180)
async def test_logs_restart_resumes_from_checkpoint(topics: KafkaSettings, tmp_path: Path) -> None:
    """A restarted logs site resumes at its checkpoint with warm HST, thresholds and templates.

    The first run stops cleanly and checkpoints. The second run restores that checkpoint and
    ends as a kill would: it commits past the checkpoint but writes none, while drain3 saves
    the templates it creates. The third run seeks back to the checkpoint's offset, not to the
    committed one, and scores every line from there. The scores after each restart equal those
    of one uninterrupted pipeline, so no run warmed up again.
    """
    # One source keeps every line in one partition, so a line's offset is its index.
    records = [replace(r, source="bgl") for r in load_log_dataset("bgl").records]
    config = _logs_config(
        topics,
        tmp_path / "logs",
        window_events=100_000,
        max_batch_records=100,
        hst_window=50,
        threshold={"warmup_events": 100},
        checkpoints_dir=tmp_path / "edge",
        checkpoint_interval_s=3600,
    )
    offline = LogsPipeline(config, None)
    lines = [Incoming(record, i, 0, i) for i, record in enumerate(records)]
    expected = {score.index: score for score in offline.process(lines)}

    replay = asyncio.create_task(
        replay_logs(topics, LogDataset("bgl", records), events_per_s=150, progress=False)
    )
    first = ModalityEdgeClient(config, site="bgl-site", modality="logs")
    async with running_services(first):
        await wait_until(lambda: first.counters.scored >= 400, timeout_s=60)
    checkpointed = sum(first.checkpoints.positions.values())
    assert checkpointed == first.counters.scored
    ends = [await end_offsets(topics, "scores")]

    second = ModalityEdgeClient(config, site="bgl-site", modality="logs")
    await _run_until_killed(second, 300)
    assert second.checkpoints.restored is not None
    assert second.checkpoints.restored.offsets == first.checkpoints.positions
    committed = sum(second.checkpoints.positions.values())
    assert committed >= checkpointed + 300
    ends.append(await end_offsets(topics, "scores"))

    third = ModalityEdgeClient(config, site="bgl-site", modality="logs")
    async with running_services(third):
        await replay
        await wait_until(lambda: third.counters.scored >= 2000 - checkpointed, timeout_s=60)
    assert third.checkpoints.restored is not None
    assert third.checkpoints.restored.offsets == first.checkpoints.positions

    runs: list[list[dict[str, Any]]] = [[], [], []]
    for score in await read_topic(topics, "scores", frozenset({"score"})):
        number = sum(score.offset >= end[score.partition] for end in ends)
        runs[number].append(score.envelope.body)
    indices = [[body["index"] for body in run] for run in runs]
    assert indices[0] == list(range(checkpointed))
    assert indices[1] == list(range(checkpointed, committed))
    assert indices[2] == list(range(checkpointed, 2000))
    assert any(expected[i].detail["new_template"] for i in range(checkpointed, committed))
    for run in runs[1:]:
        _assert_warm_start(run[0])
        for body in run:
            _assert_like_offline(body, expected[body["index"]])


def _assert_warm_start(body: dict[str, Any]) -> None:
    """Check that a restarted client's first score comes from a warm HST and threshold."""
    assert body["detail"]["hst"] > 0  # a cold HST scores 0 for its first hst_window lines
    assert body["threshold"] < sys.float_info.max  # +inf in warm-up is published as max


def _assert_like_offline(body: dict[str, Any], offline: Scored) -> None:
    index, detail = body["index"], body["detail"]
    assert detail["template"] == offline.detail["template"], index
    assert detail["new_template"] == offline.detail["new_template"], index
    # HalfSpaceTrees scores row by row, so any batching gives the same bits. The LSTM scores
    # windows in batches, and the batch size can change the last bits of a float32 result.
    assert detail["hst"] == offline.detail["hst"], index
    assert body["score"] == pytest.approx(offline.score, rel=1e-5, abs=1e-7), index


def _block_sessions(n: int) -> LogDataset:
    """Return ``n`` block sessions of 3 to 12 lines, 20 of them open at a time."""
    rng = np.random.default_rng(2)
    keys = [5, 22, 11, 9, 26, 3, 4, 2]
    sessions = [
        Session(tuple(int(k) for k in rng.choice(keys, int(rng.integers(3, 13)))), 0)
        for _ in range(n)
    ]
    return interleave_sessions(sessions, concurrency=20, seed=4)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("ending", ["stop", "kill"])
async def test_session_restart_scores_every_block(
    topics: KafkaSettings, tmp_path: Path, ending: str
) -> None:
    """A logs site restarted in the middle of open HDFS blocks scores every block in full.

    The first run ends with blocks whose lines it has read but whose end line it has not. A
    clean stop checkpoints them. A kill leaves an earlier checkpoint, and the second run
    reads the lines after it again. Either way every block gets a score whose window holds
    all of its lines, so no line before the restart was lost.
    """
    dataset = _block_sessions(300)
    config = modality_config(
        make_config(
            topics,
            edge={
                "max_batch_records": 40,
                "poll_timeout_ms": 200,
                "window_events": 100_000,
                "state_dir": str(tmp_path / "edge"),
                "checkpoint_interval_s": 3600 if ending == "stop" else 0.2,
            },
            logs={
                "state_dir": str(tmp_path / "logs"),
                "window_s": 1e6,
                "session_end_event": END_EVENT,
                "model": {"kind": "mlp_autoencoder", "hidden": [8, 4]},
            },
        ),
        "logs",
    )
    await replay_logs(topics, dataset, progress=False)
    lengths = Counter(record.source for record in dataset.records)

    first = ModalityEdgeClient(config, site="hdfs-site", modality="logs")
    if ending == "stop":
        async with running_services(first):
            await wait_until(lambda: first.counters.scored >= 60, timeout_s=60)
    else:
        await _run_until_killed(first, 60)
    assert isinstance(first.pipeline, LogsPipeline)
    assert first.pipeline.featurizer.windower.open_windows > 0  # blocks cut by the restart

    second = ModalityEdgeClient(config, site="hdfs-site", modality="logs")
    async with running_services(second):
        # Positions move only after the scores of their records are published.
        await wait_until(
            lambda: sum(second.checkpoints.positions.values()) == len(dataset.records),
            timeout_s=60,
        )
    assert second.checkpoints.restored is not None

    scores = await read_topic(topics, "scores", frozenset({"score"}))
    lines_by_block: dict[str, set[int]] = {}
    for score in scores:
        key = score.key
        lines_by_block.setdefault(key, set()).add(score.envelope.body["detail"]["lines"])
        assert dataset.records[score.envelope.body["index"]].source == key
        assert dataset.records[score.envelope.body["index"]].event == END_EVENT
    assert lines_by_block == {source: {count} for source, count in lengths.items()}
    if ending == "stop":
        assert len(scores) == 300  # a clean stop commits what it checkpointed


def _raw_log(body: dict[str, Any], ts: object = 1.0) -> bytes:
    """Pack a log record without the codec's checks, as a faulty shipper might."""
    envelope = {"v": 1, "kind": "log", "src": "shipper", "ts": ts, "body": body}
    return msgpack.packb(envelope, use_bin_type=True)


@pytest.mark.timeout(120)
async def test_bad_log_records_dead_lettered(topics: KafkaSettings, tmp_path: Path) -> None:
    """Log records that fail the schema go to the dlq with the reason; the client goes on."""
    line = {"source": "blk_1", "line": "", "index": 0}
    bad = {
        "event of wrong type": (_raw_log({**line, "event": 22}), "'event' must be a string"),
        "huge event": (_raw_log({**line, "event": "e" * 5000}), "'event' has 5000 characters"),
        "NaN time": (_raw_log({**line, "event": "5"}, ts=float("nan")), "finite number"),
        "empty source": (_raw_log({**line, "source": "", "event": "5"}), "must not be empty"),
        "list level": (_raw_log({**line, "level": ["INFO"]}), "'level' must be a string"),
    }
    producer = make_producer(topics)
    await producer.start()
    topic = topic_name(topics, "logs.raw")
    try:
        for raw, _ in bad.values():
            await producer.send_and_wait(topic, raw, key=b"blk_1", partition=0)
        for index, event in enumerate(["5", "22", END_EVENT]):
            body = {**line, "event": event, "index": index}
            value = codec.encode("log", body, src="shipper", ts=float(index))
            await producer.send_and_wait(topic, value, key=b"blk_1", partition=0)
    finally:
        await producer.stop()

    client = ModalityEdgeClient(_logs_config(topics, tmp_path), site="bgl-site", modality="logs")
    async with running_services(client):
        await wait_until(lambda: client.counters.consumed >= len(bad) + 3, timeout_s=60)

    assert client.counters.scored == 3
    assert client.counters.dead_letters == len(bad)
    dead = await read_topic(topics, "dlq", frozenset({"dead_letter"}))
    assert [d.envelope.body["offset"] for d in dead] == list(range(len(bad)))
    for entry, (name, (_, reason)) in zip(dead, bad.items(), strict=True):
        assert reason in entry.envelope.body["error"], name
        assert entry.envelope.body["topic"] == topic
