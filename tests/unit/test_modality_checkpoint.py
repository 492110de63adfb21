"""Checkpoints of the logs and traces pipelines and of their edge client, offline.

A pipeline restored from a checkpoint file must continue bit for bit like one that never
stopped, and the client must warm up instead of crashing on a checkpoint it may not use.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import structlog.testing
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError

from fanomad_stream.config import AppConfig, ModalityName, parse_config
from fanomad_stream.edge.checkpoint import (
    CHECKPOINT_FILE,
    FORMAT_VERSION,
    EdgeCheckpoint,
    read_checkpoint,
    state_fingerprint,
    write_checkpoint,
)
from fanomad_stream.edge.modalities import (
    Incoming,
    LogsPipeline,
    ModalityPipeline,
    Scored,
    TracesPipeline,
)
from fanomad_stream.edge.stream_client import ModalityEdgeClient
from fanomad_stream.featurize.logs import LogTemplateMiner, LogWindower
from fanomad_stream.featurize.trace_assembly import Span
from fanomad_stream.modalities import modality_config
from fanomad_stream.replay.logs import LogRecord

SITE = "site-a"
EDGE = {
    "window_events": 150,
    "hst_trees": 4,
    "hst_height": 5,
    "hst_window": 40,
    "threshold": {"warmup_events": 40, "history": 300},
}
LOG_MODELS = {
    "lstm": {"kind": "lstm_autoencoder", "hidden": [8, 4], "window": 4, "local_epochs": 1},
    "mlp": {"kind": "mlp_autoencoder", "hidden": [6, 3], "local_epochs": 1},
}
TRACE_MODELS = {
    "mlp": {"kind": "mlp_autoencoder", "hidden": [6, 3], "local_epochs": 1},
    "lstm": {"kind": "lstm_autoencoder", "hidden": [8, 4], "window": 4, "local_epochs": 1},
}


def _logs_config(model: str, max_sources: int = 3, **edge: object) -> AppConfig:
    config = parse_config(
        {
            "model": {"seed": 3},
            "edge": {**EDGE, "window_events": 60 if model == "mlp" else 150, **edge},
            "logs": {
                "n_buckets": 8,
                "window_s": 5.0,
                "max_sources": max_sources,
                "model": {**LOG_MODELS[model], "seed": 3},
            },
        }
    )
    return modality_config(config, "logs")


def _traces_config(model: str, **traces: object) -> AppConfig:
    settings: dict[str, object] = {
        "timeout_s": 1.0,
        "root_grace_s": 0.1,
        "n_edge_buckets": 8,
        "n_service_buckets": 4,
        "model": {**TRACE_MODELS[model], "seed": 3},
        **traces,
    }
    config = parse_config({"edge": {**EDGE, "window_events": 40}, "traces": settings})
    return modality_config(config, "traces")


def _log_lines(n: int) -> list[Incoming]:
    """Return log lines of four sources; new message shapes appear all along the stream.

    Every fifth line carries a shipper's event id instead of being mined, and the fourth
    source is rare, so that with ``max_sources`` 3 it pushes other sources' windows out.
    """
    rng = np.random.default_rng(11)
    shapes = [
        "request {a} served in {b} ms",
        "user {a} logged in from host{b}",
        "cache miss for key {a}",
        "disk {a} failed with code {b}",
        "retrying connection to node{a} attempt {b}",
        "job {a} finished state OK",
        "job {a} finished state FAILED after {b} s",
        "gc pause {a} ms heap {b} MB",
        "certificate for host{a} expires in {b} days",
        "queue {a} is full dropping {b} messages",
    ]
    items = []
    for i in range(n):
        # Shape k becomes possible from line 150 * k on, so templates keep being created.
        shape = shapes[int(rng.integers(0, min(len(shapes), 1 + i // 150)))]
        line = shape.format(a=int(rng.integers(0, 50)), b=int(rng.integers(0, 900)))
        if 1200 <= i < 1260:
            line = f"kernel panic on cpu {i % 4}"  # an anomalous burst after the split
        level = "ERROR" if "failed" in line or "FAILED" in line or "panic" in line else "INFO"
        shipped = i % 5 == 4 and not 1200 <= i < 1260
        event = f"E{int(rng.integers(0, 1 + i // 300))}" if shipped else ""
        source = "node-3" if i % 50 == 0 else f"node-{i % 3}"
        record = LogRecord(1000.0 + 0.5 * i, source, line, level, event)
        items.append(Incoming(record, i, i % 2, i // 2))
    return items


def _trace_spans(n_traces: int) -> list[Incoming]:
    """Return spans of overlapping traces in start order, on two partitions."""
    rng = np.random.default_rng(5)
    services = ["cart", "pay", "db", "auth"]
    spans = []
    for t in range(n_traces):
        trace_id = f"trace-{t:04d}"
        start = t * 150_000
        duration = int(rng.integers(100_000, 600_000))
        spans.append(Span(trace_id, f"{trace_id}-0", "", "front", "GET /", start, duration, "200"))
        for c in range(1, int(rng.integers(2, 6))):
            service = services[int(rng.integers(0, len(services)))]
            child_duration = int(rng.lognormal(9.0, 0.4 if t % 37 else 2.0))
            spans.append(
                Span(
                    trace_id,
                    f"{trace_id}-{c}",
                    f"{trace_id}-0",
                    service,
                    f"op-{service}",
                    start + int(rng.integers(1_000, duration // 2)),
                    child_duration,
                    "500" if t % 53 == 0 else "200",
                )
            )
    spans.sort(key=lambda span: span.start_us)
    offsets = [0, 0]
    items = []
    for index, span in enumerate(spans):
        partition = int(span.trace_id[-4:]) % 2
        items.append(Incoming(span, index, partition, offsets[partition]))
        offsets[partition] += 1
    return items


def _batches(items: list[Incoming], sizes: tuple[int, ...] = (37, 11, 53)) -> list[list[Incoming]]:
    batches, begin, i = [], 0, 0
    while begin < len(items):
        size = sizes[i % len(sizes)]
        batches.append(items[begin : begin + size])
        begin += size
        i += 1
    return batches


def _run(pipeline: ModalityPipeline, batches: list[list[Incoming]]) -> list[object]:
    """Process batches as the edge client does (train when a window is ready); return outputs."""
    outputs: list[object] = []
    for batch in batches:
        outputs += pipeline.process(batch)
        if pipeline.window_ready():
            delta, n_samples = pipeline.train_window()
            outputs.append(("delta", n_samples, delta))
    return outputs


def _assert_same_outputs(expected: list[object], actual: list[object]) -> None:
    assert len(actual) == len(expected)
    for i, (want, got) in enumerate(zip(expected, actual, strict=True)):
        if isinstance(want, Scored):
            assert got == want, f"output {i}"
            continue
        assert isinstance(want, tuple) and isinstance(got, tuple), f"output {i}"
        assert got[1] == want[1], f"output {i}: n_samples"
        assert got[2].keys() == want[2].keys()
        for name in want[2]:
            assert np.array_equal(got[2][name], want[2][name]), f"output {i}: delta {name}"


def _checkpoint(config: AppConfig, modality: ModalityName, state: dict[str, Any]) -> EdgeCheckpoint:
    return EdgeCheckpoint(
        site=SITE,
        fingerprint=state_fingerprint(config, modality),
        global_version=-1,
        last_update_round=-1,
        offsets={
            TopicPartition(f"{modality}.raw", 0): 120,
            TopicPartition(f"{modality}.raw", 1): 99,
        },
        pipeline=state,
        written_at=1.0,
    )


def _through_file(
    tmp_path: Path, config: AppConfig, modality: ModalityName, pipeline: ModalityPipeline
) -> dict[str, Any]:
    """Write the pipeline's snapshot to a checkpoint file and return the state read back."""
    path = tmp_path / "checkpoint" / CHECKPOINT_FILE
    write_checkpoint(path, _checkpoint(config, modality, pipeline.snapshot()))
    fingerprint = state_fingerprint(config, modality)
    return read_checkpoint(path, site=SITE, fingerprint=fingerprint).pipeline


