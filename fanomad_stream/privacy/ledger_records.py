"""Reading ``privacy.ledger`` back, so a restarted service keeps the ε it already spent.

A ``PrivacyLedger`` lives in memory. Without this step a restarted aggregator (or edge client
with DP-SGD) would start again from ε = 0 and could spend its budget a second time. Every
released round is on the topic as a ``ledger`` record with ``status: round`` and the noise
multiplier, sampling rate and step count of that round, so the history can be rebuilt.

Services publish a round's ledger record before what it accounts for (the aggregator's new
version, the edge client's update). A service killed in between leaves a record of a round that
was not released, which can only overcount ε. The aggregator drops records whose ``version`` is
above its newest published version, because it releases that round again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fanomad_stream.config import KafkaSettings
from fanomad_stream.privacy.accountant import PrivacyLedger
from fanomad_stream.transport.reader import read_topic


async def read_ledger_records(kafka: KafkaSettings, key: str) -> list[dict[str, Any]]:
    """Return the bodies of the ``privacy.ledger`` records keyed ``key``, oldest first."""
    records = await read_topic(kafka, "privacy.ledger", frozenset({"ledger"}))
    return [record.envelope.body for record in records if record.key == key]


def restore_ledger(ledger: PrivacyLedger, bodies: Iterable[Mapping[str, Any]]) -> int:
    """Record every released round of ``bodies`` into an empty ``ledger``; return the count.

    Records are identified by their cumulative round count (``params.rounds``), so a record
    read twice is recorded once. ``training_stopped`` records are skipped: whether training
    may go on follows from the rebuilt history and the budget configured now.
    """
    if ledger.rounds:
        msg = f"restore_ledger needs an empty ledger; this one has {ledger.rounds} rounds"
        raise ValueError(msg)
    seen: set[int] = set()
    for body in bodies:
        params = body["params"]
        count = int(params["rounds"])
        if body.get("status") != "round" or count in seen or params["noise_multiplier"] is None:
            continue
        seen.add(count)
        ledger.record_round(
            round_id=int(body["round"]),
            noise_multiplier=float(params["noise_multiplier"]),
            sampling_rate=float(params["sampling_rate"]),
            steps=int(params["steps"]),
        )
    return len(seen)
