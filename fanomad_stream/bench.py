"""``fanomad-stream bench``: throughput of the raw consumer, the edge pipeline and each detector.

All figures come from one run on one broker, so their ratios are meaningful even on a busy
machine; the absolute numbers are not. The broker is started by the benchmark itself.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fanomad_stream.broker.local import LocalBroker, cache_dir, free_port
from fanomad_stream.config import AppConfig
from fanomad_stream.demo import with_bootstrap
from fanomad_stream.detect.autoencoder import AutoencoderDetector
from fanomad_stream.detect.hst import HalfSpaceTreesDetector
from fanomad_stream.edge.client import EdgeClient
from fanomad_stream.replay.smd import load_machine, replay_smd, resolve_data_dir
from fanomad_stream.transport.kafka import make_consumer
from fanomad_stream.transport.topics import apply_catalog, load_catalog


def run_bench(config: AppConfig) -> int:
    cache_dir().mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-broker-", dir=cache_dir()))
    broker = LocalBroker(run_dir=run_dir, port=free_port())
    broker.start()
    try:
        config = with_bootstrap(config, broker.bootstrap_servers)
        results = asyncio.run(_bench(config))
    finally:
        broker.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    print()
    print("| measurement | events | seconds | events/s |")
    print("|---|---|---|---|")
    for name, (events, seconds) in results.items():
        print(f"| {name} | {events} | {seconds:.2f} | {events / seconds:,.0f} |")
    raw = results["raw aiokafka consume"]
    edge = results["edge pipeline (decode, score, publish, commit)"]
    print(f"\nedge pipeline rate / raw consume rate: {(edge[0] / edge[1]) / (raw[0] / raw[1]):.3f}")
    return 0


async def _bench(config: AppConfig) -> dict[str, tuple[int, float]]:
    await apply_catalog(config.kafka, load_catalog())
    replayed = await replay_smd(config.kafka, config.replay, progress=False)
    total = replayed.total_points
    print(f"replayed {total} points into metrics.raw", file=sys.stderr)
    results = {"raw aiokafka consume": (total, await _raw_consume(config, total))}

    # One edge client scoring every machine: the same code path as a site, minus the wait
    # for rounds (no aggregator runs, so no training window is sent).
    client = EdgeClient(config, site="bench", sources=list(config.replay.machines))
    await client.start()
    began = time.perf_counter()
    while client.counters.consumed < total:
        await client.step()
    results["edge pipeline (decode, score, publish, commit)"] = (total, time.perf_counter() - began)
    await client.stop()

    data = load_machine(
        resolve_data_dir(config.replay.data_dir), config.replay.machines[0], None, 5000
    )
    x = ((data.values - data.values.mean(0)) / (data.values.std(0) + 0.01)).astype(np.float32)
    results.update(_detector_rates(config, x))
    return results


async def _raw_consume(config: AppConfig, total: int) -> float:
    consumer = make_consumer(config.kafka, "metrics.raw", group_id="bench-raw")
    await consumer.start()
    began = time.perf_counter()
    seen = 0
    try:
        while seen < total:
            batches = await consumer.getmany(
                timeout_ms=500, max_records=config.edge.max_batch_records
            )
            seen += sum(len(records) for records in batches.values())
    finally:
        await consumer.stop()
    return time.perf_counter() - began


def _detector_rates(config: AppConfig, x: np.ndarray) -> dict[str, tuple[int, float]]:
    batch = config.edge.max_batch_records
    ae = AutoencoderDetector(x.shape[1], hidden=config.model.hidden, seed=config.model.seed)
    hst = HalfSpaceTreesDetector(
        x.shape[1],
        n_trees=config.edge.hst_trees,
        height=config.edge.hst_height,
        window_size=config.edge.hst_window,
    )
    out = {}
    began = time.perf_counter()
    for start in range(0, x.shape[0], batch):
        ae.score_batch(x[start : start + batch])
    out["autoencoder score (batched torch)"] = (x.shape[0], time.perf_counter() - began)
    began = time.perf_counter()
    for start in range(0, x.shape[0], batch):
        hst.score_and_learn(x[start : start + batch])
    out["HalfSpaceTrees score + learn (River, per event)"] = (
        x.shape[0],
        time.perf_counter() - began,
    )
    began = time.perf_counter()
    ae.train(x[: config.edge.window_events])
    out[f"autoencoder training window ({config.model.local_epochs} epochs)"] = (
        min(x.shape[0], config.edge.window_events),
        time.perf_counter() - began,
    )
    return out
