"""Client state machine of double-masking secure aggregation (Bonawitz et al., CCS 2017).

The client's input ``x`` (already encoded in Z_(2^bits)) leaves it only as

    y = x + PRG(b) + Σ_{v > u} PRG(s_uv) − Σ_{v < u} PRG(s_uv)   (mod 2^bits)

where ``b`` is a fresh self-mask seed and ``s_uv`` a seed agreed by X25519 with each peer ``v``
that sent its shares. Both ``b`` and the masking private key are Shamir-shared among the
cohort, so the server can remove the pairwise masks of a client that dropped out (from its
key) and the self-masks of clients that survived (from their seeds), but never both for the
same client: this client rejects any request that would reveal both.
"""

from __future__ import annotations

import os
from typing import Any

import msgpack
import numpy as np

from fanomad_stream.privacy.secagg import primitives
from fanomad_stream.privacy.secagg.messages import (
    ABORT,
    ADVERTISE_KEYS,
    KEY_LIST,
    MASKED_INPUT,
    ROUTED_SHARES,
    SERVER_ID,
    SHARE_KEYS,
    UNMASK,
    UNMASK_REQUEST,
    Message,
    ProtocolError,
    RoundAbortedError,
    check_threshold,
    make_message,
)
from fanomad_stream.privacy.secagg.shamir import split_secret


def share_points(client_ids: list[str]) -> dict[str, int]:
    """Return each client's Shamir x-coordinate: its 1-based rank among the sorted ids."""
    return {client_id: rank for rank, client_id in enumerate(sorted(client_ids), start=1)}


def pairwise_seed(
    private: Any, peer_public: bytes, *, session: str, round_id: int, first: str, second: str
) -> bytes:
    """Return the pairwise mask seed of two clients, the same from either side."""
    low, high = sorted((first, second))
    info = primitives.context(session, round_id, "pairwise_mask", low, high)
    return primitives.derive_key(private, peer_public, info)


