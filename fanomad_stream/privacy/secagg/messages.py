"""Message shapes, stage names and errors of the secure aggregation protocol.

A message is a msgpack-ready dict ``{"round", "stage", "sender", "recipient", "body"}``. The
transport carries it on a control topic keyed by ``recipient``; the server's id is
``SERVER_ID``. Messages are idempotent by (round, stage, sender): a redelivered copy is
ignored by the server and answered from cache by a client.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from fanomad_stream.errors import FanomadError

Message: TypeAlias = dict[str, Any]

SERVER_ID = "server"

# Client → server stages, in protocol order (Bonawitz et al., CCS 2017, rounds 0, 1, 2 and 4).
ADVERTISE_KEYS = "advertise_keys"
SHARE_KEYS = "share_keys"
MASKED_INPUT = "masked_input"
UNMASK = "unmask"

# Server → client stages.
KEY_LIST = "key_list"
ROUTED_SHARES = "routed_shares"
UNMASK_REQUEST = "unmask_request"
ABORT = "abort"


class ProtocolError(FanomadError):
    """A peer sent a message that breaks the protocol (wrong stage, inconsistent sets, bad size)."""


class RoundAbortedError(FanomadError):
    """The round ended without a result; the global model must stay as it was."""


def make_message(
    round_id: int, stage: str, sender: str, recipient: str, body: dict[str, Any]
) -> Message:
    """Return a protocol message."""
    return {
        "round": round_id,
        "stage": stage,
        "sender": sender,
        "recipient": recipient,
        "body": body,
    }


def check_threshold(threshold: int, cohort: int) -> None:
    """Raise ValueError unless cohort / 2 < threshold <= cohort and threshold >= 2.

    A threshold above half the cohort means two disjoint groups of clients can never both reach
    it, so a server that tells some clients "v dropped" and others "v survived" cannot collect
    enough shares of both of v's secrets.
    """
    if not (threshold >= 2 and cohort < 2 * threshold and threshold <= cohort):
        msg = (
            f"threshold must be >= 2 and in ({cohort / 2}, {cohort}] for a cohort of {cohort} "
            f"clients, got {threshold}"
        )
        raise ValueError(msg)
