"""The model factory, the per-modality config and the logs and traces pipelines, offline."""

from __future__ import annotations

import numpy as np
import pytest

from fanomad_stream.config import AppConfig, ModelSettings, parse_config
from fanomad_stream.detect.autoencoder import build_model, get_weights
from fanomad_stream.detect.factory import build_detector, initial_weights
from fanomad_stream.detect.sequence import LSTMAutoencoderDetector, TransformerAutoencoderDetector
from fanomad_stream.edge.modalities import Incoming, LogsPipeline, TracesPipeline
from fanomad_stream.errors import ConfigError
from fanomad_stream.featurize.trace_assembly import Span
from fanomad_stream.modalities import modality_config
from fanomad_stream.replay.logs import LogRecord
from fanomad_stream.replay.streams import NEZHA_DIR, load_nezha_metrics


def _config(**sections: object) -> AppConfig:
    return parse_config(dict(sections))


def test_factory_builds_each_kind() -> None:
    lstm = build_detector(ModelSettings(kind="lstm_autoencoder", n_features=6, hidden=[8, 2]))
    transformer = build_detector(
        ModelSettings(kind="transformer_autoencoder", n_features=6, hidden=[8, 2], n_heads=2)
    )
    assert isinstance(lstm, LSTMAutoencoderDetector)
    assert isinstance(transformer, TransformerAutoencoderDetector)
    assert lstm.hidden == 8
    assert lstm.latent == 2
    assert transformer.d_model == 8


def test_factory_mlp_matches_build_model() -> None:
    """Version 0 of an MLP federation is the same as before the factory existed."""
    settings = ModelSettings(n_features=5, hidden=[4, 2], seed=11)
    expected = get_weights(build_model(5, [4, 2], 11))
    weights = initial_weights(settings)
    assert weights.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(weights[name], expected[name])


def test_factory_seeded_weights_repeat() -> None:
    settings = ModelSettings(kind="lstm_autoencoder", n_features=4, hidden=[8, 2], seed=5)
    first, second = initial_weights(settings), initial_weights(settings)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def test_config_rejects_unknown_kind() -> None:
    with pytest.raises(ConfigError, match=r"model\.kind"):
        _config(model={"kind": "gru_autoencoder"})


@pytest.mark.parametrize(
    ("modality", "kind", "width"),
    [
        ("logs", "lstm_autoencoder", 10 + 2),
        ("logs", "mlp_autoencoder", 10 + 4),
        ("traces", "mlp_autoencoder", 11 + 6),
        ("traces", "transformer_autoencoder", 4 + 3),
    ],
)
def test_modality_config_width(modality: str, kind: str, width: int) -> None:
    config = _config(
        logs={"n_buckets": 10, "model": {"kind": kind}},
        traces={"n_edge_buckets": 6, "n_service_buckets": 3, "model": {"kind": kind}},
    )
    view = modality_config(config, modality)  # type: ignore[arg-type]
    assert view.model.kind == kind
    assert view.model.n_features == width
    assert view.aggregator.model_name == f"smd-ae-{modality}"


def test_modality_config_metrics_unchanged() -> None:
    config = _config()
    assert modality_config(config, "metrics") is config


def test_modality_config_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        modality_config(_config(), "audio")  # type: ignore[arg-type]


def _lines(n: int, sources: int = 2) -> list[Incoming]:
    items = []
    for i in range(n):
        text = f"request {i % 3} served in {i} ms" if i % 7 else f"disk {i} failed"
        record = LogRecord(ts=1000.0 + i, source=f"node-{i % sources}", line=text, level="INFO")
        items.append(Incoming(record, i, 0, i))
    return items


def test_logs_sequence_scores_every_line_once() -> None:
    config = modality_config(
        _config(
            edge={"window_events": 50, "threshold": {"warmup_events": 10}},
            logs={"n_buckets": 8, "model": {"kind": "lstm_autoencoder", "window": 4}},
        ),
        "logs",
    )
    pipeline = LogsPipeline(config, None)
    scored = pipeline.process(_lines(30)) + pipeline.process([])
    assert sorted(s.index for s in scored) == list(range(30))
    assert all(np.isfinite(s.score) for s in scored)
    assert {s.key for s in scored} == {"node-0", "node-1"}
    assert pipeline.contexts["node-0"].seen == 15
    assert pipeline.window_ready() is False
    delta, n = pipeline.train_window()
    assert n > 0
    assert any(np.abs(v).sum() > 0 for v in delta.values())


