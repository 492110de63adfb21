"""``fanomad-stream demo``: the whole system once, on a broker of its own.

Steps: start a fresh local broker → apply the topic catalog → start the aggregator and one
edge client per machine as separate processes (the same commands a deployment runs) → replay
the machines → wait until every replayed point has a score and the aggregator has published
the required model versions → stop the services → evaluate and print the table → stop the
broker. Nothing is left running, even when a step fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from fanomad_stream.broker.local import LocalBroker, cache_dir, free_port
from fanomad_stream.config import AppConfig
from fanomad_stream.evaluate.run import evaluate, render_markdown, write_outputs
from fanomad_stream.replay.smd import replay_smd
from fanomad_stream.service.progress import progress_bar
from fanomad_stream.transport.reader import Keyed, end_offsets, read_topic
from fanomad_stream.transport.topics import apply_catalog, load_catalog

log = structlog.get_logger(__name__)

STALL_S = 120.0  # the demo fails when no new score appears for this long


def with_bootstrap(config: AppConfig, bootstrap: str) -> AppConfig:
    kafka = config.kafka.model_copy(update={"bootstrap_servers": bootstrap})
    return config.model_copy(update={"kafka": kafka})


def run_demo(config: AppConfig, config_path: Path | None, timeout_s: float = 900.0) -> int:
    """Run the demo; return the process exit code (0 when every check passed)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    # A folder of its own, so that demos running side by side never share a broker.
    run_dir = Path(tempfile.mkdtemp(prefix="demo-broker-", dir=cache_dir()))
    broker = LocalBroker(run_dir=run_dir, port=free_port())
    print(
        f"==> starting Kafka {broker.bootstrap_servers} (first run fetches the jars)",
        file=sys.stderr,
    )
    broker.start()
    services: list[subprocess.Popen[bytes]] = []
    try:
        config = with_bootstrap(config, broker.bootstrap_servers)
        return asyncio.run(_run(config, config_path, services, timeout_s))
    finally:
        _stop_processes(services)
        broker.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


async def _run(
    config: AppConfig,
    config_path: Path | None,
    services: list[subprocess.Popen[bytes]],
    timeout_s: float,
) -> int:
    report = await apply_catalog(config.kafka, load_catalog())
    print(f"==> topics created: {len(report.created)}", file=sys.stderr)

    out_dir = config.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "fanomad_stream.cli", "--log-json"]
    if config_path is not None:
        base += ["--config", str(config_path)]
    base += ["--bootstrap", config.kafka.bootstrap_servers]
    services.append(_spawn([*base, "aggregator"], out_dir / "aggregator.log"))
    for machine in config.replay.machines:
        services.append(_spawn([*base, "edge", "--site", machine], out_dir / f"edge-{machine}.log"))
    print(
        f"==> started the aggregator and {len(config.replay.machines)} edge clients",
        file=sys.stderr,
    )

    replayed = await replay_smd(config.kafka, config.replay)
    print(f"==> replayed {replayed.total_points} points: {replayed.points}", file=sys.stderr)

    deadline = time.monotonic() + timeout_s
    await _wait_for_scores(config, replayed.total_points, services, deadline)
    versions = await _wait_for_versions(config, config.min_global_versions, services, deadline)
    _stop_processes(services)

    evaluation = await evaluate(config)
    json_path, md_path = write_outputs(evaluation, config, out_dir)
    scored = sum((await end_offsets(config.kafka, "scores")).values())
    ledger = await read_topic(config.kafka, "privacy.ledger", frozenset({"ledger"}))
    print()
    print(render_markdown(evaluation, config))
    print()
    print(
        f"Replayed points: {replayed.total_points}; published scores: {scored}; "
        f"global model versions on fl.global: {versions}."
    )
    for line in privacy_summary(config, ledger):
        print(line)
    print(f"Results: {json_path} and {md_path}; service logs in {out_dir}.")
    ok = scored == replayed.total_points and versions >= config.min_global_versions
    if not ok:
        print("error: the counts above do not match; see the service logs", file=sys.stderr)
    return 0 if ok else 1