def _trained(outputs: list[object]) -> int:
    return sum(1 for output in outputs if isinstance(output, tuple))


@pytest.mark.parametrize("model", ["lstm", "mlp"])
def test_logs_restore_continues_bitwise(tmp_path: Path, model: str) -> None:
    """Scores, thresholds, details and deltas after a restore equal an unbroken run's.

    Four sources over a bound of three make the LSTM drop stream contexts. The MLP's
    thresholds would never warm up when its sources take turns being dropped, so it keeps
    all four.
    """
    config = _logs_config(model, max_sources=3 if model == "lstm" else 4)
    batches = _batches(_log_lines(1500))
    split = len(batches) // 2

    unbroken_pipeline = LogsPipeline(config, None)
    unbroken = _run(unbroken_pipeline, batches) + unbroken_pipeline.flush()

    first = LogsPipeline(config, tmp_path / "first" / "drain3.json")
    before = _run(first, batches[:split])
    assert 0 < first.events_since_training < config.edge.window_events
    state = _through_file(tmp_path, config, "logs", first)
    templates_at_split = first.featurizer.miner.template_count

    restored = LogsPipeline(config, tmp_path / "second" / "drain3.json")
    restored.restore(state)
    assert restored.featurizer.miner.template_count == templates_at_split
    after = _run(restored, batches[split:]) + restored.flush()

    _assert_same_outputs(unbroken, before + after)
    assert restored.featurizer.miner.events == unbroken_pipeline.featurizer.miner.events
    assert len(restored.featurizer.miner.events) > 1
    assert restored.sources_dropped == unbroken_pipeline.sources_dropped
    assert _trained(after) >= 2
    scores_after = [s for s in after if isinstance(s, Scored)]
    frequent = next(s for s in scores_after if s.key != "node-3")
    assert np.isfinite(frequent.threshold)  # warmed up before the split
    assert any(s.alert for s in before + after if isinstance(s, Scored))
    # Lines after the split create templates, so drain3's restored state decides their ids.
    assert restored.featurizer.miner.template_count > templates_at_split


