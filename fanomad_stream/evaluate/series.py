"""Per-source score series and per-round training history, saved beside the evaluation.

``evaluation.json`` contains metrics only. The report also needs what the metrics were computed
from: each source's scores, thresholds, alerts and labels in event order, the baselines' scores
on the same rows, and what every federated round did. They are written as ``series.npz``
(arrays, no pickle) and ``rounds.json``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from fanomad_stream.config import KafkaSettings
from fanomad_stream.transport.reader import read_topic

log = structlog.get_logger(__name__)

SERIES_FILE = "series.npz"
ROUNDS_FILE = "rounds.json"
UNLABELLED = -1
# The edge publishes float64 max as the threshold while it warms up, because the score schema
# requires finite values. Anything this large is stored as NaN, which plots leave blank.
WARMUP_THRESHOLD = 1e300

Series = dict[str, dict[str, np.ndarray]]


@dataclass(frozen=True)
class RoundRecord:
    """One closed federated round as the topics recorded it.

    ``train_loss`` is the mean of the ``train_loss`` values that the round's folded clients
    reported with their updates (NaN when none did). ``epsilon`` is the largest epsilon spent
    that the privacy ledger or the updates reported for the round, or None without privacy
    accounting.
    """

    round: int
    version: int
    clients: list[str]
    train_loss: float
    epsilon: float | None


def source_arrays(
    index: np.ndarray,
    score: np.ndarray,
    threshold: np.ndarray,
    alert: np.ndarray,
    labels: dict[int, int],
    baselines: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Pack one source's series; ``label`` is -1 on rows without a label (the train half)."""
    threshold = np.where(threshold >= WARMUP_THRESHOLD, np.nan, threshold)
    arrays = {
        "index": np.asarray(index, dtype=np.int64),
        "score": np.asarray(score, dtype=np.float64),
        "threshold": np.asarray(threshold, dtype=np.float64),
        "alert": np.asarray(alert, dtype=bool),
        "label": np.array([labels.get(int(i), UNLABELLED) for i in index], dtype=np.int8),
    }
    for name, values in baselines.items():
        arrays[f"score_{name}"] = np.asarray(values, dtype=np.float64)
    return arrays


def save_series(out_dir: Path, series: Series) -> Path:
    path = out_dir / SERIES_FILE
    flat = {
        f"{source}/{name}": array for source, by in series.items() for name, array in by.items()
    }
    np.savez_compressed(path, **flat)  # type: ignore[arg-type]
    return path


def load_series(path: Path) -> Series:
    """Read ``series.npz`` back into {source: {array name: array}}."""
    series: Series = defaultdict(dict)
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            source, _, name = key.rpartition("/")
            series[source][name] = data[key]
    return dict(series)


def save_rounds(out_dir: Path, rounds: list[RoundRecord]) -> Path:
    path = out_dir / ROUNDS_FILE
    rows = [asdict(r) | {"train_loss": _json_float(r.train_loss)} for r in rounds]
    path.write_text(json.dumps(rows, indent=2))
    return path


def load_rounds(path: Path) -> list[RoundRecord]:
    rows = json.loads(path.read_text())
    return [
        RoundRecord(
            round=row["round"],
            version=row["version"],
            clients=list(row["clients"]),
            train_loss=float("nan") if row["train_loss"] is None else float(row["train_loss"]),
            epsilon=row["epsilon"],
        )
        for row in rows
    ]


async def collect_rounds(kafka: KafkaSettings, model_name: str) -> list[RoundRecord]:
    """Rebuild the round history from ``fl.global``, ``fl.updates`` and ``privacy.ledger``."""
    globals_ = await read_topic(kafka, "fl.global", frozenset({"global"}))
    updates = await read_topic(kafka, "fl.updates", frozenset({"update"}))
    ledger = await read_topic(kafka, "privacy.ledger", frozenset({"ledger"}))

    # NOTE: every version is keyed by the model name on a compacted topic, so once the broker
    # compacts a segment only the newest version survives and older rounds drop out here.
    # A key of the form ``name@version`` (as the topic catalog allows) is read as well.
    closed: dict[int, dict[str, Any]] = {}
    for item in globals_:
        body = item.envelope.body
        if item.key.split("@")[0] == model_name and body["version"] > 0:
            closed[body["version"]] = body

    # A client that re-sent its update (after a restart) is counted once, with its last loss.
    losses: dict[int, dict[str, float]] = defaultdict(dict)
    reported_epsilon: dict[int, list[float]] = defaultdict(list)
    for item in updates:
        body = item.envelope.body
        if isinstance(body.get("train_loss"), int | float):
            losses[body["round"]][body["client_id"]] = float(body["train_loss"])
        epsilon = (body.get("privacy") or {}).get("epsilon")
        if isinstance(epsilon, int | float):
            reported_epsilon[body["round"]].append(float(epsilon))
    for item in ledger:
        epsilon = item.envelope.body.get("epsilon")
        if isinstance(epsilon, int | float) and "round" in item.envelope.body:
            reported_epsilon[item.envelope.body["round"]].append(float(epsilon))

    rounds = []
    for version in sorted(closed):
        body = closed[version]
        clients = [str(c) for c in body["clients"]]
        folded = [losses[body["round"]][c] for c in clients if c in losses[body["round"]]]
        finite = [v for v in folded if math.isfinite(v)]
        epsilons = reported_epsilon.get(body["round"])
        rounds.append(
            RoundRecord(
                round=int(body["round"]),
                version=int(version),
                clients=clients,
                train_loss=float(np.mean(finite)) if finite else float("nan"),
                epsilon=max(epsilons) if epsilons else None,
            )
        )
    log.info("rounds_collected", rounds=len(rounds), updates=len(updates), ledger=len(ledger))
    return rounds


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None
