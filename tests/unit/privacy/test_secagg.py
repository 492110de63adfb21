"""Secure aggregation: Shamir sharing, fixed-point encoding and the double-masking protocol."""

from __future__ import annotations

import numpy as np
import pytest

from fanomad_stream.errors import ConfigError
from fanomad_stream.privacy.secagg import (
    FixedPointCodec,
    ProtocolError,
    SecAggClient,
    SecAggServer,
    ShareDecryptionError,
)
from fanomad_stream.privacy.secagg.local import run_local_round
from fanomad_stream.privacy.secagg.messages import (
    KEY_LIST,
    MASKED_INPUT,
    ROUTED_SHARES,
    UNMASK,
    UNMASK_REQUEST,
    Message,
    make_message,
)
from fanomad_stream.privacy.secagg.shamir import combine_shares, split_secret

IDS = [f"edge-{i}" for i in range(5)]
THRESHOLD = 3
LENGTH = 2_000
BITS = 24


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.integers(0, 2**BITS, LENGTH, dtype=np.uint64) for c in IDS}


def _round(
    inputs: dict[str, np.ndarray], round_id: int = 7
) -> tuple[SecAggServer, dict[str, SecAggClient]]:
    server = SecAggServer(
        round_id=round_id,
        session="test",
        threshold=THRESHOLD,
        clients=IDS,
        vector_length=LENGTH,
        bits=BITS,
    )
    clients = {
        c: SecAggClient(
            client_id=c,
            round_id=round_id,
            session="test",
            threshold=THRESHOLD,
            encoded=inputs[c],
            bits=BITS,
            metadata={"weight": 1.0},
        )
        for c in IDS
    }
    return server, clients


def _deliver(clients: dict[str, SecAggClient], messages: list[Message]) -> list[Message]:
    replies: list[Message] = []
    for message in messages:
        replies += clients[message["recipient"]].handle(message)
    return replies


def _feed(server: SecAggServer, messages: list[Message]) -> list[Message]:
    out: list[Message] = []
    for message in messages:
        out += server.handle(message)
    return out


class TestShamir:
    def test_any_threshold_subset_rebuilds(self) -> None:
        """Every t-subset of shares rebuilds the secret."""
        secret = bytes(range(32))
        shares = split_secret(secret, threshold=3, points=[1, 2, 3, 4, 5])
        for subset in ([1, 2, 3], [2, 4, 5], [1, 3, 5]):
            assert combine_shares({x: shares[x] for x in subset}, threshold=3) == secret

    def test_too_few_shares_rejected(self) -> None:
        """Fewer than t shares raise ValueError."""
        shares = split_secret(bytes(32), threshold=3, points=[1, 2, 3])
        with pytest.raises(ValueError, match="need 3 shares"):
            combine_shares({1: shares[1], 2: shares[2]}, threshold=3)

    def test_fewer_shares_look_random(self) -> None:
        """t − 1 shares of two different secrets are not the same values."""
        first = split_secret(bytes(32), threshold=3, points=[1, 2, 3])
        second = split_secret(bytes(32), threshold=3, points=[1, 2, 3])
        assert first[1] != second[1]