@pytest.mark.parametrize("model", ["mlp", "lstm"])
def test_traces_restore_continues_bitwise(tmp_path: Path, model: str) -> None:
    """Restored traces keep their index and ref, and every output equals an unbroken run's."""
    config = _traces_config(model)
    batches = _batches(_trace_spans(400))
    split = len(batches) // 2

    unbroken_pipeline = TracesPipeline(config)
    unbroken = _run(unbroken_pipeline, batches) + unbroken_pipeline.flush()

    first = TracesPipeline(config)
    before = _run(first, batches[:split])
    open_at_split = first.open_traces
    assert open_at_split > 0
    state = _through_file(tmp_path, config, "traces", first)

    restored = TracesPipeline(config)
    restored.restore(state)
    assert restored.open_traces == open_at_split
    after = _run(restored, batches[split:]) + restored.flush()

    _assert_same_outputs(unbroken, before + after)
    scores = [s for s in before + after if isinstance(s, Scored)]
    assert len(scores) == 400
    assert all(s.index >= 0 and s.partition >= 0 for s in scores)
    assert _trained(after) >= 2


def test_restore_of_partial_state_changes_nothing() -> None:
    config = _logs_config("lstm")
    pipeline = LogsPipeline(config, None)
    _run(pipeline, _batches(_log_lines(200)))
    state = dict(pipeline.snapshot())
    del state["training"]
    fresh = LogsPipeline(config, None)
    detector = fresh.detector
    with pytest.raises(KeyError):
        fresh.restore(state)
    assert fresh.detector is detector
    assert fresh.contexts == {}
    assert fresh.featurizer.miner.template_count == 0


def test_restore_rejects_unbounded_windower() -> None:
    """A windower without the max_sources bound, as earlier builds saved it, is rejected."""
    config = _logs_config("mlp")
    pipeline = LogsPipeline(config, None)
    _run(pipeline, _batches(_log_lines(200)))
    state = {**pipeline.snapshot(), "windower": LogWindower(config.logs.window_s)}
    fresh = LogsPipeline(config, None)
    windower = fresh.featurizer.windower
    with pytest.raises(TypeError, match=r"no bound of logs\.max_sources"):
        fresh.restore(state)
    assert fresh.featurizer.windower is windower
    assert fresh.scalers == {}


