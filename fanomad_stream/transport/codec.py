"""msgpack envelope for every record the system writes to Kafka.

A record value is one msgpack map ``{"v": 1, "kind": str, "src": str, "ts": float, "body": map}``.
numpy arrays travel as msgpack extension type 1 whose data is itself msgpack
``[dtype, shape, raw little-endian bytes]``; the dtype must be on an allow-list, so object
arrays (and so pickle) can never appear. Decoding is strict: size limits are checked before
parsing, the envelope and the body of each known kind are validated, and every failure raises
DecodeError with the reason, which the consumer turns into a dead-letter record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from fanomad_stream.errors import DecodeError

SCHEMA_VERSION = 1
NDARRAY_EXT = 1

# dtypes a record may carry. Arrays are always sent little-endian.
ALLOWED_DTYPES = frozenset(
    {"<f4", "<f8", "<f2", "<i8", "<i4", "<i2", "|i1", "<u8", "<u4", "<u2", "|u1", "|b1"}
)

DEFAULT_MAX_RECORD_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_ARRAY_ELEMENTS = 8 * 1024 * 1024


@dataclass(frozen=True)
class Envelope:
    """A decoded record: schema version, kind, producer id, event time (s) and body."""

    kind: str
    src: str
    ts: float
    body: dict[str, Any]
    v: int = SCHEMA_VERSION


def _ext_default(obj: object) -> object:
    if isinstance(obj, np.ndarray):
        return msgpack.ExtType(NDARRAY_EXT, _pack_array(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    msg = f"cannot encode a value of type {type(obj).__name__}; use numbers, str, bytes, lists, maps or numpy arrays"
    raise TypeError(msg)


def _pack_array(array: np.ndarray) -> bytes:
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    dtype = little.dtype.str
    if dtype not in ALLOWED_DTYPES:
        msg = f"array dtype {array.dtype!s} is not allowed; allowed: {sorted(ALLOWED_DTYPES)}"
        raise TypeError(msg)
    data = np.ascontiguousarray(little).tobytes()
    return msgpack.packb([dtype, list(little.shape), data], use_bin_type=True)


class _ArrayDecoder:
    """msgpack ext hook that rebuilds allow-listed arrays and counts their elements."""

    def __init__(self, max_elements: int) -> None:
        self.max_elements = max_elements
        self.elements = 0

    def __call__(self, code: int, data: bytes) -> np.ndarray:
        if code != NDARRAY_EXT:
            raise DecodeError(
                f"unknown msgpack extension type {code}; only {NDARRAY_EXT} (ndarray) is defined"
            )
        try:
            dtype, shape, raw = msgpack.unpackb(data, raw=False, use_list=True)
        except (ValueError, TypeError, msgpack.UnpackException) as err:
            raise DecodeError(f"malformed ndarray extension: {err}") from err
        if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
            raise DecodeError(
                f"ndarray dtype {dtype!r} is not allowed; allowed: {sorted(ALLOWED_DTYPES)}"
            )
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise DecodeError(f"ndarray shape {shape!r} must be a list of non-negative integers")
        if not isinstance(raw, bytes):
            raise DecodeError("ndarray data must be msgpack bin bytes")
        count = math.prod(shape)
        self.elements += count
        if self.elements > self.max_elements:
            raise DecodeError(
                f"record carries {self.elements} array elements, above the limit of {self.max_elements}"
            )
        expected = count * np.dtype(dtype).itemsize
        if len(raw) != expected:
            raise DecodeError(
                f"ndarray of dtype {dtype} and shape {shape} needs {expected} bytes, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)


def encode(kind: str, body: Mapping[str, Any], *, src: str, ts: float) -> bytes:
    """Encode one record. Raises TypeError for values that cannot travel (object arrays)."""
    envelope = {"v": SCHEMA_VERSION, "kind": kind, "src": src, "ts": float(ts), "body": dict(body)}
    return msgpack.packb(envelope, default=_ext_default, use_bin_type=True)


def decode(
    raw: bytes | None,
    *,
    expected_kinds: frozenset[str] | None = None,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_array_elements: int = DEFAULT_MAX_ARRAY_ELEMENTS,
) -> Envelope:
    """Decode and validate one record value.

    Raises DecodeError naming the problem: empty, oversized, truncated or malformed bytes, an
    unknown schema version, an unexpected kind, or a body that fails its kind's schema.
    """
    if raw is None or len(raw) == 0:
        raise DecodeError("record value is empty")
    if len(raw) > max_record_bytes:
        raise DecodeError(
            f"record of {len(raw)} bytes exceeds the limit of {max_record_bytes} bytes"
        )
    hook = _ArrayDecoder(max_array_elements)
    # msgpack 1.2's unpackb takes no max_buffer_size; the length check above bounds the input.
    try:
        obj = msgpack.unpackb(
            raw,
            raw=False,
            ext_hook=hook,
            strict_map_key=True,
        )
    except DecodeError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise DecodeError(f"malformed msgpack: {type(err).__name__}: {err}") from err
    return _validate_envelope(obj, expected_kinds)


def _validate_envelope(obj: object, expected_kinds: frozenset[str] | None) -> Envelope:
    if not isinstance(obj, dict):
        raise DecodeError(f"record must be a msgpack map, got {type(obj).__name__}")
    version = obj.get("v")
    if version != SCHEMA_VERSION:
        raise DecodeError(
            f"unknown schema version {version!r}; this build reads version {SCHEMA_VERSION}"
        )
    kind, src, ts, body = obj.get("kind"), obj.get("src"), obj.get("ts"), obj.get("body")
    if not isinstance(kind, str) or kind not in BODY_SCHEMAS:
        raise DecodeError(f"unknown record kind {kind!r}; known kinds: {sorted(BODY_SCHEMAS)}")
    if expected_kinds is not None and kind not in expected_kinds:
        raise DecodeError(
            f"record kind {kind!r} does not belong here; expected one of {sorted(expected_kinds)}"
        )
    if not isinstance(src, str):
        raise DecodeError(f"record field 'src' must be a string, got {type(src).__name__}")
    if not isinstance(ts, float | int) or isinstance(ts, bool) or not math.isfinite(ts):
        raise DecodeError(f"record field 'ts' must be a finite number, got {ts!r}")
    if not isinstance(body, dict):
        raise DecodeError(f"record field 'body' must be a map, got {type(body).__name__}")
    BODY_SCHEMAS[kind](body)
    return Envelope(kind=kind, src=src, ts=float(ts), body=body)


# --- body schemas -------------------------------------------------------------------------

Check = Callable[[str, object], None]


def _need(body: dict[str, Any], name: str, check: Check) -> None:
    if name not in body:
        raise DecodeError(f"body field {name!r} is missing")
    check(name, body[name])


def _maybe(body: dict[str, Any], name: str, check: Check) -> None:
    if body.get(name) is not None:
        check(name, body[name])


def _string(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise DecodeError(f"body field {name!r} must be a string, got {type(value).__name__}")


def _integer(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise DecodeError(f"body field {name!r} must be an integer, got {value!r}")


def _non_negative_int(name: str, value: object) -> None:
    _integer(name, value)
    if value < 0:  # type: ignore[operator]
        raise DecodeError(f"body field {name!r} must be >= 0, got {value!r}")


def _finite(name: str, value: object) -> None:
    if not isinstance(value, float | int) or isinstance(value, bool) or not math.isfinite(value):
        raise DecodeError(f"body field {name!r} must be a finite number, got {value!r}")


def _bounded_string(max_chars: int, *, allow_empty: bool = True) -> Check:
    def check(name: str, value: object) -> None:
        if not isinstance(value, str):
            raise DecodeError(f"body field {name!r} must be a string, got {type(value).__name__}")
        length = len(value)
        if length > max_chars:
            msg = f"body field {name!r} has {length} characters, above the limit of {max_chars}"
            raise DecodeError(msg)
        if length == 0 and not allow_empty:
            raise DecodeError(f"body field {name!r} must not be empty")

    return check


def _map(name: str, value: object) -> None:
    if not isinstance(value, dict):
        raise DecodeError(f"body field {name!r} must be a map, got {type(value).__name__}")


def _float_vector(name: str, value: object) -> None:
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind != "f":
        raise DecodeError(
            f"body field {name!r} must be a 1-D float ndarray, got {_describe(value)}"
        )
    if value.size == 0:
        raise DecodeError(f"body field {name!r} is empty")
    if not np.isfinite(value).all():
        bad = int(np.count_nonzero(~np.isfinite(value)))
        raise DecodeError(f"body field {name!r} contains {bad} NaN or infinite values")


def _weights(name: str, value: object) -> None:
    """Check a map of parameter name to a finite float ndarray."""
    if not isinstance(value, dict) or not value:
        raise DecodeError(f"body field {name!r} must be a non-empty map of name to ndarray")
    for key, array in value.items():
        if not isinstance(key, str) or not isinstance(array, np.ndarray) or array.dtype.kind != "f":
            raise DecodeError(f"{name}[{key!r}] must be a float ndarray, got {_describe(array)}")
        if not np.isfinite(array).all():
            raise DecodeError(f"{name}[{key!r}] contains NaN or infinite values")


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"ndarray of dtype {value.dtype} and shape {value.shape}"
    return type(value).__name__


def _metric(body: dict[str, Any]) -> None:
    _need(body, "values", _float_vector)
    _maybe(body, "index", _non_negative_int)


# Upper bounds on text fields, so one record cannot carry an unbounded string into a featurizer.
# NOTE: drain3 compares a line with every template of its token count, so long lines of new
# words stay slow within this bound. A 3,000-token line took about 28 ms once 1,000 such
# templates existed (drain3 0.9.11, one core of the 2-core development VM).
MAX_LOG_LINE_CHARS = 65_536
MAX_NAME_CHARS = 1024
MAX_ID_CHARS = 128


def _log(body: dict[str, Any]) -> None:
    _need(body, "source", _bounded_string(MAX_NAME_CHARS, allow_empty=False))
    _need(body, "line", _bounded_string(MAX_LOG_LINE_CHARS))
    _maybe(body, "level", _bounded_string(MAX_NAME_CHARS))
    _maybe(body, "index", _non_negative_int)
    _maybe(body, "event", _bounded_string(MAX_NAME_CHARS))


def _span(body: dict[str, Any]) -> None:
    """Check one span body; ``parent_id`` is the empty string for a root span."""
    _need(body, "trace_id", _bounded_string(MAX_ID_CHARS, allow_empty=False))
    _need(body, "span_id", _bounded_string(MAX_ID_CHARS, allow_empty=False))
    _need(body, "parent_id", _bounded_string(MAX_ID_CHARS))
    _need(body, "service", _bounded_string(MAX_NAME_CHARS, allow_empty=False))
    _need(body, "operation", _bounded_string(MAX_NAME_CHARS))
    _need(body, "start_us", _non_negative_int)
    _need(body, "duration_us", _non_negative_int)
    _maybe(body, "status", _bounded_string(MAX_NAME_CHARS))
    _maybe(body, "pod", _bounded_string(MAX_NAME_CHARS))
    if body["span_id"] == body["parent_id"]:
        raise DecodeError(f"span {body['span_id']!r} names itself as its parent")


def _label(body: dict[str, Any]) -> None:
    _need(body, "index", _non_negative_int)
    _need(body, "label", _non_negative_int)


def _score(body: dict[str, Any]) -> None:
    _need(body, "index", _integer)
    _need(body, "score", _finite)
    _need(body, "threshold", _finite)
    _need(body, "model_version", _integer)
    _need(body, "modality", _string)


def _alert(body: dict[str, Any]) -> None:
    _score(body)
    _need(body, "ref", _map)


def _update(body: dict[str, Any]) -> None:
    _need(body, "round", _non_negative_int)
    _need(body, "client_id", _string)
    _maybe(body, "model", _string)
    _need(body, "n_samples", _integer)
    _need(body, "base_version", _non_negative_int)
    _need(body, "delta", _weights)
    _maybe(body, "privacy", _map)


def _global(body: dict[str, Any]) -> None:
    _need(body, "round", _integer)  # -1 for version 0, the seeded initial model
    _need(body, "version", _non_negative_int)
    _need(body, "weights", _weights)
    _need(
        body, "clients", lambda name, value: None if isinstance(value, list) else _map(name, value)
    )
    _maybe(body, "aggregator_state", _map)


def _free(body: dict[str, Any]) -> None:
    """Kinds whose body is for people and tools, not for arithmetic."""


BODY_SCHEMAS: dict[str, Callable[[dict[str, Any]], None]] = {
    "metric": _metric,
    "log": _log,
    "span": _span,
    "label": _label,
    "score": _score,
    "alert": _alert,
    "update": _update,
    "global": _global,
    "ledger": _free,
    "control": _free,
    "dead_letter": _free,
}