class SecAggClient:
    """One client's side of one secure aggregation round.

    Feed every message addressed to this client into ``handle`` and send what it returns.
    The client keeps its secrets in memory only and drops them on abort.

    Parameters
    ----------
    client_id
        This client's id, also the Kafka key of messages addressed to it.
    round_id
        The federated round this aggregation belongs to.
    session
        A name bound into every key and ciphertext (for example the model id and topic), so
        nothing can be replayed across deployments.
    threshold
        Shamir threshold t: the least number of clients that must survive every stage.
        Must be >= 2 and more than half of the advertised cohort.
    encoded
        This client's input, uint64 values in [0, 2^bits).
    bits
        Ring width: masks and sums are taken mod 2^bits.
    metadata
        Public values sent in clear with the masked input (for example weight and clipped
        value count). NOTE: nothing in it is hidden by the masks.
    """

    def __init__(
        self,
        *,
        client_id: str,
        round_id: int,
        session: str,
        threshold: int,
        encoded: np.ndarray,
        bits: int,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.client_id = client_id
        self.round_id = round_id
        self.session = session
        self.threshold = threshold
        self.bits = bits
        self.metadata = dict(metadata or {})
        self._input = np.asarray(encoded, dtype=np.uint64)
        if not 1 <= bits <= 64:
            raise ValueError(f"bits must be in [1, 64], got {bits!r}")
        if bits < 64 and np.any(self._input >> np.uint64(bits)):
            raise ValueError(f"encoded input has values outside [0, 2^{bits}); encode it first")
        self._encryption_key = primitives.new_private_key()
        self._masking_key = primitives.new_private_key()
        self._self_seed = os.urandom(primitives.SEED_BYTES)
        self._keys: dict[str, dict[str, bytes]] = {}
        self._held_shares: dict[str, tuple[bytes, bytes]] = {}
        self._shared_clients: set[str] | None = None
        self._revealed_seed_for: set[str] = set()
        self._revealed_key_for: set[str] = set()
        self._responses: dict[str, tuple[Message, list[Message]]] = {}
        self.aborted_reason: str | None = None

    def start(self) -> list[Message]:
        """Return the advertise-keys message that opens the round."""
        body = {
            "encryption_key": primitives.public_bytes(self._encryption_key),
            "masking_key": primitives.public_bytes(self._masking_key),
            "seed_commitment": primitives.seed_commitment(self._self_seed, self._commitment_info()),
        }
        return [self._to_server(ADVERTISE_KEYS, body)]

    def handle(self, message: Message) -> list[Message]:
        """Process one server message and return the messages to send in reply.

        A redelivered copy of an already handled message returns the same reply. A message for
        another round is ignored. Raises ProtocolError on a message that breaks the protocol,
        RoundAbortedError on an abort, and ShareDecryptionError on a tampered share.
        """
        if message.get("round") != self.round_id or message.get("recipient") != self.client_id:
            return []
        stage = message.get("stage")
        if self.aborted_reason is not None:
            raise RoundAbortedError(f"round {self.round_id} was aborted: {self.aborted_reason}")
        if stage == ABORT:
            self._abort(str(message["body"].get("reason", "no reason given")))
            raise RoundAbortedError(f"round {self.round_id} was aborted: {self.aborted_reason}")
        cached = self._responses.get(str(stage))
        if cached is not None:
            if cached[0] != message:
                msg = f"server sent two different {stage} messages in round {self.round_id}"
                raise ProtocolError(msg)
            return cached[1]
        handlers = {
            KEY_LIST: self._on_key_list,
            ROUTED_SHARES: self._on_routed_shares,
            UNMASK_REQUEST: self._on_unmask_request,
        }
        if stage not in handlers:
            raise ProtocolError(f"unknown stage {stage!r} from the server")
        replies = handlers[str(stage)](message["body"])
        self._responses[str(stage)] = (message, replies)
        return replies

    def _on_key_list(self, body: dict[str, Any]) -> list[Message]:
        keys: dict[str, dict[str, bytes]] = body["keys"]
        check_threshold(self.threshold, len(keys))
        mine = keys.get(self.client_id)
        if mine is None or mine["masking_key"] != primitives.public_bytes(self._masking_key):
            raise ProtocolError("key list does not carry this client's own public keys")
        advertised = [k["masking_key"] for k in keys.values()] + [
            k["encryption_key"] for k in keys.values()
        ]
        if len(set(advertised)) != len(advertised):
            raise ProtocolError("key list repeats a public key; a peer may be impersonated")
        self._keys = keys
        points = share_points(list(keys))
        seed_shares = split_secret(
            self._self_seed, threshold=self.threshold, points=points.values()
        )
        key_bytes = primitives.private_bytes(self._masking_key)
        key_shares = split_secret(key_bytes, threshold=self.threshold, points=points.values())
        ciphertexts: dict[str, bytes] = {}
        for peer, x in points.items():
            plaintext = msgpack.packb([self.client_id, peer, seed_shares[x], key_shares[x]])
            if peer == self.client_id:
                self._held_shares[peer] = (seed_shares[x], key_shares[x])
                continue
            info = primitives.context(self.session, self.round_id, SHARE_KEYS, self.client_id, peer)
            key = primitives.derive_key(self._encryption_key, keys[peer]["encryption_key"], info)
            ciphertexts[peer] = primitives.encrypt(key, plaintext, info)
        return [self._to_server(SHARE_KEYS, {"ciphertexts": ciphertexts})]

    def _on_routed_shares(self, body: dict[str, Any]) -> list[Message]:
        if not self._keys:
            raise ProtocolError("routed shares arrived before the key list")
        senders: dict[str, bytes] = body["ciphertexts"]
        survivors = set(senders) | {self.client_id}
        if not survivors <= set(self._keys):
            raise ProtocolError(
                f"shares from clients outside the key list: {sorted(survivors - set(self._keys))}"
            )
        if len(survivors) < self.threshold:
            raise ProtocolError(
                f"only {len(survivors)} clients shared keys, below threshold {self.threshold}"
            )
        for sender, blob in senders.items():
            self._held_shares[sender] = self._open_share(sender, blob)
        self._shared_clients = survivors
        masked = self._input + primitives.expand_mask(self._self_seed, self._input.size, self.bits)
        for peer in sorted(survivors - {self.client_id}):
            seed = pairwise_seed(
                self._masking_key,
                self._keys[peer]["masking_key"],
                session=self.session,
                round_id=self.round_id,
                first=self.client_id,
                second=peer,
            )
            mask = primitives.expand_mask(seed, self._input.size, self.bits)
            masked = masked + mask if self.client_id < peer else masked - mask
        masked &= np.uint64((1 << self.bits) - 1 if self.bits < 64 else 2**64 - 1)
        dtype = np.uint32 if self.bits <= 32 else np.uint64
        body_out = {"masked": masked.astype(dtype), "metadata": self.metadata}
        return [self._to_server(MASKED_INPUT, body_out)]

    def _open_share(self, sender: str, blob: bytes) -> tuple[bytes, bytes]:
        info = primitives.context(self.session, self.round_id, SHARE_KEYS, sender, self.client_id)
        key = primitives.derive_key(
            self._encryption_key, self._keys[sender]["encryption_key"], info
        )
        description = f"the share from {sender!r} to {self.client_id!r} in round {self.round_id}"
        plaintext = primitives.decrypt(key, blob, info, description=description)
        claimed_sender, claimed_recipient, seed_share, key_share = msgpack.unpackb(plaintext)
        if (claimed_sender, claimed_recipient) != (sender, self.client_id):
            raise ProtocolError(
                f"{description} names sender {claimed_sender!r} and recipient {claimed_recipient!r}"
            )
        return seed_share, key_share

    def _on_unmask_request(self, body: dict[str, Any]) -> list[Message]:
        survivors = set(body["survivors"])
        dropped = set(body["dropped"])
        shared = self._shared_clients
        if shared is None:
            raise ProtocolError("unmask request arrived before the routed shares")
        if survivors & dropped:
            raise ProtocolError(
                f"clients listed as both survived and dropped: {sorted(survivors & dropped)}"
            )
        if survivors | dropped != shared:
            raise ProtocolError(
                "survived and dropped clients do not add up to the clients that shared keys"
            )
        if self.client_id not in survivors:
            raise ProtocolError("unmask request lists this client as dropped")
        if len(survivors) < self.threshold:
            raise ProtocolError(
                f"only {len(survivors)} masked inputs, below threshold {self.threshold}"
            )
        if survivors & self._revealed_key_for or dropped & self._revealed_seed_for:
            raise ProtocolError("request would reveal both shares of one client")
        self._revealed_seed_for |= survivors
        self._revealed_key_for |= dropped
        seed_shares = {peer: self._held_shares[peer][0] for peer in sorted(survivors)}
        key_shares = {peer: self._held_shares[peer][1] for peer in sorted(dropped)}
        return [self._to_server(UNMASK, {"seed_shares": seed_shares, "key_shares": key_shares})]

    def _abort(self, reason: str) -> None:
        self.aborted_reason = reason
        self._held_shares.clear()
        self._self_seed = b""

    def _commitment_info(self) -> bytes:
        return primitives.context(
            self.session, self.round_id, ADVERTISE_KEYS, self.client_id, SERVER_ID
        )

    def _to_server(self, stage: str, body: dict[str, Any]) -> Message:
        return make_message(self.round_id, stage, self.client_id, SERVER_ID, body)
