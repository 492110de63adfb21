"""The offsets that an edge client's scoring state covers, and the checkpoint that stores both.

Every edge client (metrics, logs, traces) folds the records of the partitions it reads into
its scoring state. ``CheckpointManager`` keeps the next offset to read of each of those
partitions (``positions``), commits those offsets, seeks each partition to them when it is
assigned, and writes and reads the checkpoint (``edge.checkpoint``) that stores the state
together with them. A client holds ``state_lock`` while it changes the state or
``positions``, so that a rebalance and a checkpoint never see half a batch.

The checkpoint is kept only when the client has a state folder and holds that folder's
``CheckpointLock``. Without them the manager still tracks, commits and seeks ``positions``, so
a partition that comes back after a rebalance resumes where this process's state left it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from fanomad_stream.config import EdgeSettings
from fanomad_stream.edge.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointLock,
    CheckpointRejectedError,
    EdgeCheckpoint,
    read_checkpoint,
    write_checkpoint,
)
from fanomad_stream.edge.site_state import SiteRounds
from fanomad_stream.federate.global_model import GlobalModelReader

Logger = structlog.typing.FilteringBoundLogger


class CheckpointManager:
    """Positions, commits, seeks and the checkpoint of one edge client; see the module docstring.

    Parameters
    ----------
    folder
        The client's state folder, or None to keep no checkpoint.
    site
        Client id of the site, stored in and checked against the checkpoint header.
    fingerprint
        ``state_fingerprint`` of the client's settings.
    topic
        The full name (with the topic prefix) of the topic the client reads. A checkpoint
        with offsets of another topic is rejected.
    edge
        The client's edge settings: ``checkpoint_interval_s`` and ``stop_timeout_s``.
    logger
        The client's bound logger.
    """

    def __init__(
        self,
        *,
        folder: Path | None,
        site: str,
        fingerprint: str,
        topic: str,
        edge: EdgeSettings,
        logger: Logger,
    ) -> None:
        self.folder = folder
        self.site = site
        self.fingerprint = fingerprint
        self.topic = topic
        self._interval_s = edge.checkpoint_interval_s
        self._stop_timeout_s = edge.stop_timeout_s
        self._log = logger
        # Next offset to read of every partition whose records the state has folded in, and
        # of each partition that was assigned but unread when a checkpoint was written.
        self.positions: dict[TopicPartition, int] = {}
        self.state_lock = asyncio.Lock()
        # False while the state contains records or training that ``positions`` do not cover.
        self.in_sync = True
        self.changed = False
        self.lock: CheckpointLock | None = None
        self.restored: EdgeCheckpoint | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self.commit_failures = 0
        self._written_at = time.monotonic()

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / CHECKPOINT_FILE

    def read(self) -> EdgeCheckpoint | None:
        """Take the folder's lock and read the checkpoint; return None when none may be used.

        A missing file returns None quietly. A locked folder, an unusable folder and a
        rejected file are logged, and the client then warms up.
        """
        if self.folder is None:
            return None
        lock = CheckpointLock(self.folder)
        try:
            acquired = lock.acquire()
        except OSError as err:
            self._log.error(
                "edge_checkpoint_unusable",
                lock=str(lock.path),
                error=str(err),
                detail="the state folder cannot hold the lock file; this process keeps no checkpoint",
            )
            return None
        if not acquired:
            self._log.warning(
                "edge_checkpoint_locked",
                lock=str(lock.path),
                detail="another process of this site uses the checkpoint; this one keeps none",
            )
            return None
        self.lock = lock
        path = self.folder / CHECKPOINT_FILE
        try:
            checkpoint = read_checkpoint(path, site=self.site, fingerprint=self.fingerprint)
        except FileNotFoundError:
            return None
        except (CheckpointRejectedError, OSError) as err:
            reason = err.reason if isinstance(err, CheckpointRejectedError) else "unreadable"
            self._log.warning(
                "edge_checkpoint_rejected", reason=reason, path=str(path), error=str(err)
            )
            return None
        other_topics = sorted({tp.topic for tp in checkpoint.offsets} - {self.topic})
        if other_topics:
            self._log.warning(
                "edge_checkpoint_rejected",
                reason="topic",
                path=str(path),
                error=f"checkpoint covers topics {other_topics}, this client reads {self.topic!r}",
            )
            return None
        return checkpoint

    async def read_for_restart(
        self, rounds: SiteRounds, global_model: GlobalModelReader
    ) -> tuple[EdgeCheckpoint | None, int]:
        """Return the checkpoint this process may restore, or None, and the last round sent.

        A checkpoint or an update round newer than the newest global version belongs to
        another cluster or an earlier model lineage, because versions only grow in one
        lineage: the round then counts as -1 and the checkpoint as None.
        """
        checkpoint = self.read()
        last_round = await rounds.last_sent(
            -1 if checkpoint is None else checkpoint.last_update_round
        )
        checkpoint_version = -1 if checkpoint is None else checkpoint.global_version
        if last_round < 0 and checkpoint_version < 0:
            return checkpoint, last_round
        latest = await global_model.catch_up()
        newest = -1 if latest is None else latest.version
        if newest < last_round:
            self._log.warning(
                "edge_state_ignored", last_update_round=last_round, newest_version=newest
            )
            last_round = -1
        if checkpoint is not None and not self.lineage_fits(checkpoint, newest):
            checkpoint = None
        return checkpoint, last_round

    def lineage_fits(self, checkpoint: EdgeCheckpoint, newest_version: int) -> bool:
        """Return False, with a warning, when the checkpoint is newer than ``fl.global``.

        Versions only grow in one model lineage, so such a checkpoint belongs to another
        cluster or to an earlier lineage.
        """
        if newest_version >= checkpoint.global_version:
            return True
        self._log.warning(
            "edge_checkpoint_rejected",
            reason="lineage",
            checkpoint_version=checkpoint.global_version,
            newest_version=newest_version,
        )
        return False

    def restore(
        self, checkpoint: EdgeCheckpoint, restore_state: Callable[[Mapping[str, Any]], None]
    ) -> bool:
        """Load the checkpoint's state with ``restore_state`` and take over its offsets.

        ``restore_state`` raises KeyError, TypeError or ValueError, and changes nothing, on a
        state that does not fit. This returns False then, with a warning, and the client warms
        up instead.
        """
        try:
            restore_state(checkpoint.pipeline)
        except (KeyError, TypeError, ValueError) as err:
            self._log.warning(
                "edge_checkpoint_rejected",
                reason="state",
                error=f"{type(err).__name__}: {err}",
                detail="the saved pipeline state does not fit this release; warming up instead",
            )
            return False
        self.positions = dict(checkpoint.offsets)
        self.restored = checkpoint
        return True

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Mark the state out of sync with ``positions`` while a batch or training runs.

        The mark stays when the block raises or is cancelled, because the state may then
        contain records or training that no offset covers, and such a state is never
        checkpointed.
        """
        self.in_sync = False
        yield
        self.in_sync = True
        self.changed = True

    def advance(self, batches: Mapping[TopicPartition, list[Any]]) -> None:
        """Move ``positions`` past the last record of each partition in a handled batch."""
        for tp, records in batches.items():
            if records:
                self.positions[tp] = records[-1].offset + 1

    async def commit(self, partitions: Collection[TopicPartition]) -> bool:
        """Commit ``positions`` of the given partitions that are still assigned.

        A rebalance can take partitions away between the poll and the commit. The commit then
        fails and is counted in ``commit_failures``, the new owner reads those records again,
        and the client goes on. Returns True when the commit went through.
        """
        assert self.consumer is not None, "CheckpointManager.consumer is not set"
        assigned = self.consumer.assignment()
        offsets = {
            tp: self.positions[tp] for tp in partitions if tp in assigned and tp in self.positions
        }
        if not offsets:
            return False
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as err:
            self.commit_failures += 1
            self._log.warning(
                "commit_failed",
                error=str(err),
                partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in offsets),
                commit_failures=self.commit_failures,
            )
            return False
        return True

    def due(self) -> bool:
        """Return True when a checkpoint may and should be written now."""
        return (
            self.lock is not None
            and self.in_sync
            and self.changed
            and time.monotonic() - self._written_at >= self._interval_s
        )

    async def write(
        self, *, global_version: int, last_update_round: int, state: dict[str, Any]
    ) -> bool:
        """Write the checkpoint of ``state``; return False when no checkpoint was written.

        Nothing is written when the read position of an assigned partition is unknown (see
        ``_cover_unread_partitions``) or the file cannot be written.

        The caller holds ``state_lock`` and the folder's lock, so nothing changes while the
        state is pickled in a worker thread.
        """
        path = self.path
        assert path is not None and self.lock is not None, "no checkpoint lock is held"
        if not await self._cover_unread_partitions():
            return False
        checkpoint = EdgeCheckpoint(
            site=self.site,
            fingerprint=self.fingerprint,
            global_version=global_version,
            last_update_round=last_update_round,
            offsets=dict(self.positions),
            pipeline=state,
            written_at=time.time(),
        )
        started = time.perf_counter()
        try:
            size = await asyncio.to_thread(write_checkpoint, path, checkpoint)
        except OSError as err:
            self._log.error("edge_checkpoint_write_failed", path=str(path), error=str(err))
            return False
        self._written_at = time.monotonic()
        self.changed = False
        self._log.info(
            "edge_checkpoint_written",
            bytes=size,
            seconds=round(time.perf_counter() - started, 3),
            global_version=global_version,
            offsets=offsets_for_log(checkpoint.offsets),
        )
        return True

    async def _cover_unread_partitions(self) -> bool:
        """Add the read position of each assigned partition that no batch has come from.

        The state contains no record of such a partition, so a restore must read it from
        where this process began. Without an offset in the checkpoint it would resume from
        the committed offset, which later batches may have moved past records that the
        checkpoint's state never saw. Returns False, with a warning, when a position is not
        known within ``edge.stop_timeout_s``, and then no checkpoint may be written.
        """
        if self.consumer is None:
            return True
        for tp in self.consumer.assignment():
            if tp in self.positions:
                continue
            try:
                offset = await asyncio.wait_for(self.consumer.position(tp), self._stop_timeout_s)
            except IllegalStateError:
                continue  # revoked since assignment(): another member reads it now
            except TimeoutError:
                self._log.warning(
                    "edge_checkpoint_skipped",
                    reason="position_unknown",
                    partition=f"{tp.topic}:{tp.partition}",
                    timeout_s=self._stop_timeout_s,
                )
                return False
            self.positions[tp] = offset
        return True

    async def write_on_stop(self, write: Callable[[], Awaitable[object]]) -> None:
        """Call ``write`` under ``state_lock`` when the state changed and is in sync.

        The wait for the lock takes at most ``edge.stop_timeout_s``, so a batch stuck on a
        broker that is down cannot block the stop.
        """
        if self.lock is None:
            return
        try:
            await asyncio.wait_for(self.state_lock.acquire(), self._stop_timeout_s)
        except TimeoutError:
            self._log.error(
                "edge_checkpoint_skipped", reason="state_busy", timeout_s=self._stop_timeout_s
            )
            return
        try:
            if not self.in_sync:
                # A cancelled step left records or training that ``positions`` do not cover.
                self._log.warning("edge_checkpoint_skipped", reason="batch_abandoned")
            elif self.changed:
                await write()
        finally:
            self.state_lock.release()

    def release(self) -> None:
        """Release the folder's lock, so that this process writes no more checkpoints."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def listener(self) -> ConsumerRebalanceListener:
        """Return the rebalance listener to pass to ``subscribe``."""
        return _RebalanceListener(self)

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        # Waiting for the lock lets the batch in progress finish. Its offsets are then committed
        # while this process is still a member of the generation that owns them.
        async with self.state_lock:
            if revoked and self.consumer is not None:
                await self.commit(revoked)
        self._log.info("partitions_revoked", partitions=offsets_for_log(dict.fromkeys(revoked, 0)))

    def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        """Seek every assigned partition the state has read to the state's next offset."""
        assert self.consumer is not None
        resumed: dict[TopicPartition, int] = {}
        for tp in assigned:
            offset = self.positions.get(tp)
            if offset is not None:
                self.consumer.seek(tp, offset)
                resumed[tp] = offset
        committed = sorted(f"{tp.topic}:{tp.partition}" for tp in assigned if tp not in resumed)
        self._log.info(
            "partitions_assigned", resumed=offsets_for_log(resumed), from_committed=committed
        )


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, manager: CheckpointManager) -> None:
        self._manager = manager

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        await self._manager.on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        self._manager.on_partitions_assigned(assigned)


def offsets_for_log(offsets: Mapping[TopicPartition, int]) -> dict[str, int]:
    return {f"{tp.topic}:{tp.partition}": offset for tp, offset in sorted(offsets.items())}
