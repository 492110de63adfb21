"""The edge client's small state file that survives a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import structlog

from fanomad_stream.config import parse_config
from fanomad_stream.edge.client import EdgeClient
from fanomad_stream.edge.site_state import SiteState
from fanomad_stream.edge.stream_client import ModalityEdgeClient
from fanomad_stream.modalities import modality_config
from fanomad_stream.service.runner import SteppedService


def _client(state_dir: Path | None) -> EdgeClient:
    config = parse_config({"edge": {"state_dir": str(state_dir) if state_dir else None}})
    return EdgeClient(config, site="site-a", sources=["m"])


def test_last_round_survives_restart(tmp_path: Path) -> None:
    """A restarted client knows the last round it sent, so it sends no second update for it."""
    _client(tmp_path).rounds.write(SiteState(4))
    restarted = _client(tmp_path)
    assert restarted.rounds.read() == SiteState(4)
    assert (tmp_path / "site-a" / "edge.json").exists()


def test_sending_round_is_kept(tmp_path: Path) -> None:
    """A send cut short by a crash leaves its round in the file for the restart to check."""
    _client(tmp_path).rounds.write(SiteState(4, sending_round=5))
    assert _client(tmp_path).rounds.read() == SiteState(4, sending_round=5)


def test_missing_or_corrupt_state_starts_fresh(tmp_path: Path) -> None:
    """No file, or an unreadable one, means no update was sent yet."""
    assert _client(tmp_path).rounds.read() == SiteState()
    (tmp_path / "site-a").mkdir()
    (tmp_path / "site-a" / "edge.json").write_text("{not json")
    assert _client(tmp_path).rounds.read() == SiteState()
    (tmp_path / "site-a" / "edge.json").write_text('{"last_update_round": "x"}')
    assert _client(tmp_path).rounds.read() == SiteState()


def test_no_state_dir_keeps_no_file(tmp_path: Path) -> None:
    client = _client(None)
    client.rounds.write(SiteState(2))
    assert client.rounds.read() == SiteState()
    assert list(tmp_path.iterdir()) == []


def _modality_client(state_dir: Path) -> ModalityEdgeClient:
    config = parse_config({"edge": {"state_dir": str(state_dir)}, "logs": {"state_dir": "x"}})
    return ModalityEdgeClient(
        modality_config(config, "logs"), site="site-a", modality="logs", sources=None
    )


def test_modality_client_keeps_its_rounds_apart(tmp_path: Path) -> None:
    """A logs client of the site keeps its own edge.json beside its checkpoint."""
    _modality_client(tmp_path).rounds.write(SiteState(3))
    assert (tmp_path / "site-a" / "logs" / "edge.json").exists()
    assert _client(tmp_path).rounds.read() == SiteState()
    assert _modality_client(tmp_path).rounds.read() == SiteState(3)


@pytest.mark.parametrize(("found", "expected"), [(True, 5), (False, 4)])
async def test_unknown_send_is_looked_up_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, found: bool, expected: int
) -> None:
    """A send a crash cut short counts as sent only when fl.updates contains it."""
    rounds = _modality_client(tmp_path).rounds
    rounds.write(SiteState(4, sending_round=5))
    looked_up: list[int] = []

    async def update_was_sent(round_id: int) -> bool:
        looked_up.append(round_id)
        return found

    monkeypatch.setattr(rounds, "_update_was_sent", update_was_sent)
    assert await rounds.last_sent(-1) == expected
    assert rounds.read() == SiteState(expected)  # the unknown send is settled on disk
    assert await rounds.last_sent(-1) == expected
    assert looked_up == [5]


async def test_newer_checkpoint_round_skips_lookup(tmp_path: Path) -> None:
    rounds = _modality_client(tmp_path).rounds
    rounds.write(SiteState(4, sending_round=5))
    assert await rounds.last_sent(6) == 6


class _Blocked(SteppedService):
    def __init__(self) -> None:
        super().__init__(0.2, structlog.get_logger("test"))
        self.steps = 0

    async def step(self) -> int:
        self.steps += 1
        if self.steps == 2:
            await asyncio.Event().wait()  # a step stuck on a broker that is down
        return 0


async def test_stuck_step_is_abandoned_after_the_stop_timeout() -> None:
    service = _Blocked()
    task = asyncio.create_task(service.run())
    while service.steps < 2:
        await asyncio.sleep(0.01)
    service.request_stop()
    await asyncio.wait_for(task, 5.0)
    assert service.steps == 2


async def test_close_that_hangs_is_logged_not_raised() -> None:
    service = _Blocked()
    await asyncio.wait_for(service._close("consumer", asyncio.Event().wait()), 5.0)