def test_logs_mlp_scores_closed_windows() -> None:
    config = modality_config(
        _config(logs={"n_buckets": 8, "window_s": 10.0, "model": {"kind": "mlp_autoencoder"}}),
        "logs",
    )
    pipeline = LogsPipeline(config, None)
    scored = pipeline.process(_lines(40, sources=1))
    # 40 lines one second apart from t=1000 span windows [1000, 1010) ... [1030, 1040)
    assert len(scored) == 3
    assert [s.detail["lines"] for s in scored] == [10, 10, 10]
    assert len(pipeline.flush()) == 1


def _span(trace: str, span: str, parent: str, start_s: float, service: str = "svc-a") -> Span:
    return Span(trace, span, parent, service, "GET /x", int(start_s * 1e6), 1000)


def test_traces_clock_per_partition() -> None:
    """A partition read ahead in time does not make another partition's spans late."""
    config = modality_config(_config(traces={"timeout_s": 5.0, "root_grace_s": 0.5}), "traces")
    pipeline = TracesPipeline(config)
    ahead = [Incoming(_span("t-late", "r", "", 100.0), 0, 1, 0)]
    behind = [
        Incoming(_span("t-early", "r", "", 1.0), 1, 0, 0),
        Incoming(_span("t-early", "c", "r", 1.0005, "svc-b"), 2, 0, 1),
    ]
    assert pipeline.process(ahead) == []
    assert pipeline.process(behind) == []
    scored = pipeline.flush()
    assert sorted(s.key for s in scored) == ["t-early", "t-late"]
    assert pipeline.counters().late_spans == 0
    early = next(s for s in scored if s.key == "t-early")
    assert early.detail["spans"] == 2
    assert early.index == 1
    assert early.service in {"svc-a", "svc-b"}
    assert np.isfinite(early.detail["hst"])


def test_traces_advance_closes_idle_traces() -> None:
    config = modality_config(_config(traces={"timeout_s": 2.0}), "traces")
    pipeline = TracesPipeline(config)
    pipeline.process([Incoming(_span("t1", "c", "missing-root", 10.0), 0, 0, 0)])
    assert pipeline.advance(1_000_000) == []
    closed = pipeline.advance(1_500_000)
    assert [s.key for s in closed] == ["t1"]
    assert closed[0].detail["closed_by"] == "timeout"


def test_traces_late_span_leaves_no_entry() -> None:
    config = modality_config(_config(traces={"timeout_s": 1.0}), "traces")
    pipeline = TracesPipeline(config)
    pipeline.process([Incoming(_span("t1", "r", "", 1.0), 0, 0, 0)])
    closed = pipeline.process([Incoming(_span("t2", "r", "", 10.0), 1, 0, 1)])
    assert [s.key for s in closed] == ["t1"]
    assert pipeline.process([Incoming(_span("t1", "c", "r", 1.5), 2, 0, 2)]) == []
    assert pipeline.counters().late_spans == 1
    assert "t1" not in pipeline._first


@pytest.mark.skipif(not NEZHA_DIR.is_dir(), reason="Nezha data not found beside the checkout")
def test_nezha_metric_keys_unique() -> None:
    """Both days have a pod per service, and (service, index) still names one row."""
    rows = load_nezha_metrics(NEZHA_DIR, margin_s=60.0)
    keys = {
        (service, int(index)) for service, index in zip(rows.services, rows.indices, strict=True)
    }
    assert len(keys) == len(rows.services)
    assert (np.diff(rows.ts) >= 0).all()
    assert rows.values.shape == (len(rows.services), 18)
    assert 0 < rows.labels.sum() < len(rows.services)


@pytest.mark.skipif(not NEZHA_DIR.is_dir(), reason="Nezha data not found beside the checkout")
def test_nezha_metric_label_at_minute_middle() -> None:
    """A row counts at the middle of the minute it sums up (case injected at 13:31:54)."""
    rows = load_nezha_metrics(NEZHA_DIR, margin_s=60.0)
    contacts = np.array([service == "ts-contacts-service" for service in rows.services])
    ts, labels = rows.ts[contacts], rows.labels[contacts]
    # 2023-01-29 13:32:10 sums up 13:31:10-13:32:10, mostly before the injection
    assert labels[ts == 1674999130.0].tolist() == [0]
    # 2023-01-29 13:33:09 sums up the first whole faulty minute
    assert labels[ts == 1674999189.0].tolist() == [1]
