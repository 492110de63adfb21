"""The topic catalog in ``topics/catalog.yaml`` and the command that applies it.

Applying is idempotent: missing topics are created, existing ones are compared with the
catalog and every difference (partition count, cleanup policy, retention, message size) is
reported as drift. Drift is reported, never changed silently, because shrinking partitions or
rewriting retention on a live cluster is an operator's decision.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fanomad_stream.config import KafkaSettings
from fanomad_stream.errors import ConfigError
from fanomad_stream.transport.kafka import client_options, topic_name

log = structlog.get_logger(__name__)

DEFAULT_CATALOG = Path(__file__).resolve().parents[2] / "topics" / "catalog.yaml"


class TopicSpec(BaseModel):
    """One catalog entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    partitions: int = Field(ge=1, le=10_000)
    replication: int = Field(ge=1, le=10)
    cleanup_policy: str = Field(pattern=r"^(delete|compact|compact,delete)$")
    retention_ms: int = Field(ge=-1)
    key: str
    kind: str
    value: str
    large_messages: bool = False

    def configs(self, max_message_bytes: int) -> dict[str, str]:
        values = {"cleanup.policy": self.cleanup_policy, "retention.ms": str(self.retention_ms)}
        if self.large_messages:
            values["max.message.bytes"] = str(max_message_bytes)
        return values


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    topics: list[TopicSpec]


def load_catalog(path: Path | None = None) -> Catalog:
    """Read and validate the catalog; raises ConfigError on a bad entry."""
    path = path or DEFAULT_CATALOG
    try:
        return Catalog.model_validate(yaml.safe_load(path.read_text()))
    except FileNotFoundError as err:
        raise ConfigError(f"topic catalog {str(path)!r} not found") from err
    except ValidationError as err:
        raise ConfigError(f"invalid topic catalog {str(path)!r}:\n{err}") from None


@dataclass
class ApplyReport:
    created: list[str]
    unchanged: list[str]
    drift: list[str]


async def apply_catalog(settings: KafkaSettings, catalog: Catalog) -> ApplyReport:
    """Create missing topics and report how existing ones differ from the catalog."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        report = ApplyReport(created=[], unchanged=[], drift=[])
        missing = [
            spec for spec in catalog.topics if topic_name(settings, spec.name) not in existing
        ]
        if missing:
            await admin.create_topics(
                [
                    NewTopic(
                        name=topic_name(settings, spec.name),
                        num_partitions=spec.partitions,
                        replication_factor=spec.replication,
                        topic_configs=spec.configs(settings.max_message_bytes),
                    )
                    for spec in missing
                ]
            )
            report.created = [topic_name(settings, spec.name) for spec in missing]
            await _wait_visible(admin, set(report.created))
        present = [spec for spec in catalog.topics if spec not in missing]
        for spec in present:
            problems = await _drift(admin, settings, spec)
            name = topic_name(settings, spec.name)
            if problems:
                report.drift.extend(f"{name}: {problem}" for problem in problems)
            else:
                report.unchanged.append(name)
        log.info(
            "topics_applied",
            created=len(report.created),
            unchanged=len(report.unchanged),
            drift=len(report.drift),
        )
        return report
    finally:
        await admin.close()


async def _wait_visible(
    admin: AIOKafkaAdminClient, names: set[str], timeout_s: float = 30.0
) -> None:
    """Wait until new topics appear in metadata, so that an immediate second apply finds them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not names <= set(await admin.list_topics()):
        if loop.time() > deadline:
            msg = f"created topics {sorted(names)} did not appear in metadata within {timeout_s} s"
            raise TimeoutError(msg)
        await asyncio.sleep(0.2)


async def _drift(admin: AIOKafkaAdminClient, settings: KafkaSettings, spec: TopicSpec) -> list[str]:
    name = topic_name(settings, spec.name)
    problems = []
    described = await admin.describe_topics([name])
    partitions = len(described[0]["partitions"]) if described else 0
    if partitions != spec.partitions:
        problems.append(f"partitions {partitions}, catalog says {spec.partitions}")
    resources = [ConfigResource(ConfigResourceType.TOPIC, name)]
    responses = await admin.describe_configs(resources)
    actual = _config_values(responses)
    for key, wanted in spec.configs(settings.max_message_bytes).items():
        if actual.get(key) != wanted:
            problems.append(f"{key} is {actual.get(key)!r}, catalog says {wanted!r}")
    return problems


def _config_values(responses: list[Any]) -> dict[str, str]:
    values: dict[str, str] = {}
    for response in responses:
        for resource in response.resources:
            # DescribeConfigs v1+ resource tuple: (error_code, error_message, type, name, entries)
            for entry in resource[4]:
                values[entry[0]] = entry[1]
    return values
