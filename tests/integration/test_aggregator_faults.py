"""Kill the aggregator process with SIGKILL at random points and check that no update is lost
or folded twice: the final global model must equal, bit for bit, the model of an
uninterrupted computation.

FedAvg in synchronous rounds is checked against a hand-built expectation: deltas are small
multiples of 1/64 and weights are powers of two, so every weighted mean is exact in floating
point and the expected model does not depend on the fold order. FedAdam (server moments) and
buffered asynchronous rounds (duplicate keys) are checked against a ``RoundEngine`` that folds
the same ``fl.updates`` log once, in order, without interruption: every version published on
``fl.global``, by any of the killed processes, must equal that engine's version.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fanomad_stream.config import KafkaSettings, parse_config
from fanomad_stream.detect.autoencoder import Weights, build_model, get_weights
from fanomad_stream.errors import UpdateRejectedError
from fanomad_stream.federate.global_model import GlobalModelReader
from fanomad_stream.federate.rounds import RoundEngine
from fanomad_stream.transport import codec
from fanomad_stream.transport.kafka import make_producer, topic_name
from fanomad_stream.transport.reader import read_topic

pytestmark = pytest.mark.broker

CLIENTS = {"a": 1, "b": 1, "c": 2}  # client id -> n_samples
ROUNDS = 5
MODEL = {"n_features": 4, "hidden": [2], "seed": 11}


def _delta(template: dict[str, np.ndarray], client: str, round_id: int) -> dict[str, np.ndarray]:
    """Return a deterministic delta whose entries are multiples of 1/64."""
    offset = ord(client) - ord("a") + 1
    return {
        name: (
            (np.arange(array.size).reshape(array.shape) % 5) - 2 + offset * (round_id + 1)
        ).astype(np.float32)
        / 64
        for name, array in template.items()
    }


def _expected_model(rounds: int) -> dict[str, np.ndarray]:
    weights = get_weights(build_model(MODEL["n_features"], MODEL["hidden"], MODEL["seed"]))
    total = sum(CLIENTS.values())
    for round_id in range(rounds):
        deltas = {c: _delta(weights, c, round_id) for c in CLIENTS}
        for name in weights:
            summed = sum(n * deltas[c][name].astype(np.float64) for c, n in CLIENTS.items())
            weights[name] = (weights[name] + (summed / total).astype(np.float32)).astype(np.float32)
    return weights


MODES: dict[str, dict[str, object]] = {
    "fedavg": {},
    "fedadam": {"strategy": {"name": "fedadam", "eta": 0.05}},
    "buffered": {"buffered_async": {"buffer_size": 2, "max_staleness": 2}},
}


def _raw_config(kafka: KafkaSettings, mode: str) -> dict[str, object]:
    aggregator = {"quorum": len(CLIENTS), "round_deadline_s": 300, "clients": sorted(CLIENTS)}
    return {
        "kafka": kafka.model_dump(mode="json"),
        "model": MODEL,
        "edge": {"scoring": "baseline"},  # the model reads the raw row width
        "aggregator": {**aggregator, **MODES[mode]},
    }


def _write_config(tmp_path: Path, kafka: KafkaSettings, mode: str = "fedavg") -> Path:
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump(_raw_config(kafka, mode)))
    return path


async def _uninterrupted_versions(kafka: KafkaSettings, mode: str) -> dict[int, Weights]:
    """Fold the whole ``fl.updates`` log once, in order, as one aggregator that never stops."""
    config = parse_config(_raw_config(kafka, mode))
    start = get_weights(build_model(MODEL["n_features"], MODEL["hidden"], MODEL["seed"]))
    engine = RoundEngine(config, start, version=0)
    versions = {0: engine.weights}
    for record in await read_topic(kafka, "fl.updates", frozenset({"update"})):
        body = record.envelope.body
        closed = None
        if engine.buffered is None:
            if body["round"] != engine.version or body["client_id"] in engine.clients:
                continue  # rejected as stale or duplicate by the aggregator too
            engine.fold(body["client_id"], body["base_version"], body["delta"], body["n_samples"])
            if engine.folded >= len(CLIENTS):
                closed = engine.close()
        else:
            try:
                closed = engine.fold(
                    body["client_id"], body["base_version"], body["delta"], body["n_samples"]
                )
            except UpdateRejectedError:
                continue
        if closed is not None:
            versions[closed.version] = closed.weights
    return versions


async def _check_every_published_version(kafka: KafkaSettings, mode: str) -> int:
    """Compare each version on ``fl.global`` with the uninterrupted fold; return the count."""
    expected = await _uninterrupted_versions(kafka, mode)
    published = await read_topic(kafka, "fl.global", frozenset({"global"}))
    assert published, "no version was published"
    for record in published:
        body = record.envelope.body
        version = body["version"]
        assert version in expected, f"version {version} was published but never released"
        for name, array in expected[version].items():
            assert np.array_equal(body["weights"][name], array), (version, name)
    return len(published)


def _spawn_aggregator(
    config_path: Path, log_path: Path, failpoints: str = ""
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", FANOMAD_FAILPOINTS=failpoints)
    with log_path.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fanomad_stream.cli",
                "--log-json",
                "--config",
                str(config_path),
                "aggregator",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )


async def _clients(kafka: KafkaSettings, model_name: str, done: asyncio.Event) -> None:
    """Send each client's update once per global version, as edge clients would."""
    reader = GlobalModelReader(kafka, model_name)
    producer = make_producer(kafka)
    await reader.start()
    await producer.start()
    sent: set[int] = set()
    try:
        while not done.is_set():
            await reader.poll(timeout_ms=200)
            latest = reader.latest
            if latest is None or latest.version in sent or latest.version >= ROUNDS:
                continue
            for client, n_samples in CLIENTS.items():
                body = {
                    "round": latest.version,
                    "client_id": client,
                    "n_samples": n_samples,
                    "base_version": latest.version,
                    "delta": _delta(latest.weights, client, latest.version),
                }
                value = codec.encode("update", body, src=client, ts=0.0)
                await producer.send_and_wait(
                    topic_name(kafka, "fl.updates"), value, key=client.encode()
                )
            sent.add(latest.version)
    finally:
        await producer.stop()
        await reader.stop()


