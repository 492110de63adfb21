"""The edge client's small state file that survives a restart."""

from __future__ import annotations

from pathlib import Path

from fanomad_stream.config import parse_config
from fanomad_stream.edge.client import EdgeClient
from fanomad_stream.edge.site_state import SiteState


def _client(state_dir: Path | None) -> EdgeClient:
    config = parse_config({"edge": {"state_dir": str(state_dir) if state_dir else None}})
    return EdgeClient(config, site="site-a", sources=["m"])


def test_last_round_survives_restart(tmp_path: Path) -> None:
    """A restarted client knows the last round it sent, so it sends no second update for it."""
    _client(tmp_path)._write_site_state(SiteState(4))
    restarted = _client(tmp_path)
    assert restarted._read_site_state() == SiteState(4)
    assert (tmp_path / "site-a" / "edge.json").exists()


def test_sending_round_is_kept(tmp_path: Path) -> None:
    """A send cut short by a crash leaves its round in the file for the restart to check."""
    _client(tmp_path)._write_site_state(SiteState(4, sending_round=5))
    assert _client(tmp_path)._read_site_state() == SiteState(4, sending_round=5)


def test_missing_or_corrupt_state_starts_fresh(tmp_path: Path) -> None:
    """No file, or an unreadable one, means no update was sent yet."""
    assert _client(tmp_path)._read_site_state() == SiteState()
    (tmp_path / "site-a").mkdir()
    (tmp_path / "site-a" / "edge.json").write_text("{not json")
    assert _client(tmp_path)._read_site_state() == SiteState()
    (tmp_path / "site-a" / "edge.json").write_text('{"last_update_round": "x"}')
    assert _client(tmp_path)._read_site_state() == SiteState()


def test_no_state_dir_keeps_no_file(tmp_path: Path) -> None:
    client = _client(None)
    client._write_site_state(SiteState(2))
    assert client._read_site_state() == SiteState()
    assert list(tmp_path.iterdir()) == []