class TestFixedPointCodec:
    def test_overflow_config_rejected(self) -> None:
        """100 clients with range ±8 at 2^22 steps per unit need 33 bits and are rejected."""
        with pytest.raises(ConfigError, match="33-bit ring"):
            FixedPointCodec(clip_range=8.0, scale_bits=22, max_clients=100, max_bits=32)

    def test_bits_from_cohort_range_and_weight(self) -> None:
        """The ring width grows with cohort size and weight."""
        small = FixedPointCodec(clip_range=8.0, scale_bits=22, max_clients=8)
        weighted = FixedPointCodec(clip_range=8.0, scale_bits=22, max_clients=8, max_weight=4.0)
        assert small.bits == 30
        assert weighted.bits == 32
        assert small.wire_dtype == np.uint32

    def test_out_of_range_counted_not_wrapped(self) -> None:
        """Values beyond the range are clipped to it and counted."""
        codec = FixedPointCodec(clip_range=1.0, scale_bits=10, max_clients=2)
        encoded = codec.encode(np.array([5.0, -5.0, 0.5]), rng=np.random.default_rng(0))
        decoded = codec.decode_sum(encoded.values, count=1)
        assert encoded.clipped_values == 2
        np.testing.assert_allclose(decoded, [1.0, -1.0, 0.5])

    def test_stochastic_rounding_unbiased(self) -> None:
        """The mean of many encodings of a value between two steps is that value."""
        codec = FixedPointCodec(clip_range=1.0, scale_bits=2, max_clients=1)
        value = np.full(100_000, 0.1)  # 0.4 steps
        decoded = codec.decode_sum(
            codec.encode(value, rng=np.random.default_rng(1)).values, count=1
        )
        assert set(np.unique(decoded)) == {0.0, 0.25}
        assert float(decoded.mean()) == pytest.approx(0.1, abs=0.005)

    def test_non_finite_rejected(self) -> None:
        """NaN cannot be encoded."""
        codec = FixedPointCodec(clip_range=1.0, scale_bits=2, max_clients=1)
        with pytest.raises(ValueError, match="NaN"):
            codec.encode(np.array([np.nan]), rng=np.random.default_rng(0))

    def test_float_sum_roundtrip(self) -> None:
        """Encoded float updates summed in the ring decode to the float sum within one step each."""
        codec = FixedPointCodec(clip_range=2.0, scale_bits=16, max_clients=5)
        rng = np.random.default_rng(3)
        vectors = [rng.uniform(-2, 2, 100) for _ in range(5)]
        total = sum(codec.encode(v, rng=rng).values for v in vectors)
        decoded = codec.decode_sum(np.asarray(total) % 2**codec.bits, count=5)
        np.testing.assert_allclose(decoded, sum(vectors), atol=5 * 2.0**-16)