async def _run_with_kills(
    tmp_path: Path,
    kafka: KafkaSettings,
    kills: int,
    seed: int,
    mode: str = "fedavg",
    *,
    crash_points: bool = False,
    points: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Run the aggregator to version ROUNDS with ``kills`` SIGKILLs and return the final model.

    Kills land at random times, or with ``crash_points`` at random named points of the fold,
    or at the given ``points`` (``name=N``), one per kill.
    """
    config_path = _write_config(tmp_path, kafka, mode)
    log_path = tmp_path / "aggregator.log"
    rng = random.Random(seed)
    done = asyncio.Event()
    clients = asyncio.create_task(_clients(kafka, "smd-ae", done))
    watcher = GlobalModelReader(kafka, "smd-ae")
    try:
        for kill in range(kills):
            if crash_points:
                # The process kills itself at a named point: after folding an update, between
                # publishing a version and committing its offsets, or after the commit.
                point = rng.choice(
                    ["aggregator.folded", "aggregator.published", "aggregator.committed"]
                )
                hits = rng.randint(1, 6 if point == "aggregator.folded" else 2)
                spec = f"{point}={hits}" if points is None else points[kill]
                process = _spawn_aggregator(config_path, log_path, spec)
                try:
                    await asyncio.wait_for(asyncio.to_thread(process.wait), timeout=60)
                except TimeoutError:
                    process.send_signal(signal.SIGKILL)  # every round was done before the point
                    process.wait()
            else:
                process = _spawn_aggregator(config_path, log_path)
                await asyncio.sleep(
                    rng.uniform(1.0, 7.0)
                )  # start-up, mid-round or just after a publish
                process.send_signal(signal.SIGKILL)
                process.wait()
        process = _spawn_aggregator(config_path, log_path)
        await watcher.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 180
        while watcher.latest is None or watcher.latest.version < ROUNDS:
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert loop.time() < deadline, (
                f"version {ROUNDS} not reached; log:\n{log_path.read_text()[-3000:]}"
            )
            await watcher.poll(timeout_ms=500)
        process.send_signal(signal.SIGTERM)
        # 0 after a clean stop; -SIGTERM when an earlier run already finished every round and
        # this one was still importing, before its signal handler existed.
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        return watcher.latest.weights
    finally:
        done.set()
        await clients
        await watcher.stop()


async def test_killed_aggregator_matches_uninterrupted(
    tmp_path: Path, topics: KafkaSettings
) -> None:
    """Three SIGKILLs at random points leave the final model bitwise equal to the expected one."""
    final = await _run_with_kills(tmp_path, topics, kills=3, seed=1)
    expected = _expected_model(ROUNDS)
    for name, array in expected.items():
        assert np.array_equal(final[name], array), name


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
async def test_killed_aggregator_trials(tmp_path: Path, topics: KafkaSettings, trial: int) -> None:
    """Each of 20 trials, with its own kill points, ends at the same bitwise model."""
    final = await _run_with_kills(tmp_path, topics, kills=2, seed=100 + trial)
    expected = _expected_model(ROUNDS)
    for name, array in expected.items():
        assert np.array_equal(final[name], array), name


@pytest.mark.parametrize("mode", ["fedadam", "buffered"])
async def test_killed_aggregator_keeps_its_fold_state(
    tmp_path: Path, topics: KafkaSettings, mode: str
) -> None:
    """A SIGKILL at each crash point: every version equals the uninterrupted fold of the log."""
    points = ["aggregator.published=2", "aggregator.folded=3", "aggregator.committed=1"]
    await _run_with_kills(
        tmp_path, topics, kills=3, seed=2, mode=mode, crash_points=True, points=points
    )
    assert await _check_every_published_version(topics, mode) >= ROUNDS + 1


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fedadam", "buffered"])
@pytest.mark.parametrize("trial", range(20))
async def test_killed_aggregator_fold_state_trials(
    tmp_path: Path, topics: KafkaSettings, trial: int, mode: str
) -> None:
    """20 trials per mode, each with its own kill points, as the test above."""
    await _run_with_kills(tmp_path, topics, kills=3, seed=200 + trial, mode=mode, crash_points=True)
    assert await _check_every_published_version(topics, mode) >= ROUNDS + 1
