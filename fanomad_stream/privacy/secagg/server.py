"""Server state machine of double-masking secure aggregation (Bonawitz et al., CCS 2017).

The server routes keys and encrypted shares, collects masked inputs and finally asks the
survivors for the shares it needs: the self-mask seed of every client whose masked input
arrived, and the masking private key of every client that shared keys but sent no masked
input. From those it removes all masks and learns only the sum of the surviving inputs.

The server is pure: ``handle`` takes one message and returns the messages to send, and
``on_timeout`` closes the current stage with whoever answered. A stage closes on its own as
soon as every client it waits for has answered. When fewer than ``threshold`` clients answer a
stage, the round aborts before any share is requested, so nothing is revealed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fanomad_stream.errors import ConfigError
from fanomad_stream.privacy.secagg import primitives
from fanomad_stream.privacy.secagg.client import pairwise_seed, share_points
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
    check_threshold,
    make_message,
)
from fanomad_stream.privacy.secagg.shamir import combine_shares

# Client stages in the order the server collects them; "done" and "aborted" end a round.
STAGES = (ADVERTISE_KEYS, SHARE_KEYS, MASKED_INPUT, UNMASK)


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked sum of the surviving clients' inputs in Z_(2^bits)."""

    total: np.ndarray
    survivors: list[str]
    dropped_after_sharing: list[str]
    metadata: dict[str, dict[str, Any]]


@dataclass
class _Round:
    received: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {stage: {} for stage in STAGES}
    )
    keys: dict[str, dict[str, bytes]] = field(default_factory=dict)
    shared: list[str] = field(default_factory=list)
    survivors: list[str] = field(default_factory=list)


