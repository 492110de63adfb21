"""The small JSON file ``edge.json`` in a site's state folder that keeps it from sending twice.

``last_update_round`` is the last round whose update the broker acknowledged.
``sending_round`` is set just before an update is sent and cleared once it is acknowledged, so
a client that finds it after a crash treats the outcome of that send as unknown. It checks
``fl.updates`` before it trains for that round again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from structlog.typing import FilteringBoundLogger

from fanomad_stream.config import KafkaSettings
from fanomad_stream.transport.reader import read_topic

SITE_STATE_FILE = "edge.json"


@dataclass(frozen=True)
class SiteState:
    last_update_round: int = -1
    sending_round: int | None = None


def read_site_state(path: Path) -> SiteState:
    """Read the file; a missing file is a site that never sent an update.

    Raises ValueError when the file exists but does not hold a valid state.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return SiteState()
    try:
        raw = json.loads(text)
        sending = raw.get("sending_round")
        return SiteState(
            last_update_round=int(raw["last_update_round"]),
            sending_round=None if sending is None else int(sending),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        msg = f"edge state file {path} is invalid ({err!r}); delete it to start without it"
        raise ValueError(msg) from err


def write_site_state(path: Path, state: SiteState) -> None:
    """Replace the file atomically, with mode 0600 in a folder with mode 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    body: dict[str, int] = {"last_update_round": state.last_update_round}
    if state.sending_round is not None:
        body["sending_round"] = state.sending_round
    partial = path.with_name(path.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps(body))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


class SiteRounds:
    """The rounds one site has sent, kept in ``<folder>/edge.json`` across restarts.

    ``folder`` None keeps nothing on disk. A failed write is logged and sending goes on: a
    lost write risks a second send of a round after a crash, and the aggregator rejects a
    second update of one client while its round is open.
    """

    def __init__(
        self,
        folder: Path | None,
        *,
        kafka: KafkaSettings,
        site: str,
        model_name: str,
        logger: FilteringBoundLogger,
    ) -> None:
        self.path = None if folder is None else folder / SITE_STATE_FILE
        self._kafka = kafka
        self._site = site
        self._model_name = model_name
        self._log = logger

    def read(self) -> SiteState:
        """Return the saved state; an unreadable file is logged and counts as no state."""
        if self.path is None:
            return SiteState()
        try:
            return read_site_state(self.path)
        except (OSError, ValueError) as err:
            self._log.error("edge_state_unreadable", path=str(self.path), error=str(err))
            return SiteState()

    def write(self, state: SiteState) -> None:
        if self.path is None:
            return
        try:
            write_site_state(self.path, state)
        except OSError as err:
            self._log.error(
                "edge_state_write_failed",
                path=str(self.path),
                error=str(err),
                last_update_round=state.last_update_round,
            )

    async def last_sent(self, known: int) -> int:
        """Return the last round sent, settling a send that a crash left unknown.

        ``known`` is the last round another record (a checkpoint) has. A ``sending_round``
        above it is looked up on ``fl.updates``, and the file is rewritten without it.
        """
        state = self.read()
        last = max(known, state.last_update_round)
        pending = state.sending_round
        if pending is not None and pending > last:
            if await self._update_was_sent(pending):
                last = pending
            self.write(SiteState(last))
        return last

    async def _update_was_sent(self, round_id: int) -> bool:
        """Return True when ``fl.updates`` contains this site's update for ``round_id``."""
        updates = await read_topic(self._kafka, "fl.updates", frozenset({"update"}))
        found = any(
            update.key == self._site
            and update.envelope.body.get("client_id") == self._site
            and update.envelope.body.get("round") == round_id
            and update.envelope.body.get("model") == self._model_name
            for update in updates
        )
        self._log.info("update_send_checked", round=round_id, found=found)
        return found