def test_restore_of_other_modality_raises() -> None:
    """A traces state does not restore into a logs pipeline, and the reverse."""
    traces = TracesPipeline(_traces_config("lstm"))
    logs = LogsPipeline(_logs_config("lstm"), None)
    with pytest.raises((KeyError, TypeError)):
        logs.restore(traces.snapshot())
    with pytest.raises((KeyError, TypeError)):
        traces.restore(logs.snapshot())
    assert logs.featurizer.miner.template_count == 0


def test_fingerprint_covers_modality_settings() -> None:
    base = state_fingerprint(_logs_config("lstm"), "logs")
    other_buckets = modality_config(
        parse_config({"edge": EDGE, "logs": {"n_buckets": 8, "window_s": 20.0}}), "logs"
    )
    assert state_fingerprint(other_buckets, "logs") != base
    assert state_fingerprint(_logs_config("lstm"), "traces") != base
    timeouts = state_fingerprint(_traces_config("mlp"), "traces")
    assert state_fingerprint(_traces_config("mlp", timeout_s=2.0), "traces") != timeouts
    moved = modality_config(
        parse_config(
            {
                "model": {"seed": 3},
                "edge": {**EDGE, "window_events": 150},
                "logs": {
                    "n_buckets": 8,
                    "window_s": 5.0,
                    "max_sources": 3,
                    "state_dir": "elsewhere",
                    "model": {**LOG_MODELS["lstm"], "seed": 3},
                },
            }
        ),
        "logs",
    )
    assert state_fingerprint(moved, "logs") == base


def test_metrics_fingerprint_unchanged() -> None:
    """The metrics fingerprint hashes what it hashed before modalities had checkpoints."""
    config = parse_config({"edge": {"state_dir": "/tmp/x", "window_events": 500}})
    described = {
        "format": FORMAT_VERSION,
        "model_name": config.aggregator.model_name,
        "model": config.model.model_dump(mode="json"),
        "edge": config.edge.model_dump(
            mode="json",
            exclude={
                "group_prefix",
                "max_batch_records",
                "state_dir",
                "max_metric_values",
                "poll_timeout_ms",
                "checkpoint_interval_s",
                "stop_timeout_s",
            },
        ),
    }
    expected = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    assert state_fingerprint(config) == expected


def _client(
    config: AppConfig, tmp_path: Path, modality: str, *, checkpoints: bool = True
) -> ModalityEdgeClient:
    """Return a client of ``config`` whose state folders are in tmp_path.

    Without ``checkpoints``, ``edge.state_dir`` stays None and the client keeps no checkpoint.
    """
    state_dir = tmp_path / "edge" if checkpoints else None
    edge = config.edge.model_copy(update={"state_dir": state_dir})
    logs = config.logs.model_copy(update={"state_dir": tmp_path / "logs"})
    config = config.model_copy(update={"edge": edge, "logs": logs})
    return ModalityEdgeClient(config, site=SITE, modality=modality)


def _checkpoint_path(tmp_path: Path, modality: str) -> Path:
    return tmp_path / "edge" / SITE / modality / CHECKPOINT_FILE


async def _write_from(client: ModalityEdgeClient, positions: dict[TopicPartition, int]) -> None:
    """Write the client's checkpoint as its step would, holding the folder's lock."""
    assert client.checkpoints.read() is None
    client.checkpoints.positions = dict(positions)
    client.checkpoints.changed = True
    async with client.checkpoints.state_lock:
        await client._write_checkpoint()
    client.checkpoints.release()


