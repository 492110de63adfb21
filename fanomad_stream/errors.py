"""Exception types shared by every component."""

from __future__ import annotations


class FanomadError(Exception):
    """Base class of the project's errors.

    ``retriable`` is True for transient failures (a broker that is not reachable yet) that a
    caller may retry with backoff; everything else is final.
    """

    retriable: bool = False


class ConfigError(FanomadError, ValueError):
    """A configuration value is missing or outside its accepted range."""


class DecodeError(FanomadError, ValueError):
    """A Kafka record could not be decoded or failed validation."""


class BrokerError(FanomadError):
    """The local Kafka broker could not be fetched, started or reached."""


class BrokerNotReadyError(BrokerError):
    """The broker did not answer a metadata request in time."""

    retriable = True


class UpdateRejectedError(FanomadError, ValueError):
    """A model update failed validation and was not folded into the round."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RoundError(FanomadError):
    """A federated round could not be closed (for example, its total weight is zero)."""