class SecAggServer:
    """The aggregator's side of one secure aggregation round.

    Parameters
    ----------
    round_id
        The federated round this aggregation belongs to.
    session
        The name bound into every key and ciphertext; must equal the clients' session.
    threshold
        Shamir threshold t, >= 2 and more than half of ``clients``. It is also the smallest
        cohort the round accepts, so it is the ``min_cohort`` for DP noise shares.
    clients
        Ids of the clients invited to the round.
    vector_length
        Number of ring elements in every masked input.
    bits
        Ring width: sums are taken mod 2^bits.
    stage_timeout_s
        Seconds the transport waits for a stage before calling ``on_timeout``, > 0.
    """

    def __init__(
        self,
        *,
        round_id: int,
        session: str,
        threshold: int,
        clients: list[str],
        vector_length: int,
        bits: int,
        stage_timeout_s: float = 30.0,
    ) -> None:
        if len(set(clients)) != len(clients) or SERVER_ID in clients:
            raise ConfigError(f"client ids must be distinct and not {SERVER_ID!r}, got {clients!r}")
        try:
            check_threshold(threshold, len(clients))
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if not stage_timeout_s > 0:
            raise ConfigError(f"stage_timeout_s must be > 0 seconds, got {stage_timeout_s!r}")
        self.round_id = round_id
        self.session = session
        self.threshold = threshold
        self.clients = sorted(clients)
        self.vector_length = vector_length
        self.bits = bits
        self.stage_timeout_s = stage_timeout_s
        self.stage = ADVERTISE_KEYS
        self.result: SecAggResult | None = None
        self.aborted_reason: str | None = None
        self.ignored_messages = 0
        self.rejected: list[tuple[str, str]] = []
        self._round = _Round()

    def handle(self, message: Message) -> list[Message]:
        """Record one client message; return the next stage's messages once the stage closes.

        Duplicates, messages for another round or an already closed stage, and messages from
        uninvited clients are ignored and counted in ``ignored_messages``.
        """
        sender = message.get("sender")
        stage = message.get("stage")
        if (
            message.get("round") != self.round_id
            or stage != self.stage
            or sender not in self._waiting_for()
            or sender in self._round.received[str(stage)]
        ):
            self.ignored_messages += 1
            return []
        body = message.get("body")
        reason = self._validate(str(stage), str(sender), body) if isinstance(body, dict) else ""
        if not isinstance(body, dict) or reason:
            self.rejected.append((str(sender), reason or "message body must be a map"))
            return []
        self._round.received[str(stage)][str(sender)] = body
        if set(self._round.received[str(stage)]) == set(self._waiting_for()):
            return self._close_stage()
        return []

    def on_timeout(self) -> list[Message]:
        """Close the current stage with the clients that answered, or abort below threshold."""
        if self.stage in STAGES:
            return self._close_stage()
        return []

    def _waiting_for(self) -> list[str]:
        if self.stage == ADVERTISE_KEYS:
            return self.clients
        if self.stage == SHARE_KEYS:
            return list(self._round.keys)
        if self.stage == MASKED_INPUT:
            return self._round.shared
        if self.stage == UNMASK:
            return self._round.survivors
        return []

    def _validate(self, stage: str, sender: str, body: dict[str, Any]) -> str:
        """Return why ``body`` is malformed for ``stage``, or "" when it is acceptable."""
        if stage == MASKED_INPUT:
            masked = body.get("masked")
            if (
                not isinstance(masked, np.ndarray)
                or masked.shape != (self.vector_length,)
                or masked.dtype.kind != "u"
            ):
                return f"masked input must be an unsigned vector of {self.vector_length} values"
            if self.bits < 64 and masked.size and int(masked.max()) >> self.bits:
                return f"masked input has values outside the ring [0, 2^{self.bits})"
        if stage == ADVERTISE_KEYS and not all(
            isinstance(body.get(k), bytes) and len(body[k]) == 32
            for k in ("encryption_key", "masking_key", "seed_commitment")
        ):
            return "advertise_keys must carry two 32-byte X25519 public keys and a seed commitment"
        if stage == SHARE_KEYS:
            expected = set(self._round.keys)
            ciphertexts = body.get("ciphertexts")
            if not isinstance(ciphertexts, dict) or set(ciphertexts) != expected - {sender}:
                return "share_keys must carry one ciphertext for every other client in the key list"
        if stage == UNMASK:
            survivors = set(self._round.survivors)
            dropped = set(self._round.shared) - survivors
            if set(body.get("seed_shares", ())) != survivors:
                return "unmask must carry a self-mask seed share for every surviving client"
            if set(body.get("key_shares", ())) != dropped:
                return "unmask must carry a masking key share for every dropped client"
        return ""

    def _close_stage(self) -> list[Message]:
        answered = sorted(self._round.received[self.stage])
        if len(answered) < self.threshold:
            reason = (
                f"only {len(answered)} of {len(self._waiting_for())} clients answered stage "
                f"{self.stage}, below threshold {self.threshold}"
            )
            return self._abort(reason)
        if self.stage == ADVERTISE_KEYS:
            return self._send_key_list(answered)
        if self.stage == SHARE_KEYS:
            return self._route_shares(answered)
        if self.stage == MASKED_INPUT:
            return self._request_unmasking(answered)
        try:
            self._unmask(answered)
        except ProtocolError as err:
            # A corrupt share leaves the sum unknown, so the round ends without a result.
            return self._abort(str(err))
        return []

    def _send_key_list(self, answered: list[str]) -> list[Message]:
        received = self._round.received[ADVERTISE_KEYS]
        self._round.keys = {client: received[client] for client in answered}
        self.stage = SHARE_KEYS
        body = {"keys": self._round.keys}
        return [self._to(client, KEY_LIST, body) for client in answered]

    def _route_shares(self, answered: list[str]) -> list[Message]:
        self._round.shared = answered
        self.stage = MASKED_INPUT
        received = self._round.received[SHARE_KEYS]
        messages = []
        for recipient in answered:
            ciphertexts = {
                sender: received[sender]["ciphertexts"][recipient]
                for sender in answered
                if sender != recipient and recipient in received[sender]["ciphertexts"]
            }
            messages.append(self._to(recipient, ROUTED_SHARES, {"ciphertexts": ciphertexts}))
        return messages

    def _request_unmasking(self, answered: list[str]) -> list[Message]:
        self._round.survivors = answered
        self.stage = UNMASK
        dropped = sorted(set(self._round.shared) - set(answered))
        body = {"survivors": answered, "dropped": dropped}
        return [self._to(client, UNMASK_REQUEST, body) for client in answered]

    def _unmask(self, answered: list[str]) -> None:
        survivors = self._round.survivors
        dropped = sorted(set(self._round.shared) - set(survivors))
        points = share_points(list(self._round.keys))
        responses = self._round.received[UNMASK]
        modulus_mask = np.uint64((1 << self.bits) - 1 if self.bits < 64 else 2**64 - 1)

        total = np.zeros(self.vector_length, dtype=np.uint64)
        for client in survivors:
            total += self._round.received[MASKED_INPUT][client]["masked"].astype(np.uint64)
        for client in survivors:
            shares = {points[w]: responses[w]["seed_shares"][client] for w in answered}
            seed = self._rebuild(shares, f"the self-mask seed of {client!r}")
            info = primitives.context(
                self.session, self.round_id, ADVERTISE_KEYS, client, SERVER_ID
            )
            if (
                primitives.seed_commitment(seed, info)
                != self._round.keys[client]["seed_commitment"]
            ):
                msg = f"the self-mask seed rebuilt for {client!r} does not match its commitment"
                raise ProtocolError(msg)
            total -= primitives.expand_mask(seed, self.vector_length, self.bits)
        for client in dropped:
            total = self._remove_pairwise_masks(total, client, answered, points)

        self.result = SecAggResult(
            total=total & modulus_mask,
            survivors=list(survivors),
            dropped_after_sharing=dropped,
            metadata={c: self._round.received[MASKED_INPUT][c]["metadata"] for c in survivors},
        )
        self.stage = "done"

    def _remove_pairwise_masks(
        self, total: np.ndarray, dropped: str, answered: list[str], points: dict[str, int]
    ) -> np.ndarray:
        """Subtract the masks that survivors added for ``dropped``, rebuilt from its key."""
        responses = self._round.received[UNMASK]
        shares = {points[w]: responses[w]["key_shares"][dropped] for w in answered}
        raw_key = self._rebuild(shares, f"the masking key of {dropped!r}")
        key = primitives.load_private_key(raw_key)
        if primitives.public_bytes(key) != self._round.keys[dropped]["masking_key"]:
            msg = f"the masking key rebuilt for {dropped!r} does not match its public key"
            raise ProtocolError(msg)
        for survivor in self._round.survivors:
            seed = pairwise_seed(
                key,
                self._round.keys[survivor]["masking_key"],
                session=self.session,
                round_id=self.round_id,
                first=dropped,
                second=survivor,
            )
            mask = primitives.expand_mask(seed, self.vector_length, self.bits)
            # The survivor added the mask when its id sorts first, and subtracted it otherwise.
            total = total - mask if survivor < dropped else total + mask
        return total

    def _rebuild(self, shares: dict[int, bytes], description: str) -> bytes:
        try:
            return combine_shares(shares, threshold=self.threshold)
        except (ValueError, TypeError) as err:
            msg = f"could not rebuild {description} from {len(shares)} shares: {err}"
            raise ProtocolError(msg) from err

    def _abort(self, reason: str) -> list[Message]:
        self.aborted_reason = reason
        self.stage = "aborted"
        return [self._to(client, ABORT, {"reason": reason}) for client in self.clients]

    def _to(self, recipient: str, stage: str, body: dict[str, Any]) -> Message:
        return make_message(self.round_id, stage, SERVER_ID, recipient, body)
