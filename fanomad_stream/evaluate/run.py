"""``fanomad-stream evaluate``: join published scores with labels and compare with baselines.

Everything is computed on the labelled (test) rows of each source and then averaged over
sources. The baselines run in the same call on the same records:

- ``random``: seeded uniform scores;
- ``l2``: L2 norm of the row standardized by the edge's streaming scaler;
- ``hst``: River HalfSpaceTrees alone (the score the edge computed beside the autoencoder);
- ``local``: the edge pipeline re-run offline on the replayed metric records, each source
  training only its own model (no federation), in the edge's scoring mode.

The ``local`` baseline's operating threshold is the edge pipeline's own; every other
baseline's comes from the edge's online quantile rule. All are fitted on past scores only.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from fanomad_stream.config import AppConfig
from fanomad_stream.detect.factory import build_threshold
from fanomad_stream.edge.pipeline import EdgePipeline
from fanomad_stream.evaluate.metrics import DetectionMetrics, evaluate_scores
from fanomad_stream.evaluate.series import (
    RoundRecord,
    Series,
    collect_rounds,
    save_rounds,
    save_series,
    source_arrays,
)
from fanomad_stream.transport.reader import read_topic

log = structlog.get_logger(__name__)

DETECTORS = ("system", "local", "hst", "l2", "random")
TABLE_COLUMNS = ("auroc", "pr_auc", "best_f1", "f1_operating")


@dataclass
class SourceSeries:
    index: np.ndarray
    score: np.ndarray
    threshold: np.ndarray
    alert: np.ndarray
    hst: np.ndarray
    l2: np.ndarray


@dataclass
class Evaluation:
    per_source: dict[str, dict[str, DetectionMetrics]] = field(default_factory=dict)
    scores_total: int = 0
    labels_total: int = 0
    # What the report plots: per-source series and the round history (not in the JSON).
    series: Series = field(default_factory=dict)
    rounds: list[RoundRecord] = field(default_factory=list)

    def mean(self, detector: str, column: str) -> float:
        values = [getattr(m[detector], column) for m in self.per_source.values() if detector in m]
        values = [v for v in values if not math.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    def mean_pa_f1(self, detector: str) -> float:
        return self.mean(detector, "pa_f1")

    def as_dict(self) -> dict[str, Any]:
        return {
            "scores_total": self.scores_total,
            "labels_total": self.labels_total,
            "mean": {d: {c: self.mean(d, c) for c in (*TABLE_COLUMNS, "pa_f1")} for d in DETECTORS},
            "per_source": {
                s: {d: m.as_dict() for d, m in by.items()} for s, by in self.per_source.items()
            },
        }


def online_decisions(scores: np.ndarray, config: AppConfig, batch: int) -> np.ndarray:
    """Apply the edge's threshold rule to a score series in arrival order."""
    rule = build_threshold(config.edge.threshold)
    thresholds = (
        np.concatenate(
            [rule.thresholds_for(scores[i : i + batch]) for i in range(0, scores.shape[0], batch)]
        )
        if scores.shape[0]
        else np.empty(0)
    )
    return scores > thresholds


def local_only_scores(values: np.ndarray, config: AppConfig) -> np.ndarray:
    """Re-run the edge pipeline on one source without federation; return its scores."""
    return local_only_run(values, config)[0]


def local_only_run(values: np.ndarray, config: AppConfig) -> tuple[np.ndarray, np.ndarray]:
    """Re-run the edge pipeline on one source without federation; return scores and alerts.

    The pipeline scores in the edge's mode (``edge.scoring``) and decides alerts with the
    edge's own threshold, fitted on past scores only.
    """
    pipeline = EdgePipeline(config.model.n_features, config.edge, config.model, with_hst=False)
    batch = config.edge.max_batch_records
    scores, alerts = [], []
    for start in range(0, values.shape[0], batch):
        result = pipeline.process("local", values[start : start + batch])
        scores.append(result.score)
        alerts.append(result.alert)
        if pipeline.window_ready():
            pipeline.train_window()
    if not scores:
        return np.empty(0), np.empty(0, dtype=bool)
    return np.concatenate(scores), np.concatenate(alerts)


