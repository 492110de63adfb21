"""Federated, privacy-preserving anomaly detection on live Kafka streams."""

__version__ = "0.1.0"
