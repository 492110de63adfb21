"""Structural checks of docker/compose.yaml without a Docker engine.

No Compose tool runs here, so the file is checked against a pydantic model of the part of the
Compose Specification it uses. Every service is also checked against the project itself. Each
command must parse with the ``fanomad-stream`` CLI, each mounted config must pass
``load_config``, and each metric the dashboard queries must be one the services expose.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

from fanomad_stream.cli import _parser
from fanomad_stream.config import AppConfig, load_config
from fanomad_stream.service.metrics import AggregatorMetrics, EdgeMetrics
from fanomad_stream.transport.topics import load_catalog

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
# Values the compose file requires from the environment (${VAR:?message}).
REQUIRED_ENV = {"SMD_DATA_DIR": "/srv/smd", "GRAFANA_ADMIN_PASSWORD": "not-a-real-password"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Build(_Strict):
    context: str
    dockerfile: str


class DependsOn(_Strict):
    condition: Literal["service_started", "service_healthy", "service_completed_successfully"]


class Healthcheck(_Strict):
    test: list[str]
    interval: str
    timeout: str
    retries: int = Field(ge=1)


class Service(_Strict):
    image: str
    build: Build | None = None
    command: list[str] | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    volumes: list[str] = Field(default_factory=list)
    ports: list[str] = Field(default_factory=list)
    depends_on: dict[str, DependsOn] = Field(default_factory=dict)
    profiles: list[str] = Field(default_factory=list)
    healthcheck: Healthcheck | None = None
    restart: Literal["no", "always", "on-failure", "unless-stopped"] | None = None


class ComposeFile(BaseModel):
    # Top-level keys beyond these must be extension fields (x-...), checked below.
    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    services: dict[str, Service]
    volumes: dict[str, None] = Field(default_factory=dict)


_VARIABLE = re.compile(
    r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\})"
)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Substitute ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} and $$ as Compose does."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":-", "-") and unset:
            return arg
        if op in (":?", "?") and unset:
            pytest.fail(f"{name} is required by the compose file: {arg}")
        return value or ""

    return _VARIABLE.sub(substitute, text)


@pytest.fixture(scope="module")
def compose() -> ComposeFile:
    text = interpolate((DOCKER / "compose.yaml").read_text(), REQUIRED_ENV)
    return ComposeFile.model_validate(yaml.safe_load(text))


@pytest.fixture(scope="module")
def dockerfile() -> tuple[list[str], dict[str, Path]]:
    """Return the image's ENTRYPOINT arguments and its {container path: repository path} map."""
    lines = (DOCKER / "Dockerfile").read_text().splitlines()
    workdir = next(line.split()[1] for line in lines if line.startswith("WORKDIR "))
    copies = {}
    for line in lines:
        if line.startswith("COPY "):
            *sources, target = line.split()[1:]
            target_path = Path(workdir) / target
            for source in sources:
                # A target ending in "/" is a folder that receives each source by name.
                inside = target_path / source if target.endswith("/") else target_path
                copies[str(inside)] = ROOT / source
    entrypoint = json.loads(
        next(line[len("ENTRYPOINT ") :] for line in lines if line.startswith("ENTRYPOINT "))
    )
    assert entrypoint[0] == "fanomad-stream"
    return entrypoint[1:], copies


def our_services(compose: ComposeFile) -> dict[str, Service]:
    return {name: s for name, s in compose.services.items() if s.build is not None}


def mounts(service: Service) -> dict[str, Path]:
    """Return {container path: host path} of the bind mounts given as relative host paths."""
    out = {}
    for volume in service.volumes:
        host, container, *_ = volume.split(":")
        if host.startswith("."):
            out[container] = (DOCKER / host).resolve()
    return out


def container_file(path: str, service: Service, image_files: dict[str, Path]) -> Path:
    """Map a path inside the container to the repository file that the mount or image puts there."""
    for inside, host in {**image_files, **mounts(service)}.items():
        if path == inside:
            return host
        if path.startswith(inside.rstrip("/") + "/"):
            return host / Path(path).relative_to(inside)
    pytest.fail(f"{path} is neither mounted nor copied into the image")