class TestProtocol:
    @pytest.mark.parametrize(
        ("drop_before", "survivors"),
        [
            ({}, IDS),
            ({"edge-1": "advertise_keys"}, ["edge-0", "edge-2", "edge-3", "edge-4"]),
            ({"edge-1": "share_keys"}, ["edge-0", "edge-2", "edge-3", "edge-4"]),
            ({"edge-2": "masked_input"}, ["edge-0", "edge-1", "edge-3", "edge-4"]),
            ({"edge-3": "unmask"}, IDS),
            (
                {"edge-0": "masked_input", "edge-4": "unmask"},
                ["edge-1", "edge-2", "edge-3", "edge-4"],
            ),
            ({"edge-0": "share_keys", "edge-4": "masked_input"}, ["edge-1", "edge-2", "edge-3"]),
        ],
        ids=[
            "none",
            "before-keys",
            "before-sharing",
            "after-sharing",
            "after-masked-input",
            "after-sharing-and-after-input",
            "two-dropped",
        ],
    )
    def test_sum_exact_with_dropouts(
        self, drop_before: dict[str, str], survivors: list[str]
    ) -> None:
        """The unmasked result equals the plain ring sum of the surviving inputs."""
        inputs = _inputs()
        server, clients = _round(inputs)
        run_local_round(server, clients, drop_before=drop_before)
        assert server.aborted_reason is None
        assert server.result is not None
        assert server.result.survivors == survivors
        expected = sum(inputs[c] for c in survivors) % 2**BITS
        np.testing.assert_array_equal(server.result.total, expected)

    def test_redelivery_is_harmless(self) -> None:
        """Delivering every message twice gives the same exact sum."""
        inputs = _inputs(1)
        server, clients = _round(inputs)
        run_local_round(server, clients, drop_before={"edge-2": "masked_input"}, duplicate=True)
        assert server.result is not None
        assert server.ignored_messages > 0
        expected = sum(inputs[c] for c in server.result.survivors) % 2**BITS
        np.testing.assert_array_equal(server.result.total, expected)

    def test_below_threshold_aborts_without_unmasking(self) -> None:
        """With 3 of 5 dropping before the masked input, no share is requested or revealed."""
        server, clients = _round(_inputs())
        drops = {c: "masked_input" for c in ("edge-0", "edge-1", "edge-2")}
        received = run_local_round(server, clients, drop_before=drops)
        assert server.result is None
        assert server.aborted_reason is not None
        assert "below threshold" in server.aborted_reason
        assert not [m for m in received if m["stage"] == UNMASK]
        assert clients["edge-3"].aborted_reason is not None

    def test_masked_input_uncorrelated(self) -> None:
        """One masked vector shows no correlation with a structured input and looks uniform."""
        inputs = {c: (np.arange(LENGTH, dtype=np.uint64) * 997) % 2**BITS for c in IDS}
        server, clients = _round(inputs)
        received = run_local_round(server, clients)
        masked = next(m for m in received if m["stage"] == MASKED_INPUT)["body"]["masked"]
        x = inputs[IDS[0]].astype(np.float64)
        y = masked.astype(np.float64)
        assert abs(np.corrcoef(x, y)[0, 1]) < 0.1
        assert abs(np.corrcoef(np.arange(LENGTH), y)[0, 1]) < 0.1
        counts = np.bincount((masked >> (BITS - 3)).astype(np.int64), minlength=8)
        assert counts.min() > LENGTH / 8 * 0.7

    def test_tampered_share_detected(self) -> None:
        """A flipped byte in a routed share raises ShareDecryptionError naming the sender."""
        server, clients = _round(_inputs())
        key_lists = _feed(server, [m for c in clients.values() for m in c.start()])
        routed = _feed(server, _deliver(clients, key_lists))
        target = next(m for m in routed if m["stage"] == ROUTED_SHARES)
        sender = sorted(target["body"]["ciphertexts"])[0]
        blob = bytearray(target["body"]["ciphertexts"][sender])
        blob[-1] ^= 1
        target["body"]["ciphertexts"][sender] = bytes(blob)
        with pytest.raises(ShareDecryptionError, match=sender):
            clients[target["recipient"]].handle(target)

    def test_share_replayed_to_other_round_rejected(self) -> None:
        """A share from round 7 fed into round 8 with the same keys fails authentication."""
        server, clients = _round(_inputs())
        key_lists = _feed(server, [m for c in clients.values() for m in c.start()])
        routed = _feed(server, _deliver(clients, key_lists))
        message = routed[0]
        client = clients[message["recipient"]]
        client.round_id = 8  # same keys, other round: only the bound context differs
        replayed = dict(message, round=8)
        with pytest.raises(ShareDecryptionError):
            client.handle(replayed)

    def _run_to_unmask_request(self) -> tuple[dict[str, SecAggClient], Message]:
        server, clients = _round(_inputs())
        key_lists = _feed(server, [m for c in clients.values() for m in c.start()])
        routed = _feed(server, _deliver(clients, key_lists))
        requests = _feed(server, _deliver(clients, routed))
        assert all(m["stage"] == UNMASK_REQUEST for m in requests)
        return clients, requests[0]

    def test_client_rejects_both_shares_for_peer(self) -> None:
        """An unmask request listing a peer as survived and dropped is rejected."""
        clients, request = self._run_to_unmask_request()
        forged = make_message(
            request["round"],
            UNMASK_REQUEST,
            "server",
            request["recipient"],
            {"survivors": IDS, "dropped": ["edge-4"]},
        )
        with pytest.raises(ProtocolError, match="both"):
            clients[request["recipient"]].handle(forged)

    def test_client_rejects_second_unmask_request(self) -> None:
        """After answering one unmask request, a different one for the round is rejected."""
        clients, request = self._run_to_unmask_request()
        client = clients[request["recipient"]]
        first = client.handle(request)
        assert client.handle(request) == first
        others = [c for c in IDS if c != request["recipient"]]
        changed = make_message(
            request["round"],
            UNMASK_REQUEST,
            "server",
            request["recipient"],
            {"survivors": [request["recipient"], *others[:3]], "dropped": [others[3]]},
        )
        with pytest.raises(ProtocolError, match="two different"):
            client.handle(changed)

    def test_key_list_missing_own_key_rejected(self) -> None:
        """A key list that does not carry the client's own key is rejected."""
        server, clients = _round(_inputs())
        key_lists = _feed(server, [m for c in clients.values() for m in c.start()])
        message = key_lists[0]
        keys = dict(message["body"]["keys"])
        keys[message["recipient"]] = keys[next(c for c in IDS if c != message["recipient"])]
        forged = make_message(
            message["round"], KEY_LIST, "server", message["recipient"], {"keys": keys}
        )
        with pytest.raises(ProtocolError, match="own public keys"):
            clients[message["recipient"]].handle(forged)

    @pytest.mark.parametrize("threshold", [1, 2, 6])
    def test_bad_threshold_rejected(self, threshold: int) -> None:
        """A threshold at most half the cohort, or above it, is a configuration error."""
        with pytest.raises(ConfigError, match="threshold"):
            SecAggServer(
                round_id=0, session="s", threshold=threshold, clients=IDS, vector_length=1, bits=8
            )


