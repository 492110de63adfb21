"""SASL/SCRAM and TLS connections through KafkaSettings, against brokers started for them."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.errors import KafkaError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fanomad_stream.broker.local import LocalBroker, ScramUser, free_port
from fanomad_stream.config import KafkaSettings
from fanomad_stream.transport.kafka import make_consumer, make_producer, topic_name
from fanomad_stream.transport.topics import apply_catalog, load_catalog

pytestmark = pytest.mark.broker

USER = ScramUser(name="edge-site-a", password="correct-horse-battery")


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalBroker, Path]]:
    """A second local broker with a SCRAM listener and a TLS listener signed by a test CA.

    Returns the broker and the CA certificate that TLS clients must trust.
    """
    folder = tmp_path_factory.mktemp("kafka-secure")
    ca_path, keystore = write_ca_and_broker_pem(folder)
    broker = LocalBroker(
        run_dir=folder / "run",
        port=free_port(),
        sasl_port=free_port(),
        scram_users=(USER,),
        ssl_port=free_port(),
        ssl_keystore_pem=keystore,
    )
    broker.start(timeout_s=120)
    try:
        yield broker, ca_path
    finally:
        broker.stop()


@pytest.fixture
def scram_broker(secure_broker: tuple[LocalBroker, Path]) -> LocalBroker:
    return secure_broker[0]


def scram_settings(
    broker: LocalBroker, mechanism: str, *, password: str, prefix: str
) -> KafkaSettings:
    return KafkaSettings.model_validate(
        {
            "bootstrap_servers": f"127.0.0.1:{broker.sasl_port}",
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": mechanism,
            "sasl_username": USER.name,
            "sasl_password": password,
            "topic_prefix": prefix,
            "request_timeout_ms": 10_000,
        }
    )


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_scram_round_trip(scram_broker: LocalBroker, mechanism: str) -> None:
    """A record produced over a SCRAM listener is read back by a SCRAM consumer."""
    settings = scram_settings(
        scram_broker, mechanism, password=USER.password, prefix=f"{mechanism.lower()}."
    )
    await apply_catalog(settings, load_catalog())
    topic = topic_name(settings, "dlq")

    producer = make_producer(settings)
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, value=b"over scram", key=b"k")
    finally:
        await producer.stop()

    consumer = make_consumer(settings, "dlq", group_id=f"scram-{mechanism}")
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=10_000, max_records=10)
        records = [record for batch in batches.values() for record in batch]
    finally:
        await consumer.stop()

    assert sent.offset == 0
    assert [record.value for record in records] == [b"over scram"]


async def test_scram_wrong_password_rejected(scram_broker: LocalBroker) -> None:
    """The SCRAM listener rejects a client with a wrong password instead of letting it in."""
    settings = scram_settings(scram_broker, "SCRAM-SHA-256", password="wrong", prefix="wrong.")
    producer = make_producer(settings)
    with pytest.raises(KafkaError):
        await producer.start()
    await producer.stop()


async def test_plaintext_client_cannot_use_sasl_port(scram_broker: LocalBroker) -> None:
    """A client without SASL settings does not get metadata from the SCRAM listener."""
    settings = KafkaSettings(
        bootstrap_servers=f"127.0.0.1:{scram_broker.sasl_port}", request_timeout_ms=3_000
    )
    producer = make_producer(settings)
    with pytest.raises(KafkaError):
        await producer.start()
    await producer.stop()


def write_ca_and_broker_pem(folder: Path) -> tuple[Path, Path]:
    """Write a throw-away CA certificate and a broker key plus chain for 127.0.0.1.

    Returns (CA certificate PEM, broker key and certificate chain PEM).
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fanomad test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    broker_key = ec.generate_private_key(ec.SECP256R1())
    broker_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(broker_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = folder / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    keystore = folder / "broker.pem"
    key_pem = broker_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        # Kafka's PEM reader (Java 17) cannot decrypt the PBES2 keys cryptography writes.
        serialization.NoEncryption(),
    )
    keystore.write_bytes(
        key_pem
        + broker_cert.public_bytes(serialization.Encoding.PEM)
        + ca_cert.public_bytes(serialization.Encoding.PEM)
    )
    return ca_path, keystore


async def test_tls_round_trip(secure_broker: tuple[LocalBroker, Path]) -> None:
    """A record produced over TLS, verified against the test CA, is read back over TLS."""
    broker, ca_path = secure_broker
    settings = KafkaSettings(
        bootstrap_servers=f"127.0.0.1:{broker.ssl_port}",
        security_protocol="SSL",
        ssl_cafile=ca_path,
        topic_prefix="tls.",
        request_timeout_ms=10_000,
    )
    await apply_catalog(settings, load_catalog())

    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(topic_name(settings, "dlq"), value=b"over tls", key=b"k")
    finally:
        await producer.stop()
    consumer = make_consumer(settings, "dlq", group_id="tls")
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=10_000, max_records=10)
    finally:
        await consumer.stop()

    assert [r.value for batch in batches.values() for r in batch] == [b"over tls"]


async def test_tls_unknown_ca_rejected(
    secure_broker: tuple[LocalBroker, Path], tmp_path: Path
) -> None:
    """A client that trusts a different CA fails the handshake instead of connecting."""
    broker, _ = secure_broker
    other_ca, _ = write_ca_and_broker_pem(tmp_path)
    settings = KafkaSettings(
        bootstrap_servers=f"127.0.0.1:{broker.ssl_port}",
        security_protocol="SSL",
        ssl_cafile=other_ca,
        request_timeout_ms=3_000,
    )
    producer = make_producer(settings)
    with pytest.raises(KafkaError):
        await producer.start()
    await producer.stop()