def service_config(service: Service, image_files: dict[str, Path]) -> AppConfig:
    return load_config(container_file(service.environment["FANOMAD_CONFIG"], service, image_files))


def parse_command(service: Service, entrypoint: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Parse ``entrypoint + command`` with the CLI's parser under the service's environment."""
    for key in ("FANOMAD_CONFIG", "FANOMAD_BOOTSTRAP", "FANOMAD_SITE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in service.environment.items():
        monkeypatch.setenv(key, value)
    return _parser().parse_args([*entrypoint, *(service.command or [])])


def test_top_level_extensions_only(compose: ComposeFile) -> None:
    """Keys other than name, services and volumes are x- extension fields."""
    extra = set(compose.model_extra or {})
    assert extra
    assert all(key.startswith("x-") for key in extra)


def test_dependencies_exist(compose: ComposeFile) -> None:
    """Every depends_on names a service, and default services never wait for a profiled one."""
    for name, service in compose.services.items():
        for dependency in service.depends_on:
            assert dependency in compose.services, f"{name} depends on unknown {dependency}"
            if not service.profiles:
                assert not compose.services[dependency].profiles, f"{name} waits for {dependency}"


def test_kafka_runs_kraft_from_official_image(compose: ComposeFile) -> None:
    """The broker is Apache's image in KRaft mode with a health check the others wait on."""
    kafka = compose.services["kafka"]
    assert kafka.image.startswith("apache/kafka:")
    assert kafka.environment["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "KAFKA_ZOOKEEPER_CONNECT" not in kafka.environment
    assert kafka.healthcheck is not None
    assert f"kafka-data:{kafka.environment['KAFKA_LOG_DIRS']}" in kafka.volumes
    assert compose.services["topics"].depends_on["kafka"].condition == "service_healthy"


def test_commands_parse_with_cli(
    compose: ComposeFile,
    dockerfile: tuple[list[str], dict[str, Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each Python service runs a real fanomad-stream subcommand with a valid config."""
    entrypoint, image_files = dockerfile
    commands = {}
    for name, service in our_services(compose).items():
        args = parse_command(service, entrypoint, monkeypatch)
        commands[name] = args.command
        assert isinstance(service_config(service, image_files), AppConfig)
        assert args.bootstrap.split(":")[0] in compose.services
    assert commands["topics"] == "topics"
    assert commands["aggregator"] == "aggregator"
    assert commands["replay"] == "replay"
    assert sorted(n for n, c in commands.items() if c == "edge") == [
        "edge-1",
        "edge-2",
        "edge-3",
        "edge-4",
    ]


def test_topic_catalog_in_image(
    compose: ComposeFile,
    dockerfile: tuple[list[str], dict[str, Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The catalog path given to `topics apply` is a file the image contains, and it loads."""
    entrypoint, image_files = dockerfile
    service = compose.services["topics"]
    args = parse_command(service, entrypoint, monkeypatch)

    catalog = load_catalog(container_file(str(args.catalog), service, image_files))

    assert "metrics.raw" in [topic.name for topic in catalog.topics]


def test_edge_sites_match_config(
    compose: ComposeFile,
    dockerfile: tuple[list[str], dict[str, Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The edge sites are the replayed machines, the aggregator accepts them, quorum fits."""
    entrypoint, image_files = dockerfile
    sites = []
    for service in our_services(compose).values():
        args = parse_command(service, entrypoint, monkeypatch)
        if args.command == "edge":
            sites.append(args.site)
    config = service_config(compose.services["aggregator"], image_files)

    assert sorted(sites) == sorted(config.replay.machines)
    assert sorted(sites) == sorted(config.aggregator.clients or [])
    assert config.aggregator.quorum <= len(sites)
    assert str(config.replay.data_dir) in [
        v.split(":")[1] for v in compose.services["replay"].volumes
    ]


def test_prometheus_scrapes_every_endpoint(
    compose: ComposeFile,
    dockerfile: tuple[list[str], dict[str, Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every service with --metrics-port binds all interfaces in its container and is scraped."""
    entrypoint, _ = dockerfile
    prometheus = compose.services["prometheus"]
    scrape = yaml.safe_load(
        container_file("/etc/prometheus/prometheus.yml", prometheus, {}).read_text()
    )
    targets = {
        (name, sd["port"])
        for job in scrape["scrape_configs"]
        for sd in job["dns_sd_configs"]
        for name in sd["names"]
    }
    exposed = set()
    for name, service in our_services(compose).items():
        args = parse_command(service, entrypoint, monkeypatch)
        if getattr(args, "metrics_port", None) is not None:
            exposed.add((name, args.metrics_port))
            assert args.metrics_host == "0.0.0.0"

    assert exposed
    assert targets == exposed


def test_monitoring_is_optional(compose: ComposeFile) -> None:
    """Prometheus and Grafana run only under the monitoring profile."""
    profiled = {name for name, s in compose.services.items() if s.profiles}
    assert profiled == {"prometheus", "grafana"}
    assert all(compose.services[name].profiles == ["monitoring"] for name in profiled)


def test_ports_published_on_loopback_only(compose: ComposeFile) -> None:
    """Published ports bind 127.0.0.1 on the host, never every interface."""
    for name, service in compose.services.items():
        for port in service.ports:
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port}"


def test_bind_mounts_exist(compose: ComposeFile) -> None:
    """Every relative host path that a service mounts exists in the repository."""
    for service in compose.services.values():
        for host in mounts(service).values():
            assert host.exists(), host


def exposed_metric_names() -> set[str]:
    """Return every sample name the services can expose, including labelled series not yet set."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for registry in (EdgeMetrics("probe").registry, AggregatorMetrics().registry):
        for family in registry.collect():
            names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def test_dashboard_queries_exposed_metrics(compose: ComposeFile) -> None:
    """The provisioned dashboard uses the provisioned data source and only real metric names."""
    grafana = compose.services["grafana"]
    provisioning = container_file("/etc/grafana/provisioning", grafana, {})
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    providers = yaml.safe_load((provisioning / "dashboards" / "fanomad.yaml").read_text())
    folder = container_file(providers["providers"][0]["options"]["path"], grafana, {})
    dashboards = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    uid = datasources["datasources"][0]["uid"]
    known = exposed_metric_names()

    assert dashboards
    queried = set()
    for dashboard in dashboards:
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] == uid
            for target in panel["targets"]:
                queried.update(re.findall(r"fanomad_[a-z_]+", target["expr"]))
    assert queried
    assert queried <= known, f"unknown metrics: {sorted(queried - known)}"
    for required in (
        "fanomad_consumer_lag",
        "fanomad_updates_rejected_total",
        "fanomad_epsilon_spent",
    ):
        assert required in queried


def test_required_variables_enforced() -> None:
    """Without SMD_DATA_DIR the stack does not start, instead of mounting an empty folder."""
    text = (DOCKER / "compose.yaml").read_text()
    env = {k: v for k, v in REQUIRED_ENV.items() if k != "SMD_DATA_DIR"}

    with pytest.raises(pytest.fail.Exception, match="SMD_DATA_DIR"):
        interpolate(text, env)


def test_ci_workflow_runs_ci_script() -> None:
    """The GitHub workflow runs .ci/run, and .ci/run runs `make test`, as local CI does."""
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    steps = [step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"]]
    script = (ROOT / ".ci" / "run").read_text().splitlines()

    assert steps[-1].strip() == "bash .ci/run"
    assert script[-1] == "make test"


def test_edge_state_on_named_volume(
    compose: ComposeFile,
    dockerfile: tuple[list[str], dict[str, Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every edge site checkpoints into a named volume, at a folder the image creates."""
    entrypoint, image_files = dockerfile
    dockerfile_text = (DOCKER / "Dockerfile").read_text()
    edges = [
        service
        for service in our_services(compose).values()
        if parse_command(service, entrypoint, monkeypatch).command == "edge"
    ]
    assert edges
    for service in edges:
        state_dir = service_config(service, image_files).edge.state_dir
        assert state_dir is not None
        named = {v.split(":")[1]: v.split(":")[0] for v in service.volumes}
        assert named.get(str(state_dir)) in compose.volumes
        assert f"mkdir -p /runs {state_dir}" in dockerfile_text
