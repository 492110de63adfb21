"""Cryptographic building blocks of secure aggregation, all from the ``cryptography`` package.

- X25519 key agreement, with fresh key pairs in every round.
- HKDF-SHA256 to turn a shared secret into a key bound to its context.
- AES-256-GCM for the Shamir shares sent from one client to another through the server.
- A ChaCha20 keystream as the PRG that expands a 256-bit seed into a mask vector.

Every derived key and every ciphertext is bound to a context (protocol version, session,
round, stage, sender and recipient), so a value from one round or direction cannot be replayed
in another.
"""

from __future__ import annotations

import os

import msgpack
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fanomad_stream.errors import FanomadError

PROTOCOL = "fanomad-secagg/1"
NONCE_BYTES = 12
SEED_BYTES = 32


class ShareDecryptionError(FanomadError):
    """An encrypted share failed AES-GCM authentication: it was altered, replayed or misrouted."""


def context(session: str, round_id: int, stage: str, sender: str, recipient: str) -> bytes:
    """Return the canonical bytes of a message context, used as HKDF info and AEAD data."""
    return msgpack.packb([PROTOCOL, session, round_id, stage, sender, recipient])


def seed_commitment(seed: bytes, info: bytes) -> bytes:
    """Return SHA-256(info || seed), which lets the server check a rebuilt self-mask seed.

    The seed is 256 uniform bits, so the digest reveals nothing useful about it.
    """
    digest = hashes.Hash(hashes.SHA256())
    digest.update(info + seed)
    return digest.finalize()


def new_private_key() -> X25519PrivateKey:
    """Return a fresh X25519 private key from the operating system's CSPRNG."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """Return the 32-byte raw public key of ``key``."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """Return the 32-byte raw private key (only ever Shamir-shared, never sent whole)."""
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def load_private_key(raw: bytes) -> X25519PrivateKey:
    """Return the X25519 private key with raw bytes ``raw``."""
    return X25519PrivateKey.from_private_bytes(raw)


def derive_key(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """Return a 32-byte key from X25519(private, peer_public) through HKDF-SHA256 with ``info``."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    hkdf = HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=None, info=info)
    return hkdf.derive(shared)


def encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """Return nonce || AES-256-GCM ciphertext of ``plaintext`` bound to ``associated_data``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, blob: bytes, associated_data: bytes, *, description: str) -> bytes:
    """Return the plaintext of ``blob``.

    Raises ShareDecryptionError, naming ``description``, when authentication fails.
    """
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data)
    except InvalidTag as err:
        msg = (
            f"AES-GCM authentication failed for {description}: the ciphertext was altered, "
            "replayed from another round or sent to the wrong recipient, so treat the sender "
            "as faulty"
        )
        raise ShareDecryptionError(msg) from err


def expand_mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """Return ``length`` uniform values in [0, 2^bits) as uint64, from a ChaCha20 keystream.

    The seed is the ChaCha20 key and the nonce is zero: every seed is used for exactly one mask,
    so no (key, nonce) pair repeats.
    """
    if len(seed) != SEED_BYTES:
        msg = f"mask seed must be {SEED_BYTES} bytes, got {len(seed)}"
        raise ValueError(msg)
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    if bits <= 32:
        words = np.frombuffer(stream.update(bytes(4 * length)), dtype="<u4").astype(np.uint64)
    else:
        words = np.frombuffer(stream.update(bytes(8 * length)), dtype="<u8").copy()
    if bits < 64:
        words &= np.uint64((1 << bits) - 1)
    return words
