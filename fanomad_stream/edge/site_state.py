"""The small JSON file ``<state_dir>/<site>/edge.json`` that keeps a site from sending twice.

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