def test_codec_and_protocol_end_to_end() -> None:
    """Float updates, encoded and securely summed, decode to the float sum of survivors."""
    codec = FixedPointCodec(clip_range=1.0, scale_bits=16, max_clients=len(IDS))
    rng = np.random.default_rng(5)
    floats = {c: rng.uniform(-1, 1, LENGTH) for c in IDS}
    encoded = {c: codec.encode(floats[c], rng=rng).values for c in IDS}
    server = SecAggServer(
        round_id=1,
        session="e2e",
        threshold=THRESHOLD,
        clients=IDS,
        vector_length=LENGTH,
        bits=codec.bits,
    )
    clients = {
        c: SecAggClient(
            client_id=c,
            round_id=1,
            session="e2e",
            threshold=THRESHOLD,
            encoded=encoded[c],
            bits=codec.bits,
        )
        for c in IDS
    }
    run_local_round(server, clients, drop_before={"edge-4": "masked_input"})
    assert server.result is not None
    survivors = server.result.survivors
    decoded = codec.decode_sum(server.result.total, count=len(survivors))
    np.testing.assert_allclose(
        decoded, sum(floats[c] for c in survivors), atol=len(survivors) * 2.0**-16
    )


def test_messages_survive_record_codec() -> None:
    """Every protocol message travels through the Kafka record codec and the sum stays exact."""
    from fanomad_stream.transport import codec

    def wire(message: Message) -> Message:
        raw = codec.encode("control", message, src=message["sender"], ts=0.0)
        return codec.decode(raw, expected_kinds=frozenset({"control"})).body

    inputs = _inputs(2)
    server, clients = _round(inputs)
    run_local_round(server, clients, drop_before={"edge-1": "masked_input"}, wire=wire)
    assert server.result is not None
    expected = sum(inputs[c] for c in server.result.survivors) % 2**BITS
    np.testing.assert_array_equal(server.result.total, expected)


def test_flatten_roundtrip() -> None:
    """Flattening an update and splitting it back restores names, shapes and values."""
    from fanomad_stream.privacy.secagg.encoding import flatten_update, unflatten_update

    update = {"b": np.arange(3, dtype=np.float32), "a": np.ones((2, 2), np.float32)}
    vector, layout = flatten_update(update)
    assert vector.shape == (7,)
    assert [name for name, _ in layout] == ["a", "b"]
    restored = unflatten_update(vector, layout)
    np.testing.assert_array_equal(restored["a"], update["a"])
    np.testing.assert_array_equal(restored["b"], update["b"])
    with pytest.raises(ValueError, match="layout needs 7"):
        unflatten_update(vector[:6], layout)


@pytest.mark.parametrize(
    ("shift_secret", "fragment"),
    [(True, "commitment"), (False, "could not rebuild")],
    ids=["plausible-seed", "garbage"],
)
def test_corrupt_seed_share_aborts_round(shift_secret: bool, fragment: str) -> None:
    """A wrong self-mask seed share is detected and the round aborts with no result."""
    from fanomad_stream.privacy.secagg.shamir import PRIME, SHARE_BYTES

    def corrupt(message: Message) -> Message:
        if message["stage"] != UNMASK or message["sender"] != "edge-0":
            return message
        shares = dict(message["body"]["seed_shares"])
        if shift_secret:
            # edge-0 holds x = 1, and the server interpolates from x = 1, 2, 3, where the
            # Lagrange weight of x = 1 is 3. Adding 3⁻¹ to the share moves the seed by 1.
            value = int.from_bytes(shares["edge-2"], "big") + pow(3, -1, PRIME)
            shares["edge-2"] = (value % PRIME).to_bytes(SHARE_BYTES, "big")
        else:
            shares["edge-2"] = bytes(SHARE_BYTES)
        return dict(message, body=dict(message["body"], seed_shares=shares))

    server, clients = _round(_inputs())
    run_local_round(server, clients, wire=corrupt)
    assert server.result is None
    assert server.aborted_reason is not None
    assert "edge-2" in server.aborted_reason
    assert fragment in server.aborted_reason
