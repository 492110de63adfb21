"""Run a long-lived service until SIGTERM or SIGINT, then stop it cleanly."""

from __future__ import annotations

import asyncio
import signal
from typing import Protocol, Self

import structlog

log = structlog.get_logger(__name__)


class Service(Protocol):
    async def start(self) -> None: ...
    async def run(self) -> None: ...
    async def stop(self) -> None: ...
    def request_stop(self) -> None: ...


class ServiceLifecycle:
    """Base of the long-lived services: a stop flag and ``async with`` for start and stop.

    Subclasses implement ``start`` and ``stop``, and their ``run`` loop ends once
    ``_stopping`` is set.
    """

    def __init__(self) -> None:
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def request_stop(self) -> None:
        """Ask ``run`` to return after the step in progress."""
        self._stopping.set()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def run_until_signalled(service: Service, name: str, stop_timeout_s: float = 30.0) -> None:
    """Start ``service``, run it, and on SIGTERM/SIGINT let the current step finish and stop.

    A stop that takes longer than ``stop_timeout_s`` (for example while the broker is down) is
    abandoned with an error log, so the process always exits.
    """
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    await service.start()
    try:
        await service.run()
    finally:
        try:
            await asyncio.wait_for(service.stop(), stop_timeout_s)
        except TimeoutError:
            log.error("service_stop_timed_out", service=name, timeout_s=stop_timeout_s)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
