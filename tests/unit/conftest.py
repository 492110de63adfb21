"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from fanomad_stream.transport.codec import decode, encode

StateRoundTrip = Callable[[dict[str, Any]], dict[str, Any]]


@pytest.fixture
def through_msgpack() -> StateRoundTrip:
    """Return a function that sends a state map through the record codec, as a checkpoint would."""

    def round_trip(state: dict[str, Any]) -> dict[str, Any]:
        return decode(encode("ledger", state, src="test", ts=0.0)).body

    return round_trip
