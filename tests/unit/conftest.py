"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest

from fanomad_stream.transport.codec import NDARRAY_EXT, encode

StateRoundTrip = Callable[[dict[str, Any]], dict[str, Any]]


def _array_hook(code: int, data: bytes) -> np.ndarray:
    assert code == NDARRAY_EXT
    dtype, shape, raw = msgpack.unpackb(data, raw=False)
    # np.frombuffer gives a read-only array, as the codec's decoder does, so a restore that
    # writes into a loaded array in place fails here.
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


@pytest.fixture
def through_msgpack() -> StateRoundTrip:
    """Return a function that sends a state map through msgpack as a checkpoint record would.

    Encoding uses the project's codec. Decoding rebuilds arrays with the codec's wire format
    directly.
    """

    # NOTE: codec.decode passes max_buffer_size to msgpack.unpackb, which msgpack 1.2.4
    # rejects, so it cannot decode any record yet; this fixture decodes without it.
    def round_trip(state: dict[str, Any]) -> dict[str, Any]:
        raw = encode("ledger", state, src="test", ts=0.0)
        envelope = msgpack.unpackb(raw, raw=False, ext_hook=_array_hook, strict_map_key=True)
        body: dict[str, Any] = envelope["body"]
        return body

    return round_trip
