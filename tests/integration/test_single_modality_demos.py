"""Single-modality demo runs on the real broker: BGL lines alone, and Nezha traces alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fanomad_stream.config import AppConfig, KafkaSettings
from fanomad_stream.demo_logs import load_demo_dataset, replay_and_evaluate
from fanomad_stream.demo_multimodal import run_on_broker
from fanomad_stream.replay.streams import LOGHUB_DIR, NEZHA_DIR, load_nezha_spans
from tests.conftest import make_config

pytestmark = pytest.mark.broker

BASELINE_ROWS = [
    "lstm_autoencoder (online, federated)",
    "random",
    "River HalfSpaceTrees (online)",
    "count-vector PCA (offline)",
]


@pytest.mark.skipif(not (LOGHUB_DIR / "BGL").is_dir(), reason="LogHub not found beside checkout")
@pytest.mark.timeout(120)
async def test_bgl_demo_scores_every_line(topics: KafkaSettings, tmp_path: Path) -> None:
    """Every replayed BGL line is scored once; the table has the detector and 3 baselines."""
    config = make_config(
        topics,
        edge={
            "group_prefix": f"edge-{topics.topic_prefix}",
            "max_batch_records": 100,
            "poll_timeout_ms": 200,
            "window_events": 150,
            "hst_window": 50,
            "threshold": {"warmup_events": 50},
        },
        logs={
            "state_dir": str(tmp_path),
            "model": {"kind": "lstm_autoencoder", "hidden": [16, 4], "window": 8, "seed": 3},
        },
        aggregator={"quorum": 1, "round_deadline_s": 20},
        log_demo={"limit": 400, "lines_per_window": 20, "timeout_s": 60},
    )
    dataset = load_demo_dataset(config)
    assert dataset.labels is not None
    anomalous = int(dataset.labels.sum())

    result = await replay_and_evaluate(config, dataset, progress=False)

    assert result.lines == 400
    assert result.scored == 400
    assert [row.scorer for row in result.rows] == BASELINE_ROWS
    for row in result.rows:
        assert (row.lines, row.line_positives) == (400, anomalous)
        assert row.windows == 20
        assert 0.0 <= row.line_auroc <= 1.0
        assert 0.0 <= row.window_pr_auc <= 1.0
    detector, random, hst, _pca = result.rows
    assert detector.decided
    assert not random.decided
    assert hst.line_auroc != 0.5  # HST sent scores that are not all equal
    assert result.global_version >= 1


@pytest.mark.skipif(not NEZHA_DIR.is_dir(), reason="Nezha data not found beside checkout")
@pytest.mark.timeout(120)
async def test_nezha_traces_alone(topics: KafkaSettings, tmp_path: Path) -> None:
    """With nezha.modalities [traces] only traces run, every trace is scored, baselines set."""
    config = make_config(
        topics,
        edge={
            "group_prefix": f"edge-{topics.topic_prefix}",
            "max_batch_records": 300,
            "poll_timeout_ms": 200,
            "hst_window": 30,
            "threshold": {"warmup_events": 30},
        },
        logs={"state_dir": str(tmp_path / "state")},
        traces={"timeout_s": 5.0},
        aggregator={"quorum": 1, "round_deadline_s": 20, "model_name": "nezha"},
        nezha={"modalities": ["traces"], "timeout_s": 60},
        output_dir=str(tmp_path / "out"),
    )
    # Every span: the first few thousand in start order fall in no fault case.
    spans, _ = load_nezha_spans()
    traces = len({span.trace_id for span in spans})

    assert await run_on_broker(config) == 0

    rows = json.loads((tmp_path / "out" / "multimodal.json").read_text())
    assert [row["modality"] for row in rows] == ["traces"]
    (row,) = rows
    assert row["events"] == traces
    assert 0 < row["positives"] < traces
    assert 0.0 <= row["random_pr_auc"] <= 1.0
    assert 0.0 <= row["hst_pr_auc"] <= 1.0
    assert "| traces |" in (tmp_path / "out" / "multimodal.md").read_text()


HDFS_SESSIONS = LOGHUB_DIR / "HDFS_sessions_deeplog"


def _hdfs_config(topics: KafkaSettings, tmp_path: Path, model: dict[str, object]) -> AppConfig:
    session_mlp = model["kind"] == "mlp_autoencoder"
    return make_config(
        topics,
        edge={
            "group_prefix": f"edge-{topics.topic_prefix}",
            "max_batch_records": 300,
            "poll_timeout_ms": 200,
            "window_events": 100 if session_mlp else 1000,
            "hst_window": 50,
            "threshold": {"warmup_events": 50, "quantile": 0.97},
        },
        logs={
            "state_dir": str(tmp_path),
            "n_buckets": 256,
            "window_s": 100_000,
            "session_end_event": "end" if session_mlp else None,
            "model": model,
        },
        aggregator={"quorum": 2, "round_deadline_s": 20},
        log_demo={
            "dataset": "hdfs_sessions",
            "single_stream": False,
            "sites": 2,
            "sessions": {
                "warmup_sessions": 300 if session_mlp else 60,
                "normal_sessions": 200 if session_mlp else 40,
                "anomalous_sessions": 30 if session_mlp else 10,
                "concurrency": 10,
            },
            "timeout_s": 90,
        },
    )


@pytest.mark.skipif(not HDFS_SESSIONS.is_dir(), reason="DeepLog sessions not found beside checkout")
@pytest.mark.timeout(150)
async def test_hdfs_sessions_scored_per_session_by_two_sites(
    topics: KafkaSettings, tmp_path: Path
) -> None:
    """The session MLP scores each block once at its end line, on two federated sites."""
    config = _hdfs_config(
        topics,
        tmp_path,
        {"kind": "mlp_autoencoder", "hidden": [32, 8], "local_epochs": 5, "seed": 7},
    )
    dataset = load_demo_dataset(config)
    assert dataset.labels is not None

    result = await replay_and_evaluate(config, dataset, progress=False)

    assert result.lines == 530  # sessions, warm-up included
    assert result.scored == 530
    assert result.global_version >= 1  # quorum 2: both sites sent updates
    assert [row.scorer for row in result.sessions] == [
        "mlp_autoencoder (online, federated)",
        *BASELINE_ROWS[1:],
    ]
    detector, random, hst, pca = result.sessions
    for row in result.sessions:
        assert (row.sessions, row.anomalous) == (230, 30)
    assert detector.decided and not random.decided
    # Template counts separate HDFS blocks well: PCA reaches about 0.99 on these sessions.
    assert pca.auroc_max > 0.9
    assert detector.auroc_max > 0.8, detector
    assert hst.auroc_max != 0.5


@pytest.mark.skipif(not HDFS_SESSIONS.is_dir(), reason="DeepLog sessions not found beside checkout")
@pytest.mark.timeout(150)
async def test_hdfs_sessions_lstm_scores_every_line(topics: KafkaSettings, tmp_path: Path) -> None:
    """The LSTM scores every line of the interleaved blocks; sessions fold its line scores."""
    config = _hdfs_config(
        topics,
        tmp_path,
        {
            "kind": "lstm_autoencoder",
            "hidden": [16, 4],
            "window": 8,
            "train_prefixes": True,
            "seed": 3,
        },
    )
    dataset = load_demo_dataset(config)

    result = await replay_and_evaluate(config, dataset, progress=False)

    assert result.lines == len(dataset.records)
    assert result.scored == result.lines
    assert result.global_version >= 1
    assert [row.sessions for row in result.sessions] == [50] * 4
    assert all(row.anomalous == 10 for row in result.sessions)
