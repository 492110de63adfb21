"""Kill the aggregator process with SIGKILL at random points and check that no update is lost
or folded twice: the final global model must equal, bit for bit, the model of an
uninterrupted computation.

Deltas are small multiples of 1/64 and weights are powers of two, so every weighted mean is
exact in floating point and the expected model does not depend on the fold order.
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

from fanomad_stream.config import KafkaSettings
from fanomad_stream.detect.autoencoder import build_model, get_weights
from fanomad_stream.federate.global_model import GlobalModelReader
from fanomad_stream.transport import codec
from fanomad_stream.transport.kafka import make_producer, topic_name

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


def _write_config(tmp_path: Path, kafka: KafkaSettings) -> Path:
    config = {
        "kafka": kafka.model_dump(mode="json"),
        "model": MODEL,
        "edge": {"scoring": "baseline"},  # the model reads the raw row width
        "aggregator": {"quorum": len(CLIENTS), "round_deadline_s": 300, "clients": sorted(CLIENTS)},
    }
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _spawn_aggregator(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
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
    tmp_path: Path, kafka: KafkaSettings, kills: int, seed: int
) -> dict[str, np.ndarray]:
    config_path = _write_config(tmp_path, kafka)
    log_path = tmp_path / "aggregator.log"
    rng = random.Random(seed)
    done = asyncio.Event()
    clients = asyncio.create_task(_clients(kafka, "smd-ae", done))
    watcher = GlobalModelReader(kafka, "smd-ae")
    try:
        for _ in range(kills):
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
