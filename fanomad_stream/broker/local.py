"""A single-node Apache Kafka broker (KRaft, combined broker and controller) on 127.0.0.1.

The broker's classpath is assembled from Maven Central by ``pom.xml`` beside this file and kept
in the cache folder, so only the first run downloads it (about 45 MB). The broker runs as
``java -cp '<lib>/*' kafka.Kafka server.properties`` in a run folder that contains its data, its log
and a pid file, so the start, status and stop commands can be separate processes.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import structlog

from fanomad_stream.errors import BrokerError, BrokerNotReadyError

log = structlog.get_logger(__name__)

KAFKA_VERSION = "4.3.1"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies"
DEFAULT_PORT = 19092


def cache_dir() -> Path:
    """Return the folder for downloaded jars and broker data (``$FANOMAD_CACHE``)."""
    return Path(os.environ.get("FANOMAD_CACHE", Path.home() / ".cache" / "fanomad-stream"))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kafka_cluster_id() -> str:
    """Return a random cluster id: 16 bytes in unpadded base64url, never starting with '-'."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _require_tool(name: str, package_hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        msg = f"{name!r} was not found on PATH; install {package_hint} and try again"
        raise BrokerError(msg)
    return path


def fetch_classpath(lib_dir: Path | None = None) -> Path:
    """Copy the broker's jars from Maven Central into ``lib_dir`` unless they are there.

    Returns the folder with the jars. Raises BrokerError when Maven is missing or fails.
    """
    lib_dir = lib_dir or cache_dir() / f"kafka-{KAFKA_VERSION}" / "lib"
    marker = lib_dir / ".complete"
    if marker.exists():
        return lib_dir
    mvn = _require_tool("mvn", "Apache Maven 3.6+ (Debian: apt-get install maven)")
    _require_tool("java", "a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless)")
    staging = lib_dir.with_name(lib_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pom = resources.files("fanomad_stream.broker").joinpath("pom.xml")
    with resources.as_file(pom) as pom_path:
        command = [
            mvn,
            "-B",
            "-q",
            "-f",
            str(pom_path),
            DEPENDENCY_PLUGIN,
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ]
        log.info("kafka_fetch_started", version=KAFKA_VERSION, target=str(lib_dir))
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-2000:]
        msg = f"Maven failed to fetch Kafka {KAFKA_VERSION} (exit {result.returncode}):\n{tail}"
        raise BrokerError(msg)
    shutil.rmtree(lib_dir, ignore_errors=True)
    staging.rename(lib_dir)
    marker.touch()
    log.info("kafka_fetch_finished", jars=len(list(lib_dir.glob("*.jar"))))
    return lib_dir


@dataclass(frozen=True)
class ScramUser:
    """A SASL/SCRAM user written into the cluster metadata when the broker is formatted."""

    name: str
    password: str


