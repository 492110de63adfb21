"""Session fixtures: one real Kafka broker for every test that talks to the bus.

The broker is the project's own local broker (Apache Kafka from Maven Central, KRaft, one
node on 127.0.0.1), started once per test session in a temporary folder and stopped at the
end. Each test gets its own topic prefix, so tests never see each other's records.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from fanomad_stream.broker.local import LocalBroker, free_port
from fanomad_stream.config import AppConfig, KafkaSettings, parse_config
from fanomad_stream.transport.topics import apply_catalog, load_catalog

_counter = itertools.count()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """Start the local broker for the session; its log is printed if start-up fails."""
    broker = LocalBroker(run_dir=tmp_path_factory.mktemp("kafka"), port=free_port())
    broker.start(timeout_s=120)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:40].strip("-")
    return f"t{next(_counter)}-{name}."


@pytest.fixture
def kafka_settings(kafka_broker: LocalBroker, topic_prefix: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=kafka_broker.bootstrap_servers, topic_prefix=topic_prefix
    )


@pytest.fixture
async def topics(kafka_settings: KafkaSettings) -> AsyncIterator[KafkaSettings]:
    """Create every catalog topic under the test's prefix."""
    await apply_catalog(kafka_settings, load_catalog())
    yield kafka_settings


def make_config(kafka: KafkaSettings, **sections: object) -> AppConfig:
    """Build an AppConfig with the test's Kafka settings and the given sections."""
    raw: dict[str, object] = {"kafka": kafka.model_dump(mode="json")}
    raw.update(sections)
    return parse_config(raw)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()
    # A test that ran the CLI configured structlog to write to that test's captured stderr.
    structlog.reset_defaults()


SMD_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "smd"


async def wait_until(predicate: object, timeout_s: float = 60.0, interval_s: float = 0.2) -> None:
    """Await until ``predicate()`` is true; fail the test with a message on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():  # type: ignore[operator]
        if loop.time() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)