async def test_client_restores_checkpoint_and_templates(tmp_path: Path) -> None:
    """A restarted logs client takes the checkpoint's state and offsets, and its templates.

    drain3 saved templates of lines after the checkpoint to its file. The restore rewrites
    the file with the checkpoint's templates, so the file and the state agree again.
    """
    config = _logs_config("lstm")
    lines = _log_lines(900)
    first = _client(config, tmp_path, "logs")
    assert isinstance(first.pipeline, LogsPipeline)
    _run(first.pipeline, _batches(lines[:600]))
    topic = "logs.raw"
    positions = {TopicPartition(topic, 0): 300, TopicPartition(topic, 1): 300}
    await _write_from(first, positions)
    templates = first.pipeline.featurizer.miner.template_count
    events = dict(first.pipeline.featurizer.miner.events)
    _run(first.pipeline, _batches(lines[600:]))  # mined after the checkpoint: a crash follows
    drain3_file = tmp_path / "logs" / SITE / "drain3.json"
    ahead = LogTemplateMiner(drain3_file, n_buckets=config.logs.n_buckets)
    assert ahead.template_count > templates
    assert len(ahead.events) > len(events)

    second = _client(config, tmp_path, "logs")
    with structlog.testing.capture_logs() as logs:
        await second._load_state()
    assert [entry["event"] for entry in logs] == ["edge_checkpoint_restored"]
    assert second.checkpoints.positions == positions
    assert second.checkpoints.restored is not None
    assert isinstance(second.pipeline, LogsPipeline)
    assert second.pipeline.featurizer.miner.template_count == templates
    assert second.pipeline.featurizer.miner.events == events
    on_disk = LogTemplateMiner(drain3_file, n_buckets=config.logs.n_buckets)
    assert on_disk.template_count == templates
    assert on_disk.events == events
    assert second.pipeline.contexts.keys() == first.pipeline.contexts.keys()
    second.checkpoints.release()


@pytest.mark.parametrize(
    ("change", "reason"),
    [("other_config", "config"), ("corrupt", "corrupt"), ("other_site", "site")],
)
async def test_client_warms_up_on_unusable_checkpoint(
    tmp_path: Path, change: str, reason: str
) -> None:
    """A checkpoint the client may not use is logged as rejected, and the client warms up."""
    config = _traces_config("mlp")
    first = _client(config, tmp_path, "traces")
    assert isinstance(first.pipeline, TracesPipeline)
    _run(first.pipeline, _batches(_trace_spans(60)))
    await _write_from(first, {TopicPartition("traces.raw", 0): 5})
    path = _checkpoint_path(tmp_path, "traces")
    if change == "corrupt":
        data = bytearray(path.read_bytes())
        data[-20] ^= 0xFF
        path.write_bytes(bytes(data))
    if change == "other_config":
        config = _traces_config("mlp", max_open_traces=5)
    client = _client(config, tmp_path, "traces")
    if change == "other_site":
        client.checkpoints.site = "site-b"

    with structlog.testing.capture_logs() as logs:
        await client._load_state()
    events = {entry["event"]: entry for entry in logs}
    assert events["edge_checkpoint_rejected"]["log_level"] == "warning"
    assert events["edge_checkpoint_rejected"]["reason"] == reason
    assert "edge_warmup_started" in events
    assert client.checkpoints.restored is None
    assert client.checkpoints.positions == {}
    assert isinstance(client.pipeline, TracesPipeline)
    assert client.pipeline.open_traces == 0
    assert client.pipeline.traces_scored == 0
    # The client holds the lock, so its next checkpoint replaces the rejected file.
    assert client.checkpoints.lock is not None
    client.checkpoints.release()


async def test_client_rejects_state_of_other_shape(tmp_path: Path) -> None:
    """A checkpoint whose state fails to restore leaves a cold pipeline and a warning."""
    config = _logs_config("lstm")
    first = _client(config, tmp_path, "logs")
    assert isinstance(first.pipeline, LogsPipeline)
    _run(first.pipeline, _batches(_log_lines(100)))
    first.pipeline.snapshot = lambda: {"detector": "not a detector"}  # type: ignore[method-assign]
    await _write_from(first, {TopicPartition("logs.raw", 0): 100})

    client = _client(config, tmp_path, "logs")
    with structlog.testing.capture_logs() as logs:
        await client._load_state()
    rejected = [entry for entry in logs if entry["event"] == "edge_checkpoint_rejected"]
    assert [entry["reason"] for entry in rejected] == ["state"]
    assert client.checkpoints.restored is None
    assert client.checkpoints.positions == {}
    client.checkpoints.release()