async def evaluate(config: AppConfig, *, with_local: bool = True) -> Evaluation:
    """Read scores, labels and (for the local baseline) metrics, and compute every metric."""
    kafka = config.kafka
    scores = await read_topic(kafka, "scores", frozenset({"score"}))
    labels = await read_topic(kafka, "labels", frozenset({"label"}))
    series = _score_series(scores)
    truth: dict[str, dict[int, int]] = defaultdict(dict)
    for item in labels:
        truth[item.key][item.envelope.body["index"]] = item.envelope.body["label"]
    values = await _metric_values(config) if with_local else {}

    result = Evaluation(scores_total=len(scores), labels_total=len(labels))
    ks = tuple(config.evaluation.precision_at_k)
    batch = config.edge.max_batch_records
    for source, s in sorted(series.items()):
        if source not in truth:
            continue
        labelled = np.array([i in truth[source] for i in s.index])
        y = np.array([truth[source][i] for i in s.index[labelled]], dtype=np.int8)
        rng = np.random.default_rng(config.evaluation.seed)
        candidates: dict[str, tuple[np.ndarray, np.ndarray]] = {
            "system": (s.score, s.alert),
            "hst": (s.hst, online_decisions(s.hst, config, batch)),
            "l2": (s.l2, online_decisions(s.l2, config, batch)),
        }
        random_scores = np.asarray(rng.random(s.score.shape[0]), dtype=np.float64)
        candidates["random"] = (random_scores, online_decisions(random_scores, config, batch))
        if source in values:
            candidates["local"] = local_only_run(values[source][s.index], config)
        result.per_source[source] = {
            name: evaluate_scores(y, score[labelled], decided[labelled], ks)
            for name, (score, decided) in candidates.items()
        }
        baselines = {name: score for name, (score, _) in candidates.items() if name != "system"}
        result.series[source] = source_arrays(
            s.index, s.score, s.threshold, s.alert, truth[source], baselines
        )
        log.info(
            "source_evaluated", source=source, labelled=int(labelled.sum()), positives=int(y.sum())
        )
    result.rounds = await collect_rounds(kafka, config.aggregator.model_name)
    return result


def _score_series(scores: list[Any]) -> dict[str, SourceSeries]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in scores:
        grouped[item.key].append(item.envelope.body)
    out = {}
    for source, bodies in grouped.items():
        bodies.sort(key=lambda b: b["index"])
        out[source] = SourceSeries(
            index=np.array([b["index"] for b in bodies]),
            score=np.array([b["score"] for b in bodies]),
            threshold=np.array([b["threshold"] for b in bodies], dtype=np.float64),
            alert=np.array([b["alert"] for b in bodies], dtype=bool),
            hst=np.array([b["detail"]["hst"] for b in bodies]),
            l2=np.array([b["detail"]["l2"] for b in bodies]),
        )
    return out


async def _metric_values(config: AppConfig) -> dict[str, np.ndarray]:
    records = await read_topic(config.kafka, "metrics.raw", frozenset({"metric"}))
    grouped: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for item in records:
        grouped[item.key][item.envelope.body["index"]] = item.envelope.body["values"]
    out = {}
    for source, rows in grouped.items():
        width = config.model.n_features
        matrix = np.zeros((max(rows) + 1, width), dtype=np.float32)
        for i, row in rows.items():
            matrix[i] = row
        out[source] = matrix
    return out


def render_markdown(evaluation: Evaluation, config: AppConfig) -> str:
    """Return the evaluation table (means over sources) and the system's confusion matrix."""
    k = config.evaluation.precision_at_k[0] if config.evaluation.precision_at_k else None
    header = "| detector | AUROC | PR-AUC | best F1 | F1 @ operating threshold |"
    header += f" P@{k} |" if k else ""
    header += " point-adjusted F1 (inflated, for comparison only) |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for detector in DETECTORS:
        if not any(detector in m for m in evaluation.per_source.values()):
            continue
        cells = [f"{evaluation.mean(detector, c):.3f}" for c in TABLE_COLUMNS]
        if k:
            pk = [
                m[detector].precision_at_k[k]
                for m in evaluation.per_source.values()
                if detector in m
            ]
            cells.append(f"{float(np.nanmean(pk)):.3f}")
        cells.append(f"{evaluation.mean_pa_f1(detector):.3f}")
        lines.append(f"| {detector} | " + " | ".join(cells) + " |")
    confusion: dict[str, int] = defaultdict(int)
    for metrics in evaluation.per_source.values():
        for key, count in metrics["system"].confusion.items():
            confusion[key] += count
    lines += [
        "",
        f"Sources: {len(evaluation.per_source)}; scores read: {evaluation.scores_total}; "
        f"labels read: {evaluation.labels_total}. Metrics are point-wise on labelled rows, "
        "averaged over sources.",
        f"System confusion at the operating threshold (all sources): TP {confusion['tp']}, "
        f"FP {confusion['fp']}, FN {confusion['fn']}, TN {confusion['tn']}.",
    ]
    return "\n".join(lines)


def write_outputs(evaluation: Evaluation, config: AppConfig, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "evaluation.json", out_dir / "evaluation.md"
    json_path.write_text(json.dumps(evaluation.as_dict(), indent=2, default=_jsonable))
    md_path.write_text(render_markdown(evaluation, config) + "\n")
    save_series(out_dir, evaluation.series)
    save_rounds(out_dir, evaluation.rounds)
    return json_path, md_path


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
