"""The edge client's small state file that survives a restart."""

from __future__ import annotations

from pathlib import Path

from fanomad_stream.config import parse_config
from fanomad_stream.edge.client import EdgeClient


def _client(state_dir: Path | None) -> EdgeClient:
    config = parse_config({"edge": {"state_dir": str(state_dir) if state_dir else None}})
    return EdgeClient(config, site="site-a", sources=["m"])


def test_last_round_survives_restart(tmp_path: Path) -> None:
    """A restarted client knows the last round it sent, so it sends no second update for it."""
    first = _client(tmp_path)
    first.last_update_round = 4
    first._save_last_update_round()
    restarted = _client(tmp_path)
    assert restarted._load_last_update_round() == 4
    assert (tmp_path / "site-a" / "edge.json").exists()


def test_missing_or_corrupt_state_starts_fresh(tmp_path: Path) -> None:
    """No file, or an unreadable one, means no update was sent yet."""
    assert _client(tmp_path)._load_last_update_round() == -1
    (tmp_path / "site-a").mkdir()
    (tmp_path / "site-a" / "edge.json").write_text("{not json")
    assert _client(tmp_path)._load_last_update_round() == -1


def test_no_state_dir_keeps_no_file(tmp_path: Path) -> None:
    client = _client(None)
    client.last_update_round = 2
    client._save_last_update_round()
    assert client._load_last_update_round() == -1
    assert list(tmp_path.iterdir()) == []