async def test_client_restores_over_damaged_template_files(tmp_path: Path) -> None:
    """Damaged drain3 and event files are set aside, and the checkpoint rewrites both."""
    config = _logs_config("mlp")
    first = _client(config, tmp_path, "logs")
    assert isinstance(first.pipeline, LogsPipeline)
    _run(first.pipeline, _batches(_log_lines(300)))
    await _write_from(first, {TopicPartition("logs.raw", 0): 300})
    miner = first.pipeline.featurizer.miner
    drain3_file = tmp_path / "logs" / SITE / "drain3.json"
    events_file = tmp_path / "logs" / SITE / "drain3-events.json"
    drain3_file.write_bytes(b"not base64")
    events_file.write_text('{"5": "not a cluster id"}')

    with structlog.testing.capture_logs() as logs:
        second = _client(config, tmp_path, "logs")
        await second._load_state()
    rejected = [entry["path"] for entry in logs if entry["event"] == "log_template_state_rejected"]
    assert rejected == [str(drain3_file), str(events_file)]
    assert second.checkpoints.restored is not None
    assert isinstance(second.pipeline, LogsPipeline)
    assert second.pipeline.featurizer.miner.events == miner.events
    on_disk = LogTemplateMiner(drain3_file, n_buckets=config.logs.n_buckets)
    assert on_disk.template_count == miner.template_count
    assert on_disk.events == miner.events
    second.checkpoints.release()


@pytest.mark.parametrize(
    "content",
    [b"\xc1 not msgpack", msgpack.packb([1, 2]), msgpack.packb({"assemblers": {0: "x"}})],
)
async def test_damaged_trace_file_is_set_aside(tmp_path: Path, content: bytes) -> None:
    """A traces.msgpack that fails to load is moved aside, and the client starts empty."""
    config = _traces_config("mlp")
    client = _client(config, tmp_path, "traces", checkpoints=False)
    client._traces_state.parent.mkdir(parents=True)
    client._traces_state.write_bytes(content)
    with structlog.testing.capture_logs() as logs:
        await client._load_state()
    (entry,) = [entry for entry in logs if entry["event"] == "trace_state_rejected"]
    assert entry["log_level"] == "warning"
    assert entry["path"] == str(client._traces_state)
    assert not client._traces_state.exists()
    rejected = client._traces_state.with_name("traces.msgpack.rejected")
    assert rejected.read_bytes() == content
    assert isinstance(client.pipeline, TracesPipeline)
    assert client.pipeline.open_traces == 0
    assert client.pipeline.assemblers == {}


def _trace_file_state(config: AppConfig) -> tuple[TracesPipeline, bytes]:
    pipeline = TracesPipeline(config)
    _run(pipeline, _batches(_trace_spans(100)))
    assert pipeline.open_traces > 0
    return pipeline, msgpack.packb(pipeline.open_traces_state(), use_bin_type=True)


async def test_trace_file_keeps_first_spans(tmp_path: Path) -> None:
    """Without a checkpoint folder, open traces come back from traces.msgpack with their refs."""
    config = _traces_config("mlp")
    original, packed = _trace_file_state(config)
    client = _client(config, tmp_path, "traces", checkpoints=False)
    assert client.checkpoints.folder is None
    client._traces_state.parent.mkdir(parents=True)
    client._traces_state.write_bytes(packed)
    with structlog.testing.capture_logs() as logs:
        await client._load_state()
    assert [entry["event"] for entry in logs] == ["trace_state_loaded", "edge_warmup_started"]
    assert isinstance(client.pipeline, TracesPipeline)
    assert client.pipeline.open_traces == original.open_traces
    expected = {s.key: (s.index, s.partition, s.offset) for s in original.flush()}
    flushed = {s.key: (s.index, s.partition, s.offset) for s in client.pipeline.flush()}
    assert flushed == expected
    assert all(index >= 0 for index, _, _ in flushed.values())


