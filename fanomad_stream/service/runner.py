"""Run a long-lived service until SIGTERM or SIGINT, then stop it cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable
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


class SteppedService(ServiceLifecycle):
    """A service whose ``run`` repeats ``step`` and whose stop is bounded in time.

    A stop request lets the step in progress finish for up to ``stop_timeout_s``. A step still
    blocked after that (for example on a broker that is down) is cancelled. ``_close`` bounds
    the close of one Kafka client the same way.
    """

    def __init__(self, stop_timeout_s: float, logger: structlog.typing.FilteringBoundLogger):
        super().__init__()
        self.stop_timeout_s = stop_timeout_s
        self._service_log = logger

    async def step(self) -> int:
        raise NotImplementedError

    async def run(self) -> None:
        """Call ``step`` until ``request_stop``; a step's error ends the run."""
        while not self._stopping.is_set():
            step = asyncio.create_task(self.step())
            try:
                await self._wait_for_step(step)
            finally:
                if not step.done():
                    step.cancel()
            if not step.cancelled():
                step.result()

    async def _wait_for_step(self, step: asyncio.Task[int]) -> None:
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({step, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if step.done():
            return
        await asyncio.wait({step}, timeout=self.stop_timeout_s)
        if step.done():
            return
        self._service_log.error("edge_step_abandoned", timeout_s=self.stop_timeout_s)
        step.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await step

    async def _close(self, name: str, closing: Awaitable[None]) -> None:
        """Await ``closing`` for at most ``stop_timeout_s``; log instead of raising."""
        try:
            await asyncio.wait_for(closing, self.stop_timeout_s)
        except TimeoutError:
            self._service_log.error(
                "kafka_client_close_timed_out", client=name, timeout_s=self.stop_timeout_s
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # NOTE: aiokafka 0.14.0's Fetcher.close() awaits the fetch tasks it has just
            # cancelled without catching CancelledError, so a consumer whose broker is down
            # can raise it from stop(). The consumer is marked closed before that point.
            self._service_log.error(
                "kafka_client_close_failed", client=name, error="CancelledError"
            )


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