def privacy_summary(config: AppConfig, ledger: list[Keyed]) -> list[str]:
    """Return the demo's privacy lines: the ε the global model (and each client) spent."""
    privacy = config.privacy
    secure = privacy.secure_aggregation
    secagg = (
        f"secure aggregation on (threshold {secure.threshold} of "
        f"{len(config.aggregator.clients or [])})"
        if secure.enabled
        else "secure aggregation off"
    )
    if not (privacy.client_dp.enabled or privacy.dp_sgd.enabled):
        return [f"Privacy: no differential privacy (ε = ∞); {secagg}."]
    lines = []
    model = [r.envelope.body for r in ledger if r.key == config.aggregator.model_name]
    if privacy.client_dp.enabled:
        dp = privacy.client_dp
        spent = _last(model)
        epsilon = 0.0 if spent is None else spent["epsilon"]
        rounds = 0 if spent is None else spent["params"]["rounds"]
        lines.append(
            f"Privacy: client-level ε spent = {epsilon:.3f} at δ = {dp.delta:g} after {rounds} "
            f"DP rounds (PLD accountant; noise multiplier {dp.noise_multiplier}, clipping norm "
            f"{dp.clipping_norm}, budget {dp.epsilon_budget}); {secagg}."
        )
        stopped = [body for body in model if body.get("status") == "training_stopped"]
        if stopped:
            lines.append(f"Training stopped: {stopped[-1]['reason']}")
    if privacy.dp_sgd.enabled:
        per_client: dict[str, float] = {}
        for record in ledger:
            if record.key != config.aggregator.model_name:
                per_client[record.key] = record.envelope.body["epsilon"]
        spent_per_client = ", ".join(
            f"{site} {eps:.3f}" for site, eps in sorted(per_client.items())
        )
        lines.append(
            f"Privacy: sample-level DP-SGD ε per client at δ = {privacy.dp_sgd.delta:g}: "
            f"{spent_per_client or 'no window trained'}."
        )
    return lines


def _last(bodies: list[dict[str, Any]]) -> dict[str, Any] | None:
    return bodies[-1] if bodies else None


def _spawn(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with log_path.open("wb") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )


def _check_alive(services: list[subprocess.Popen[bytes]]) -> None:
    for process in services:
        if process.poll() is not None:
            args = (
                [str(a) for a in process.args]
                if isinstance(process.args, list)
                else [str(process.args)]
            )
            msg = f"service {' '.join(args[-3:])!r} exited with code {process.returncode}; see its log"
            raise RuntimeError(msg)


async def _wait_for_scores(
    config: AppConfig, expected: int, services: list[subprocess.Popen[bytes]], deadline: float
) -> None:
    last_progress = time.monotonic()
    with progress_bar(total=expected, unit="score", desc="scoring") as bar:
        while True:
            _check_alive(services)
            done = sum((await end_offsets(config.kafka, "scores")).values())
            if done > bar.n:
                last_progress = time.monotonic()
            bar.update(done - bar.n)
            if done >= expected:
                return
            if time.monotonic() > deadline or time.monotonic() - last_progress > STALL_S:
                dead = sum((await end_offsets(config.kafka, "dlq")).values())
                msg = (
                    f"only {done} of {expected} points were scored ({dead} records in the dead-letter "
                    f"topic); see the edge logs in {config.output_dir}"
                )
                raise TimeoutError(msg)
            await asyncio.sleep(1.0)


async def _wait_for_versions(
    config: AppConfig, wanted: int, services: list[subprocess.Popen[bytes]], deadline: float
) -> int:
    """Wait until ``wanted`` versions after version 0 are on ``fl.global``; return the count."""
    while True:
        _check_alive(services)
        records = await read_topic(config.kafka, "fl.global", frozenset({"global"}))
        versions = len(
            {r.envelope.body["version"] for r in records if r.envelope.body["version"] > 0}
        )
        if versions >= wanted or time.monotonic() > deadline:
            return versions
        await asyncio.sleep(1.0)


def _stop_processes(services: list[subprocess.Popen[bytes]], timeout_s: float = 30.0) -> None:
    for process in services:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in services:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    services.clear()