async def test_trace_file_replaced_by_checkpoint(tmp_path: Path) -> None:
    """With a checkpoint folder, traces.msgpack is read once and removed by the first checkpoint."""
    config = _traces_config("mlp")
    original, packed = _trace_file_state(config)
    client = _client(config, tmp_path, "traces")
    client._traces_state.parent.mkdir(parents=True)
    client._traces_state.write_bytes(packed)

    await client._load_state()
    assert isinstance(client.pipeline, TracesPipeline)
    assert client.pipeline.open_traces == original.open_traces
    assert client._traces_state.exists()
    client.checkpoints.changed = True
    async with client.checkpoints.state_lock:
        await client._write_checkpoint()
    assert not client._traces_state.exists()
    client.checkpoints.release()

    restarted = _client(config, tmp_path, "traces")
    await restarted._load_state()
    assert restarted.checkpoints.restored is not None
    assert isinstance(restarted.pipeline, TracesPipeline)
    assert restarted.pipeline.open_traces == original.open_traces
    restarted.checkpoints.release()


class _RebalancedConsumer:
    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("logs.raw", 0)}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        raise CommitFailedError("the group rebalanced")


async def test_commit_failure_counted_not_raised(tmp_path: Path) -> None:
    """A commit rejected after a rebalance leaves the batch to be redelivered."""
    client = ModalityEdgeClient(_logs_config("lstm"), site="s1", modality="logs")
    client.checkpoints.consumer = _RebalancedConsumer()  # type: ignore[assignment]
    tp = TopicPartition("logs.raw", 0)
    client.checkpoints.positions[tp] = 10
    with structlog.testing.capture_logs() as logs:
        assert not await client.checkpoints.commit([tp])
        assert not await client.checkpoints.commit([tp])
    assert client.checkpoints.commit_failures == 2
    assert [entry["event"] for entry in logs] == ["commit_failed", "commit_failed"]


class _PositionConsumer:
    """A consumer with two assigned partitions; only the first has been read."""

    def __init__(self, position: int | None) -> None:
        self._position = position

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("logs.raw", 0), TopicPartition("logs.raw", 1)}

    async def position(self, tp: TopicPartition) -> int:
        assert tp == TopicPartition("logs.raw", 1)
        if self._position is None:
            await asyncio.sleep(3600)  # the broker never responds
        assert self._position is not None
        return self._position


async def test_checkpoint_covers_unread_partitions(tmp_path: Path) -> None:
    """An assigned partition no batch came from enters the checkpoint at its read position.

    A restore then reads it from there, and not from a committed offset that batches after
    the checkpoint moved on.
    """
    client = _client(_logs_config("mlp"), tmp_path, "logs")
    assert client.checkpoints.read() is None
    client.checkpoints.consumer = _PositionConsumer(7)  # type: ignore[assignment]
    client.checkpoints.positions = {TopicPartition("logs.raw", 0): 5}
    client.checkpoints.changed = True
    async with client.checkpoints.state_lock:
        await client._write_checkpoint()
    client.checkpoints.release()
    checkpoint = read_checkpoint(
        _checkpoint_path(tmp_path, "logs"),
        site=SITE,
        fingerprint=client.checkpoints.fingerprint,
    )
    assert checkpoint.offsets == {
        TopicPartition("logs.raw", 0): 5,
        TopicPartition("logs.raw", 1): 7,
    }


async def test_checkpoint_skipped_when_position_unknown(tmp_path: Path) -> None:
    client = _client(_logs_config("mlp", stop_timeout_s=0.2), tmp_path, "logs")
    assert client.checkpoints.read() is None
    client.checkpoints.consumer = _PositionConsumer(None)  # type: ignore[assignment]
    client.checkpoints.positions = {TopicPartition("logs.raw", 0): 5}
    with structlog.testing.capture_logs() as logs:
        written = await client.checkpoints.write(
            global_version=-1, last_update_round=-1, state=client.pipeline.snapshot()
        )
    client.checkpoints.release()
    assert written is False
    assert not _checkpoint_path(tmp_path, "logs").exists()
    (entry,) = logs
    assert (entry["event"], entry["reason"]) == ("edge_checkpoint_skipped", "position_unknown")
    assert entry["partition"] == "logs.raw:1"