@dataclass
class LocalBroker:
    """One Kafka process (broker and controller roles) bound to 127.0.0.1.

    ``run_dir`` keeps ``server.properties``, the data folder, ``broker.log`` and
    ``broker.pid``. A second ``LocalBroker`` pointed at the same ``run_dir`` can read the
    status of, or stop, a broker that another process started.
    """

    run_dir: Path
    port: int = DEFAULT_PORT
    controller_port: int | None = None
    sasl_port: int | None = None
    scram_users: tuple[ScramUser, ...] = ()
    # A TLS listener needs a PEM file with the broker's private key (PKCS#8) and certificate
    # chain. ssl_key_password is needed only when that key is encrypted.
    # NOTE: Kafka 4.3.1 on Java 17 failed to load a PBES2-encrypted key ("PBES2 SecretKeyFactory
    # not available"), which is the encryption `cryptography` writes; unencrypted keys load.
    ssl_port: int | None = None
    ssl_keystore_pem: Path | None = None
    ssl_key_password: str | None = None
    heap_mb: int = 512
    extra_properties: dict[str, str] = field(default_factory=dict)
    # The process this object started, kept so that it is reaped, not garbage-collected while
    # it runs (which warns "subprocess is still running").
    _process: subprocess.Popen[bytes] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "broker.log"

    def pid(self) -> int | None:
        """Return the pid of the running broker, or None when none runs from ``run_dir``."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def start(self, timeout_s: float = 90.0) -> None:
        """Format the storage (first start only), launch the JVM and wait until it responds.

        Raises BrokerError when the process exits early and BrokerNotReadyError when it does
        not respond to a metadata request within ``timeout_s``. The log tail is in the message.
        """
        if self.pid() is not None:
            msg = f"a broker already runs from {self.run_dir} (pid {self.pid()}); stop it first"
            raise BrokerError(msg)
        java = _require_tool("java", "a Java 17+ runtime (apt-get install openjdk-17-jre-headless)")
        lib_dir = fetch_classpath()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        properties = self._write_properties()
        jvm = self._jvm_options()
        classpath = str(lib_dir / "*")
        if not (self.run_dir / "data" / "meta.properties").exists():
            self._format(java, jvm, classpath, properties)

        with self.log_file.open("ab") as out:
            process = subprocess.Popen(
                [java, *jvm, "-cp", classpath, "kafka.Kafka", str(properties)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._process = process
        self.pid_file.write_text(str(process.pid))
        log.info("broker_starting", pid=process.pid, bootstrap=self.bootstrap_servers)
        self._wait_ready(process, timeout_s)
        log.info("broker_started", pid=process.pid, bootstrap=self.bootstrap_servers)

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Send SIGTERM and wait; SIGKILL after ``timeout_s``. Returns False if none ran."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                break
            time.sleep(0.2)
        else:
            log.warning("broker_stop_timed_out", pid=pid, timeout_s=timeout_s)
            os.kill(pid, signal.SIGKILL)
        if self._process is not None:
            self._process.wait()  # reap our own child so it does not linger as a zombie
            self._process = None
        self.pid_file.unlink(missing_ok=True)
        if self._process is not None:
            self._process.poll()  # records the exit status, also when _alive reaped it
            self._process = None
        log.info("broker_stopped", pid=pid)
        return True

    def is_ready(self, timeout_s: float = 5.0) -> bool:
        """Return True when the broker responds to a metadata request."""
        # Until the port accepts connections, aiokafka would log a connection error per try.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                pass
        except OSError:
            return False
        try:
            asyncio.run(_describe_cluster(self.bootstrap_servers, timeout_s))
        except Exception:  # any failure means "not ready"; the caller decides what to do
            return False
        return True

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no broker log)"

    def _jvm_options(self) -> list[str]:
        log_config = resources.files("fanomad_stream.broker").joinpath("log4j2.properties")
        tmp = self.run_dir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return [
            f"-Xms{min(256, self.heap_mb)}m",
            f"-Xmx{self.heap_mb}m",
            "-XX:+ExitOnOutOfMemoryError",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log_config}",
            # zstd-jni and snappy-java unpack native code into these; /tmp may be noexec.
            f"-DZstdTempFolder={tmp}",
            f"-Dorg.xerial.snappy.tempdir={tmp}",
        ]

    def _format(self, java: str, jvm: list[str], classpath: str, properties: Path) -> None:
        command = [java, *jvm, "-cp", classpath, "kafka.tools.StorageTool", "format"]
        command += ["-t", kafka_cluster_id(), "-c", str(properties)]
        for user in self.scram_users:
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                command += [
                    "--add-scram",
                    f"{mechanism}=[name={user.name},password={user.password}]",
                ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            msg = f"formatting Kafka storage in {self.run_dir} failed:\n{result.stdout[-1500:]}"
            raise BrokerError(msg + result.stderr[-1500:])

    def _write_properties(self) -> Path:
        controller_port = self.controller_port or free_port()
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        if self.sasl_port is not None:
            listeners.append(f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}")
        if self.ssl_port is not None:
            listeners.append(f"SSL://127.0.0.1:{self.ssl_port}")
        values = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
            "listeners": ",".join([*listeners, f"CONTROLLER://127.0.0.1:{controller_port}"]),
            "advertised.listeners": ",".join(listeners),
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": (
                "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SSL:SSL"
            ),
            "log.dirs": str(self.run_dir / "data"),
            "num.partitions": "1",
            # One node: internal topics can have only one replica.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "log.segment.bytes": str(16 * 1024 * 1024),
            # Model updates of several MB travel as single records; topics may raise it further.
            "message.max.bytes": str(16 * 1024 * 1024),
            "replica.fetch.max.bytes": str(16 * 1024 * 1024),
        }
        if self.sasl_port is not None:
            values["sasl.enabled.mechanisms"] = "SCRAM-SHA-256,SCRAM-SHA-512"
            for mechanism in ("scram-sha-256", "scram-sha-512"):
                key = f"listener.name.sasl_plaintext.{mechanism}.sasl.jaas.config"
                values[key] = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        if self.ssl_port is not None:
            values.update(self._ssl_properties())
        values.update(self.extra_properties)
        path = self.run_dir / "server.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
        return path

    def _ssl_properties(self) -> dict[str, str]:
        if self.ssl_keystore_pem is None:
            msg = (
                "ssl_port is set but ssl_keystore_pem is not; give the PEM key and certificate file"
            )
            raise BrokerError(msg)
        values = {
            "listener.name.ssl.ssl.keystore.type": "PEM",
            "listener.name.ssl.ssl.keystore.location": str(self.ssl_keystore_pem),
            "listener.name.ssl.ssl.client.auth": "none",
        }
        if self.ssl_key_password is not None:
            values["listener.name.ssl.ssl.key.password"] = self.ssl_key_password
        return values

    def _wait_ready(self, process: subprocess.Popen[bytes], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                msg = f"Kafka exited with code {process.returncode} during start-up:\n"
                raise BrokerError(msg + self.log_tail())
            if self.is_ready(timeout_s=3.0):
                return
            time.sleep(0.5)
        msg = f"Kafka on {self.bootstrap_servers} did not respond to a metadata request within {timeout_s:.0f} s:\n"
        raise BrokerNotReadyError(msg + self.log_tail())


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass  # not our child: fall back to a signal-0 probe
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _describe_cluster(bootstrap: str, timeout_s: float) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        await asyncio.wait_for(admin.describe_cluster(), timeout_s)
    finally:
        await admin.close()
