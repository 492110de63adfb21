"""Clear errors when the tools the local broker needs are missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from fanomad_stream.broker.local import LocalBroker, fetch_classpath, kafka_cluster_id
from fanomad_stream.errors import BrokerError


def test_missing_maven_names_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without mvn on PATH, the fetch error names the package to install."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match=r"'mvn' was not found on PATH; install Apache Maven"):
        fetch_classpath(tmp_path / "lib")


def test_missing_java_names_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without java on PATH, the start error names the package to install."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        BrokerError, match=r"'java' was not found on PATH; install a Java 17\+ runtime"
    ):
        LocalBroker(run_dir=tmp_path / "run").start()


def test_cluster_id_format() -> None:
    """Cluster ids are 22 base64url characters and never start with '-'."""
    for _ in range(200):
        text = kafka_cluster_id()
        assert len(text) == 22
        assert not text.startswith("-")


def test_stop_without_broker_returns_false(tmp_path: Path) -> None:
    """Stopping when nothing runs from the folder is a no-op that returns False."""
    assert LocalBroker(run_dir=tmp_path).stop() is False
