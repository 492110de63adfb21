"""Body schemas of the log and span record kinds."""

from __future__ import annotations

from typing import Any

import pytest

from fanomad_stream.errors import DecodeError
from fanomad_stream.featurize.trace_assembly import Span
from fanomad_stream.replay.logs import LogRecord
from fanomad_stream.transport.codec import MAX_LOG_LINE_CHARS, decode, encode


def log_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "source": "R02-M1-N0",
        "line": "KERNEL INFO cache parity error corrected",
    }
    body.update(changes)
    return body


def span_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "trace_id": "b0103bb0161ad7fa352fe1828eeb643a",
        "span_id": "520b067330e3ede5",
        "parent_id": "",
        "service": "ts-gateway-service",
        "operation": "/*",
        "start_us": 1674981768697000,
        "duration_us": 318316,
    }
    body.update(changes)
    return body


def roundtrip(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    return decode(encode(kind, body, src="replay", ts=1.0), expected_kinds=frozenset({kind})).body


def test_log_roundtrip_with_optional_fields() -> None:
    """A log record with level and index decodes to the same body."""
    body = log_body(level="INFO", index=7)
    assert roundtrip("log", body) == body


def test_span_roundtrip_with_status() -> None:
    """A span with status and pod decodes to the same body."""
    body = span_body(status="ERROR", pod="ts-gateway-service-6f6cfc45b-h5m2n")
    assert roundtrip("span", body) == body


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (log_body(line=None), "'line' must be a string"),
        (log_body(source=""), "'source' must not be empty"),
        (log_body(line="x" * (MAX_LOG_LINE_CHARS + 1)), "above the limit"),
        (log_body(index=-1), "'index' must be >= 0"),
        (log_body(level=3), "'level' must be a string"),
        (log_body(event=5), "'event' must be a string"),
        ({"line": "no source"}, "'source' is missing"),
    ],
)
def test_log_rejects_invalid_body(body: dict[str, Any], reason: str) -> None:
    """Each invalid log body raises DecodeError naming the field."""
    with pytest.raises(DecodeError, match=reason):
        roundtrip("log", body)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (span_body(start_us=-5), "'start_us' must be >= 0"),
        (span_body(duration_us=1.5), "'duration_us' must be an integer"),
        (span_body(trace_id=""), "'trace_id' must not be empty"),
        (span_body(span_id="a" * 129), "above the limit of 128"),
        (span_body(parent_id="520b067330e3ede5"), "names itself as its parent"),
        (span_body(service=None), "'service' must be a string"),
        ({k: v for k, v in span_body().items() if k != "parent_id"}, "'parent_id' is missing"),
    ],
)
def test_span_rejects_invalid_body(body: dict[str, Any], reason: str) -> None:
    """Each invalid span body raises DecodeError naming the field."""
    with pytest.raises(DecodeError, match=reason):
        roundtrip("span", body)


def test_log_record_travels_through_codec() -> None:
    """A log record encoded with to_body decodes back to an equal record."""
    record = LogRecord(ts=12.5, source="node-1", line="KERNEL INFO ok", level="INFO")
    envelope = decode(encode("log", record.to_body(3), src="replay", ts=record.ts))
    assert envelope.body["index"] == 3
    assert LogRecord.from_body(envelope.body, envelope.ts) == record


def test_parsed_log_record_keeps_its_event_id() -> None:
    """A record with a shipper's event id decodes with that id; one without has none."""
    record = LogRecord(ts=1.0, source="blk_7", line="", event="22")
    body = record.to_body(0)
    assert body["event"] == "22"
    assert "event" not in LogRecord(ts=1.0, source="n", line="x").to_body(0)
    envelope = decode(encode("log", body, src="replay", ts=record.ts))
    assert LogRecord.from_body(envelope.body, envelope.ts) == record


def test_span_travels_through_codec() -> None:
    """A span encoded with to_body decodes back to an equal span."""
    span = Span("t" * 32, "s" * 16, "", "ts-gateway-service", "/*", 1674981768697000, 318316)
    envelope = decode(encode("span", span.to_body(), src="replay", ts=span.start_us / 1e6))
    assert Span.from_body(envelope.body) == span
