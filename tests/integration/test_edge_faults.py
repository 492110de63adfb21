"""Edge clients under faults on the real broker: SIGKILL and restart, a rebalance, a dead broker.

The edge client runs as ``fanomad-stream edge`` in a subprocess, next to an aggregator in the
test process, while a paced SMD replay feeds ``metrics.raw``. The checks are the guarantees of
the edge checkpoint. Every replayed row is scored at least once, and the site sends at most one
update per round, which the aggregator folds once. A restarted client resumes from its
checkpoint instead of warming up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from fanomad_stream.broker.local import LocalBroker, free_port
from fanomad_stream.config import AppConfig, KafkaSettings
from fanomad_stream.demo_multimodal import running_services
from fanomad_stream.edge.client import EdgeClient
from fanomad_stream.federate.aggregator import Aggregator
from fanomad_stream.modalities import modality_config
from fanomad_stream.replay.logs import END_EVENT, interleave_sessions, read_hdfs_sessions
from fanomad_stream.replay.smd import REPO_ROOT, ReplayReport, replay_smd
from fanomad_stream.replay.streams import LOGHUB_DIR, replay_logs
from fanomad_stream.transport.reader import read_topic
from fanomad_stream.transport.topics import apply_catalog, load_catalog
from tests.conftest import make_config, wait_until

pytestmark = pytest.mark.broker

SITE = "site-a"
MACHINES = ["machine-1-3", "machine-1-6"]
SAMPLE_DIR = REPO_ROOT / "data" / "smd-sample"


def _sections(
    state_dir: Path, machines: list[str], rows: tuple[int, int], speed: float
) -> dict[str, Any]:
    return {
        "replay": {
            "machines": machines,
            "train_rows": rows[0],
            "test_rows": rows[1],
            "data_dir": str(SAMPLE_DIR),
            "speed": speed,
        },
        "model": {"local_epochs": 1, "seed": 1},
        "edge": {
            "window_events": 300,
            "max_batch_records": 100,
            "hst_trees": 10,
            "scoring": "context",
            "context": {"warmup_rows": 500, "spot_warmup": 500},
            "state_dir": str(state_dir),
            "checkpoint_interval_s": 0.5,
            "stop_timeout_s": 10,
        },
        "aggregator": {"quorum": 1, "round_deadline_s": 30, "clients": [SITE]},
    }


def _write_config(path: Path, kafka: KafkaSettings, sections: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"kafka": kafka.model_dump(mode="json"), **sections}))
    return path


def _spawn_edge(
    config_path: Path, log_path: Path, sources: list[str], modality: str = "metrics"
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "fanomad_stream.cli", "--log-json"]
    command += ["--config", str(config_path), "edge", "--site", SITE, "--modality", modality]
    if sources:
        command += ["--sources", *sources]
    with log_path.open("ab") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )


def _events(log_path: Path) -> list[dict[str, Any]]:
    """Return the JSON log events of one run; other lines (a traceback) are skipped."""
    if not log_path.exists():
        return []
    events = []
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events


def _has_event(log_path: Path, name: str) -> bool:
    return any(event.get("event") == name for event in _events(log_path))


async def _wait_for_event(log_path: Path, name: str, process: subprocess.Popen[bytes]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while not _has_event(log_path, name):
        tail = log_path.read_text()[-3000:] if log_path.exists() else ""
        assert process.poll() is None, f"edge exited with {process.returncode}:\n{tail}"
        assert loop.time() < deadline, f"no {name} event within 120 s:\n{tail}"
        await asyncio.sleep(0.1)


async def _scored(kafka: KafkaSettings) -> Counter[tuple[str, int]]:
    scores = await read_topic(kafka, "scores", frozenset({"score"}))
    return Counter((s.key, int(s.envelope.body["index"])) for s in scores)


async def _wait_all_scored(kafka: KafkaSettings, report: ReplayReport, timeout_s: float) -> None:
    expected = {(m, i) for m, n in report.points.items() for i in range(n)}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        missing = expected - set(await _scored(kafka))
        if not missing:
            return
        assert loop.time() < deadline, (
            f"{len(missing)} rows never scored, e.g. {sorted(missing)[:5]}"
        )
        await asyncio.sleep(2.0)


async def _updates_per_round(kafka: KafkaSettings) -> Counter[tuple[str, int]]:
    updates = await read_topic(kafka, "fl.updates", frozenset({"update"}))
    return Counter((u.envelope.body["client_id"], int(u.envelope.body["round"])) for u in updates)


async def _check_folded_once(
    kafka: KafkaSettings, aggregator: Aggregator, *, repeats_allowed: bool = False
) -> Counter[tuple[str, int]]:
    """Check that each (client, round) on ``fl.updates`` was folded into exactly one version.

    With ``repeats_allowed`` a round may appear more than once on the topic (two processes of
    one site) as long as the aggregator rejected every copy after the first. Returns the update
    counts per (client, round).
    """
    updates = await _updates_per_round(kafka)
    rounds = sorted({round_id for _, round_id in updates})
    # With quorum 1 the fold of round r publishes version r + 1 at once.
    await wait_until(
        lambda: aggregator.model is not None and aggregator.model.version >= len(rounds),
        timeout_s=60,
    )
    assert rounds == list(range(len(rounds)))
    globals_ = await read_topic(kafka, "fl.global", frozenset({"global"}))
    versions = [g.envelope.body for g in globals_]
    assert [v["version"] for v in versions] == list(range(len(versions)))
    for version in versions[1:]:
        assert version["clients"] == [SITE], version["version"]
    assert len(versions) - 1 == len(rounds)
    if repeats_allowed:
        repeated = sum(n - 1 for n in updates.values())
        assert sum(aggregator.rejected.values()) == repeated, aggregator.rejected
        assert set(aggregator.rejected) <= {"duplicate", "stale_round"}, aggregator.rejected
    else:
        assert aggregator.rejected == {}
    return updates


async def _run_edge_kill_trial(
    tmp_path: Path, kafka: KafkaSettings, *, kills: int, seed: int
) -> None:
    # 2 × 3000 rows, replayed in about 30 s.
    sections = _sections(tmp_path / "state", MACHINES, rows=(2000, 1000), speed=6000.0)
    config_path = _write_config(tmp_path / "edge.yaml", kafka, sections)
    config = make_config(kafka, **sections)
    rng = random.Random(seed)
    aggregator = Aggregator(config)
    logs: list[Path] = []
    async with running_services(aggregator):
        replay = asyncio.create_task(replay_smd(kafka, config.replay, progress=False))
        for kill in range(kills):
            logs.append(tmp_path / f"edge-{kill}.log")
            process = _spawn_edge(config_path, logs[-1], MACHINES)
            # Right after the assignment, after a checkpoint or after an update, and then
            # anywhere in the next window: 300 rows take about 0.3 s to 1.5 s here.
            trigger = rng.choice(["partitions_assigned", "edge_checkpoint_written", "update_sent"])
            await _wait_for_event(logs[-1], trigger, process)
            await asyncio.sleep(rng.uniform(0.0, 2.0))
            process.send_signal(signal.SIGKILL)
            process.wait()
        logs.append(tmp_path / "edge-final.log")
        process = _spawn_edge(config_path, logs[-1], MACHINES)
        try:
            report = await replay
            await _wait_all_scored(kafka, report, timeout_s=180)
            await _check_folded_once(kafka, aggregator)
        finally:
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=60)
    assert returncode == 0, logs[-1].read_text()[-3000:]

    await _check_sent_once(kafka)
    _check_restored(logs)


async def _check_sent_once(kafka: KafkaSettings) -> None:
    updates = await _updates_per_round(kafka)
    assert updates, "the site sent no update"
    assert max(updates.values()) == 1, (
        f"rounds sent twice: {[k for k, n in updates.items() if n > 1]}"
    )


def _check_restored(logs: list[Path]) -> None:
    """Check that every run after a written checkpoint restored one instead of warming up."""
    restored = 0
    for i, log_path in enumerate(logs[1:], start=1):
        if any(_has_event(earlier, "edge_checkpoint_written") for earlier in logs[:i]):
            assert _has_event(log_path, "edge_checkpoint_restored"), log_path.name
            assert not _has_event(log_path, "edge_warmup_started"), log_path.name
            restored += 1
    assert restored >= 1, "no run restored a checkpoint"


async def test_killed_edge_resumes_from_checkpoint(tmp_path: Path, topics: KafkaSettings) -> None:
    """Two SIGKILLs of the edge process: no row unscored, no round sent twice, no new warm-up.

    The final global model is not compared with an uninterrupted run, because it depends on
    timing even without kills. A client trains when its window is full at the end of a poll.
    So the poll batch boundaries decide which rows form each window and which global version
    the client trains on, and both depend on when records and models arrive.
    """
    await _run_edge_kill_trial(tmp_path, topics, kills=2, seed=5)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
async def test_killed_edge_trials(tmp_path: Path, topics: KafkaSettings, trial: int) -> None:
    """Each of 20 trials kills the edge twice at its own random points."""
    await _run_edge_kill_trial(tmp_path, topics, kills=2, seed=200 + trial)


async def test_second_process_joins_mid_window(tmp_path: Path, topics: KafkaSettings) -> None:
    """A second process of the site joins the group mid-window: no crash, no round folded
    twice, every row scored, and only the first process uses the checkpoint."""
    machines = ["machine-1-3", "machine-1-4", "machine-1-6", "machine-1-8"]
    config = make_config(
        topics, **_sections(tmp_path / "state", machines, rows=(1000, 500), speed=6000.0)
    )
    aggregator = Aggregator(config)
    first = EdgeClient(config, site=SITE, sources=machines)
    second = EdgeClient(config, site=SITE, sources=machines)
    async with running_services(aggregator, first) as tasks:
        replay = asyncio.create_task(replay_smd(topics, config.replay, progress=False))
        await wait_until(
            lambda: (
                first.counters.updates_sent >= 1
                and 0 < first.pipeline.events_since_training < config.edge.window_events
            ),
            timeout_s=120,
            interval_s=0.02,
        )
        await second.start()
        tasks.append(asyncio.create_task(second.run()))
        try:
            await wait_until(
                lambda: second._consumer is not None and bool(second._consumer.assignment()),
                timeout_s=60,
            )
            assert first._consumer is not None
            owned = first._consumer.assignment() | second._consumer.assignment()
            assert len(owned) == 4
            assert len(first._consumer.assignment()) < 4
            report = await replay
            await _wait_all_scored(topics, report, timeout_s=180)
            updates = await _check_folded_once(topics, aggregator, repeats_allowed=True)
        finally:
            second.request_stop()
            await second.stop()
        for task in tasks:
            assert not task.done() or task.exception() is None

    assert updates
    assert first.checkpoints.lock is None  # released by stop()
    assert first.checkpoints.restored is None
    assert second.checkpoints.restored is None
    keyed = await read_topic(topics, "metrics.raw", frozenset({"metric"}))
    assert len({k.partition for k in keyed}) >= 2, "the sources landed on one partition"
    assert first.counters.scored + second.counters.scored >= report.total_points
    assert second.counters.scored > 0


def test_second_process_keeps_no_checkpoint(tmp_path: Path) -> None:
    """Of two processes of a site sharing a state folder, only the first takes the lock."""
    from fanomad_stream.edge.checkpoint import CheckpointLock

    config = make_config(
        KafkaSettings(), **_sections(tmp_path / "state", MACHINES, rows=(10, 10), speed=0.0)
    )
    holder = CheckpointLock(tmp_path / "state" / SITE)
    assert holder.acquire()
    client = EdgeClient(config, site=SITE, sources=MACHINES)
    assert client.checkpoints.read() is None
    assert client.checkpoints.lock is None
    holder.release()
    assert client.checkpoints.read() is None  # the lock is free now, and there is no file
    assert client.checkpoints.lock is not None
    client.checkpoints.release()


@pytest.fixture
def dedicated_broker(tmp_path: Path) -> Any:
    """A broker of this test alone, which the test may kill."""
    broker = LocalBroker(run_dir=tmp_path / "kafka", port=free_port())
    broker.start(timeout_s=120)
    try:
        yield broker
    finally:
        broker.stop()


def _kill_broker(broker: LocalBroker) -> None:
    pid = broker.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)


async def _dedicated_config(broker: LocalBroker, tmp_path: Path) -> AppConfig:
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic_prefix="down.")
    await apply_catalog(kafka, load_catalog())
    sections = _sections(tmp_path / "state", MACHINES, rows=(1000, 500), speed=0.0)
    sections["edge"]["stop_timeout_s"] = 5
    return make_config(kafka, **sections)


async def test_stop_returns_while_broker_down(
    tmp_path: Path, dedicated_broker: LocalBroker
) -> None:
    """With the broker killed mid-stream, run() and stop() return, and the state is kept.

    The 60 s bounds only guard against a hang. The client's own bound is stop_timeout_s for
    the step, then stop_timeout_s for the state lock and for each of its three Kafka clients.
    """
    config = await _dedicated_config(dedicated_broker, tmp_path)
    client = EdgeClient(config, site=SITE, sources=MACHINES)
    await client.start()
    run = asyncio.create_task(client.run())
    replay = asyncio.create_task(replay_smd(config.kafka, config.replay, progress=False))
    try:
        await wait_until(lambda: client.counters.scored >= 300, timeout_s=120)
        _kill_broker(dedicated_broker)
        await asyncio.sleep(1.0)
        client.request_stop()
        await asyncio.wait_for(asyncio.gather(run, return_exceptions=True), 60)
        await asyncio.wait_for(client.stop(), 60)
    finally:
        replay.cancel()
        await asyncio.gather(replay, return_exceptions=True)
    assert client._producer is None
    assert client._consumer is None
    assert (tmp_path / "state" / SITE / "checkpoint.bin").exists()


async def test_cli_edge_exits_on_sigterm_while_broker_down(
    tmp_path: Path, dedicated_broker: LocalBroker
) -> None:
    """``fanomad-stream edge`` exits after SIGTERM although its broker is gone."""
    config = await _dedicated_config(dedicated_broker, tmp_path)
    sections = _sections(tmp_path / "state", MACHINES, rows=(1000, 500), speed=0.0)
    sections["edge"]["stop_timeout_s"] = 5
    config_path = _write_config(tmp_path / "edge.yaml", config.kafka, sections)
    log_path = tmp_path / "edge.log"
    process = _spawn_edge(config_path, log_path, MACHINES)
    try:
        await replay_smd(config.kafka, config.replay, progress=False)
        await _wait_for_event(log_path, "edge_checkpoint_written", process)
        _kill_broker(dedicated_broker)
        await asyncio.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(process.wait, 60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert returncode == 0, log_path.read_text()[-3000:]
    assert _has_event(log_path, "edge_stopped")


HDFS_SESSIONS = LOGHUB_DIR / "HDFS_sessions_deeplog"


def _logs_sections(state_dir: Path) -> dict[str, Any]:
    return {
        "edge": {
            "window_events": 100,
            "max_batch_records": 200,
            "hst_window": 50,
            "hst_trees": 10,
            "threshold": {"warmup_events": 50, "quantile": 0.97},
            "state_dir": str(state_dir),
            "checkpoint_interval_s": 0.5,
            "stop_timeout_s": 10,
        },
        "logs": {
            "state_dir": str(state_dir / "drain3"),
            "n_buckets": 256,
            "window_s": 100_000,
            "session_end_event": "end",
            "model": {"kind": "mlp_autoencoder", "hidden": [32, 8], "seed": 7},
        },
        "aggregator": {"quorum": 1, "round_deadline_s": 30, "clients": [SITE]},
    }


async def _run_logs_kill_trial(
    tmp_path: Path, kafka: KafkaSettings, *, kills: int, seed: int
) -> None:
    """Kill a logs edge client scoring HDFS sessions, restart it, and check the guarantees."""
    sections = _logs_sections(tmp_path / "state")
    config_path = _write_config(tmp_path / "edge.yaml", kafka, sections)
    config = make_config(kafka, **sections)
    sessions = read_hdfs_sessions(HDFS_SESSIONS, max_normal=700, max_abnormal=30)
    dataset = interleave_sessions(sessions, concurrency=20, seed=seed)
    # One score per block, at the index of its end line.
    expected = {
        (record.source, index)
        for index, record in enumerate(dataset.records)
        if record.event == END_EVENT
    }
    rng = random.Random(seed)
    aggregator = Aggregator(modality_config(config, "logs"))
    logs: list[Path] = []
    async with running_services(aggregator):
        # About 15,000 lines in about 25 s.
        replay = asyncio.create_task(
            replay_logs(kafka, dataset, events_per_s=600.0, progress=False)
        )
        for kill in range(kills):
            logs.append(tmp_path / f"edge-{kill}.log")
            process = _spawn_edge(config_path, logs[-1], [], modality="logs")
            trigger = rng.choice(["partitions_assigned", "edge_checkpoint_written", "update_sent"])
            if kill == kills - 1:
                # The last run before the final one always leaves a checkpoint to restore.
                trigger = "edge_checkpoint_written"
            await _wait_for_event(logs[-1], trigger, process)
            await asyncio.sleep(rng.uniform(0.0, 2.0))
            process.send_signal(signal.SIGKILL)
            process.wait()
        logs.append(tmp_path / "edge-final.log")
        process = _spawn_edge(config_path, logs[-1], [], modality="logs")
        try:
            await replay
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 180
            while missing := expected - set(await _scored(kafka)):
                assert loop.time() < deadline, (
                    f"{len(missing)} sessions never scored, e.g. {sorted(missing)[:5]}"
                )
                await asyncio.sleep(2.0)
            await _check_folded_once(kafka, aggregator)
        finally:
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=60)
    assert returncode == 0, logs[-1].read_text()[-3000:]

    await _check_sent_once(kafka)
    _check_restored(logs)


@pytest.mark.skipif(not HDFS_SESSIONS.is_dir(), reason="DeepLog sessions not found beside checkout")
async def test_killed_logs_edge_resumes_from_checkpoint(
    tmp_path: Path, topics: KafkaSettings
) -> None:
    """Two SIGKILLs of a logs client on HDFS sessions: every block scored, no round twice."""
    await _run_logs_kill_trial(tmp_path, topics, kills=2, seed=5)


@pytest.mark.slow
@pytest.mark.skipif(not HDFS_SESSIONS.is_dir(), reason="DeepLog sessions not found beside checkout")
@pytest.mark.parametrize("trial", range(10))
async def test_killed_logs_edge_trials(tmp_path: Path, topics: KafkaSettings, trial: int) -> None:
    """Each of 10 trials kills the logs client twice at its own random points."""
    await _run_logs_kill_trial(tmp_path, topics, kills=2, seed=300 + trial)
