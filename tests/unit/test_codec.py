"""Record codec: round trips and strict rejection of malformed records."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from fanomad_stream.errors import DecodeError
from fanomad_stream.transport import codec


def _raw_envelope(body: object, version: object = 1, kind: object = "metric") -> bytes:
    return msgpack.packb(
        {"v": version, "kind": kind, "src": "m", "ts": 1.0, "body": body}, use_bin_type=True
    )


def _array_ext(dtype: str, shape: list[int], data: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(
        codec.NDARRAY_EXT, msgpack.packb([dtype, shape, data], use_bin_type=True)
    )


class TestRoundTrip:
    def test_metric_round_trip(self) -> None:
        """A metric record decodes to the same values, dtype and envelope fields."""
        values = np.arange(38, dtype=np.float32) / 7
        raw = codec.encode("metric", {"index": 3, "values": values}, src="machine-1-2", ts=12.5)
        envelope = codec.decode(raw)
        assert envelope.kind == "metric"
        assert envelope.src == "machine-1-2"
        assert envelope.ts == 12.5
        assert envelope.body["index"] == 3
        np.testing.assert_array_equal(envelope.body["values"], values)
        assert envelope.body["values"].dtype == np.float32

    def test_big_endian_array_sent_little_endian(self) -> None:
        """Arrays of any byte order arrive with the same values in little-endian order."""
        values = np.array([1.5, -2.25], dtype=">f8")
        decoded = codec.decode(codec.encode("metric", {"values": values}, src="m", ts=0))
        np.testing.assert_array_equal(decoded.body["values"], values)
        assert decoded.body["values"].dtype.str == "<f8"

    def test_multi_megabyte_update_round_trip(self) -> None:
        """An update of 1.5M float32 parameters (6 MB) encodes and decodes exactly."""
        delta = {"w": np.linspace(-1, 1, 1_500_000, dtype=np.float32)}
        body = {"round": 0, "client_id": "a", "n_samples": 10, "base_version": 0, "delta": delta}
        raw = codec.encode("update", body, src="a", ts=0)
        assert len(raw) > 6_000_000
        np.testing.assert_array_equal(codec.decode(raw).body["delta"]["w"], delta["w"])


class TestRejection:
    @pytest.mark.parametrize(
        ("raw", "fragment"),
        [
            (b"", "empty"),
            (
                codec.encode("metric", {"values": np.ones(4, np.float32)}, src="m", ts=0)[:-5],
                "malformed msgpack",
            ),
            (b"\xc1\x00\x01", "malformed msgpack"),
            (_raw_envelope({"values": []}, version=99), "unknown schema version 99"),
            (_raw_envelope({"values": []}, kind="weather"), "unknown record kind 'weather'"),
            (msgpack.packb([1, 2, 3]), "must be a msgpack map"),
            (
                _raw_envelope({"values": _array_ext("|O", [1], b"\x00" * 8)}),
                "dtype '|O' is not allowed",
            ),
            (
                _raw_envelope({"values": _array_ext("<f4", [4], b"\x00" * 8)}),
                "needs 16 bytes, got 8",
            ),
            (_raw_envelope({"values": _array_ext("<f4", [-1], b"")}), "non-negative integers"),
            (_raw_envelope({"values": np.float32(1.0).item()}), "1-D float ndarray"),
            (_raw_envelope({}), "'values' is missing"),
        ],
        ids=[
            "empty",
            "truncated",
            "garbage",
            "unknown-version",
            "unknown-kind",
            "not-a-map",
            "object-dtype",
            "short-array-bytes",
            "negative-shape",
            "scalar-values",
            "missing-field",
        ],
    )
    def test_malformed_record_rejected(self, raw: bytes, fragment: str) -> None:
        """Every malformed record raises DecodeError whose message names the problem."""
        with pytest.raises(DecodeError, match=fragment):
            codec.decode(raw)

    def test_nan_in_metric_rejected(self) -> None:
        """A metric with NaN values is rejected with the count of bad values."""
        values = np.array([1.0, np.nan, np.inf], dtype=np.float32)
        with pytest.raises(DecodeError, match="contains 2 NaN or infinite values"):
            codec.decode(codec.encode("metric", {"values": values}, src="m", ts=0))

    def test_oversized_array_rejected(self) -> None:
        """An array above the element limit is rejected before it is materialised."""
        raw = codec.encode("metric", {"values": np.zeros(1000, np.float32)}, src="m", ts=0)
        with pytest.raises(DecodeError, match="above the limit of 100"):
            codec.decode(raw, max_array_elements=100)

    def test_oversized_record_rejected(self) -> None:
        """A record above the byte limit is rejected before parsing."""
        raw = codec.encode("metric", {"values": np.zeros(1000, np.float32)}, src="m", ts=0)
        with pytest.raises(DecodeError, match="exceeds the limit of 1000 bytes"):
            codec.decode(raw, max_record_bytes=1000)

    def test_unexpected_kind_rejected(self) -> None:
        """A valid record of the wrong kind for the topic is rejected."""
        raw = codec.encode("metric", {"values": np.ones(2, np.float32)}, src="m", ts=0)
        with pytest.raises(DecodeError, match="does not belong here"):
            codec.decode(raw, expected_kinds=frozenset({"update"}))

    def test_object_array_cannot_be_encoded(self) -> None:
        """Object arrays never leave a producer: encoding raises TypeError."""
        with pytest.raises(TypeError, match="dtype object is not allowed"):
            codec.encode("metric", {"values": np.array([{}], dtype=object)}, src="m", ts=0)
